"""The whole pipeline as one job: ``rsna19 run`` (index → convert → folds → train × fold → predict → stack → submit)."""

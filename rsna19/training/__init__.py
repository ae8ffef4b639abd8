"""One trainer for every model family (docs/architecture.md, "Training")."""

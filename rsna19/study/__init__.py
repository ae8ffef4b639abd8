"""New studies: bundles of a finished run, the study predictor, ``rsna19 predict-study`` and ``rsna19 evaluate``."""

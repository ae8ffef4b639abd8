"""Model inputs: folds, HU windows, augmentation and datasets over the conversion cache."""

"""The data layer: folds, readers for the real layouts, the synthetic dataset, filters, episodes, transforms."""

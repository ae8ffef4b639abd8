"""Pictures: curves and tables of a run, conversion previews, the per-study report."""

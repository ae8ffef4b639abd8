"""Shared names and numbers, errors, typed configs, atomic writes, metrics and study-level calibration."""

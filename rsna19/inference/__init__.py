"""Prediction with trained base models."""

"""Analyses of a model's attention on captured q/k/v: pure NumPy, no framework import."""

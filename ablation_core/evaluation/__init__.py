"""Measuring patches: model-side gaps on any model, the toy world's classifier evaluation, and image grids."""

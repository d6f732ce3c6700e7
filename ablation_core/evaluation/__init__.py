"""Measuring patches: model-side gaps on any model, the toy world's classifier evaluation, image grids, and the CLIP
figures of ``clip/`` on any model with a CLIP model the user downloaded."""

"""Ablation patches: the weight-delta format, its files, applying it to a model, merging, importing and caching.

``patch``: ``AblationPatch`` / ``LayerDelta`` and low-rank compression; ``files``: checked loading and atomic saving;
``apply``: matching keys to a model, the base-model fingerprint, applying and removing; ``merge``, ``importers``,
``cache``.
"""

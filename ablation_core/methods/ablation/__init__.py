"""Concept Ablation (Kumari et al., ICCV 2023): fine-tune a parameter group so the target behaves like its anchor.

``settings`` holds the defaults, presets and per-family settings; ``loop`` the training pipeline; ``adapters`` the
trainable weight changes; ``objectives`` the losses; ``check`` the held-out measure of how much the run changed.
"""

"""Flux.1 and other flow-matching transformers: the network, its text encoders and its file layouts."""

"""Models as the core sees them: families, configs, key names, the tokenizer, layer groups, loading and sampling.

``view.ModelView`` is the one interface every backend implements (encode prompts, predict noise, list the weights a
parameter group trains); ``sampling`` draws latents from any view. Nothing here knows about methods or patches.
"""

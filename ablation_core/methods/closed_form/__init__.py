"""Closed-form erasure (UCE / MACE's refinement / SPEED): edit every cross-attention K/V projection in one solve.

No training and no images: the text embeddings of each target, in many prompt contexts (its tokens and every token
after them), are mapped onto what the original weights give for the anchor's, while the outputs for a preserved set
of concepts are kept, either as a least-squares penalty (UCE, MACE) or as a hard constraint (the edit lives in the
null space of the preserved embeddings, as SPEED and AlphaEdit do). ``settings`` holds the request and its
per-family defaults, ``embeddings`` collects aligned embedding pairs, ``solve`` turns them into a patch.
"""

"""Image-level figures of a patch on the user's own model, read by a CLIP model the user downloaded (no fetching):
CLIP accuracy of target against anchor, CLIP score, and the neighbours' KID with its noise floor."""

from .metrics import kid
from .model import ClipScorer, load_clip
from .prompts import builtin_neighbours, clip_prompt_sets
from .report import ClipEvaluation, DrawFn, Sampling, estimate_cost, evaluate_clip, score_with_clip, view_drawer

__all__ = ["ClipEvaluation", "ClipScorer", "DrawFn", "Sampling", "builtin_neighbours", "clip_prompt_sets",
           "estimate_cost", "evaluate_clip", "kid", "load_clip", "score_with_clip", "view_drawer"]

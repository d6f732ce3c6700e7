"""The A1111 tab's backend, for A1111 and Forge alike: ``view`` sees A1111's ``shared.sd_model`` as a ``ModelView``
(``backends.forge`` sees Forge's own objects; ``A1111Host.view`` picks); ``flows`` run the methods for the tab and
save patches into the Lora folder; ``library`` is the tab's patch browser.
A1111 itself is never imported here: the tab (``scripts/concept_ablation.py``) hands in what the flows need."""

from .flows import METHODS, ROBUST_HELP, STORAGE, A1111Host, RunOutcome, TabRequest, run_request
from .library import COLUMNS, PatchEntry, describe, list_patches
from .progress import RunProgress
from .view import A1111ModelView, a1111_family, loras_unmerged

__all__ = ["COLUMNS", "METHODS", "ROBUST_HELP", "STORAGE", "A1111Host", "A1111ModelView", "PatchEntry", "RunOutcome",
           "RunProgress", "TabRequest", "a1111_family", "describe", "list_patches", "loras_unmerged",
           "run_request"]

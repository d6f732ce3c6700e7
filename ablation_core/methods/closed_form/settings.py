"""What a closed-form erasure is asked to do, and the defaults that suit each model family.

Targets come with one shared anchor or one anchor each. The preserved set is a built-in bank of everyday concepts
(objects, animals, people, styles, and the bare templates) plus the anchors and the user's own list; on the toy
model it is every toy concept that is not a target, in the toy world's own phrasing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from ...errors import AblationError, PromptError
from ...models.families import FAMILIES
from ..prompts import Kind, check_kinds, check_pair

MODES = ("least-squares", "null-space")
MODE_HELP = {
    "least-squares": "keep preserved concepts with a least-squares penalty (UCE/MACE); strongest erasure",
    "null-space": "edit only where preserved concepts have no embedding (SPEED): they cannot change",
}
PRESERVED_WORDS = (
    "person", "man", "woman", "child", "face", "cat", "dog", "bird", "fish", "horse", "car", "house", "tree",
    "flower", "city", "street", "mountain", "river", "sea", "forest", "sky", "building", "table", "chair", "food",
    "fruit", "boat", "train", "airplane", "bicycle", "book", "phone", "computer", "shoe", "hat", "ball", "toy",
    "photo", "painting", "drawing", "sketch", "illustration", "cartoon", "watercolor", "oil painting",
    "digital art", "3d render", "portrait", "landscape", "art",
)
PRESERVED_TEMPLATES = ("a photo of a {}", "a painting of a {}", "{}", "an image of a {}")
DEFAULTS: dict[str, dict[str, object]] = {
    "real": {"kind": "object", "mode": "least-squares", "preserve_weight": 0.5, "ridge": 1e-3,
             "null_space_tolerance": 1e-6, "prompts_per_target": 24, "preserve_focus": 0},
    "toy": {"kind": "object", "mode": "least-squares", "preserve_weight": 0.5, "ridge": 1e-3,
            "null_space_tolerance": 1e-6, "prompts_per_target": 64, "preserve_focus": 0},
}
DEFAULTS["flux"], DEFAULTS["toy-flux"] = DEFAULTS["real"], DEFAULTS["toy"]


@dataclass(frozen=True)
class ClosedFormConfig:
    """One closed-form erasure; fields left ``None`` get the family's defaults from ``resolve_closed_form``."""

    targets: tuple[str, ...]
    anchors: tuple[str, ...]
    preserve: tuple[str, ...] = ()
    kind: Kind | None = None
    pair_kinds: tuple[Kind, ...] | None = None
    mode: str | None = None
    preserve_weight: float | None = None
    ridge: float | None = None
    null_space_tolerance: float | None = None
    prompts_per_target: int | None = None
    preserve_focus: int | None = None
    builtin_preserve: bool = True
    preserved_prompts: tuple[str, ...] | None = None
    anchor_prompts: tuple[tuple[str, ...], ...] | None = None
    robust_rounds: int = 0
    seed: int = 0
    extra_metadata: dict[str, str] = field(default_factory=dict)

    def pairs(self) -> list[tuple[str, str]]:
        anchors = self.anchors * len(self.targets) if len(self.anchors) == 1 else self.anchors
        return list(zip(self.targets, anchors))

    def kinds(self) -> list[Kind]:
        """The kind of each target: ``pair_kinds`` where they differ (styles and objects in one list), else ``kind``."""
        return list(self.pair_kinds) if self.pair_kinds else [self.kind] * len(self.targets)  # type: ignore[list-item]

    def describe(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra_metadata"}


def make_closed_form_config(targets: list[str] | tuple[str, ...] | str, anchors: list[str] | tuple[str, ...] | str,
                            **overrides: object) -> ClosedFormConfig:
    """Targets with one shared anchor or one anchor each; checks the pairing and the settings' names."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    anchors = (anchors,) if isinstance(anchors, str) else tuple(anchors)
    if not targets:
        raise PromptError("no targets: name at least one concept to erase")
    if not anchors:
        raise PromptError("no anchor: name what the targets should become (one anchor, or one per target)")
    if len(anchors) not in (1, len(targets)):
        raise PromptError(f"{len(targets)} target(s) but {len(anchors)} anchors: give one anchor for all targets or "
                          "one per target")
    pairs = [check_pair(t, a) for t, a in zip(targets, anchors * len(targets) if len(anchors) == 1 else anchors)]
    unknown = set(overrides) - {f.name for f in fields(ClosedFormConfig)}
    if unknown:
        raise AblationError(f"unknown setting(s) {', '.join(sorted(unknown))}")
    chosen = {k: v for k, v in overrides.items() if v is not None}
    if "preserve" in chosen:
        chosen["preserve"] = tuple(str(p).strip() for p in chosen["preserve"] if str(p).strip())
    return replace(ClosedFormConfig(tuple(t for t, _ in pairs), tuple(a for _, a in pairs) if len(anchors) > 1
                                    else (pairs[0][1],)), **chosen)


def parse_concept_lines(text: str, default_anchor: str | None = None,
                        separators: tuple[str, ...] = ("->", ",")) -> tuple[list[str], list[str]]:
    """Targets and anchors from lines of ``target -> anchor`` or ``target, anchor`` (or a bare ``target`` with
    ``default_anchor``); blank lines and lines starting with ``#`` are skipped. ``separators=("->",)`` keeps commas
    inside targets and anchors (whole prompts, "a person, fully clothed")."""
    targets, anchors = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        for separator in separators:
            if separator in line:
                target, anchor = (part.strip() for part in line.split(separator, 1))
                break
        else:
            target, anchor = line, (default_anchor or "").strip()
        if not anchor:
            raise PromptError(f"line {number} ('{line}') names no anchor: write 'target -> anchor', or give one "
                              "anchor for every target")
        targets.append(target)
        anchors.append(anchor)
    if not targets:
        raise PromptError("the concept list is empty: one 'target -> anchor' per line")
    return targets, anchors


def resolve_closed_form(config: ClosedFormConfig, family: str) -> ClosedFormConfig:
    """Every ``None`` field filled for ``family``; on the toy model, its own phrasing and its concepts."""
    profile = FAMILIES[family].settings_profile
    values = dict(DEFAULTS[profile])
    if FAMILIES[family].toy:
        config = _toy_choices(config)
    filled = {name: value for name, value in values.items() if getattr(config, name) is None}
    config = replace(config, **filled)
    if config.preserved_prompts is None:
        config = replace(config, preserved_prompts=tuple(_preserved_prompts(config)))
    check_closed_form(config)
    return config


def _preserved_prompts(config: ClosedFormConfig) -> list[str]:
    targets = {t.lower() for t in config.targets}
    # the built-in bank first, so its prompts fall into the same chunks whatever the anchors (``MomentCache``)
    words = [*(PRESERVED_WORDS if config.builtin_preserve else ()), *config.preserve, *dict.fromkeys(config.anchors)]
    words = [w for w in dict.fromkeys(words) if w.lower() not in targets]
    return [template.format(word) for word in words for template in PRESERVED_TEMPLATES]


def _toy_choices(config: ClosedFormConfig) -> ClosedFormConfig:
    from ...toy import prompts as toy_prompts

    targets = tuple(t.lower().strip() for t in config.targets)
    anchors = tuple(a.lower().strip() for a in config.anchors)
    for role, name in [("target", t) for t in targets] + [("anchor", a) for a in anchors]:
        if not toy_prompts.is_toy_concept(name):
            raise PromptError(f"the toy model does not know the {role} '{name}'; it knows "
                              f"{', '.join(toy_prompts.KNOWN)}")
    pair_kinds = tuple(toy_prompts.kind_of(t) for t in targets)
    kind = config.kind or pair_kinds[0]
    mixed = config.kind is None and config.pair_kinds is None and len(set(pair_kinds)) > 1
    pairs = list(zip(targets, anchors * len(targets) if len(anchors) == 1 else anchors))
    anchor_prompts = config.anchor_prompts or tuple(tuple(toy_prompts.anchor_prompts(a, "train")) for _, a in pairs)
    preserved = config.preserved_prompts
    if preserved is None:
        kept = [c for c in (*config.preserve, *toy_prompts.KNOWN) if c not in targets]
        preserved = tuple(p for c in dict.fromkeys(kept) for p in toy_prompts.captions_of(c, "train")
                          if not any(t in p for t in targets))
    return replace(config, targets=targets, anchors=anchors, kind=kind, anchor_prompts=anchor_prompts,
                   preserved_prompts=preserved, pair_kinds=pair_kinds if mixed else config.pair_kinds)


def check_closed_form(config: ClosedFormConfig) -> None:
    if config.mode not in MODES:
        raise AblationError(f"unknown closed-form mode {config.mode!r}; choose one of {', '.join(MODES)}")
    check_kinds(config.kind, config.pair_kinds, len(config.targets))
    if not 0 <= float(config.preserve_weight) < 1e6:
        raise AblationError(f"the preserve weight must be 0 or more (got {config.preserve_weight})")
    if not 0 < float(config.ridge) < 1e3:
        raise AblationError(f"the ridge must be a small positive number (got {config.ridge})")
    if not 0 < float(config.null_space_tolerance) < 1:
        raise AblationError(f"the null-space tolerance must be between 0 and 1 (got {config.null_space_tolerance})")
    if int(config.robust_rounds) < 0:
        raise AblationError(f"robust rounds cannot be negative (got {config.robust_rounds})")
    if not 0 <= int(config.preserve_focus) <= 50:
        raise AblationError(f"the preserve focus is a number of extra solves, 0 to 50 (got {config.preserve_focus})")
    if int(config.prompts_per_target) < 1:
        raise AblationError("prompts per target must be at least 1")
    if len({t.lower() for t in config.targets}) != len(config.targets):
        raise PromptError("a target is listed twice")

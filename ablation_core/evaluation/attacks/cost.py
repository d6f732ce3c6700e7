"""What the attacks will cost, in UNet evaluations, printed before they start (as the CLIP evaluation prints its own).

A sampled image costs one evaluation per solver step, two with classifier-free guidance. A training or search step
costs one evaluation per image in its batch (with its backward pass); scoring a token candidate, one per image of
its task. Each attack prepares once on the unpatched model, then runs twice (unpatched and patched). Variants keep
only the candidates that drew the target, so their figure is an upper bound.
"""

from __future__ import annotations

from ...models.sampling import unguided
from ...models.view import ModelView
from .soft_prompt import SoftPromptBudget
from .token_search import TokenSearchBudget
from .variants import VariantsBudget, candidate_prompts
from .world import TOY_WORLD, AttackWorld


def per_image(view: ModelView, world: AttackWorld) -> int:
    """UNet evaluations of one sampled image."""
    return world.steps * (1 if (view.guidance_input or unguided(world.guidance)) else 2)


def variants_cost(budget: VariantsBudget, target: str, seed: int, image: int, world: AttackWorld) -> int:
    families = candidate_prompts(target, budget, seed, world)
    screened = sum(len(found) for found in families.values()) * budget.screen
    return (screened + 2 * budget.per_family * len(families)) * image


def soft_prompt_cost(budget: SoftPromptBudget, image: int) -> int:
    return budget.images * image + 2 * (budget.steps * budget.batch_size + budget.samples * image)


def token_search_cost(budget: TokenSearchBudget, image: int) -> int:
    prepare = budget.prompts * budget.images * (image + 1)
    search = budget.images + budget.iterations * (budget.images_per_gradient + (budget.candidates + 1) * budget.images)
    return prepare + 2 * (budget.prompts * search + budget.samples * image)


def attack_costs(view: ModelView, names: list[str], budgets: dict, target: str, seed: int = 0,
                 world: AttackWorld = TOY_WORLD) -> dict[str, int]:
    """UNet evaluations per named attack (``budgets[name]`` its budget), before and after together."""
    image, target = per_image(view, world), target.lower().strip()
    found = {}
    for name in names:
        budget = budgets[name]
        if name == "variants":
            found[name] = variants_cost(budget, target, seed, image, world)
        elif name == "soft-prompt":
            found[name] = soft_prompt_cost(budget, image)
        else:
            found[name] = token_search_cost(budget, image)
    return found


def describe_attack_cost(costs: dict[str, int]) -> str:
    parts = ", ".join(f"{name} {count:,}" for name, count in costs.items())
    return (f"attacks' cost: at most {sum(costs.values()):,} UNet evaluations ({parts}; training and search steps "
            "also run backward)")

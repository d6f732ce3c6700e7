"""The adversary: searches for a conditioning that makes a (patched) model draw the target again.

Both searches minimise the diffusion loss of the model as it is (patched or not) on images of the target that the
unpatched model drew, as the attacks of the literature do:
  - ``invert_embedding``: textual inversion (Circumventing Concept Erasure): one new token embedding per text
    encoder, read at a placeholder word, trained with Adam on those images (each encoder's rate scaled to the spread
    of its token table);
  - ``search_tokens``: a discrete search over the whole vocabulary (UnlearnDiffAtk, P4D): from the target prompt,
    each iteration ranks every token at each searched position by the loss gradient with respect to a one-hot choice
    (HotFlip), tries a batch of single-token swaps from the top ranks on the same noisy images, and keeps the best.
The evaluation measures how often the results bring the target back; robust erasure erases them too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...models.sampling import sample_latents
from ...models.view import Conditioning, ModelView
from .token_hook import END_TOKEN, START_TOKEN, embedding_tables, encode_ids, encode_with, initial_vector, prompt_ids

StepFn = Callable[[int, int, float], None]
EVAL_CHUNK = 64


@dataclass
class Inversion:
    vectors: list[Tensor]
    losses: list[float]


@dataclass
class TokenSearch:
    ids: list[int]
    positions: list[int]
    losses: list[float]


def draw_images(view: ModelView, prompts: list[str], count: int, steps: int, guidance: float, seed: int,
                batch_size: int = 64, latent_size: int | None = None) -> tuple[Tensor, Tensor]:
    """``count`` images of ``prompts`` (in turn) from the model as it is, and each image's prompt index."""
    index = torch.arange(count) % len(prompts)
    return sample_latents(view, prompts, index, steps, guidance, batch_size, seed, latent_size), index


def _noised(view: ModelView, latents: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Noisy images at random timesteps, and what the network should predict for them (the noise-based target)."""
    x0 = latents.to(view.device, view.dtype)
    t = torch.randint(0, view.schedule.steps, (len(x0),), generator=generator).to(view.device)
    noise = torch.randn(x0.shape, generator=generator).to(view.device, view.dtype)
    return view.schedule.noisy(x0, noise, t), t, view.schedule.noise_target(x0, noise)


CLIP_EMBEDDING_STD = 0.02  # the spread of CLIP's token table (its initialisation) that learning rates are set for


def embedding_scales(view: ModelView) -> list[float]:
    """Each text encoder's token-table spread against CLIP's. Adam moves each coordinate by about the learning rate
    per step whatever the gradient's size, so a rate set for CLIP's table (std 0.02) hardly moves a vector in T5's
    (std about 1 in the toy, larger in T5-XXL): the rate is scaled by the table's own spread."""
    return [max(float(table.float().std()) / CLIP_EMBEDDING_STD, 1e-3) for table in embedding_tables(view)]


def invert_embedding(view: ModelView, latents: Tensor, prompts: list[str], init_words: str, steps: int,
                     learning_rate: float, batch_size: int, seed: int, on_step: StepFn | None = None) -> Inversion:
    """Textual inversion: the placeholder embedding that best denoises ``latents`` (image ``i`` captioned
    ``prompts[i]``, each carrying the placeholder word) on the model as it is; starts from ``init_words``."""
    generator = torch.Generator().manual_seed(seed)
    vectors = [v.to(view.device).requires_grad_(True) for v in initial_vector(view, init_words)]
    optimizer = torch.optim.Adam([{"params": [vector], "lr": learning_rate * scale}
                                  for vector, scale in zip(vectors, embedding_scales(view))])
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            pick = torch.randint(len(latents), (batch_size,), generator=generator)
            x_t, t, wanted = _noised(view, latents[pick], generator)
            cond = encode_with(view, [prompts[i] for i in pick.tolist()], vectors)
            loss = F.mse_loss(view.predict(x_t, t, cond).float(), wanted.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step + 1, steps, losses[-1])
    return Inversion([v.detach() for v in vectors], losses)


def span_of(view: ModelView, prompt: str, words: str) -> list[int]:
    """Positions (in ``prompt_ids``) of the tokens of ``words`` inside ``prompt``; empty if it is not there."""
    ids, wanted = prompt_ids(view, prompt), view.token_ids(words)[0]
    for start in range(1, len(ids) - len(wanted)):
        if ids[start:start + len(wanted)] == wanted:
            return list(range(start, start + len(wanted)))
    return []


def search_start(view: ModelView, prompt: str, target: str, extra_tokens: int) -> tuple[list[int], list[int]]:
    """The target prompt's ids with ``extra_tokens`` more copies of the target's first token before it, and the
    positions the search may change: those copies and the target's own tokens."""
    ids = prompt_ids(view, prompt)
    span = span_of(view, prompt, target) or [len(view.token_ids(prompt)[0])]
    first = ids[span[0]]
    ids = ids[:span[0]] + [first] * extra_tokens + ids[span[0]:]
    ids = ids[:len(ids) - extra_tokens]
    if ids[-1] != END_TOKEN:
        ids[-1] = END_TOKEN
    return ids, list(range(span[0], span[-1] + 1 + extra_tokens))


@dataclass
class DenoisingTask:
    """Noisy images of the target and what the model should predict for them: the noise (the diffusion loss, as
    UnlearnDiffAtk) or the unpatched model's prediction for the target prompt (as P4D)."""

    x_t: Tensor
    t: Tensor
    wanted: Tensor


def denoising_task(view: ModelView, latents: Tensor, copies: int, seed: int) -> DenoisingTask:
    """Each image noised ``copies`` times at timesteps spread over the middle of the schedule (where prompts steer
    the content), fixed so that every candidate is scored on the same problem."""
    generator = torch.Generator().manual_seed(seed)
    x0 = latents.repeat(copies, 1, 1, 1).to(view.device, view.dtype)
    steps = view.schedule.steps
    t = torch.linspace(0.15 * steps, 0.85 * steps, len(x0)).long()[torch.randperm(len(x0), generator=generator)]
    noise = torch.randn(x0.shape, generator=generator).to(view.device, view.dtype)
    t = t.to(view.device)
    return DenoisingTask(view.schedule.noisy(x0, noise, t), t, view.schedule.noise_target(x0, noise))


@torch.no_grad()
def reference_task(view: ModelView, task: DenoisingTask, cond: Conditioning) -> DenoisingTask:
    """The same noisy images, now asking for what the model as it is predicts with ``cond`` (one prompt)."""
    batch = Conditioning(cond.context.expand(len(task.x_t), -1, -1), {k: v.expand(len(task.x_t), -1)
                                                                    for k, v in cond.extra.items()})
    return DenoisingTask(task.x_t, task.t, view.predict(task.x_t, task.t, batch).detach())


def _candidate_losses(view: ModelView, candidates: Tensor, task: DenoisingTask) -> Tensor:
    """The loss of each candidate id sequence on the whole task (no gradient)."""
    with torch.no_grad():
        cond = encode_ids(view, candidates)
        count, images = len(candidates), len(task.x_t)
        which = torch.arange(count).repeat_interleave(images)
        losses = []
        for start in range(0, len(which), EVAL_CHUNK):
            rows = which[start:start + EVAL_CHUNK]
            image = (torch.arange(start, start + len(rows)) % images).to(task.t.device)
            pred = view.predict(task.x_t[image], task.t[image], cond.select(rows))
            losses.append((pred.float() - task.wanted[image].float()).square().flatten(1).mean(1))
        return torch.cat(losses).view(count, images).mean(1).cpu()


def search_tokens(view: ModelView, task: DenoisingTask, start_ids: list[int], positions: list[int], iterations: int,
                  candidates: int, top_k: int, images_per_step: int, seed: int,
                  on_step: StepFn | None = None) -> TokenSearch:
    """Greedy coordinate-gradient search over the vocabulary for the tokens at ``positions`` that solve ``task``
    best on the model as it is. The current prompt is always one of the candidates, so the loss never rises."""
    generator = torch.Generator().manual_seed(seed)
    table = embedding_tables(view)[0]
    banned = torch.tensor([START_TOKEN, END_TOKEN])
    current = torch.tensor(start_ids)
    losses = [float(_candidate_losses(view, current[None].to(view.device), task)[0])]
    for step in range(iterations):
        if losses[-1] <= 0:  # the prompt already gives exactly what is wanted
            break
        pick = torch.randperm(len(task.x_t), generator=generator)[:images_per_step].to(task.t.device)
        one_hot = F.one_hot(current[positions], table.shape[0]).float().to(view.device)[None].requires_grad_(True)
        with torch.enable_grad():
            cond = encode_ids(view, current[None], one_hot, positions)
            batch = Conditioning(cond.context.expand(len(pick), -1, -1), cond.extra)
            loss = F.mse_loss(view.predict(task.x_t[pick], task.t[pick], batch).float(), task.wanted[pick].float())
            loss.backward()
        scores = -one_hot.grad[0].float().cpu()
        scores[:, banned] = -torch.inf
        ranked = scores.topk(min(top_k, scores.shape[1]), dim=1).indices
        where = torch.randint(len(positions), (candidates,), generator=generator)
        choice = ranked[where, torch.randint(ranked.shape[1], (candidates,), generator=generator)]
        trial = current.repeat(candidates + 1, 1)
        trial[torch.arange(1, candidates + 1), torch.tensor(positions)[where]] = choice
        scored = _candidate_losses(view, trial.to(view.device), task)
        best = int(scored.argmin())
        current = trial[best].cpu()
        losses.append(float(scored[best]))
        if on_step is not None:
            on_step(step + 1, iterations, losses[-1])
    return TokenSearch(current.tolist(), positions, losses)


def decode_ids(view: ModelView, ids: list[int]) -> str:
    """A readable form of a token id sequence (start, end and padding dropped), for reports."""
    tokenizers = getattr(view, "tokenizers", None)
    kept = [i for i in ids if i not in (START_TOKEN, END_TOKEN)]
    if tokenizers:
        return tokenizers[0].decode(kept)
    return " ".join(str(i) for i in kept)

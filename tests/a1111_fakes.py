"""Small fakes of the A1111 pieces the extension touches, with the same names and methods as the real ones.

- ``FakeSDModel``: ``shared.sd_model`` of A1111 for SD1 (``LatentDiffusion``: ``model.diffusion_model``, the hijacked
  ``cond_stage_model`` with ``tokenize``, ``get_learned_conditioning``, ``alphas_cumprod``, ``decode_first_stage``)
  and SDXL (``DiffusionEngine``: ``conditioner.embedders``, conditioning as a dict with ``crossattn`` and ``vector``),
  over a tiny LDM-named UNet;
- ``FakeState``: ``shared.state`` (job, steps, ``textinfo``, ``interrupt()``);
- ``FakeNetworks``: the built-in Lora extension's ``networks`` module, and ``merge_lora`` to leave a LoRA of "the last
  generation" added into the weights the way it does (original in ``network_weights_backup``, restored on the
  module's next forward once no LoRA is wanted);
- ``a1111_lora_target``: the built-in extension's rule for finding the module a LoRA key changes (``networks.py``);
- ``install``: fake ``modules.*`` packages and a recording fake ``gradio``, for loading ``scripts/`` as A1111 does.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
import types
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from ablation_core.models.sampling import sd_alphas_cumprod
from ablation_core.models.tokenizer import sd_clip_tokenizer
from tests.comfy_fakes import CONTEXT_DIM, TinyLDMUNet

ADM_CHANNELS = CONTEXT_DIM + 16


class FakeEmbeddingsWithFixes(nn.Module):
    """A1111's textual-inversion wrapper around the vocabulary embedding (``sd_hijack.EmbeddingsWithFixes``)."""

    def __init__(self, wrapped: nn.Embedding):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.wrapped(input_ids)


class FakeCLIPEmbedder(nn.Module):
    """A1111's ``FrozenCLIPEmbedderWithCustomWords``: ``wrapped.transformer`` is the HF text model, ``tokenize``
    gives ids without start/end tokens, calling it with prompts gives ``[B, 77, dim]``."""

    def __init__(self, hidden: int = CONTEXT_DIM, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.wrapped = nn.Module()
        self.wrapped.transformer = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=16))
        transformer = self.wrapped.transformer
        embeddings = getattr(transformer, "text_model", transformer).embeddings
        embeddings.token_embedding = FakeEmbeddingsWithFixes(embeddings.token_embedding)
        self.tokenizer = sd_clip_tokenizer()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), truncation=False, add_special_tokens=False)["input_ids"]

    def forward(self, texts: list[str]) -> Tensor:
        ids = self.tokenizer(list(texts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        return self.wrapped.transformer(ids).last_hidden_state


class FakeConditioner(nn.Module):
    """SDXL's ``GeneralConditioner`` with its two (hijacked) text embedders."""

    def __init__(self, seed: int = 0):
        super().__init__()
        half = CONTEXT_DIM // 2
        self.embedders = nn.ModuleList([FakeCLIPEmbedder(half, seed), FakeCLIPEmbedder(half, seed + 1)])
        self.pooled = nn.Linear(half, ADM_CHANNELS)

    def forward(self, texts: list[str]) -> dict[str, Tensor]:
        first, second = (embedder(texts) for embedder in self.embedders)
        return {"crossattn": torch.cat([first, second], dim=-1), "vector": self.pooled(second[:, -1])}


class FakeSDModel(nn.Module):
    """``shared.sd_model`` (SD1 ``LatentDiffusion`` or SDXL ``DiffusionEngine``) over a tiny LDM-named UNet."""

    def __init__(self, family: str = "sd1", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.is_sdxl, self.is_sd2, self.is_sd1, self.is_sd3 = family == "sdxl", family == "sd2", family == "sd1", False
        self.parameterization = "eps"
        self.model = nn.Module()
        self.model.diffusion_model = TinyLDMUNet(adm_channels=ADM_CHANNELS if self.is_sdxl else None)
        self.model.diffusion_model.in_channels = 4
        self.model.diffusion_model.channel_mult = (1,)  # the tiny UNet never halves the latents
        if self.is_sdxl:
            self.conditioner = FakeConditioner(seed)
            self.cond_stage_model = self.conditioner  # as A1111 sets it
        else:
            self.cond_stage_model = FakeCLIPEmbedder(seed=seed)
        self.first_stage_model = nn.Conv2d(4, 3, 1)
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod().float())
        self.sd_checkpoint_info = types.SimpleNamespace(name_for_extra=f"tiny_{family}", title=f"tiny_{family}")
        self.eval().requires_grad_(False)
        self.conditioning_sizes: list[tuple[int, int]] = []

    def get_learned_conditioning(self, prompts: list[str]):
        self.conditioning_sizes.append((getattr(prompts, "width", 0), getattr(prompts, "height", 0)))
        return self.conditioner(prompts) if self.is_sdxl else self.cond_stage_model(prompts)

    def decode_first_stage(self, z: Tensor) -> Tensor:
        return torch.tanh(self.first_stage_model(z)).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def model_weights(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer, copied (to check a model is bit-identical later)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class FakeState:
    """``shared.state``: what the progress API reads, plus Interrupt. ``interrupt_on`` interrupts as soon as the run
    writes a ``textinfo`` containing that text (to press Interrupt in the middle of a phase)."""

    def __init__(self, interrupt_on: str | None = None):
        self.interrupt_on = interrupt_on
        self.texts: list[str] = []
        self.bar: list[tuple[int, int]] = []  # (sampling_step, sampling_steps) at each text: what the bar showed
        self.begin()

    def begin(self, job: str = "(unknown)") -> None:
        self.job, self.job_no, self.job_count = job, 0, 0
        self.sampling_step = self.sampling_steps = 0
        self.interrupted = self.stopping_generation = self.skipped = False
        self.textinfo = None
        self.time_start = time.time()

    def end(self) -> None:
        self.job, self.job_count = "", 0

    def interrupt(self) -> None:
        self.interrupted = True

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "textinfo" and value:
            self.texts.append(value)
            self.bar.append((self.sampling_step, self.sampling_steps))
            if self.interrupt_on and self.interrupt_on in value:
                self.interrupted = True


class FakeNetworks(types.ModuleType):
    """The built-in Lora extension's ``networks`` module: the LoRAs of the current generation, the list refresh."""

    def __init__(self):
        super().__init__("networks")
        self.loaded_networks: list = []
        self.refreshed = 0

    def list_available_networks(self) -> None:
        self.refreshed += 1


def merge_lora(networks: FakeNetworks, modules: list[nn.Module], scale: float = 0.5) -> None:
    """Leave a LoRA added into ``modules`` as A1111 does after a generation with ``<lora:...>``: the original in
    ``network_weights_backup``, the wanted names in ``network_current_names``, and a forward pre-hook that puts the
    original back once no LoRA is wanted (A1111 patches ``Linear.forward`` to the same effect)."""
    names = (("last_generation", 1.0, 1.0, 1.0),)
    networks.loaded_networks.append(types.SimpleNamespace(name="last_generation", te_multiplier=1.0,
                                                          unet_multiplier=1.0, dyn_dim=1.0))

    def restore(module: nn.Module, args: tuple) -> None:
        wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in networks.loaded_networks)
        if module.network_current_names != wanted and not wanted:
            with torch.no_grad():
                module.weight.copy_(module.network_weights_backup)
            module.network_current_names = ()

    for module in modules:
        module.network_weights_backup = module.weight.detach().to("cpu", copy=True)
        with torch.no_grad():
            module.weight.add_(scale * torch.randn_like(module.weight))
        module.network_current_names = names
        module.register_forward_pre_hook(restore)


def a1111_lora_target(sd_model: nn.Module, key: str) -> nn.Module | None:
    """The module A1111's built-in Lora extension (v1.10 ``networks.load_network``) finds for a LoRA key, or None
    ("didn't match keys"): names are the model's module names with ``_`` for ``.``, under ``sd_model.model`` for the
    UNet; a ``lora_unet_`` key (LDM-named, as ours are) is tried with ``diffusion_model`` in its place."""
    mapping = {name.replace(".", "_"): module for name, module in sd_model.model.named_modules()}
    text_root = sd_model.conditioner if getattr(sd_model, "is_sdxl", False) else sd_model.cond_stage_model
    if getattr(sd_model, "is_sdxl", False):
        for i, embedder in enumerate(text_root.embedders):
            for name, module in getattr(embedder, "wrapped", embedder).named_modules():
                mapping[f"{i}_{name.replace('.', '_')}"] = module
    else:
        for name, module in getattr(text_root, "wrapped", text_root).named_modules():
            mapping[name.replace(".", "_")] = module
    found = mapping.get(key)
    if found is None and re.match(r"(.*)_([qkv]_proj)$", key):
        found = mapping.get(re.match(r"(.*)_([qkv]_proj)$", key).group(1))
    if found is None and "lora_unet" in key:
        found = mapping.get(key.replace("lora_unet", "diffusion_model"))
    elif found is None and "lora_te1_text_model" in key:
        found = mapping.get(key.replace("lora_te1_text_model", "0_transformer_text_model"))
    return found


# gradio and the modules package ---------------------------------------------------------------------------------

class Component:
    """Any gradio block or component: remembers its arguments and the events wired to it."""

    created: list[Component] = []

    def __init__(self, *args, **kwargs):
        self.kind, self.args, self.kwargs, self.events = type(self).__name__, args, kwargs, {}
        Component.created.append(self)

    def __enter__(self) -> Component:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def _event(self, name: str):
        def register(fn=None, inputs=None, outputs=None, _js=None, js=None, **kwargs):
            self.events[name] = {"fn": fn, "inputs": inputs or [], "outputs": outputs or [], "_js": _js, "js": js}
        return register

    def __getattr__(self, name: str):
        if name in ("click", "change", "select", "submit"):
            return self._event(name)
        raise AttributeError(name)


def fake_gradio() -> types.ModuleType:
    gradio = types.ModuleType("gradio")
    for name in ("Blocks", "Row", "Column", "Accordion", "Tab", "Textbox", "Dropdown", "Radio", "Number", "Checkbox",
                 "Button", "HTML", "Image", "Dataframe", "Markdown", "Slider"):
        setattr(gradio, name, type(name, (Component,), {}))
    gradio.update = lambda **kwargs: {"__type__": "update", **kwargs}
    return gradio


def install(monkeypatch, lora_dir: Path, sd_model: nn.Module | None, state: FakeState | None = None,
            networks: FakeNetworks | None = None) -> types.SimpleNamespace:
    """Fake ``modules.{script_callbacks,shared,paths,devices,call_queue}``, ``gradio`` and ``networks`` in
    ``sys.modules``; returns them with the registered tab callbacks."""
    state = state or FakeState()
    callbacks: list = []
    modules = types.ModuleType("modules")
    modules.__path__ = []
    script_callbacks = types.ModuleType("modules.script_callbacks")
    script_callbacks.on_ui_tabs = lambda callback, *, name=None: callbacks.append(callback)
    shared = types.ModuleType("modules.shared")
    shared.sd_model, shared.state = sd_model, state
    shared.opts = types.SimpleNamespace(samples_format="png")
    shared.cmd_opts = types.SimpleNamespace(lora_dir=str(lora_dir))
    paths = types.ModuleType("modules.paths")
    paths.models_path = str(Path(lora_dir).parent)
    devices = types.ModuleType("modules.devices")
    devices.autocast = contextlib.nullcontext
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.wrap_gradio_gpu_call = wrap_gradio_gpu_call_for(state)
    for module in (script_callbacks, shared, paths, devices, call_queue):
        setattr(modules, module.__name__.split(".")[-1], module)
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "gradio", fake_gradio())
    if networks is not None:
        monkeypatch.setitem(sys.modules, "networks", networks)
    Component.created = []
    return types.SimpleNamespace(shared=shared, state=state, callbacks=callbacks, networks=networks)


def wrap_gradio_gpu_call_for(state: FakeState):
    """A1111's ``call_queue.wrap_gradio_gpu_call``: state begins and ends around the call; an exception becomes
    ``extra_outputs`` plus an error message; the last output (HTML) gets the time taken appended."""
    def wrap(func, extra_outputs=None):
        def call(*args):
            state.begin(job=args[0] if args and str(args[0]).startswith("task(") else "(unknown)")
            try:
                result = list(func(*args))
            except Exception as err:
                result = list(extra_outputs or [None, ""]) + [f"<div class='error'>{type(err).__name__}: {err}</div>"]
            finally:
                state.end()
                state.interrupted = False
            result[-1] += "<div class='performance'>Time taken: 0.1 sec.</div>"
            return tuple(result)
        return call
    return wrap

"""Small fakes of Stable Diffusion WebUI Forge's model objects, shaped like the real ones (Forge main, 2025-06).

- ``ForgeDiffusionEngine``: ``shared.sd_model`` of Forge. Not an ``nn.Module``, no ``.model``, ``cond_stage_model``
  None; ``forge_objects.unet`` is a ``UnetPatcher`` whose ``.model`` is a ``KModel`` (``diffusion_model`` with LDM
  names, ``predictor`` with ``alphas_cumprod`` and ``prediction_type``, ``computation_dtype``, ``lora_loader``);
  ``get_learned_conditioning`` and ``decode_first_stage`` run under ``torch.inference_mode()``.
- The UNet's ``Linear`` is Forge's ``ForgeOperations.Linear``: a plain ``nn.Module``, not an ``nn.Linear``; its
  ``BasicTransformerBlock`` adds residuals in place (``x += n``); every weight is an inference tensor (the engine is
  built inside ``torch.inference_mode()``, as Forge's loader does).
- ``LoraLoader.refresh`` merges LoRA patches into the weights as Forge does (new parameters, originals in
  ``backup``) whenever ``memory_management.load_models_gpu`` loads a patcher with other patches.
- ``install``: the A1111 fakes plus ``modules.sd_models`` (lazy ``forge_model_reload``), ``modules_forge.main_thread``,
  ``backend.memory_management`` and gradio 4.
"""

from __future__ import annotations

import math
import sys
import threading
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablation_core.models.sampling import sd_alphas_cumprod
from tests import a1111_fakes
from tests.a1111_fakes import ADM_CHANNELS, FakeCLIPEmbedder
from tests.comfy_fakes import CHANNELS, CONTEXT_DIM


class Linear(nn.Module):
    """``backend.operations.ForgeOperations.Linear``: an ``nn.Module`` holding ``weight`` and ``bias``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        reference = nn.Linear(in_features, out_features, bias=bias)
        self.weight = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone()) if bias else None
        self.parameters_manual_cast = False

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim, dim, bias=False)
        self.to_v = Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None, value: Tensor | None = None, mask=None,
                transformer_options: dict | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(F.scaled_dot_product_attention(q, k, v))


class BasicTransformerBlock(nn.Module):
    """Forge's block: the residuals go in place after the norms have saved ``x``."""

    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.attn1, self.norm1 = CrossAttention(dim), nn.LayerNorm(dim)
        self.attn2, self.norm2 = CrossAttention(dim, context_dim), nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(Linear(dim, 2 * dim), nn.GELU(), Linear(2 * dim, dim))

    def forward(self, x: Tensor, context: Tensor | None = None, transformer_options: dict | None = None) -> Tensor:
        n = self.attn1(self.norm1(x), transformer_options=transformer_options)
        x += n
        n = self.attn2(self.norm2(x), context=context, transformer_options=transformer_options)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


class SpatialTransformer(nn.Module):
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, dim)
        self.proj_in = Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, context_dim)])
        self.proj_out = Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, transformer_options: dict | None = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2).contiguous())
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context, transformer_options=transformer_options)
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class IntegratedUNet2DConditionModel(nn.Module):
    """``backend.nn.unet.IntegratedUNet2DConditionModel`` in miniature, with its LDM module names."""

    def __init__(self, context_dim: int = CONTEXT_DIM, num_classes: str | None = None, channels: int = CHANNELS):
        super().__init__()
        self.in_channels, self.model_channels, self.channel_mult = 4, channels, (1,)
        self.num_classes = num_classes
        self.time_embed = nn.Sequential(Linear(channels, channels), nn.SiLU(), Linear(channels, channels))
        if num_classes is not None:
            self.label_emb = nn.Sequential(nn.Sequential(Linear(ADM_CHANNELS, channels), nn.SiLU(),
                                                         Linear(channels, channels)))
        self.input_blocks = nn.ModuleList([
            nn.ModuleList([nn.Conv2d(4, channels, 3, padding=1)]),
            nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1), SpatialTransformer(channels, context_dim)]),
        ])
        self.middle_block = nn.ModuleList([SpatialTransformer(channels, context_dim)])
        self.output_blocks = nn.ModuleList([
            nn.ModuleList([nn.Conv2d(2 * channels, channels, 3, padding=1), SpatialTransformer(channels, context_dim)]),
        ])
        self.out = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, 4, 3, padding=1))
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "attn2.to_v" in name or "attn2.to_out.0.weight" in name:
                    param.mul_(8.0)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None, control=None,
                transformer_options: dict | None = None, **kwargs) -> Tensor:
        assert (y is not None) == (self.num_classes is not None)
        half = self.model_channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / half)
        angles = timesteps.float()[:, None] * freqs[None]
        emb = self.time_embed(torch.cat([angles.cos(), angles.sin()], dim=1).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        h0 = self.input_blocks[0][0](x) + emb[:, :, None, None]
        h1 = self.input_blocks[1][1](self.input_blocks[1][0](h0), context, transformer_options)
        h = self.middle_block[0](h1, context, transformer_options)
        conv, transformer = self.output_blocks[0]
        return self.out(transformer(conv(torch.cat([h, h1], dim=1)), context, transformer_options))


# Patchers, memory management, LoRA ----------------------------------------------------------------------------

class Prediction(nn.Module):
    def __init__(self, prediction_type: str = "epsilon"):
        super().__init__()
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod().float())


class LoraLoader:
    """``backend.patcher.lora.LoraLoader``: merges patches into the weights, keeps the originals in ``backup``."""

    def __init__(self, model: nn.Module):
        self.model, self.backup, self.loaded_hash = model, {}, str([])

    @torch.inference_mode()
    def refresh(self, lora_patches: dict) -> None:
        hashes = str(list(lora_patches))
        if hashes == self.loaded_hash:
            return
        for key, weight in self.backup.items():
            _set_parameter(self.model, key, weight)
        self.backup = {}
        for patches in lora_patches.values():
            for key, delta in patches.items():
                weight = self.model.get_parameter(key)
                self.backup.setdefault(key, weight)
                _set_parameter(self.model, key, nn.Parameter(weight + delta, requires_grad=False))
        self.loaded_hash = hashes


def _set_parameter(model: nn.Module, key: str, value: nn.Parameter) -> None:
    owner, name = key.rsplit(".", 1)
    setattr(model.get_submodule(owner), name, value)


class KModel(nn.Module):
    def __init__(self, diffusion_model: nn.Module, prediction_type: str = "epsilon", storage_dtype=torch.float32):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor = Prediction(prediction_type)
        self.storage_dtype, self.computation_dtype = storage_dtype, torch.float32
        self.lora_loader = LoraLoader(self)


class ModelPatcher:
    def __init__(self, model: nn.Module):
        self.model, self.lora_patches = model, {}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.load_device = self.offload_device = torch.device("cpu")

    def clone(self) -> ModelPatcher:
        twin = type(self)(self.model)
        twin.lora_patches = dict(self.lora_patches)
        return twin

    def refresh_loras(self) -> None:
        self.model.lora_loader.refresh(self.lora_patches)


class MemoryManagement(types.ModuleType):
    """``backend.memory_management``: the loaded patchers, newest first; loading one unloads its clones and
    refreshes its LoRAs (which merges or restores weights). ``low_vram`` makes loading the text encoder unload the
    UNet, as Forge does when both do not fit."""

    def __init__(self):
        super().__init__("backend.memory_management")
        self.current_loaded_models: list = []
        self.loads: list = []
        self.low_vram = False

    def load_models_gpu(self, models: list) -> None:
        assert torch.is_inference_mode_enabled(), "Forge loads models inside inference mode"
        for patcher in models:
            if any(m.model is patcher for m in self.current_loaded_models):
                continue
            self.current_loaded_models = [m for m in self.current_loaded_models if m.model.model is not patcher.model]
            if self.low_vram:
                self.current_loaded_models = []
            self.current_loaded_models.insert(0, types.SimpleNamespace(model=patcher))
            self.loads.append(patcher)
            patcher.refresh_loras()

    def load_model_gpu(self, model) -> None:
        self.load_models_gpu([model])


# The engine ---------------------------------------------------------------------------------------------------

class ClassicTextProcessingEngine:
    """Tokenizes without start/end tokens and encodes a list of prompts."""

    def __init__(self, encoder: FakeCLIPEmbedder):
        self.text_encoder = encoder

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.text_encoder.tokenize(texts)

    def __call__(self, texts: list[str]) -> Tensor:
        return self.text_encoder(texts)


class ForgeDiffusionEngine:
    """``shared.sd_model`` of Forge for SD1 (``StableDiffusion``) or SDXL (``StableDiffusionXL``)."""

    def __init__(self, memory: MemoryManagement, family: str = "sd1", seed: int = 0, storage_dtype=torch.float32):
        torch.manual_seed(seed)
        self.memory = memory
        self.is_sd1, self.is_sdxl, self.is_sd2, self.is_sd3, self.is_inpaint = (family == "sd1", family == "sdxl",
                                                                                False, False, False)
        self.cond_stage_model = self.first_stage_model = None
        unet = IntegratedUNet2DConditionModel(num_classes="sequential" if self.is_sdxl else None)
        unet_patcher = ModelPatcher(KModel(unet.eval().requires_grad_(False), storage_dtype=storage_dtype))
        if self.is_sdxl:
            half = CONTEXT_DIM // 2
            encoders = [FakeCLIPEmbedder(half, seed), FakeCLIPEmbedder(half, seed + 1)]
            self.text_processing_engine_l, self.text_processing_engine_g = (ClassicTextProcessingEngine(e)
                                                                            for e in encoders)
            self.pooled = Linear(half, ADM_CHANNELS)
            text_model = nn.ModuleDict({"clip_l": encoders[0], "clip_g": encoders[1], "pooled": self.pooled})
        else:
            text_model = nn.ModuleDict({"clip_l": FakeCLIPEmbedder(seed=seed)})
            self.text_processing_engine = ClassicTextProcessingEngine(text_model["clip_l"])
        clip = types.SimpleNamespace(cond_stage_model=text_model.eval().requires_grad_(False),
                                     patcher=ModelPatcher(text_model))
        self.vae = nn.Conv2d(4, 3, 1)
        self.forge_objects = types.SimpleNamespace(unet=unet_patcher, clip=clip, vae=self.vae)
        self.forge_objects_original = types.SimpleNamespace(**vars(self.forge_objects))
        self.forge_objects_after_applying_lora = types.SimpleNamespace(**vars(self.forge_objects))
        self.sd_checkpoint_info = types.SimpleNamespace(name_for_extra=f"forge_{family}", title=f"forge_{family}")
        self.conditioning_sizes: list[tuple[int, int]] = []

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts: list[str]):
        self.memory.load_model_gpu(self.forge_objects.clip.patcher)
        self.conditioning_sizes.append((getattr(prompts, "width", 0), getattr(prompts, "height", 0)))
        if not self.is_sdxl:
            return self.text_processing_engine(prompts)
        first, second = self.text_processing_engine_l(prompts), self.text_processing_engine_g(prompts)
        return {"crossattn": torch.cat([first, second], dim=-1), "vector": self.pooled(second[:, -1])}

    @torch.inference_mode()
    def decode_first_stage(self, z: Tensor) -> Tensor:
        return torch.tanh(self.vae(z)).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


def build_engine(memory: MemoryManagement, family: str = "sd1", **kwargs) -> ForgeDiffusionEngine:
    """Built the way Forge's loader builds it: inside inference mode, so every weight is an inference tensor."""
    with torch.inference_mode():
        engine = ForgeDiffusionEngine(memory, family, **kwargs)
        for module in (engine.forge_objects.unet.model, engine.forge_objects.clip.cond_stage_model, engine.vae):
            for owner in list(module.modules()):
                for name, param in list(owner._parameters.items()):
                    if param is not None:
                        owner._parameters[name] = nn.Parameter(param.clone(), requires_grad=False)
    return engine


def merge_lora(engine: ForgeDiffusionEngine, scale: float = 0.5) -> None:
    """A generation with ``<lora:...>``: a patcher with LoRA patches on the K/V weights, loaded (merged)."""
    unet = engine.forge_objects_original.unet.clone()
    names = [n for n, _ in unet.model.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    unet.lora_patches = {("last_generation", 1.0): {n: scale * torch.randn_like(unet.model.get_parameter(n))
                                                    for n in names}}
    engine.forge_objects.unet = engine.forge_objects_after_applying_lora.unet = unet
    with torch.inference_mode():
        engine.memory.load_models_gpu([unet])


def unet_weights(engine: ForgeDiffusionEngine) -> dict[str, Tensor]:
    """The UNet's parameters as they are (the objects themselves, to check identity and values later)."""
    return dict(engine.forge_objects.unet.model.diffusion_model.named_parameters())


# Installing Forge's modules --------------------------------------------------------------------------------------

def install_memory(monkeypatch) -> MemoryManagement:
    """Forge's ``backend.memory_management`` in ``sys.modules`` (the view imports it when it loads the UNet)."""
    memory = MemoryManagement()
    backend = types.ModuleType("backend")
    backend.__path__ = []
    backend.memory_management = memory
    monkeypatch.setitem(sys.modules, "backend", backend)
    monkeypatch.setitem(sys.modules, "backend.memory_management", memory)
    return memory


def install(monkeypatch, lora_dir: Path, family: str = "sd1", state: a1111_fakes.FakeState | None = None,
            **engine_kwargs) -> types.SimpleNamespace:
    """The A1111 fakes with Forge's lazy model: ``shared.sd_model`` stays None until ``forge_model_reload`` (run
    on Forge's main thread) builds the engine."""
    env = a1111_fakes.install(monkeypatch, lora_dir, None, state)
    memory = install_memory(monkeypatch)
    model_data = types.SimpleNamespace(sd_model=None, get_sd_model=lambda: model_data.sd_model)

    @torch.inference_mode()
    def forge_model_reload():
        if model_data.sd_model is None:
            model_data.sd_model = build_engine(memory, family, **engine_kwargs)
        return model_data.sd_model, True

    sd_models = types.ModuleType("modules.sd_models")
    sd_models.forge_model_reload, sd_models.model_data = forge_model_reload, model_data
    modules_forge = types.ModuleType("modules_forge")
    modules_forge.__path__ = []
    main_thread = types.ModuleType("modules_forge.main_thread")
    main_thread.calls = []

    def run_and_wait_result(func, *args, **kwargs):
        """Runs ``func`` on another thread (Forge's main thread) and returns its result, None if it raised."""
        result: list = []
        worker = threading.Thread(target=lambda: result.append(func(*args, **kwargs)))
        worker.start()
        worker.join()
        main_thread.calls.append(func.__name__)
        return result[0] if result else None

    main_thread.run_and_wait_result = run_and_wait_result
    modules_forge.main_thread = main_thread
    sys.modules["modules"].sd_models = sd_models
    for name, module in (("modules.sd_models", sd_models), ("modules_forge", modules_forge),
                         ("modules_forge.main_thread", main_thread)):
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["gradio"].__version__ = "4.40.0"
    env.memory, env.model_data, env.main_thread = memory, model_data, main_thread
    return env

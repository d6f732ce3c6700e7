"""Small fakes of the ComfyUI pieces the nodes touch, with the same methods as the real ones.

``install(tmp_path)`` puts fake ``comfy.model_management``, ``comfy.utils``, ``folder_paths`` and ``server``
modules into ``sys.modules``. The fake ``ModelPatcher`` wraps a tiny UNet with LDM module names (as ComfyUI's
``diffusion_model`` has) and records ``add_patches`` like the real one; the fake ``CLIP`` wraps a tiny transformers
CLIP text model under ComfyUI's ``clip_l.transformer`` names and tokenizes with the real SD vocabulary.
"""

from __future__ import annotations

import enum
import math
import os
import sys
import types
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from ablation_core.models.sampling import sd_alphas_cumprod
from ablation_core.models.tokenizer import sd_clip_tokenizer

CONTEXT_DIM = 64
CHANNELS = 32


# A tiny UNet with LDM module names ---------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(F.scaled_dot_product_attention(q, k, v))


class BasicTransformerBlock(nn.Module):  # ComfyUI and A1111 (ldm) name it so; gradient checkpointing finds it by name
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, dim)
        self.attn2 = Attention(dim, context_dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x), self.norm1(x))
        return x + self.attn2(self.norm2(x), context)


class SpatialTransformer(nn.Module):
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, context_dim)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(x).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))


class TinyLDMUNet(nn.Module):
    """``input_blocks.1.1.transformer_blocks.0.attn2.to_k`` and friends, like ComfyUI's ``UNetModel``."""

    def __init__(self, context_dim: int = CONTEXT_DIM, adm_channels: int | None = None, channels: int = CHANNELS):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        if adm_channels:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_channels, channels), nn.SiLU(),
                                                         nn.Linear(channels, channels)))
        self.input_blocks = nn.ModuleList([
            nn.ModuleList([nn.Conv2d(4, channels, 3, padding=1)]),
            nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1), SpatialTransformer(channels, context_dim)]),
        ])
        self.middle_block = nn.ModuleList([SpatialTransformer(channels, context_dim)])
        self.output_blocks = nn.ModuleList([
            nn.ModuleList([nn.Conv2d(2 * channels, channels, 3, padding=1), SpatialTransformer(channels, context_dim)]),
        ])
        self.out = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, 4, 3, padding=1))
        self.channels = channels
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "attn2.to_v" in name or "attn2.to_out.0.weight" in name:
                    param.mul_(8.0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                transformer_options: dict | None = None, **kwargs) -> Tensor:
        half = self.channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / half)
        angles = timesteps.float()[:, None] * freqs[None]
        emb = self.time_embed(torch.cat([angles.cos(), angles.sin()], dim=1).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        h0 = self.input_blocks[0][0](x) + emb[:, :, None, None]
        h1 = self.input_blocks[1][1](self.input_blocks[1][0](h0), context)
        h = self.middle_block[0](h1, context)
        conv, transformer = self.output_blocks[0]
        h = transformer(conv(torch.cat([h, h1], dim=1)), context)
        return self.out(h)


def module_tree_from_state_dict(state: dict[str, Tensor]) -> nn.Module:
    """A module tree with these names holding these weights (no forward): 2-D weights become Linear, 4-D Conv2d."""
    root = nn.Module()
    for key in sorted(k for k in state if k.endswith(".weight")):
        path, weight = key[: -len(".weight")].split("."), state[key]
        parent = root
        for part in path[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        if weight.ndim == 2:
            leaf = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        elif weight.ndim == 4:
            leaf = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False)
        else:
            leaf = nn.Module()
            leaf.register_parameter("weight", nn.Parameter(weight.clone(), requires_grad=False))
            parent.add_module(path[-1], leaf)
            continue
        with torch.no_grad():
            leaf.weight.copy_(weight)
        parent.add_module(path[-1], leaf)
    return root


# ComfyUI model objects ---------------------------------------------------------------------------------------

class ModelType(enum.Enum):
    EPS = 1
    V_PREDICTION = 2
    FLOW = 6


class ModelSamplingDiscrete(nn.Module):
    def __init__(self):
        super().__init__()
        acp = sd_alphas_cumprod().float()
        self.register_buffer("sigmas", ((1 - acp) / acp) ** 0.5)
        self.register_buffer("log_sigmas", self.sigmas.log())

    def timestep(self, sigma: Tensor) -> Tensor:
        dists = sigma.log().to(self.log_sigmas.device)[:, None] - self.log_sigmas[None]
        return dists.abs().argmin(dim=1).view(sigma.shape).to(sigma.device)


class LatentFormat:
    latent_channels = 4
    scale_factor = 0.18215

    def __init__(self, latent_channels: int = 4):
        self.latent_channels = latent_channels

    def process_out(self, latent: Tensor) -> Tensor:
        return latent / self.scale_factor


class BaseModel(nn.Module):
    """``comfy.model_base.BaseModel`` as far as the backend uses it."""

    def __init__(self, diffusion_model: nn.Module, context_dim: int = CONTEXT_DIM, adm_channels: int | None = None,
                 model_type: ModelType = ModelType.EPS, latent_channels: int = 4):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_sampling = ModelSamplingDiscrete()
        self.latent_format = LatentFormat(latent_channels)
        self.model_type = model_type
        self.manual_cast_dtype = None
        self.model_config = types.SimpleNamespace(unet_config={"context_dim": context_dim, "channel_mult": (1,),
                                                               "adm_in_channels": adm_channels})
        self.adm_channels = adm_channels

    def get_dtype(self) -> torch.dtype:
        return next(self.diffusion_model.parameters()).dtype

    def encode_adm(self, pooled_output: Tensor, width: int = 768, height: int = 768, **kwargs) -> Tensor | None:
        if not self.adm_channels:
            return None
        size_ids = torch.tensor([[height, width]], dtype=pooled_output.dtype) / 1024
        extra = self.adm_channels - pooled_output.shape[-1] - 2
        return torch.cat([pooled_output, size_ids.repeat(len(pooled_output), 1),
                          torch.zeros(len(pooled_output), extra)], dim=1)


class ModelPatcher:
    """``comfy.model_patcher.ModelPatcher``: clones share the model; patches are recorded, never applied here."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.patches: dict[str, list] = {}
        self.backup: dict = {}
        self.weight_wrapper_patches: dict[str, list] = {}
        self.model_options: dict = {"transformer_options": {}}
        self.patches_uuid = uuid.uuid4()

    def clone(self) -> ModelPatcher:
        n = ModelPatcher(self.model)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.backup = self.backup
        n.weight_wrapper_patches = self.weight_wrapper_patches.copy()
        n.model_options = {k: (v.copy() if isinstance(v, dict) else v) for k, v in self.model_options.items()}
        return n

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        model_sd = self.model.state_dict()
        added = []
        for key, value in patches.items():
            if key in model_sd:
                self.patches.setdefault(key, []).append((strength_patch, value, strength_model, None, None))
                added.append(key)
        self.patches_uuid = uuid.uuid4()
        return added

    def add_weight_wrapper(self, name: str, function) -> None:
        self.weight_wrapper_patches[name] = self.weight_wrapper_patches.get(name, []) + [function]

    def model_state_dict(self, filter_prefix: str | None = None) -> dict[str, Tensor]:
        sd = self.model.state_dict()
        return {k: v for k, v in sd.items() if filter_prefix is None or k.startswith(filter_prefix)}

    def patched_weight(self, key: str) -> Tensor:
        """What ComfyUI's ``calculate_weight`` gives for "diff" patches: weight * strength_model + strength * diff."""
        weight = self.model.state_dict()[key].float().clone()
        for strength, value, strength_model, _, _ in self.patches.get(key, []):
            weight = weight * strength_model + strength * value[0].float()
        return weight


class CLIPLayer(nn.Module):
    """ComfyUI's ``comfy.clip_model.CLIPLayer``: residuals added in place, as ComfyUI does."""

    def __init__(self, dim: int):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = lambda x, mask, optimized_attention: x * 0.5  # stand-in for CLIPAttention
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, optimized_attention=None) -> Tensor:
        x += self.self_attn(self.layer_norm1(x), mask, optimized_attention)
        x += self.mlp(self.layer_norm2(x))
        return x


class ClipModel(nn.Module):
    """``cond_stage_model`` of SD1: the text encoder under ``clip_l.transformer`` (HF layers, then one ComfyUI-style
    in-place ``CLIPLayer``, which the toy world's CLIP goes without)."""

    def __init__(self, seed: int = 0, text_model: CLIPTextModel | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.clip_l = nn.Module()
        self.clip_l.transformer = nn.Module()  # ComfyUI's names: clip_l.transformer.text_model.embeddings...
        self.clip_l.transformer.text_model = text_model or CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=CONTEXT_DIM, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=32))
        if text_model is None:
            self.clip_l.transformer.comfy_layer = CLIPLayer(CONTEXT_DIM)


class CLIP:
    """``comfy.sd.CLIP``: tokenize to (id, weight) pairs in 77-token chunks, encode to (cond, pooled)."""

    def __init__(self, cond_stage_model: ClipModel | None = None, patcher: ModelPatcher | None = None):
        self.cond_stage_model = cond_stage_model or ClipModel()
        self.patcher = patcher or ModelPatcher(self.cond_stage_model)
        self.tokenizer = sd_clip_tokenizer()

    def clone(self) -> CLIP:
        return CLIP(self.cond_stage_model, self.patcher.clone())

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        ids = self.tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        return {"l": [[(int(i), 1.0) for i in ids]]}

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False, return_dict: bool = False):
        ids = torch.tensor([[t for t, _ in chunk] for chunk in tokens["l"]])
        transformer = self.cond_stage_model.clip_l.transformer
        out = transformer.text_model(ids)
        layer = getattr(transformer, "comfy_layer", None)
        hidden = layer(out.last_hidden_state) if layer is not None else out.last_hidden_state
        cond = hidden.reshape(1, -1, hidden.shape[-1])
        return (cond, out.pooler_output[:1]) if return_pooled else cond


class VAE:
    def decode(self, latents: Tensor) -> Tensor:
        images = torch.sigmoid(latents[:, :3]).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
        return images.movedim(1, -1)


def make_model(family: str = "sd1", seed: int = 0, model_type: ModelType = ModelType.EPS) -> ModelPatcher:
    torch.manual_seed(seed)
    adm = CONTEXT_DIM + 16 if family == "sdxl" else None
    unet = TinyLDMUNet(adm_channels=adm).eval().requires_grad_(False)
    return ModelPatcher(BaseModel(unet, adm_channels=adm, model_type=model_type))


class ToyLDMUNet(nn.Module):
    """The embedded toy model's diffusers UNet under ComfyUI's LDM module names: every linear and convolution is
    registered at its LDM path (the same module objects), and the forward runs the diffusers UNet."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        from ablation_core.models.ldm_keys import UNetLayout, unet_module_to_ldm

        object.__setattr__(self, "_unet", unet)  # not a child: only the LDM names are seen
        layout = UNetLayout.from_config(dict(unet.config))
        for name, module in unet.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                path = unet_module_to_ldm(name, layout).split(".")
                parent = self
                for part in path[:-1]:
                    if not hasattr(parent, part):
                        parent.add_module(part, nn.Module())
                    parent = getattr(parent, part)
                parent.add_module(path[-1], module)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                transformer_options: dict | None = None, **kwargs) -> Tensor:
        return self._unet(x, timesteps, encoder_hidden_states=context).sample


def make_toy_model_and_clip() -> tuple[ModelPatcher, CLIP]:
    """The embedded toy world as ComfyUI would hold it (a MODEL and a CLIP), for running the nodes on it."""
    from ablation_core.toy.model import load_toy_model

    unet, text_encoder, _ = load_toy_model()
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    model = ModelPatcher(BaseModel(ToyLDMUNet(unet), context_dim=unet.config.cross_attention_dim,
                                   latent_channels=unet.config.in_channels))
    model.model.model_config.unet_config["channel_mult"] = tuple(range(len(unet.config.block_out_channels)))
    return model, CLIP(ClipModel(text_model=text_encoder))


def make_clip(seed: int = 0) -> CLIP:
    clip = CLIP(ClipModel(seed))
    clip.cond_stage_model.eval().requires_grad_(False)
    return clip


# Modules: comfy.model_management, comfy.utils, folder_paths, server ------------------------------------------

class InterruptProcessingException(Exception):
    pass


class ComfyState:
    """What the fake modules record, for tests to inspect and steer."""

    def __init__(self):
        self.loaded: list = []
        self.interrupt_after: int | None = None
        self.interrupt_checks = 0
        self.progress: list[tuple[int, int]] = []  # every update of every bar: (value, total)
        self.bars: list[int] = []  # the total of each bar made
        self.messages: list[tuple[str, dict]] = []


def install(root: Path, monkeypatch) -> ComfyState:
    """Install the fake ComfyUI modules (undone by ``monkeypatch`` after the test)."""
    state = ComfyState()

    model_management = types.ModuleType("comfy.model_management")
    model_management.InterruptProcessingException = InterruptProcessingException

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        state.loaded.append((models, force_full_load))

    def throw_exception_if_processing_interrupted():
        state.interrupt_checks += 1
        if state.interrupt_after is not None and state.interrupt_checks > state.interrupt_after:
            raise InterruptProcessingException()

    model_management.load_models_gpu = load_models_gpu
    model_management.get_torch_device = lambda: torch.device("cpu")
    model_management.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.current, self.node_id = total, 0, node_id
            state.bars.append(total)

        def update_absolute(self, value, total=None, preview=None):
            self.total = total if total is not None else self.total
            self.current = min(value, self.total)
            state.progress.append((self.current, self.total))

        def update(self, value):
            self.update_absolute(self.current + value)

    utils.ProgressBar = ProgressBar

    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = model_management, utils

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(root / "models")
    folder_paths.folder_names_and_paths = {"loras": ([str(root / "models" / "loras")], {".safetensors"})}

    def add_model_folder_path(name, path, is_default=False):
        paths, extensions = folder_paths.folder_names_and_paths.get(name, ([], set()))
        folder_paths.folder_names_and_paths[name] = (paths + [path], extensions)

    def get_folder_paths(name):
        return folder_paths.folder_names_and_paths[name][0][:]

    def get_filename_list(name):
        found = []
        paths, extensions = folder_paths.folder_names_and_paths[name]
        for folder in paths:
            for dirpath, _, files in os.walk(folder):
                found += [os.path.relpath(os.path.join(dirpath, f), folder) for f in files
                          if os.path.splitext(f)[1] in extensions]
        return sorted(found)

    def get_full_path(name, filename):
        for folder in folder_paths.folder_names_and_paths[name][0]:
            path = os.path.join(folder, filename)
            if os.path.isfile(path):
                return path
        return None

    folder_paths.add_model_folder_path = add_model_folder_path
    folder_paths.get_folder_paths = get_folder_paths
    folder_paths.get_filename_list = get_filename_list
    folder_paths.get_full_path = get_full_path
    folder_paths.get_user_directory = lambda: str(root / "user")

    server = types.ModuleType("server")

    class PromptServer:
        instance = types.SimpleNamespace(send_sync=lambda event, data, sid=None: state.messages.append((event, data)))

    server.PromptServer = PromptServer

    for name, module in {"comfy": comfy, "comfy.model_management": model_management, "comfy.utils": utils,
                         "folder_paths": folder_paths, "server": server}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return state

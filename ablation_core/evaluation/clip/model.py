"""A CLIP model the user downloaded, read from disk only, as one small interface: image and text features.

Two sources:

- a transformers folder (``config.json``, the weights, the tokenizer files), e.g. ``openai/clip-vit-large-patch14``
  fetched once with ``huggingface-cli download openai/clip-vit-large-patch14 --local-dir PATH``. ``transformers`` is
  already a dependency, so this needs nothing new;
- an open_clip weights file with ``arch`` naming its architecture (``ViT-H-14``), only where the optional
  ``open_clip_torch`` is installed: it pulls ``torchvision``, and with it a CUDA build of torch that may not match the
  user's own, so it is never required (see ``open_clip_scorer``).

Images are prepared in PyTorch (resize the short side, centre crop, normalise with the folder's
``preprocessor_config.json`` or CLIP's own statistics): the images are tensors already, so no PIL round trip, and no
image processor that may want torchvision. Every way the model can be wrong (no folder, no config, an image tower
only such as ComfyUI's ``clip_vision`` files, weights that do not fit, an unreadable file) is one line saying what to
do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import UnsupportedModelError, printable, quoted

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
HOW_TO_GET = ("download a full CLIP model folder once, e.g. `huggingface-cli download openai/clip-vit-large-patch14 "
              "--local-dir PATH`, and pass --clip PATH")


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to ``size``, centre-crop ``crop`` x ``crop``, normalise."""

    size: int
    crop: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> CLIP's pixel values."""
        height, width = images.shape[-2:]
        scale = self.size / min(height, width)
        resized = F.interpolate(images.float(), size=(max(self.crop, round(height * scale)),
                                                      max(self.crop, round(width * scale))),
                                mode="bicubic", align_corners=False, antialias=scale < 1).clamp(0, 1)
        top, left = (resized.shape[-2] - self.crop) // 2, (resized.shape[-1] - self.crop) // 2
        cropped = resized[..., top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (cropped - mean) / std


class ClipScorer:
    """Projected CLIP features of images and texts, batched, counted (``image_passes``, ``text_passes``)."""

    def __init__(self, encode_image: Callable[[Tensor], Tensor], encode_text: Callable[[list[str]], Tensor],
                 preprocess: Preprocess, name: str, device: torch.device | str, dtype: torch.dtype,
                 batch_size: int = 16):
        self._encode_image, self._encode_text = encode_image, encode_text
        self.preprocess, self.name = preprocess, name
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.image_passes = 0
        self.text_passes = 0

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, D] projected image embeddings (not normalised), float32 on the CPU."""
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start:start + self.batch_size].cpu())
            out.append(self._encode_image(pixels.to(self.device, self.dtype)).float().cpu())
        self.image_passes += len(images)
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> Tensor:
        """Texts -> [N, D] projected text embeddings (not normalised), float32 on the CPU."""
        out = [self._encode_text(texts[s:s + self.batch_size]).float().cpu()
               for s in range(0, len(texts), self.batch_size)]
        self.text_passes += len(texts)
        return torch.cat(out)


def load_clip(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              arch: str | None = None) -> ClipScorer:
    """The CLIP model at ``path`` (a transformers folder, or with ``arch`` an open_clip weights file)."""
    path = Path(path)
    if not path.exists():
        raise UnsupportedModelError(f"CLIP model {quoted(str(path))} does not exist; {HOW_TO_GET}")
    if path.is_file():
        if arch:
            return open_clip_scorer(path, arch, device, dtype)
        raise UnsupportedModelError(_what_file_holds(path))
    if arch:
        raise UnsupportedModelError(f"--clip-arch names an open_clip architecture, but {quoted(str(path))} is a "
                                    "folder; give the open_clip weights file, or leave --clip-arch out for a "
                                    "transformers folder")
    return transformers_scorer(path, device, dtype)


def _check_config(folder: Path) -> None:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UnsupportedModelError(f"{quoted(str(folder))} has no config.json, so it is not a transformers CLIP "
                                    f"folder; {HOW_TO_GET}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnsupportedModelError(f"{quoted(str(config_path))} cannot be read as JSON ({_first_line(err)}); "
                                    f"download the folder again") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in ("clip_vision_model", "clip_text_model"):
        tower = "an image tower" if model_type == "clip_vision_model" else "a text tower"
        raise UnsupportedModelError(f"{quoted(str(folder))} holds {tower} only; the CLIP figures compare images with "
                                    f"text, so they need both towers: {HOW_TO_GET}")
    if model_type != "clip":
        raise UnsupportedModelError(f"{quoted(str(folder))} holds a {quoted(str(model_type))} model, not CLIP; "
                                    f"{HOW_TO_GET}")


def transformers_scorer(folder: Path, device: torch.device | str, dtype: torch.dtype) -> ClipScorer:
    from transformers import CLIPModel

    from ...models.quiet import quiet_loading

    _check_config(folder)
    _check_towers(folder)
    try:
        with quiet_loading():
            model, info = CLIPModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except Exception as err:  # safetensors, torch and transformers each raise their own kinds for a bad file
        if "mismatched" in str(err):
            raise UnsupportedModelError(f"the weights in {quoted(str(folder))} do not fit its config.json (tensor "
                                        "shapes differ: another model's weights?); download the folder again") from err
        raise UnsupportedModelError(f"the CLIP weights in {quoted(str(folder))} cannot be read "
                                    f"({_first_line(err)}); download the folder again") from err
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("position_ids"))
    if missing:
        raise UnsupportedModelError(f"the weights in {quoted(str(folder))} do not fit its CLIP config: "
                                    f"{len(missing)} tensors missing (e.g. {quoted(missing[0])}); download the "
                                    "folder again")
    model = model.to(device, dtype).eval()
    tokenize = _tokenizer(folder, int(model.config.text_config.vocab_size))
    max_length = int(model.config.text_config.max_position_embeddings)

    def encode_image(pixels: Tensor) -> Tensor:
        return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)

    def encode_text(texts: list[str]) -> Tensor:
        tokens = tokenize(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        out = model.text_model(input_ids=tokens["input_ids"].to(device),
                               attention_mask=tokens["attention_mask"].to(device))
        return model.text_projection(out.pooler_output)

    return ClipScorer(encode_image, encode_text, _preprocess(folder, int(model.config.vision_config.image_size)),
                      folder.name, device, dtype)


def _check_towers(folder: Path) -> None:
    """A clip_vision file copied into a CLIP folder is an image tower still: say so before transformers loads it."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return
    try:
        keys = _tensor_names(weights)
    except Exception:  # unreadable: transformers' own message says how, below
        return
    if _image_only(keys):
        raise UnsupportedModelError(f"the weights in {quoted(str(folder))} are a CLIP image tower only (as "
                                    f"ComfyUI's clip_vision files are); the CLIP figures need the text tower too: "
                                    f"{HOW_TO_GET}")


def _image_only(keys: list[str]) -> bool:
    keys = [k.removeprefix("module.") for k in keys]
    has_text = any(k.startswith(("text_model.", "transformer.", "token_embedding")) for k in keys)
    return not has_text and any(k.startswith(("vision_model.", "visual.")) for k in keys)


def _tokenizer(folder: Path, vocab_size: int):
    from transformers import AutoTokenizer

    from ...models.quiet import quiet_loading

    has_files = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    if has_files:
        try:
            with quiet_loading():
                return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise UnsupportedModelError(f"the tokenizer in {quoted(str(folder))} cannot be read "
                                        f"({_first_line(err)}); download the folder again") from err
    from ...models.tokenizer import VOCAB_SIZE, sd_clip_tokenizer

    if vocab_size != VOCAB_SIZE:
        raise UnsupportedModelError(f"{quoted(str(folder))} has no tokenizer files (vocab.json, merges.txt or "
                                    f"tokenizer.json) and its vocabulary ({vocab_size}) is not CLIP's own; "
                                    "download the whole folder")
    return sd_clip_tokenizer()  # every OpenAI and OpenCLIP model shares this BPE vocabulary


def _preprocess(folder: Path, image_size: int) -> Preprocess:
    found = {}
    config_path = folder / "preprocessor_config.json"
    if config_path.is_file():
        try:
            found = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UnsupportedModelError(f"{quoted(str(config_path))} cannot be read as JSON "
                                        f"({_first_line(err)})") from err
    size, crop = found.get("size", image_size), found.get("crop_size", image_size)
    size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    mean, std = tuple(found.get("image_mean", CLIP_MEAN)), tuple(found.get("image_std", CLIP_STD))
    return Preprocess(int(size), int(crop), mean, std)  # type: ignore[arg-type]


def _tensor_names(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError("not a dictionary of tensors")
    return [str(k) for k in state]


def _what_file_holds(path: Path) -> str:
    """The one-line answer to "--clip FILE": what the file is and what to give instead."""
    name = quoted(str(path))
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        return f"CLIP model {name} is neither a transformers folder nor a weights file; {HOW_TO_GET}"
    try:
        keys = _tensor_names(path)
    except Exception as err:  # any failure to read means the same thing to the user
        return f"{name} cannot be read as a weights file ({_first_line(err)}); {HOW_TO_GET}"
    keys = [k.removeprefix("module.") for k in keys]
    has_image = any(k.startswith(("vision_model.", "visual.")) for k in keys)
    if _image_only(keys):
        return (f"{name} is a CLIP image tower only (ComfyUI's clip_vision files are); the CLIP figures compare "
                f"images with text, so they need the full model: {HOW_TO_GET}")
    if has_image and any(k.startswith("visual.") for k in keys):
        return (f"{name} is an open_clip weights file: name its architecture with --clip-arch (e.g. ViT-H-14; "
                "needs the optional open_clip_torch), or use the transformers folder of the same model")
    if has_image:
        return f"{name} is a transformers CLIP weights file without its folder: give the folder that holds it " \
               "with its config.json and tokenizer files"
    return f"{name} holds no CLIP model ({len(keys)} tensors, e.g. {quoted(keys[0]) if keys else 'none'}); {HOW_TO_GET}"


def open_clip_scorer(path: Path, arch: str, device: torch.device | str, dtype: torch.dtype) -> ClipScorer:
    """An open_clip model from its weights file; only where ``open_clip_torch`` is installed (never required)."""
    try:
        import open_clip
    except ImportError as err:
        raise UnsupportedModelError(f"{quoted(str(path))} with --clip-arch needs the optional open_clip_torch "
                                    "(`pip install open_clip_torch`; it installs torchvision, which may replace your "
                                    "torch build), or use the transformers folder of the same model, which needs "
                                    "nothing more") from err
    try:
        model = open_clip.create_model(arch, pretrained=str(path), device=device)
    except Exception as err:  # open_clip raises many kinds for a wrong name or file
        raise UnsupportedModelError(f"open_clip cannot load {quoted(str(path))} as {quoted(arch)} "
                                    f"({_first_line(err)})") from err
    model = model.to(dtype).eval()
    tokenizer = open_clip.get_tokenizer(arch)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(getattr(model.visual, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(model.visual, "image_std", None) or CLIP_STD)
    return ClipScorer(model.encode_image, lambda texts: model.encode_text(tokenizer(texts).to(device)),
                      Preprocess(size, size, mean, std), f"{arch} ({path.name})", device, dtype)  # type: ignore[arg-type]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return printable(text[0][:200]) if text else type(err).__name__


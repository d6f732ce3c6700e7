"""Flux's text encoders from the files people have: CLIP-L and T5-XXL as single safetensors files (the
``clip_l.safetensors`` / ``t5xxl_fp16.safetensors`` that ComfyUI's DualCLIPLoader reads, in transformers' key layout)
or as transformers folders (a diffusers Flux repository's ``text_encoder/`` and ``text_encoder_2/``).

Shapes come from the weights. The CLIP tokenizer is built from the vocabulary this package ships (it is CLIP-L's);
T5's is not in any weights file and cannot be downloaded here, so it is read from a folder the user has: a diffusers
Flux repository's ``tokenizer_2/``, or ComfyUI's ``comfy/text_encoders/t5_tokenizer/``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ...errors import UnsupportedModelError
from ..quiet import quiet_loading
from .files import read_safetensors

CLIP_HEAD_DIM = 64
T5_HELP = ("T5's tokenizer is not inside any weights file: point --t5-tokenizer at a folder holding it (a diffusers "
           "Flux repository's tokenizer_2/, or ComfyUI's comfy/text_encoders/t5_tokenizer/)")


def _layers(state: dict[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.search(pattern, k))}
    return max(found) + 1 if found else 0


def clip_config_from_state(state: dict[str, Tensor]) -> CLIPTextConfig:
    vocab, hidden = state["embeddings.token_embedding.weight"].shape
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=max(1, hidden // CLIP_HEAD_DIM),
        intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_layers(state, r"^encoder\.layers\.(\d+)\."),
        max_position_embeddings=state["embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=hidden)


def t5_config_from_state(state: dict[str, Tensor]) -> T5Config:
    vocab, d_model = state["shared.weight"].shape
    heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    d_ff = state["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    return T5Config(
        vocab_size=vocab, d_model=d_model, d_ff=d_ff, num_heads=heads,
        d_kv=state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        num_layers=_layers(state, r"encoder\.block\.(\d+)\."), feed_forward_proj="gated-gelu" if gated else "relu",
        relative_attention_num_buckets=state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        .shape[0], is_encoder_decoder=False, use_cache=False, dropout_rate=0.0)


def _without(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _from_file(path: Path, model_class, config_of, strip: tuple[str, ...], dtype: torch.dtype) -> nn.Module:
    """A transformers text model from a weights file whose keys may carry the prefixes ``strip`` (in order)."""
    state = {_without(k, strip): v for k, v in read_safetensors(path)[0].items()}
    try:
        config = config_of(state)
    except KeyError as err:
        raise UnsupportedModelError(f"{path.name} is not a {model_class.__name__} weights file (no {err})") from err
    with torch.device("meta"):
        model = model_class(config)
    wanted = model.state_dict(keep_vars=True)
    inner = {_without(k, strip): k for k in wanted}  # transformers 4 names CLIP's weights text_model.*, 5 does not
    loaded = {inner[k]: v.to(dtype) for k, v in state.items() if k in inner}
    covered = {id(wanted[k]) for k in loaded}  # tied weights (T5's embed_tokens is its shared table) count once
    missing = [k for k, v in wanted.items() if id(v) not in covered and not k.endswith("position_ids")]
    if missing:
        raise UnsupportedModelError(f"{path.name} lacks {len(missing)} weight(s) of a {model_class.__name__} (e.g. "
                                    f"'{missing[0]}')")
    model.load_state_dict(loaded, strict=False, assign=True)
    for name, buffer in list(model.named_buffers()):  # buffers the file does not hold (position ids)
        if buffer.is_meta:
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer(name.rsplit(".", 1)[1], torch.arange(buffer.shape[-1]).expand(buffer.shape),
                                  persistent=False)
    return model.to(dtype).eval()


def load_clip_l(path: str | Path, dtype: torch.dtype = torch.float32) -> CLIPTextModel:
    path = Path(path)
    if path.is_dir():
        with quiet_loading():
            return CLIPTextModel.from_pretrained(path, torch_dtype=dtype).eval()
    return _from_file(path, CLIPTextModel, clip_config_from_state,
                      ("clip_l.", "transformer.", "text_model."), dtype)


def load_t5(path: str | Path, dtype: torch.dtype = torch.float32) -> T5EncoderModel:
    path = Path(path)
    if path.is_dir():
        with quiet_loading():
            return T5EncoderModel.from_pretrained(path, torch_dtype=dtype).eval()
    model = _from_file(path, T5EncoderModel, t5_config_from_state, ("t5xxl.", "transformer."), dtype)
    model.encoder.embed_tokens = model.shared
    return model


def load_t5_tokenizer(folder: str | Path | None):
    if folder is None or not Path(folder).is_dir():
        raise UnsupportedModelError(T5_HELP + (f" ({folder} is not a folder)" if folder else ""))
    try:
        with quiet_loading():
            return AutoTokenizer.from_pretrained(str(folder), model_max_length=512)
    except (OSError, ValueError) as err:
        raise UnsupportedModelError(f"{folder} holds no tokenizer transformers can read ({err}); {T5_HELP}") from err


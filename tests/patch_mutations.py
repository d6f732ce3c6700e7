"""Seeded damage to valid patch files, one family per kind of damage the reliability issue lists.

Each family takes a valid ``.safetensors`` patch and a seeded ``random.Random`` and returns a damaged copy. Header
damage is written byte by byte (the format is an 8-byte little-endian header length, a JSON header, then the data);
tensor damage (values, shapes, dtypes, names) goes through ``safetensors.torch`` so that only the intended thing is
wrong and the loader's later checks are reached, not just the parser's.
"""

from __future__ import annotations

import copy
import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

GIB = 2**30
HEADER_LIMIT = 100 * 2**20  # the loader's (and safetensors') largest header


@dataclass
class Mutant:
    """A damaged file: what was done, its bytes, and for a header of gigabytes the size to extend the file to (as a
    sparse file, so no gigabytes are written)."""

    variant: str
    data: bytes
    sparse_size: int | None = None


@dataclass
class Base:
    """A valid patch file to damage, parsed once."""

    name: str
    raw: bytes
    aliases: dict[str, str] = field(default_factory=dict)  # patch key -> another name of the same layer

    def __post_init__(self) -> None:
        (self.header_length,) = struct.unpack("<Q", self.raw[:8])
        self.header_text = self.raw[8:8 + self.header_length].decode("utf-8")
        self.header: dict = json.loads(self.header_text)
        self.data = self.raw[8 + self.header_length:]
        self.names = [k for k in self.header if k != "__metadata__"]
        self.is_lora = any(n.endswith(".lora_up.weight") for n in self.names)

    def tensors(self) -> dict[str, Tensor]:
        return dict(load_bytes(self.raw))

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.header.get("__metadata__", {}))

    def layer_keys(self) -> list[str]:
        return sorted({n.split(".", 1)[0] for n in self.names})


def pack(header: dict | str | bytes, data: bytes) -> bytes:
    """A safetensors file from a header (a dict, or JSON text written as given) and the data bytes."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    text = header.encode("utf-8") if isinstance(header, str) else header
    return struct.pack("<Q", len(text)) + text + data


def _rebuild(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    return save_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def _pick(rng: random.Random, names: list[str], suffix: str = "") -> str:
    chosen = [n for n in names if n.endswith(suffix)]
    return rng.choice(chosen or names)


# Raw bytes ------------------------------------------------------------------------------------------------------

def bit_flips(rng: random.Random, base: Base) -> Mutant:
    raw = bytearray(base.raw)
    header_end = 8 + base.header_length
    region = rng.choice(("length field", "header", "data", "file"))
    start, stop = {"length field": (0, 8), "header": (8, header_end), "data": (header_end, len(raw)),
                   "file": (0, len(raw))}[region]
    for _ in range(rng.randint(1, 8)):
        raw[rng.randrange(start, stop)] ^= 1 << rng.randrange(8)
    return Mutant(f"bit flips in the {region}", bytes(raw))


def truncation(rng: random.Random, base: Base) -> Mutant:
    header_end = 8 + base.header_length
    where = rng.choice(("length field", "header", "data", "last byte", "everything"))
    cut = {"length field": rng.randrange(1, 8), "header": rng.randrange(8, header_end),
           "data": rng.randrange(header_end, len(base.raw)), "last byte": len(base.raw) - 1, "everything": 0}[where]
    return Mutant(f"truncated in the {where}", base.raw[:cut])


def header_length(rng: random.Random, base: Base) -> Mutant:
    n, size = base.header_length, len(base.raw)
    values = {"zero": 0, "one": 1, "one byte short": n - 1, "one byte long": n + 1, "8 bytes long": n + 8,
              "the rest of the file": size - 8, "past the end": size, "2**63": 2**63, "2**64-1": 2**64 - 1,
              "just over the limit": HEADER_LIMIT + 1, "random": rng.randrange(size)}
    variant = rng.choice(sorted(values))
    return Mutant(f"header length {variant}", struct.pack("<Q", values[variant]) + base.raw[8:])


# The JSON header ------------------------------------------------------------------------------------------------

def _entry_edit(key: str, choices: Callable[[dict, int], list]) -> Callable[[random.Random, Base], Mutant]:
    """An edit that replaces one field of one tensor's header entry with a value from ``choices(entry, data_len)``."""

    def edit(rng: random.Random, base: Base) -> Mutant:
        header = copy.deepcopy(base.header)
        name = _pick(rng, base.names)
        value = rng.choice(choices(header[name], len(base.data)))
        header[name][key] = value
        return Mutant(f"{key} {json.dumps(value)[:40]}", pack(header, base.data))

    return edit


def _shapes(entry: dict, data_len: int) -> list:
    shape = entry["shape"]
    numel = 1
    for dim in shape:
        numel *= dim
    return [[], [numel], list(reversed(shape)), [-1, numel], [0], [numel, 0], [1.5], ["4"], None, 4, [[numel]],
            [2**62, 2**62], [2**64], [numel, 1, 1, 1, 1]]


def _offsets(entry: dict, data_len: int) -> list:
    begin, end = entry["data_offsets"]
    return [[end, begin], [begin, end + 1], [begin + 1, end], [begin, begin], [0, data_len], [begin, 2**64],
            [-1, end], [begin], [begin, end, 0], [str(begin), str(end)], [float(begin), float(end)], None,
            [begin, 10**30]]


def _dtypes(entry: dict, data_len: int) -> list:
    return ["F15", "", "f16", 16, None, ["F16"], "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64",
            "F8_E4M3", "F8_E5M2", "F4", "C64", "BF16", "F64", "F16", "F32"]


def _not_an_object(rng: random.Random, base: Base) -> Mutant:
    text = rng.choice(['[]', '"text"', '42', 'null', 'true', '[{"a.diff": 1}]', '{}'])
    return Mutant(f"header {text}", pack(text, base.data))


def _invalid_json(rng: random.Random, base: Base) -> Mutant:
    text = base.header_text.rstrip()
    cut = rng.randrange(1, len(text))
    return Mutant("header cut short, padded with spaces", pack(text[:cut].ljust(base.header_length), base.data))


def _trailing_garbage(rng: random.Random, base: Base) -> Mutant:
    junk = rng.choice(["}", "x", "{}", "\x00", ",", "]"])
    return Mutant(f"header followed by {junk!r}", pack(base.header_text.rstrip() + junk, base.data))


def _entry_not_an_object(rng: random.Random, base: Base) -> Mutant:
    header = copy.deepcopy(base.header)
    header[_pick(rng, base.names)] = rng.choice([[], "F16", 3, None, [1, 2], True])
    return Mutant("a tensor entry that is not an object", pack(header, base.data))


def _missing_field(rng: random.Random, base: Base) -> Mutant:
    header = copy.deepcopy(base.header)
    entry_field = rng.choice(["dtype", "shape", "data_offsets"])
    del header[_pick(rng, base.names)][entry_field]
    return Mutant(f"no {entry_field}", pack(header, base.data))


def _extra_field(rng: random.Random, base: Base) -> Mutant:
    header = copy.deepcopy(base.header)
    header[_pick(rng, base.names)]["comment"] = "extra"
    return Mutant("an extra field in an entry", pack(header, base.data))


def _swapped_offsets(rng: random.Random, base: Base) -> Mutant:
    header = copy.deepcopy(base.header)
    first, second = rng.sample(base.names, 2)
    header[first]["data_offsets"], header[second]["data_offsets"] = (header[second]["data_offsets"],
                                                                     header[first]["data_offsets"])
    return Mutant("two tensors' data offsets swapped", pack(header, base.data))


def _bad_metadata(rng: random.Random, base: Base) -> Mutant:
    header = copy.deepcopy(base.header)
    value = rng.choice([[], "text", None, 7, {"k": 1}, {"k": {"a": "b"}}, {"k": None}, {"k": ["a"]}, "absent"])
    if value == "absent":
        header.pop("__metadata__", None)
    else:
        header["__metadata__"] = value
    return Mutant(f"metadata {json.dumps(value)}", pack(header, base.data))


def _duplicate_name(rng: random.Random, base: Base) -> Mutant:
    name = _pick(rng, base.names)
    items = [json.dumps(k) + ":" + json.dumps(v, separators=(",", ":")) for k, v in base.header.items()]
    items.append(json.dumps(name) + ":" + json.dumps(base.header[name], separators=(",", ":")))
    return Mutant("a tensor named twice", pack("{" + ",".join(items) + "}", base.data))


def _not_utf8(rng: random.Random, base: Base) -> Mutant:
    text = bytearray(base.header_text.encode())
    letters = [i for i, c in enumerate(text) if chr(c).isalpha()]
    text[rng.choice(letters)] = rng.choice([0xFF, 0xC3, 0x80, 0xFE])
    return Mutant("a byte that is not UTF-8 in the header", pack(bytes(text), base.data))


def _prefix(rng: random.Random, base: Base) -> Mutant:
    prefix = rng.choice([b"\xef\xbb\xbf", b"  ", b"\n", b"\x00"])
    return Mutant(f"header starting with {prefix!r}", pack(prefix + base.header_text.encode(), base.data))


def _bad_name(rng: random.Random, base: Base) -> Mutant:
    header = copy.deepcopy(base.header)
    name = _pick(rng, base.names)
    new = rng.choice(["", "\n", "a\nb.diff", "x" * 10000 + ".diff", "lora_unet_é.diff", "\x00.diff", "\u2028.diff",
                      name + "\n", "__metadata__.diff", " " + name])
    header = {new if k == name else k: v for k, v in header.items()}
    return Mutant(f"tensor named {new[:20]!r}", pack(header, base.data))


def _no_tensors(rng: random.Random, base: Base) -> Mutant:
    header = {"__metadata__": base.metadata} if rng.random() < 0.5 else {}
    return Mutant("no tensors", pack(header, b""))


def _deep_nesting(rng: random.Random, base: Base) -> Mutant:
    depth = rng.choice([1000, 100_000])
    rest = json.dumps({k: v for k, v in base.header.items() if k != "__metadata__"}, separators=(",", ":"))
    text = '{"__metadata__":' + "[" * depth + "]" * depth + "," + rest[1:]
    return Mutant(f"metadata nested {depth} deep", pack(text, base.data))


def _huge_integer(rng: random.Random, base: Base) -> Mutant:
    name = _pick(rng, base.names)
    entry = base.header[name]
    number = "1" + "0" * rng.choice([20, 400, 5000])
    where = rng.choice(["shape", "data_offsets"])
    value = f"[{number}]" if where == "shape" else f"[{entry['data_offsets'][0]},{number}]"
    old = json.dumps(entry[where], separators=(",", ":"))
    text = base.header_text.rstrip()
    anchor = f'"{name}":{{'
    start = text.index(anchor)
    field_at = text.index(f'"{where}":{old}', start)
    text = text[:field_at] + f'"{where}":{value}' + text[field_at + len(f'"{where}":{old}'):]
    return Mutant(f"{where} with a {len(number)}-digit number", pack(text, base.data))


HEADER_EDITS: dict[str, Callable[[random.Random, Base], Mutant]] = {
    "not an object": _not_an_object, "invalid JSON": _invalid_json, "trailing garbage": _trailing_garbage,
    "entry not an object": _entry_not_an_object, "missing field": _missing_field, "extra field": _extra_field,
    "dtype": _entry_edit("dtype", _dtypes), "shape": _entry_edit("shape", _shapes),
    "offsets": _entry_edit("data_offsets", _offsets), "swapped offsets": _swapped_offsets,
    "metadata": _bad_metadata, "duplicate name": _duplicate_name, "not UTF-8": _not_utf8, "prefix": _prefix,
    "name": _bad_name, "no tensors": _no_tensors, "deep nesting": _deep_nesting, "huge integer": _huge_integer,
}


def header_json(rng: random.Random, base: Base) -> Mutant:
    return HEADER_EDITS[rng.choice(sorted(HEADER_EDITS))](rng, base)


# Tensors --------------------------------------------------------------------------------------------------------

def nan_inf(rng: random.Random, base: Base) -> Mutant:
    tensors = base.tensors()
    name = _pick(rng, base.names)
    value = rng.choice([float("nan"), float("inf"), float("-inf")])
    flat = tensors[name].clone().reshape(-1)
    for index in rng.sample(range(flat.numel()), min(flat.numel(), rng.randint(1, 4))):
        flat[index] = value
    tensors[name] = flat.reshape(tensors[name].shape)
    return Mutant(f"{value} in {name.split('.', 1)[1]}", _rebuild(tensors, base.metadata))


def wrong_shape(rng: random.Random, base: Base) -> Mutant:
    tensors = base.tensors()
    name = _pick(rng, [n for n in base.names if not n.endswith(".alpha")])
    t = tensors[name]
    other = rng.choice([tensors[n] for n in base.names if tensors[n].shape != t.shape] or [t])
    variants: dict[str, Callable[[], Tensor]] = {
        "flattened": lambda: t.reshape(-1), "an extra leading dim": lambda: t.unsqueeze(0),
        "an extra trailing dim": lambda: t.unsqueeze(-1), "transposed": lambda: t.flatten(1).t(),
        "another layer's shape": lambda: other.clone(), "a random shape": lambda: torch.randn(
            rng.randint(1, 96), rng.randint(1, 96)), "an empty dim": lambda: torch.zeros(0, t.shape[-1]),
        "0-d": lambda: torch.tensor(0.5), "a 3x3 kernel": lambda: torch.randn(t.shape[0], t.flatten(1).shape[1], 3, 3),
    }
    if base.is_lora:
        variants["rank mismatch"] = lambda: t[:1] if name.endswith("lora_down.weight") else t[:, :1]
    variant = rng.choice(sorted(variants) + (["up and down swapped"] if base.is_lora else []))
    if variant == "up and down swapped":
        key = name.split(".", 1)[0]
        up, down = f"{key}.lora_up.weight", f"{key}.lora_down.weight"
        tensors[up], tensors[down] = tensors[down], tensors[up]
    else:
        tensors[name] = variants[variant]().clone()
    return Mutant(f"{name.split('.', 1)[1]} {variant}", _rebuild(tensors, base.metadata))


DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.float64, torch.bfloat16,
          torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32,
          torch.uint64, torch.complex64]
RELABELS = {"F32": ["I32", "U32", "F16", "F64"], "F16": ["BF16", "I16", "U16", "F32", "U8"],
            "BF16": ["F16"], "F64": ["I64", "F32"]}


def dtype(rng: random.Random, base: Base) -> Mutant:
    how = rng.choice(["one tensor", "every tensor", "relabelled"])
    if how == "relabelled":  # the bytes stay; only the header's dtype changes
        header = copy.deepcopy(base.header)
        name = _pick(rng, base.names)
        header[name]["dtype"] = label = rng.choice(RELABELS[header[name]["dtype"]])
        return Mutant(f"dtype relabelled {label}", pack(header, base.data))
    tensors = base.tensors()
    target = rng.choice(DTYPES if how == "one tensor" else [torch.bfloat16, torch.float64, torch.float16])
    names = [_pick(rng, base.names)] if how == "one tensor" else base.names
    for name in names:
        tensors[name] = tensors[name].to(target)
    return Mutant(f"{how} {str(target).removeprefix('torch.')}", _rebuild(tensors, base.metadata))


def lora_half(rng: random.Random, base: Base) -> Mutant:
    tensors = base.tensors()
    key = rng.choice(base.layer_keys())
    if base.is_lora:
        dropped = rng.choice([["lora_up.weight"], ["lora_down.weight"], ["lora_up.weight", "lora_down.weight"],
                              ["alpha"], ["lora_up.weight", "alpha"]])
        for part in dropped:
            del tensors[f"{key}.{part}"]
        return Mutant(f"without {' and '.join(dropped)}", _rebuild(tensors, base.metadata))
    diff = tensors[f"{key}.diff"]
    added = rng.choice(["lora_up.weight", "lora_down.weight", "alpha"])
    tensors[f"{key}.{added}"] = torch.tensor(1.0) if added == "alpha" else torch.randn(diff.shape[0], 1)
    return Mutant(f"a diff with {added} beside it", _rebuild(tensors, base.metadata))


def alpha(rng: random.Random, base: Base) -> Mutant:
    tensors = base.tensors()
    key = rng.choice(base.layer_keys())
    rank = float(tensors[f"{key}.lora_down.weight"].shape[0]) if base.is_lora else 1.0
    values: dict[str, Callable[[], Tensor]] = {
        "0-d": lambda: torch.tensor(rank), "shape [1]": lambda: torch.tensor([rank]),
        "shape [1, 1]": lambda: torch.tensor([[rank]]), "shape [1, 1, 1, 1]": lambda: torch.full((1, 1, 1, 1), rank),
        "shape [2]": lambda: torch.tensor([rank, rank]), "empty": lambda: torch.zeros(0), "zero": lambda: torch.tensor(
            0.0), "negative": lambda: torch.tensor(-rank), "tiny": lambda: torch.tensor(1e-30),
        "huge": lambda: torch.tensor(1e30), "fp16 max": lambda: torch.tensor(65504.0, dtype=torch.float16),
        "NaN": lambda: torch.tensor(float("nan")), "Inf": lambda: torch.tensor(float("inf")),
        "int64": lambda: torch.tensor(int(rank)), "bool": lambda: torch.tensor(True),
        "bfloat16": lambda: torch.tensor(rank, dtype=torch.bfloat16), "float64": lambda: torch.tensor(
            rank, dtype=torch.float64),
    }
    variant = rng.choice(sorted(values))
    tensors[f"{key}.alpha"] = values[variant]()
    return Mutant(f"alpha {variant}" + ("" if base.is_lora else " beside a diff"), _rebuild(tensors, base.metadata))


def unknown_key(rng: random.Random, base: Base) -> Mutant:
    tensors = base.tensors()
    key = rng.choice(base.layer_keys())
    renames: dict[str, str] = {
        "a layer the model lacks": "lora_unet_not_a_layer",
        "a text layer the model lacks": "lora_te_text_model_encoder_layers_7_mlp_fc1",
        "an SDXL-only layer": "lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k",
        "upper case": key.upper(), "a trailing space": key + " ", "no prefix": key.removeprefix("lora_unet_"),
    }
    if key in base.aliases:
        renames["the layer's diffusers name"] = base.aliases[key]
    variant = rng.choice(sorted(renames) + ["an unknown part", "no dot", "a leading dot", "the same layer twice"])
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        layer, _, part = name.partition(".")
        if layer != key:
            out[name] = tensor
        elif variant in renames:
            out[f"{renames[variant]}.{part}"] = tensor
        elif variant == "an unknown part":
            out[f"{layer}.{rng.choice(['lora_mid.weight', 'weight', 'hada_w1_a', 'dora_scale', 'lora_A.weight'])}"] = (
                tensor)
        elif variant == "no dot":
            out[name.replace(".", "_")] = tensor
        elif variant == "a leading dot":
            out[f".{part}"] = tensor
        else:  # the same layer under its patch key and under its other name
            out[name] = tensor
            out[f"{base.aliases.get(key, key.upper())}.{part}"] = tensor.clone()
    return Mutant(variant, _rebuild(out, base.metadata))


def huge_header(rng: random.Random, base: Base) -> Mutant:
    variant = rng.choice(["claimed by a small file", "in a sparse file of gigabytes", "just over the limit",
                          "padded with megabytes of spaces", "a metadata value of megabytes", "ten thousand entries"])
    if variant == "claimed by a small file":
        length = rng.choice([GIB, 3 * GIB, 2**40])
        return Mutant(f"header of {length / GIB:g} GiB {variant}", struct.pack("<Q", length) + base.raw[8:])
    if variant in ("in a sparse file of gigabytes", "just over the limit"):
        length = 3 * GIB if variant.startswith("in a") else HEADER_LIMIT + 1
        return Mutant(f"header {variant}", struct.pack("<Q", length) + base.raw[8:], sparse_size=8 + length + 64)
    if variant == "padded with megabytes of spaces":
        megabytes = rng.randint(1, 2)
        return Mutant(f"header padded to {megabytes} MB", pack(base.header_text + " " * megabytes * 2**20, base.data))
    if variant == "a metadata value of megabytes":
        header = copy.deepcopy(base.header)
        header.setdefault("__metadata__", {})["ss_tag_frequency"] = "x" * rng.randint(1, 2) * 2**20
        return Mutant("metadata value of megabytes", pack(header, base.data))
    header = {f"lora_unet_x{i}.alpha": {"dtype": "F16", "shape": [], "data_offsets": [2 * i, 2 * i + 2]}
              for i in range(10_000)}
    return Mutant("ten thousand alpha entries", pack(header, bytes(20_000)))


FAMILIES: dict[str, Callable[[random.Random, Base], Mutant]] = {
    "bit flips": bit_flips, "truncation": truncation, "header length": header_length, "header JSON": header_json,
    "NaN/Inf": nan_inf, "wrong shape": wrong_shape, "dtype": dtype, "half a LoRA pair": lora_half,
    "alpha": alpha, "unknown keys": unknown_key, "huge header": huge_header,
}

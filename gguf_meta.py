"""Reading a GGUF file's scalar metadata fast, and estimating a model's memory from it.

``gguf.GGUFReader`` builds numpy views for every field part, which takes about a second
on a 150k-token vocabulary; this reader walks the key/value section with ``struct`` over
an mmap, skipping arrays, and stops before the tensor infos.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default KV cache type is f16
MARGIN_FRACTION = 0.05
MARGIN_BYTES = 64 * 2**20


class GGUFError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True)
class ArrayLength:
    """An array value, skipped: only its length is kept (the vocabulary's size, say)."""

    length: int


def read_metadata(path: Path) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (arrays as their ``ArrayLength``); ``GGUFError``
    for anything that is not a whole GGUF header (an empty file, a copy still in progress)."""
    with path.open("rb") as handle:
        if not path.stat().st_size:
            raise GGUFError("the file is empty")  # mmap cannot map an empty file
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _read(data)


def _read(data: Any) -> dict[str, Any]:
    if data[:4] != b"GGUF":
        raise GGUFError("not a GGUF file")
    if len(data) < 24:
        raise GGUFError("truncated GGUF header")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise GGUFError(f"GGUF version {version} is not supported")
    offset, values = 24, {}
    try:
        for _ in range(n_kv):
            key, offset = _string(data, offset)
            (kind,), offset = struct.unpack_from("<I", data, offset), offset + 4
            value, offset = _value(data, offset, kind)
            values[key] = value
    except (struct.error, UnicodeDecodeError, KeyError) as exc:
        raise GGUFError(f"corrupt GGUF metadata: {exc}") from None
    return values


def _string(data: Any, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, offset)
    start = offset + 8
    return bytes(data[start:start + length]).decode("utf-8"), start + length


def _value(data: Any, offset: int, kind: int) -> tuple[Any, int]:
    if kind == _STRING:
        return _string(data, offset)
    if kind == _ARRAY:
        item_kind, count = struct.unpack_from("<IQ", data, offset)
        offset += 12
        if item_kind == _STRING:
            for _ in range(count):
                (length,) = struct.unpack_from("<Q", data, offset)
                offset += 8 + length
        else:
            offset += count * struct.calcsize(_SCALARS[item_kind])
        return ArrayLength(count), offset
    fmt = _SCALARS[kind]
    return struct.unpack_from(fmt, data, offset)[0], offset + struct.calcsize(fmt)


@dataclass(frozen=True)
class Shape:
    """What memory estimation needs from a model's metadata."""

    n_layer: int
    n_kv_heads: int
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    n_vocab: int = 0  # 0: the header does not say
    n_embd: int = 0


@lru_cache(maxsize=256)
def model_shape(path: Path, size: int, mtime: int) -> Shape | None:
    """The model's shape, or None when the metadata does not say (size/mtime key the cache)."""
    try:
        meta = read_metadata(path)
    except (OSError, ValueError):
        return None
    arch = meta.get("general.architecture")
    layers = meta.get(f"{arch}.block_count")
    embd = meta.get(f"{arch}.embedding_length")
    heads = meta.get(f"{arch}.attention.head_count")
    if not (isinstance(layers, int) and isinstance(embd, int) and isinstance(heads, int) and heads):
        return None
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    kv_heads = kv_heads if isinstance(kv_heads, int) else heads
    head_k = meta.get(f"{arch}.attention.key_length", embd // heads)
    head_v = meta.get(f"{arch}.attention.value_length", embd // heads)
    n_ctx_train = meta.get(f"{arch}.context_length", 0)
    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = tokens.length if isinstance(tokens, ArrayLength) else 0
    return Shape(layers, kv_heads, int(head_k), int(head_v), int(n_ctx_train or 0), n_vocab, embd)


def estimate_bytes(size_on_disk: int, shape: Shape | None, n_ctx: int) -> int:
    """Weights (the file) + KV cache (n_ctx x layers x KV heads x head size x K and V) + margin."""
    kv = 0
    if shape is not None:
        context = n_ctx or shape.n_ctx_train
        kv = context * shape.n_layer * shape.n_kv_heads * (shape.head_dim_k + shape.head_dim_v) * KV_BYTES_PER_ELEMENT
    return int(size_on_disk + kv + size_on_disk * MARGIN_FRACTION + MARGIN_BYTES)

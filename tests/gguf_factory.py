"""Generate tiny but real GGUF model files for tests.

The models written here are genuine llama-architecture GGUF files with random
weights and a small SentencePiece-style ("llama") vocabulary with byte fallback.
llama.cpp (through llama-cpp-python) loads them in milliseconds and runs
inference on them, so tests can exercise the real loading / tokenization /
generation / embedding code paths without downloading a model.

Output steering: dimension 0 of every token embedding is a large constant, which
survives the residual stream, and the output rows of the special tokens
(``<unk>``, ``<s>``, ``</s>``, ``<|im_start|>``, ``<|im_end|>``) and of the 256
byte tokens carry a large negative weight on that dimension. Their logits are
therefore strongly negative, so the model (practically) never emits EOS or raw
bytes on its own: generation runs until ``max_tokens`` or a stop string and
produces printable ASCII text. Use ``logit_bias={EOS_ID: 100.0}`` to force EOS.

Also provides deliberately broken files: a vocab-only GGUF (no tensors), a GGUF
truncated in the middle of its tensor data, and a text file named ``.gguf``.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import gguf
import numpy as np

__all__ = [
    "BOS_ID",
    "CHATML_TEMPLATE",
    "EOS_ID",
    "UNK_ID",
    "build_vocab",
    "write_audio_projector",
    "write_llama_model",
    "write_mlp_projector",
    "write_not_gguf",
    "write_truncated_model",
    "write_vocab_only_model",
]

CHATML_TEMPLATE: str = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Standard ChatML template; equals llama-cpp-python's ``CHATML_CHAT_TEMPLATE``."""

UNK_ID: int = 0
BOS_ID: int = 1
EOS_ID: int = 2

_SPIECE_SPACE = "\u2581"  # '▁', SentencePiece's word-boundary marker
_CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>")
_WORDS = (
    "▁Once", "▁upon", "▁a", "▁time", "▁the", "▁The", "▁Hello", "▁hello",
    "▁world", "▁there", "▁was", "▁little", "▁and", "▁of", "▁to", "▁in", "▁is",
    "▁it", "▁I", "▁you", "▁hi", "▁Hi", "▁how", "▁are", "▁what", "▁user",
    "▁assistant", "▁system", "▁test", "▁story", "hi", "lo", "ing", "ed", "er",
    "user", "assistant", "system",
)  # fmt: skip

_STEER_EMBD = 1.0  # value of embedding dimension 0 for every token
_STEER_OUT = -2.0  # output weight on dimension 0 for tokens that must not be sampled


def build_vocab(
    extra_words: Sequence[str] | None = None,
    control_tokens: Sequence[str] = (),
) -> tuple[list[str], list[float], list[int]]:
    """Return ``(tokens, scores, token_types)`` of the SentencePiece-style vocabulary.

    Layout: ``<unk>`` (0), ``<s>`` (1), ``</s>`` (2), the 256 byte tokens
    ``<0x00>``..``<0xFF>`` (3..258), ``<|im_start|>`` (259), ``<|im_end|>`` (260),
    then ``control_tokens`` (a model family's markers, say: 261...), then normal
    tokens: ``▁``, every printable ASCII character with and without a ``▁`` prefix,
    and common words (plus ``extra_words``) together with all their prefixes, so
    SentencePiece's score-based merging can build every whole word. Longer normal
    tokens get higher scores.
    """
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    controls = [*_CONTROL_TOKENS, *(t for t in control_tokens if t not in _CONTROL_TOKENS)]
    tokens += controls
    types += [gguf.TokenType.CONTROL] * len(controls)
    scores: list[float] = [0.0] * len(tokens)

    seen = set(tokens)
    normal: list[str] = [_SPIECE_SPACE]
    printable = [c for c in string.printable if c.isprintable() and c != " "]
    normal += printable
    normal += [_SPIECE_SPACE + c for c in printable]
    for word in (*_WORDS, *(extra_words or ())):
        normal += [word[:end] for end in range(1, len(word) + 1)]
    for tok in normal:
        if tok and tok not in seen:
            seen.add(tok)
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
            scores.append(float(len(tok)))
    return tokens, scores, [int(t) for t in types]


def _add_vocab(
    writer: gguf.GGUFWriter,
    chat_template: str | None,
    extra_words: Sequence[str] | None,
    control_tokens: Sequence[str] = (),
) -> int:
    tokens, scores, types = build_vocab(extra_words, control_tokens)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    return len(tokens)


def _add_hparams(
    writer: gguf.GGUFWriter,
    *,
    name: str,
    n_vocab: int,
    n_embd: int,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    n_ctx_train: int,
    file_type: int,
) -> None:
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(10000.0)


def _tensor_specs(
    n_vocab: int,
    n_embd: int,
    n_layer: int,
    n_head_kv: int,
    head_dim: int,
    n_ff: int,
) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """Yield ``(name, numpy_shape, kind)``; numpy shapes are ggml ``ne`` reversed."""
    n_embd_kv = n_head_kv * head_dim
    yield "token_embd.weight", (n_vocab, n_embd), "embd"
    for i in range(n_layer):
        yield f"blk.{i}.attn_norm.weight", (n_embd,), "norm"
        yield f"blk.{i}.attn_q.weight", (n_embd, n_embd), "weight"
        yield f"blk.{i}.attn_k.weight", (n_embd_kv, n_embd), "weight"
        yield f"blk.{i}.attn_v.weight", (n_embd_kv, n_embd), "weight"
        yield f"blk.{i}.attn_output.weight", (n_embd, n_embd), "weight"
        yield f"blk.{i}.ffn_norm.weight", (n_embd,), "norm"
        yield f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), "weight"
        yield f"blk.{i}.ffn_up.weight", (n_ff, n_embd), "weight"
        yield f"blk.{i}.ffn_down.weight", (n_embd, n_ff), "weight"
    yield "output_norm.weight", (n_embd,), "norm"
    yield "output.weight", (n_vocab, n_embd), "output"


def _make_tensor(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    kind: str,
    dtype: np.dtype,
    n_banned: int,
) -> np.ndarray:
    if kind == "norm":
        return np.ones(shape, dtype=np.float32)
    data = rng.standard_normal(shape, dtype=np.float32)
    data *= 0.02
    if kind == "embd":
        data[:, 0] = _STEER_EMBD
    elif kind == "output":
        data[:, 0] = 0.0
        data[:n_banned, 0] = _STEER_OUT
    return data if data.dtype == dtype else data.astype(dtype)


def write_llama_model(
    path: str | os.PathLike[str],
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 2048,
    chat_template: str | None = None,
    dtype: str = "f32",
    seed: int = 0,
    extra_words: list[str] | None = None,
    control_tokens: Sequence[str] = (),
) -> Path:
    """Write a random-weight llama-architecture GGUF model and return its path.

    ``control_tokens``: more control tokens after ChatML's (a model family's markers, which a
    real model writes as single tokens); like the others, they are steered away from
    unless a grammar or a logit bias asks for them.

    Tensors are generated and written one at a time, so memory stays bounded by the
    largest tensor even for big configurations. ``dtype`` is ``"f32"`` or ``"f16"``
    (norm weights are always f32). The defaults give a file of about 0.6 MB (f32) or
    0.3 MB (f16); ``seed`` makes the weights reproducible.
    """
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    path = Path(path)
    np_dtype = np.dtype(np.float16 if dtype == "f16" else np.float32)
    file_type = (
        gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
    )
    # the special, byte and ChatML tokens lead the vocabulary
    n_banned = 3 + 256 + len({*_CONTROL_TOKENS, *control_tokens})
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(path, "llama")
    try:
        n_vocab = _add_vocab(writer, chat_template, extra_words, control_tokens)
        _add_hparams(
            writer,
            name=f"tiny-llama-test-{n_embd}x{n_layer}",
            n_vocab=n_vocab,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_ff=n_ff,
            n_ctx_train=n_ctx_train,
            file_type=int(file_type),
        )
        head_dim = n_embd // n_head
        specs = list(_tensor_specs(n_vocab, n_embd, n_layer, n_head_kv, head_dim, n_ff))
        for name, shape, kind in specs:
            t_dtype = np.dtype(np.float32) if kind == "norm" else np_dtype
            nbytes = int(np.prod(shape)) * t_dtype.itemsize
            writer.add_tensor_info(name, shape, t_dtype, nbytes)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _name, shape, kind in specs:
            writer.write_tensor_data(_make_tensor(rng, shape, kind, np_dtype, n_banned))
    finally:
        writer.close()
    return path


def write_vocab_only_model(path: str | os.PathLike[str]) -> Path:
    """Write a vocab-only GGUF (like llama.cpp's ``ggml-vocab-*.gguf``) to ``path``.

    It holds the architecture, hyperparameters and tokenizer metadata of the default
    :func:`write_llama_model` model but zero tensors, so a normal load fails (missing
    tensors) while ``Llama(..., vocab_only=True)`` can still tokenize with it.
    """
    path = Path(path)
    writer = gguf.GGUFWriter(path, "llama")
    try:
        n_vocab = _add_vocab(writer, None, None)
        _add_hparams(
            writer,
            name="tiny-llama-vocab-only",
            n_vocab=n_vocab,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_head_kv=2,
            n_ff=128,
            n_ctx_train=2048,
            file_type=int(gguf.LlamaFileType.ALL_F32),
        )
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    finally:
        writer.close()
    return path


def write_truncated_model(path: str | os.PathLike[str]) -> Path:
    """Write a default model, then cut the file off halfway through its tensor data.

    The header, metadata and tensor infos stay intact; only the weights are incomplete.
    """
    path = write_llama_model(path)
    reader = gguf.GGUFReader(path)
    data_start = min(int(t.data_offset) for t in reader.tensors)
    del reader  # release the memory map before truncating
    full_size = path.stat().st_size
    os.truncate(path, data_start + (full_size - data_start) // 2)
    return path


def write_not_gguf(path: str | os.PathLike[str]) -> Path:
    """Write a plain text file (whatever its name, e.g. ``x.gguf``); return its path."""
    path = Path(path)
    text = "This is not a GGUF model file, just some plain text.\n"
    path.write_text(text, encoding="utf-8")
    return path


def write_bert_reranker(path: str | os.PathLike[str], *, n_embd: int = 32, n_layer: int = 2, n_head: int = 2,
                        n_ff: int = 64, n_ctx_train: int = 512, seed: int = 0) -> Path:
    """Write a random-weight BERT cross-encoder (pooling type rank, one score per pair) and
    return its path: a reranker of the shape of bge-reranker, in miniature.

    The WordPiece vocabulary holds [PAD] [UNK] [CLS] [SEP] [MASK], then every lowercase letter,
    digit and punctuation mark as a word start (``▁x``, as llama.cpp's converter writes them)
    and as a continuation (``x``), and a few whole words, so any lowercase ASCII text tokenizes.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    words = ("the", "cat", "dog", "sat", "on", "mat", "paris", "capital", "france", "is", "what", "weather")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [_SPIECE_SPACE + c for c in chars] + list(chars) + [_SPIECE_SPACE + w for w in words]
    types = [gguf.TokenType.CONTROL] * 5 + [gguf.TokenType.NORMAL] * (len(tokens) - 5)
    writer = gguf.GGUFWriter(path, "bert")
    try:
        writer.add_name("tiny-bert-reranker-test")
        writer.add_context_length(n_ctx_train)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_layer_norm_eps(1e-12)
        writer.add_causal_attention(False)
        writer.add_pooling_type(gguf.PoolingType.RANK)
        writer.add_token_type_count(2)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_tokenizer_model("bert")
        writer.add_token_list(tokens)
        writer.add_token_types([int(t) for t in types])
        writer.add_pad_token_id(0)
        writer.add_unk_token_id(1)
        writer.add_bos_token_id(2)  # [CLS]
        writer.add_cls_token_id(2) if hasattr(writer, "add_cls_token_id") else None
        writer.add_sep_token_id(3)
        writer.add_eos_token_id(3)
        writer.add_mask_token_id(4)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(True)

        def tensor(name: str, *shape: int, kind: str = "weight") -> None:
            if kind == "ones":
                data = np.ones(shape, dtype=np.float32)
            elif kind == "zeros":
                data = np.zeros(shape, dtype=np.float32)
            else:
                data = (rng.standard_normal(shape, dtype=np.float32) * 0.2).astype(np.float32)
            writer.add_tensor(name, data)

        n_vocab = len(tokens)
        tensor("token_embd.weight", n_vocab, n_embd)
        tensor("token_types.weight", 2, n_embd)
        tensor("position_embd.weight", n_ctx_train, n_embd)
        tensor("token_embd_norm.weight", n_embd, kind="ones")
        tensor("token_embd_norm.bias", n_embd, kind="zeros")
        for i in range(n_layer):
            for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
                tensor(f"blk.{i}.{name}.weight", n_embd, n_embd)
                tensor(f"blk.{i}.{name}.bias", n_embd, kind="zeros")
            tensor(f"blk.{i}.attn_output_norm.weight", n_embd, kind="ones")
            tensor(f"blk.{i}.attn_output_norm.bias", n_embd, kind="zeros")
            tensor(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
            tensor(f"blk.{i}.ffn_up.bias", n_ff, kind="zeros")
            tensor(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
            tensor(f"blk.{i}.ffn_down.bias", n_embd, kind="zeros")
            tensor(f"blk.{i}.layer_output_norm.weight", n_embd, kind="ones")
            tensor(f"blk.{i}.layer_output_norm.bias", n_embd, kind="zeros")
        tensor("cls.output.weight", 1, n_embd)
        tensor("cls.output.bias", 1, kind="zeros")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path


def write_mlp_projector(
    path: str | os.PathLike[str],
    *,
    n_embd_text: int = 64,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 64,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
) -> Path:
    """Write a tiny LLaVA-style vision projector (``mmproj``) for a text model of width ``n_embd_text``.

    llama.cpp's ``clip.cpp`` reads it as projector type ``mlp`` (LLaVA 1.5): a small ViT
    (patch embedding, learned positions, ``n_layer`` pre-norm blocks of which all but the
    last run, as LLaVA takes the second-to-last layer's features) and a two-layer GELU MLP
    into the text model's embedding space. Images are padded to a square and resized to
    ``image_size``, so every image becomes ``(image_size / patch_size) ** 2`` embeddings
    (16 with the defaults) and encodes in about a millisecond.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    n_patches = (image_size // patch_size) ** 2
    writer = gguf.GGUFWriter(path, "clip")
    try:
        writer.add_name("tiny-mlp-projector-test")
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_string("clip.projector_type", "mlp")
        writer.add_bool("clip.has_vision_encoder", True)
        writer.add_bool("clip.has_audio_encoder", False)
        writer.add_bool("clip.use_gelu", True)
        writer.add_uint32("clip.vision.embedding_length", n_embd)
        writer.add_uint32("clip.vision.attention.head_count", n_head)
        writer.add_uint32("clip.vision.feed_forward_length", n_ff)
        writer.add_uint32("clip.vision.block_count", n_layer)
        writer.add_uint32("clip.vision.projection_dim", n_embd_text)
        writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
        writer.add_uint32("clip.vision.image_size", image_size)
        writer.add_uint32("clip.vision.patch_size", patch_size)
        writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
        writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

        def weight(*shape: int, scale: float = 0.05) -> np.ndarray:
            return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

        tensors: list[tuple[str, np.ndarray]] = [
            ("v.patch_embd.weight", weight(n_embd, 3, patch_size, patch_size)),
            ("v.position_embd.weight", weight(n_patches, n_embd)),
        ]
        tensors += _encoder_blocks("v", n_layer, n_embd, n_ff, weight)
        out_w, out_b = _steered_output(weight(n_embd_text, n_ff))
        tensors += [("mm.0.weight", weight(n_ff, n_embd)), ("mm.0.bias", np.zeros(n_ff, dtype=np.float32)),
                    ("mm.2.weight", out_w), ("mm.2.bias", out_b)]
        _write_tensors(writer, path, tensors)
    finally:
        writer.close()
    return path


def write_audio_projector(
    path: str | os.PathLike[str],
    *,
    n_embd_text: int = 64,
    n_embd: int = 32,
    n_layer: int = 1,
    n_head: int = 4,
    n_ff: int = 64,
    n_mel: int = 128,
    seed: int = 0,
) -> Path:
    """Write a tiny Qwen2-Audio-style projector (``qwen2a``): a Whisper encoder (two 1-D
    convolutions over the log-mel spectrogram, learned positions, ``n_layer`` blocks) and one
    linear layer into the text model's embedding space. llama.cpp cuts audio into 30-second
    windows of 3000 mel frames; each becomes 750 embeddings (convolution stride 2, then an
    average pool of 2)."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    n_pos = 1500  # positions after the strided convolution of one 3000-frame window
    writer = gguf.GGUFWriter(path, "clip")
    try:
        writer.add_name("tiny-qwen2a-projector-test")
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_string("clip.projector_type", "qwen2a")
        writer.add_bool("clip.has_vision_encoder", False)
        writer.add_bool("clip.has_audio_encoder", True)
        writer.add_uint32("clip.audio.embedding_length", n_embd)
        writer.add_uint32("clip.audio.attention.head_count", n_head)
        writer.add_uint32("clip.audio.feed_forward_length", n_ff)
        writer.add_uint32("clip.audio.block_count", n_layer)
        writer.add_uint32("clip.audio.projection_dim", n_embd_text)
        writer.add_float32("clip.audio.attention.layer_norm_epsilon", 1e-5)
        writer.add_uint32("clip.audio.num_mel_bins", n_mel)

        def weight(*shape: int, scale: float = 0.05) -> np.ndarray:
            return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

        def zeros(n: int) -> np.ndarray:
            return np.zeros(n, dtype=np.float32)

        tensors: list[tuple[str, np.ndarray]] = [
            # a convolution's bias is one value per output channel, broadcast along time
            ("a.conv1d.1.weight", weight(n_embd, n_mel, 3)), ("a.conv1d.1.bias", zeros(n_embd).reshape(n_embd, 1)),
            ("a.conv1d.2.weight", weight(n_embd, n_embd, 3)), ("a.conv1d.2.bias", zeros(n_embd).reshape(n_embd, 1)),
            ("a.position_embd.weight", weight(n_pos, n_embd)),
        ]
        tensors += _encoder_blocks("a", n_layer, n_embd, n_ff, weight, key_bias=False)  # Whisper's keys have none
        out_w, out_b = _steered_output(weight(n_embd_text, n_embd))
        tensors += [("mm.a.fc.weight", out_w), ("mm.a.fc.bias", out_b)]
        _write_tensors(writer, path, tensors)
    finally:
        writer.close()
    return path


def _encoder_blocks(prefix: str, n_layer: int, n_embd: int, n_ff: int, weight: Callable[..., np.ndarray],
                    key_bias: bool = True) -> list[tuple[str, np.ndarray]]:
    """The tensors of ``n_layer`` pre-norm transformer blocks as clip.cpp names them (``v.blk.N`` or ``a.blk.N``)."""
    tensors: list[tuple[str, np.ndarray]] = []
    for i in range(n_layer):
        block = f"{prefix}.blk.{i}"
        for norm in ("ln1", "ln2"):
            tensors += [(f"{block}.{norm}.weight", np.ones(n_embd, dtype=np.float32)),
                        (f"{block}.{norm}.bias", np.zeros(n_embd, dtype=np.float32))]
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors.append((f"{block}.{name}.weight", weight(n_embd, n_embd)))
            if key_bias or name != "attn_k":
                tensors.append((f"{block}.{name}.bias", np.zeros(n_embd, dtype=np.float32)))
        tensors += [(f"{block}.ffn_up.weight", weight(n_ff, n_embd)),
                    (f"{block}.ffn_up.bias", np.zeros(n_ff, dtype=np.float32)),
                    (f"{block}.ffn_down.weight", weight(n_embd, n_ff)),
                    (f"{block}.ffn_down.bias", np.zeros(n_embd, dtype=np.float32))]
    return tensors


def _steered_output(out_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A projector's last layer that keeps the text model's steering dimension (see the module
    docstring), so text after a picture or a sound is still steered away from control tokens."""
    out_b = np.zeros(out_w.shape[0], dtype=np.float32)
    out_w[0, :] = 0.0
    out_b[0] = _STEER_EMBD
    return out_w, out_b


def _write_tensors(writer: gguf.GGUFWriter, path: Path, tensors: list[tuple[str, np.ndarray]]) -> None:
    for name, data in tensors:
        writer.add_tensor(name, data)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()

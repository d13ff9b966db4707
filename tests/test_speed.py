"""The precision ``auto`` picks per machine, and what the quantized model transcribes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import EVAL_DIR, reference

from bentowhisper.engine.decoding import decode_batch
from bentowhisper.engine.loading import load_whisper
from bentowhisper.engine.speed import (
    AVX2_QUANTIZATION,
    QUANTIZABLE_PARTS,
    CpuFeatures,
    SpeedChoice,
    choose_speed,
    quantized_parts,
)
from bentowhisper.server.audio import decode_audio
from bentowhisper.server.features import LogMel
from bentowhisper.server.longform import HOP_LENGTH, WINDOW_SAMPLES
from bentowhisper.wire import DecodeJob

AVX2 = CpuFeatures("AVX2", bf16=False)
ZEN4 = CpuFeatures("AVX512", bf16=True)


# --------------------------------------------------------------------------------------------
# the choice (pure logic)


def test_auto_on_a_cpu_with_bf16_is_bf16_without_quantization() -> None:
    choice = choose_speed("cpu", "auto", "auto", ZEN4)
    assert (choice.dtype, choice.quantization) == ("bfloat16", "none")
    assert "AVX512, with AVX512-BF16/AMX" in choice.reason


def test_auto_on_avx2_is_fp32_with_the_avx2_quantization() -> None:
    choice = choose_speed("cpu", "auto", "auto", AVX2)
    assert (choice.dtype, choice.quantization) == ("float32", AVX2_QUANTIZATION)
    assert "AVX2, no AVX512-BF16/AMX" in choice.reason
    assert choice.describe() == f"dtype float32, quantization {AVX2_QUANTIZATION} ({choice.reason})"


def test_auto_dtype_without_quantization_keeps_the_old_rule() -> None:
    assert choose_speed("cpu", "auto", "none", AVX2).dtype == "float32"
    assert choose_speed("cpu", "auto", "none", ZEN4).dtype == "bfloat16"
    assert choose_speed("cuda", "auto", "auto", None) == SpeedChoice(
        "float16", "none", "auto on cuda: fp16"
    )


def test_an_explicit_dtype_turns_auto_quantization_off() -> None:
    # float32 is how a user asks for batch-invariant results (README): no int8 behind it
    for features in (AVX2, ZEN4):
        choice = choose_speed("cpu", "float32", "auto", features)
        assert (choice.dtype, choice.quantization) == ("float32", "none")
    assert choose_speed("cpu", "bf16", "auto", AVX2).dtype == "bf16"


def test_explicit_int8_means_fp32_and_only_on_the_cpu() -> None:
    assert choose_speed("cpu", "auto", "int8", ZEN4) == SpeedChoice(
        "float32", "int8:encoder,decoder,proj_out", "quantization as configured"
    )
    assert choose_speed("cpu", "float32", "int8:proj_out", AVX2).quantization == "int8:proj_out"
    with pytest.raises(ValueError, match="CPU only"):
        choose_speed("cuda", "auto", "int8", None)
    with pytest.raises(ValueError, match="needs dtype float32"):
        choose_speed("cpu", "bfloat16", "int8:decoder", ZEN4)


def test_quantized_parts() -> None:
    assert quantized_parts("none") == ()
    assert quantized_parts("int8") == QUANTIZABLE_PARTS
    assert quantized_parts("int8:proj_out, decoder") == ("decoder", "proj_out")
    for bad, match in (("int4", "unknown quantization"), ("int8:lm_head", "lm_head")):
        with pytest.raises(ValueError, match=match):
            quantized_parts(bad)
    with pytest.raises(ValueError, match="unknown quantization"):
        choose_speed("cpu", "auto", "fp8", AVX2)


# --------------------------------------------------------------------------------------------
# the quantized model on real audio


def _window(bundle, clip: str) -> DecodeJob:
    audio = decode_audio((EVAL_DIR / clip).read_bytes())
    mel = LogMel.from_checkpoint(bundle.checkpoint)(audio[:WINDOW_SAMPLES])
    frames = min(len(audio), WINDOW_SAMPLES) // HOP_LENGTH
    return DecodeJob.for_window(mel, language="en", num_frames=frames)


def _words(text: str) -> list[str]:
    return "".join(c for c in text.lower() if c.isalnum() or c.isspace()).split()


@pytest.fixture(scope="module")
def tiny_en(converted_models_dir: Path) -> dict:
    path = str(converted_models_dir / "tiny.en")
    return {
        quantization: load_whisper(path, device="cpu", dtype="float32", quantization=quantization)
        for quantization in ("none", AVX2_QUANTIZATION)
    }


def test_only_the_chosen_parts_are_quantized(tiny_en: dict) -> None:
    model = tiny_en[AVX2_QUANTIZATION].model
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(model.proj_out, dynamic)
    assert isinstance(model.model.decoder.layers[0].fc1, dynamic)
    assert type(model.model.encoder.layers[0].fc1) is torch.nn.Linear
    # the token embeddings proj_out was tied to stay fp32
    assert model.model.decoder.embed_tokens.weight.dtype == torch.float32
    assert tiny_en[AVX2_QUANTIZATION].speed.quantization == AVX2_QUANTIZATION


@pytest.mark.parametrize(
    "clip, clip_id",
    [("audio/en_misc/jfk.flac", "jfk"), ("audio/en_ljspeech/LJ001-0001.wav", "LJ001-0001")],
)
def test_the_quantized_decoder_transcribes_as_fp32_does(tiny_en: dict, clip, clip_id) -> None:
    texts = {}
    for quantization, bundle in tiny_en.items():
        (result,) = decode_batch(bundle, [_window(bundle, clip)])
        assert result.error is None
        texts[quantization] = bundle.vocab.decode(result.tokens)  # text tokens only
    fp32, int8 = (_words(texts[q]) for q in ("none", AVX2_QUANTIZATION))
    ref = _words(reference(clip_id))
    # the same words, or at most one different in the clip; and int8 not further from the
    # reference than fp32 by more than that word
    assert sum(a != b for a, b in zip(fp32, int8, strict=False)) + abs(len(fp32) - len(int8)) <= 1
    assert len(set(int8) - set(ref)) <= len(set(fp32) - set(ref)) + 1


def test_kernels_capped_to_avx2_get_the_avx2_default() -> None:
    """``ATEN_CPU_CAPABILITY=avx2`` (how compare.py --cap-isa emulates an AVX2-only CPU) makes
    ``auto`` pick what it picks on one, whatever this CPU has."""
    code = (
        "from bentowhisper.engine.loading import cpu_features\n"
        "from bentowhisper.engine.speed import choose_speed\n"
        "f = cpu_features(); c = choose_speed('cpu', 'auto', 'auto', f)\n"
        "print(f.capability, f.bf16, c.dtype, c.quantization)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == ["AVX2", "False", "float32", AVX2_QUANTIZATION]

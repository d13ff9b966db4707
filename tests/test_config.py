"""Settings: profiles from configs/, environment overrides, and the GPU profile on CPU-sized
settings (it loads and transcribes; the GPU itself is not available here)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support import EVAL_DIR, REPO_ROOT

from bentowhisper.config import Settings, load_settings
from bentowhisper.engine.decoding import decode_batch
from bentowhisper.engine.loading import load_from_settings
from bentowhisper.server.audio import decode_audio
from bentowhisper.server.features import LogMel
from bentowhisper.server.longform import TranscribeOptions, transcribe


def test_cpu_profile_is_the_default() -> None:
    settings = load_settings({})
    assert settings.model == "base"
    assert settings.device == "cpu" and settings.dtype == "auto"
    assert settings.attn_implementation == "hybrid"
    assert settings.model_aliases == ["whisper-1"]


def test_gpu_profile() -> None:
    settings = load_settings({"BENTOWHISPER_CONFIG": "configs/gpu.yaml"})
    assert settings.model == "openai/whisper-large-v3-turbo"
    assert (settings.device, settings.dtype) == ("cuda", "float16")
    assert settings.max_batch_size > load_settings({}).max_batch_size


def test_environment_overrides_every_kind_of_field() -> None:
    settings = load_settings(
        {
            "BENTOWHISPER_MAX_BATCH_SIZE": "3",
            "BENTOWHISPER_MAX_UPLOAD_MB": "1.5",
            "BENTOWHISPER_API_KEYS": "a, b,,c",
            "BENTOWHISPER_MODEL": "tiny.en",
        }
    )
    assert settings.max_batch_size == 3
    assert settings.max_upload_bytes == int(1.5 * 1024 * 1024)
    assert settings.api_keys == ["a", "b", "c"]
    assert settings.model == "tiny.en"


def test_unknown_keys_in_a_profile_are_refused(tmp_path: Path) -> None:
    profile = tmp_path / "typo.yaml"
    profile.write_text("max_bach_size: 4\n")
    with pytest.raises(ValueError, match="max_bach_size"):
        load_settings({"BENTOWHISPER_CONFIG": str(profile)})


def test_profiles_set_every_field() -> None:
    """configs/ documents every setting: each profile names them all."""
    import yaml

    fields = set(Settings.__dataclass_fields__)
    for profile in ("cpu.yaml", "gpu.yaml"):
        assert set(yaml.safe_load((REPO_ROOT / "configs" / profile).read_text())) == fields


def test_gpu_profile_on_cpu_sized_settings_transcribes(converted_models_dir: Path) -> None:
    """The GPU profile with only device, dtype and model scaled down to this machine: its
    batching, attention and loading path work end to end."""
    settings = load_settings(
        {
            "BENTOWHISPER_CONFIG": "configs/gpu.yaml",
            "BENTOWHISPER_DEVICE": "cpu",
            "BENTOWHISPER_DTYPE": "float32",
            "BENTOWHISPER_MODEL": "tiny.en",
            "BENTOWHISPER_MODELS_DIR": str(converted_models_dir),
        }
    )
    bundle = load_from_settings(settings)
    audio = decode_audio(EVAL_DIR / "audio/en_misc/jfk.flac")

    async def decode(jobs):
        return decode_batch(bundle, jobs)

    features = LogMel.from_checkpoint(bundle.checkpoint)
    done = asyncio.run(transcribe(audio, TranscribeOptions(), decode, bundle.vocab, features))
    result = done.transcription
    assert "ask not what your country can do for you" in result.text.lower().replace(",", "")


def test_a_mistyped_variable_fails_with_its_name_and_a_suggestion() -> None:
    with pytest.raises(
        ValueError,
        match=r"BENTOWHISPER_MAX_BACH_SIZE \(did you mean BENTOWHISPER_MAX_BATCH_SIZE\?\)",
    ):
        load_settings({"BENTOWHISPER_MAX_BACH_SIZE": "4"})
    with pytest.raises(ValueError, match="BENTOWHISPER_NOTHING_LIKE_IT"):
        load_settings({"BENTOWHISPER_NOTHING_LIKE_IT": "1"})
    # The prefix's other variables are no settings, and no error.
    assert load_settings({"BENTOWHISPER_FFMPEG": "ffmpeg", "BENTOWHISPER_EVAL_DIR": "/x"}).model

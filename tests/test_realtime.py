"""Realtime transcription sessions (``/v1/realtime?intent=transcription``).

Unit tests of the pure parts (codecs, event parsing, the session's buffer rules), then
end-to-end tests against a real ``bentoml serve`` driven by the ``openai`` SDK's realtime
client: a dev clip streamed in 100 ms chunks at real time, with server VAD and with manual
commits; bad events; authentication; sessions that open and drop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import EVAL_DIR

from bentowhisper.server.audio import find_ffmpeg
from bentowhisper.server.realtime.codecs import AudioDecoder, Resampler
from bentowhisper.server.realtime.events import (
    EventError,
    ServerVad,
    SessionConfig,
    apply_update,
    parse_client_event,
)
from bentowhisper.server.realtime.session import Limits, Session
from bentowhisper.server.realtime.vad import SileroStream

CLIP = EVAL_DIR / "audio" / "en_ljspeech" / "LJ001-0001.wav"  # 9.7 s, one reader, dev set


def ffmpeg_raw(path: Path, rate: int, fmt: str = "s16le") -> bytes:
    """``path`` as raw mono samples in FFmpeg's ``fmt`` (s16le, mulaw, alaw) at ``rate``."""
    command = [find_ffmpeg(), "-v", "error", "-i", str(path), "-ac", "1", "-ar", str(rate)]
    return subprocess.run([*command, "-f", fmt, "-"], capture_output=True, check=True).stdout


# --------------------------------------------------------------------------------------------
# Codecs


@pytest.mark.parametrize("fmt, kind", [("mulaw", "audio/pcmu"), ("alaw", "audio/pcma")])
def test_g711_decodes_as_ffmpeg_does(tmp_path: Path, fmt: str, kind: str) -> None:
    encoded = ffmpeg_raw(CLIP, 8000, fmt)
    (tmp_path / "clip.g711").write_bytes(encoded)
    expanded = subprocess.run(
        [
            find_ffmpeg(),
            "-v",
            "error",
            "-f",
            fmt,
            "-ar",
            "8000",
            "-ac",
            "1",
            "-i",
            str(tmp_path / "clip.g711"),
            "-f",
            "s16le",
            "-",
        ],
        capture_output=True,
        check=True,
    ).stdout
    reference = np.frombuffer(expanded, "<i2").astype(np.float32) / 32768.0
    decoder = AudioDecoder(kind, 8000)
    decoder.resample = Resampler(8000, 8000)  # compare the expansion itself, at 8 kHz
    assert np.array_equal(decoder(encoded), reference)


def test_resampler_is_seamless_across_chunks_and_accurate() -> None:
    rate = 24000
    t = np.arange(rate * 2) / rate
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    whole = Resampler(rate)(tone)
    chunked_resampler = Resampler(rate)
    chunked = np.concatenate([chunked_resampler(c) for c in np.array_split(tone, 37)])
    assert len(chunked) == len(whole) > 0.99 * 2 * 16000
    assert np.abs(chunked - whole).max() < 1e-6
    expected = np.sin(2 * np.pi * 440 * np.arange(len(whole)) / 16000)
    assert np.abs(whole[100:-100] - expected[100:-100]).max() < 1e-3
    # A 10 kHz tone is above 16 kHz's Nyquist frequency: filtered out, not folded to 6 kHz.
    alias = Resampler(rate)(np.sin(2 * np.pi * 10_000 * t).astype(np.float32))
    assert np.abs(alias[100:]).max() < 1e-3


def test_pcm16_sample_split_across_chunks() -> None:
    data = (np.arange(-50, 50, dtype="<i2") * 300).tobytes()
    decoder = AudioDecoder("audio/pcm", 16000)
    parts = [decoder(data[:51]), decoder(data[51:])]
    assert np.array_equal(np.concatenate(parts) * 32768, np.arange(-50, 50) * 300.0)


# --------------------------------------------------------------------------------------------
# Events


def test_session_update_ga_and_beta_shapes() -> None:
    ga = apply_update(
        SessionConfig(),
        {
            "type": "session.update",
            "session": {
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcmu"},
                        "transcription": {"model": "whisper-1", "language": "en"},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 800},
                    }
                },
                "include": ["item.input_audio_transcription.logprobs"],
            },
        },
    )
    assert (ga.format, ga.rate, ga.language) == ("audio/pcmu", 8000, "en")
    assert ga.turn_detection == ServerVad(silence_duration_ms=800)
    manual = apply_update(
        ga, {"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}
    )
    assert manual.turn_detection is None and manual.format == "audio/pcmu"  # rest kept
    beta = apply_update(
        SessionConfig(),
        {
            "type": "transcription_session.update",
            "session": {
                "input_audio_format": "g711_alaw",
                "input_audio_transcription": {"model": "whisper-1", "prompt": "Names: Ada."},
                "turn_detection": None,
            },
        },
    )
    assert (beta.format, beta.prompt, beta.turn_detection) == ("audio/pcma", "Names: Ada.", None)
    assert beta.beta("sess_1")["input_audio_format"] == "g711_alaw"
    assert ga.ga("sess_1")["audio"]["input"]["format"] == {"type": "audio/pcmu"}


@pytest.mark.parametrize(
    "session, param",
    [
        ({"audio": {"input": {"format": {"type": "audio/opus"}}}}, "session.audio.input.format"),
        (
            {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 44100}}}},
            "session.audio.input.format.rate",
        ),
        (
            {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
            "session.audio.input.turn_detection",
        ),
        ({"type": "realtime"}, "session.type"),
    ],
)
def test_bad_session_update_names_the_parameter(session: dict, param: str) -> None:
    with pytest.raises(EventError) as raised:
        apply_update(SessionConfig(), {"type": "session.update", "session": session})
    assert raised.value.param is not None and raised.value.param.startswith(param)


def test_unknown_event_and_bad_json() -> None:
    with pytest.raises(EventError) as raised:
        parse_client_event(json.dumps({"type": "response.create", "event_id": "e1"}))
    assert (raised.value.param, raised.value.event_id) == ("type", "e1")
    with pytest.raises(EventError) as raised:
        parse_client_event("{not json")
    assert raised.value.code == "invalid_json"


# --------------------------------------------------------------------------------------------
# Session rules (a fake decoder: these test the buffer logic, not the model)


def _session(limits: Limits, **config: object) -> tuple[Session, list[dict]]:
    sent: list[dict] = []

    async def send(event: dict) -> None:
        sent.append(event)

    async def transcribe(audio: np.ndarray, config: SessionConfig, partial: bool) -> str:
        return f"{len(audio) / 16000:.1f} seconds"

    session = Session(
        transcribe=transcribe,
        send=send,
        check=lambda c: c,
        vad=SileroStream,
        limits=limits,
        config=SessionConfig(**config),
    )
    return session, sent


def _append(samples: np.ndarray) -> str:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    return json.dumps(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}
    )


def test_manual_buffer_rules() -> None:
    async def run() -> list[dict]:
        session, sent = _session(Limits(max_turn_s=2.0), turn_detection=None, rate=16000)
        await session.handle(json.dumps({"type": "input_audio_buffer.commit", "event_id": "c0"}))
        await session.handle(_append(np.zeros(16000, np.float32)))
        await session.handle(_append(np.zeros(24000, np.float32)))  # 2.5 s > 2 s: refused
        await session.handle(json.dumps({"type": "input_audio_buffer.append", "audio": "%%"}))
        await session.handle(json.dumps({"type": "input_audio_buffer.commit"}))
        await asyncio.gather(*session.finals)
        await session.handle(json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}))
        await session.handle(json.dumps({"type": "input_audio_buffer.clear"}))
        await session.close()
        return sent

    sent = asyncio.run(run())
    kinds = [event["type"] for event in sent]
    assert kinds[0] == "error" and sent[0]["error"]["code"] == "input_audio_buffer_commit_empty"
    assert sent[0]["error"]["event_id"] == "c0"
    errors = [event["error"]["code"] for event in sent if event["type"] == "error"]
    assert errors == [
        "input_audio_buffer_commit_empty",
        "input_audio_buffer_too_large",
        "invalid_value",
    ]
    completed = [e for e in sent if e["type"].endswith("transcription.completed")]
    assert [e["transcript"] for e in completed] == ["1.0 seconds"]  # the refused chunk is not in
    assert completed[0]["usage"] == {"type": "duration", "seconds": 1.0}
    assert kinds[-1] == "input_audio_buffer.cleared"

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
import time
from pathlib import Path

import numpy as np
import pytest
from support import CLIP, IDLE_TIMEOUT_S, MAX_MESSAGE_KB, MAX_SESSIONS, english, wer

from bentowhisper.server.audio import find_ffmpeg
from bentowhisper.server.realtime.codecs import AudioDecoder, Resampler
from bentowhisper.server.realtime.events import (
    EventError,
    ServerVad,
    SessionConfig,
    apply_update,
    parse_client_event,
)
from bentowhisper.server.realtime.session import Limits, Session, stable_prefix


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


# --------------------------------------------------------------------------------------------
# End to end: a real `bentoml serve`, the openai SDK's realtime client


def _client(server, key: str = "none"):
    from openai import AsyncOpenAI

    # The beta client connects to wss://<base_url host> unless websocket_base_url says ws://.
    websocket = server.base_url.replace("http://", "ws://")
    return AsyncOpenAI(
        base_url=server.base_url, websocket_base_url=websocket, api_key=key, max_retries=0
    )


def _update(turn_detection: dict | None, fmt: dict | None = None) -> dict:
    return {
        "type": "transcription",
        "audio": {
            "input": {
                "format": fmt or {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": turn_detection,
            }
        },
    }


async def _stream(connection, pcm: bytes, *, rate: int = 24000, commit: bool = False) -> None:
    """``pcm`` (16-bit) in 100 ms appends at real time, then 1 s of silence (or a commit)."""
    step = rate // 10 * 2
    start = time.monotonic()
    data = pcm if commit else pcm + bytes(rate * 2)
    for n, offset in enumerate(range(0, len(data), step)):
        chunk = base64.b64encode(data[offset : offset + step]).decode()
        await connection.input_audio_buffer.append(audio=chunk)
        await asyncio.sleep(max(0.0, start + (n + 1) / 10 - time.monotonic()))
    if commit:
        await connection.input_audio_buffer.commit()


async def _events_until_completed(connection, turns: int = 1, timeout: float = 240) -> list:
    """Every server event (with its arrival time) until ``turns`` completed or failed."""
    events = []

    async def collect() -> None:
        finished = 0
        async for event in connection:
            events.append((time.monotonic(), event))
            if event.type.startswith("conversation.item.input_audio_transcription.") and (
                event.type.endswith(("completed", "failed"))
            ):
                finished += 1
                if finished == turns:
                    return

    await asyncio.wait_for(collect(), timeout)
    return events


def _file_wer(server) -> tuple[float, str]:
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    with open(CLIP, "rb") as audio:
        text = client.audio.transcriptions.create(model="whisper-1", file=audio).text
    return wer(_reference(), text), text


def _reference() -> str:
    from support import reference

    return reference(CLIP.stem)


@pytest.mark.parametrize(
    ("hypothesis", "sent"),
    [
        ("printing in the only", "printing in the"),  # the last word is held back
        ("Now.", ""),
        ("", ""),
        # partials of LJ001-0004 and LJ001-0009 on a 5 s encoding (base): cut where they loop
        ("produced the block books, produced the block books, produced the", "produced the block"),
        ("Printing then. Printing then. Printing then. Print", "Printing"),
        ("Printing then for our purpose. Printing then", "Printing then for our"),
        ("printing printing printing", ""),
        ("the cat and the dog and the bird", "the cat and the dog and the"),
        ("it was very very good", "it was"),  # a real repetition waits for the transcript
    ],
)
def test_partial_hypotheses_are_sent_up_to_a_loop(hypothesis: str, sent: str) -> None:
    assert stable_prefix(hypothesis) == sent


@pytest.mark.slow
def test_server_vad_streams_deltas_before_speech_stops(tiny_server) -> None:

    pcm = ffmpeg_raw(CLIP, 24000)

    async def run() -> list:
        async with _client(tiny_server).realtime.connect(
            extra_query={"intent": "transcription"}
        ) as connection:
            await connection.session.update(session=_update({"type": "server_vad"}))
            sender = asyncio.create_task(_stream(connection, pcm))
            # The clip's pauses are short: one turn at 500 ms silence_duration_ms.
            events = await _events_until_completed(connection)
            await sender
            return events

    events = asyncio.run(run())
    kinds = [event.type for _, event in events]
    assert kinds[:2] == ["session.created", "session.updated"], kinds
    stopped = kinds.index("input_audio_buffer.speech_stopped")
    assert kinds.index("input_audio_buffer.speech_started") < stopped
    deltas = [i for i, kind in enumerate(kinds) if kind.endswith("transcription.delta")]
    assert deltas and deltas[0] < stopped, kinds  # text while the turn is still spoken
    completed = events[-1][1]
    assert completed.type.endswith("transcription.completed")
    assert completed.usage.type == "duration" and 9 < completed.usage.seconds < 12
    # Partial hypotheses may differ from the final one in case and punctuation.
    spoken = "".join(event.delta for _, event in events if event.type.endswith(".delta"))
    assert english(spoken).split()[:1] == english(completed.transcript).split()[:1], spoken
    file_wer, file_text = _file_wer(tiny_server)
    realtime_wer = wer(_reference(), completed.transcript)
    assert realtime_wer <= 1.1 * file_wer, (completed.transcript, file_text)


@pytest.mark.slow
def test_manual_commits_and_beta_names(tiny_server) -> None:
    """``turn_detection: null``: the client commits; deltas come while the buffer grows.
    Through the beta client, whose session event is ``transcription_session.update``."""

    pcm = ffmpeg_raw(CLIP, 24000)

    async def run() -> list:
        client = _client(tiny_server)
        async with client.beta.realtime.connect(
            model="whisper-1", extra_query={"intent": "transcription"}
        ) as connection:
            await connection.transcription_session.update(
                session={
                    "input_audio_format": "pcm16",
                    "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                    "turn_detection": None,
                }
            )
            sender = asyncio.create_task(_stream(connection, pcm, commit=True))
            events = await _events_until_completed(connection)
            await sender
            return events

    events = asyncio.run(run())
    kinds = [event.type for _, event in events]
    assert kinds[:2] == ["transcription_session.created", "transcription_session.updated"]
    assert "input_audio_buffer.speech_started" not in kinds
    committed = kinds.index("input_audio_buffer.committed")
    deltas = [i for i, kind in enumerate(kinds) if kind.endswith("transcription.delta")]
    assert deltas and deltas[0] < committed, kinds
    completed = events[-1][1]
    file_wer, file_text = _file_wer(tiny_server)
    assert wer(_reference(), completed.transcript) <= 1.1 * file_wer, (
        completed.transcript,
        file_text,
    )


@pytest.mark.slow
def test_bad_events_get_errors_and_the_session_goes_on(tiny_server) -> None:
    pcmu = ffmpeg_raw(CLIP, 8000, "mulaw")[: 8000 * 3]

    async def run() -> list:
        async with _client(tiny_server).realtime.connect(
            extra_query={"intent": "transcription"}
        ) as connection:
            send = connection.send
            await send({"type": "response.create", "event_id": "evt_unknown"})
            await send({"type": "input_audio_buffer.append", "audio": "not base64!"})
            await send({"type": "session.update", "session": _update(None, {"type": "audio/opus"})})
            big = base64.b64encode(bytes(MAX_MESSAGE_KB * 1024)).decode()
            await send({"type": "input_audio_buffer.append", "audio": big})
            await connection.session.update(session=_update(None, {"type": "audio/pcmu"}))
            # 16 s of µ-law in 40 KB appends: the last ones go past the 15 s buffer limit
            for _ in range(4):
                await send({"type": "input_audio_buffer.append", "audio": _b64(bytes(32000))})
            await send({"type": "input_audio_buffer.clear"})
            for offset in range(0, len(pcmu), 8000):
                await send(
                    {"type": "input_audio_buffer.append", "audio": _b64(pcmu[offset:][:8000])}
                )
            await send({"type": "input_audio_buffer.commit"})
            return await _events_until_completed(connection)

    events = asyncio.run(run())
    errors = [event.error for _, event in events if event.type == "error"]
    assert [(e.code, e.event_id) for e in errors[:2]] == [
        ("invalid_value", "evt_unknown"),
        ("invalid_value", None),
    ]
    assert errors[2].param == "session.audio.input.format.type"
    assert errors[3].code == "message_too_large"
    assert errors[4].code == "input_audio_buffer_too_large"
    assert len(errors) == 5
    completed = events[-1][1]
    assert completed.type.endswith("transcription.completed")
    assert completed.transcript.lower().startswith("printing")  # 3 s of the clip, as µ-law


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.slow
def test_api_keys_by_header_or_subprotocol(tiny_server) -> None:
    import websockets
    from websockets.exceptions import InvalidStatus

    tiny_server.api_key_file.write_text("rt-key\n")
    url = tiny_server.base_url.replace("http", "ws") + "/realtime?intent=transcription"

    async def run() -> None:
        with pytest.raises(InvalidStatus) as refused:
            async with _client(tiny_server, "wrong").realtime.connect(
                extra_query={"intent": "transcription"}
            ):
                pass
        assert refused.value.response.status_code == 401
        body = json.loads(refused.value.response.body)
        assert body["error"]["type"] == "invalid_request_error"
        async with _client(tiny_server, "rt-key").realtime.connect(
            extra_query={"intent": "transcription"}
        ) as connection:
            assert (await connection.recv()).type == "session.created"
        protocols = ["realtime", "openai-insecure-api-key.rt-key"]
        async with websockets.connect(url, subprotocols=protocols) as browser_like:
            assert browser_like.subprotocol == "realtime"
            assert json.loads(await browser_like.recv())["type"] == "session.created"

    try:
        asyncio.run(run())
    finally:
        tiny_server.api_key_file.write_text("")


@pytest.mark.slow
def test_idle_timeout_and_session_limit(tiny_server) -> None:
    import websockets
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    url = tiny_server.base_url.replace("http", "ws") + "/realtime?intent=transcription"

    async def run() -> None:
        async with websockets.connect(url) as idle:
            assert json.loads(await idle.recv())["type"] == "session.created"
            started = time.monotonic()
            error = json.loads(await asyncio.wait_for(idle.recv(), IDLE_TIMEOUT_S + 10))
            assert error["error"]["code"] == "idle_timeout"
            assert time.monotonic() - started > IDLE_TIMEOUT_S - 1
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(idle.recv(), 5)
        held = [await websockets.connect(url) for _ in range(MAX_SESSIONS)]
        try:
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(url)
            assert refused.value.response.status_code == 429
        finally:
            for connection in held:
                await connection.close()

    asyncio.run(run())


def _metric(server, name: str) -> float:
    from support import metric

    return metric(server.url, name)


def _api_worker_rss_kb(server) -> int:
    workers = [
        key[0]
        for key, cmd in server.track().items()
        if "worker.service" in cmd and "--service-name bentowhisper" in cmd
    ]
    assert len(workers) == 1, workers
    status = Path(f"/proc/{workers[0]}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))


@pytest.mark.slow
def test_sessions_that_drop_leave_nothing_behind(tiny_server) -> None:
    """100 sessions stream speech (a partial decode in flight) and vanish without a close
    frame; afterwards no session, decode task or memory is left in the API worker."""
    import websockets

    url = tiny_server.base_url.replace("http", "ws") + "/realtime?intent=transcription"
    speech = _b64(ffmpeg_raw(CLIP, 24000)[: 24000 * 2 * 2])  # 2 s: enough for a partial

    async def one() -> None:
        connection = await websockets.connect(url)
        await connection.recv()
        await connection.send(json.dumps({"type": "session.update", "session": _update(None)}))
        await connection.send(json.dumps({"type": "input_audio_buffer.append", "audio": speech}))
        await asyncio.sleep(0.3)
        connection.transport.abort()  # vanish: no close frame

    async def wave(count: int) -> None:
        await asyncio.gather(*(one() for _ in range(count)))

    async def settle() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            active = _metric(tiny_server, "bentowhisper_realtime_sessions_active")
            tasks = _metric(tiny_server, "bentowhisper_realtime_decode_tasks")
            if active == 0 and tasks == 0:
                return
            await asyncio.sleep(1)
        raise AssertionError(f"{active} sessions and {tasks} decode tasks still open")

    async def run() -> tuple[int, int]:
        await wave(10)  # warm-up: allocator pools, lazily created objects
        await settle()
        before = _api_worker_rss_kb(tiny_server)
        for _ in range(10):
            await wave(10)
        await settle()
        return before, _api_worker_rss_kb(tiny_server)

    before, after = asyncio.run(run())
    assert after - before < 30_000, f"API worker RSS grew {before} -> {after} kB"


def test_server_vad_turns_on_real_speech() -> None:
    """The clip, then silence, in 100 ms appends: one turn around the speech; with a 4 s turn
    limit the same speech becomes contiguous turns."""
    speech = np.frombuffer(ffmpeg_raw(CLIP, 16000), "<i2").astype(np.float32) / 32768
    audio = np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(16000, np.float32)])

    async def run(limits: Limits) -> list[dict]:
        session, sent = _session(limits, rate=16000)
        for offset in range(0, len(audio), 1600):
            await session.handle(_append(audio[offset : offset + 1600]))
        await asyncio.gather(*session.finals)
        await session.close()
        return sent

    sent = asyncio.run(run(Limits()))
    kinds = [event["type"] for event in sent]
    assert kinds.count("input_audio_buffer.speech_started") == 1, kinds
    started = next(e for e in sent if e["type"] == "input_audio_buffer.speech_started")
    stopped = next(e for e in sent if e["type"] == "input_audio_buffer.speech_stopped")
    assert 0 <= started["audio_start_ms"] <= 500  # speech starts 0.5 s in; 300 ms padding
    assert 9_800 <= stopped["audio_end_ms"] <= 11_000  # ends 10.2 s in, plus 500 ms silence
    (completed,) = [e for e in sent if e["type"].endswith("transcription.completed")]
    seconds = (stopped["audio_end_ms"] - started["audio_start_ms"]) / 1000
    assert completed["usage"]["seconds"] == pytest.approx(seconds, abs=0.01)

    cut = asyncio.run(run(Limits(max_turn_s=4.0)))
    starts = [e["audio_start_ms"] for e in cut if e["type"].endswith("speech_started")]
    stops = [e["audio_end_ms"] for e in cut if e["type"].endswith("speech_stopped")]
    assert len(starts) == len(stops) >= 3
    assert starts[1:] == stops[:-1]  # each cut turn starts where the previous one ended
    assert all(stop - start <= 4_000 + 100 for start, stop in zip(starts, stops, strict=True))


def test_client_commit_during_server_vad_speech() -> None:
    """A commit in the middle of speech ends that turn; the rest of the speech is a new turn
    that starts after the commit, never overlapping the committed audio."""
    speech = np.frombuffer(ffmpeg_raw(CLIP, 16000), "<i2").astype(np.float32) / 32768
    audio = np.concatenate([speech, np.zeros(16000, np.float32)])

    async def run() -> list[dict]:
        session, sent = _session(Limits(), rate=16000)
        for offset in range(0, len(audio), 1600):
            await session.handle(_append(audio[offset : offset + 1600]))
            if offset == 16000 * 4:  # 4.1 s in, mid-sentence
                await session.handle(json.dumps({"type": "input_audio_buffer.commit"}))
        await asyncio.gather(*session.finals)
        return sent

    sent = asyncio.run(run())
    completed = [e for e in sent if e["type"].endswith("transcription.completed")]
    assert len(completed) == 2, [e["type"] for e in sent]
    total = sum(e["usage"]["seconds"] for e in completed)
    second = [e for e in sent if e["type"].endswith("speech_started")][-1]
    assert second["audio_start_ms"] >= 4_100 - 300 - 1  # no earlier than the commit, padded
    assert total <= len(audio) / 16000 + 0.01

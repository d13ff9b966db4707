"""A server started with ``BENTOWHISPER_DIARIZATION=false`` (the suite's ``tiny_server``):
no speaker-encoder process runs, ``diarized_json`` gets OpenAI's 400 envelope naming the
parameter, and every other format is served as before."""

from __future__ import annotations

import openai
import pytest
from support import ERROR_KEYS, EVAL_DIR

JFK = EVAL_DIR / "audio/en_misc/jfk.flac"


def test_no_speaker_encoder_and_diarized_json_is_refused(tiny_server) -> None:
    tiny_server.track()
    commands = list(tiny_server.seen.values())
    assert any("whisper-model" in command for command in commands), commands
    assert not any("speaker-encoder" in command for command in commands), commands

    with openai.OpenAI(base_url=tiny_server.base_url, api_key="none", max_retries=0) as client:
        with open(JFK, "rb") as audio, pytest.raises(openai.BadRequestError) as refused:
            client.audio.transcriptions.create(
                model="whisper-1", file=audio, response_format="diarized_json"
            )
        with open(JFK, "rb") as audio:
            text = client.audio.transcriptions.create(model="whisper-1", file=audio).text
    error = refused.value.body
    assert set(error) == ERROR_KEYS, error
    assert error["param"] == "response_format" and "without diarization" in error["message"]
    assert "ask not what your country" in text

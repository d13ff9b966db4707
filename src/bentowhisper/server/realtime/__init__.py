"""OpenAI's Realtime transcription sessions: ``GET /v1/realtime?intent=transcription`` (WebSocket).

``events``: the client and server events; ``codecs``: the input audio formats to 16 kHz float32;
``session``: the turn state machine (server VAD through ``server/vad.py``, or manual commits;
partial deltas, completed turns); ``route``: the WebSocket endpoint and its limits.
"""

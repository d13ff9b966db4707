"""Service metrics beyond BentoML's own (which already has the adaptive batch size histogram).

The collectors are created on first use, not at import: BentoML sets the Prometheus
multiprocess directory in each worker after the service module is imported, and a collector
created before that would never reach ``/metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from prometheus_client import Counter


@dataclass(frozen=True)
class Metrics:
    requests: Counter
    audio_seconds: Counter
    decode_failures: Counter
    windows: Counter
    fallbacks: Counter


@lru_cache(maxsize=1)
def metrics() -> Metrics:
    return Metrics(
        requests=Counter(
            "bentowhisper_requests",
            "Audio requests by endpoint, response format and HTTP status",
            ["endpoint", "response_format", "status"],
        ),
        audio_seconds=Counter(
            "bentowhisper_audio_seconds", "Seconds of audio transcribed or translated", ["task"]
        ),
        decode_failures=Counter(
            "bentowhisper_audio_decode_failures",
            "Uploads that could not be decoded as audio, by reason",
            ["reason"],
        ),
        windows=Counter(
            "bentowhisper_windows", "30 s windows decoded (fallback attempts not included)"
        ),
        fallbacks=Counter(
            "bentowhisper_fallbacks",
            "Windows decoded again at a higher temperature after failing the quality checks",
        ),
    )

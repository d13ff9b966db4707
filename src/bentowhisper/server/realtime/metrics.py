"""Prometheus metrics of realtime sessions, created on first use (see ``server/metrics.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from prometheus_client import Counter, Gauge


@dataclass(frozen=True)
class RealtimeMetrics:
    active: Gauge
    sessions: Counter
    turns: Counter
    turn_audio_seconds: Counter
    partials: Counter
    errors: Counter
    tasks: Gauge


@lru_cache(maxsize=1)
def realtime_metrics() -> RealtimeMetrics:
    # "livesum": summed over the live workers, so a dead worker's sessions do not linger.
    return RealtimeMetrics(
        active=Gauge(
            "bentowhisper_realtime_sessions_active",
            "Realtime sessions open now",
            multiprocess_mode="livesum",
        ),
        sessions=Counter(
            "bentowhisper_realtime_sessions",
            "Realtime connections by outcome (closed, idle_timeout, unauthorized, over_capacity,"
            " error)",
            ["outcome"],
        ),
        turns=Counter("bentowhisper_realtime_turns", "Committed turns by result", ["result"]),
        turn_audio_seconds=Counter(
            "bentowhisper_realtime_turn_audio_seconds", "Seconds of audio in completed turns"
        ),
        partials=Counter(
            "bentowhisper_realtime_partial_decodes", "Re-decodes of growing turns for deltas"
        ),
        errors=Counter(
            "bentowhisper_realtime_errors", "error events sent to clients, by code", ["code"]
        ),
        tasks=Gauge(
            "bentowhisper_realtime_decode_tasks",
            "Turn decodes (partial and final) in flight",
            multiprocess_mode="livesum",
        ),
    )

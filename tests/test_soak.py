"""A half-minute soak in CI (the 10-minute one is ``benchmarks/soak.py``, figures in
docs/reliability.md): 64 clients against the real server, every request answered."""

from __future__ import annotations

from soak import soak  # benchmarks/ is on pytest's pythonpath


def test_64_clients_for_half_a_minute_lose_nothing(server) -> None:
    report = soak(server.base_url, server.proc.pid, clients=64, duration_s=30.0)
    print({k: v for k, v in report.items() if k != "rss_samples"})

    assert report["requests"] >= 64
    assert report["outcomes"].get("ok", 0) > 0
    # 200, or 429/503 (which this server sends with Retry-After); never a timeout or a drop
    assert report["lost"] == 0, report["outcomes"]
    # both services measured, each holding at least an interpreter with its libraries
    assert {"bentowhisper", "whisper-model"} <= set(report["rss_by_process"]), report
    assert report["rss_peak_mb"] >= 2 * 50, report["rss_peak_mb"]
    # BentoML's unpatched timeout timer kept every request for 600 s. Over this soak's span
    # (7.5-30 s) the API worker then grew 8.7 %, fixed 3.2 % (the RSS series of
    # docs/results/soak-base-64x240s-before-fix.json and soak-base-64x600s-fixed.json).
    api_worker = report["rss_by_process"]["bentowhisper"]
    assert api_worker["growth"] < 0.06, api_worker

"""Pure logic of the benchmark tools (benchmarks/evaluate.py, load.py, hol.py); no server."""

from __future__ import annotations

import json
import random
from pathlib import Path

import evaluate as ev
import hol
import load
import numpy as np
import pytest

# --------------------------------------------------------------------------------------------
# normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("HELLO, World!", "hello world"),
        # numbers spelled out and written the same way
        (
            'the Gutenberg, or "forty-two line Bible" of about 1455,',
            "the gutenberg or 42 line bible of about 1455",
        ),
        ("Twenty-five dollars.", "$25"),
        ("$25", "$25"),
        # abbreviations, possessive, British spelling, fillers
        ("Mr. Smith's colour", "mister smith is color"),
        ("Uh, yes. Um, mm-hmm.", "yes"),
    ],
)
def test_normalise_english(text: str, expected: str) -> None:
    assert ev.normalise(text, "en") == expected


def test_normalise_other_languages_use_the_basic_normaliser() -> None:
    assert ev.normalise("Il a ajouté qu’« on ne devrait »", "fr") == "il a ajouté qu on ne devrait"
    assert ev.normalise("¿Cierto?  Sí.", "es") == "cierto sí"
    # no English number or spelling rules outside English
    assert ev.normalise("Twenty-five colour", "de") == "twenty five colour"


def test_same_language() -> None:
    assert ev.same_language("en", "en")
    assert ev.same_language("English", "en")
    assert ev.same_language("chinese", "zh")
    assert not ev.same_language("french", "en")


def test_chinese_is_scored_by_characters_without_spaces() -> None:
    assert ev.unit_for("zh") == "char"
    assert ev.unit_for("en") == "word"
    norm = ev.normalise("广州市，房地产。", "zh")
    assert ev.tokens(norm, "char") == list("广州市房地产")
    s = ev.score(norm, ev.normalise("广州市 房产", "zh"), "char")
    assert (s.ref_units, s.hits, s.deletions, s.errors) == (6, 5, 1, 1)
    assert s.rate == pytest.approx(1 / 6)


# --------------------------------------------------------------------------------------------
# WER / CER and aggregation


def test_score_counts_edit_operations() -> None:
    s = ev.score("a b c d", "a x c")
    assert (s.ref_units, s.hits, s.substitutions, s.deletions, s.insertions) == (4, 2, 1, 1, 0)
    assert s.rate == 0.5
    assert ev.score("a b", "").deletions == 2
    empty_ref = ev.score("", "a b")
    assert (empty_ref.ref_units, empty_ref.insertions, empty_ref.rate) == (0, 2, None)


def test_aggregate_pools_errors_instead_of_averaging_rates() -> None:
    scores = [ev.score("a b c d", "a x c"), ev.score("e f", "e f")]  # 2/4 and 0/2
    agg = ev.aggregate(scores)
    assert (agg["errors"], agg["ref_units"]) == (2, 6)
    assert agg["rate"] == pytest.approx(2 / 6)  # not the mean of ratios, 0.25
    assert agg["unit"] == "word"
    # an empty reference adds its insertions, and no reference units
    agg = ev.aggregate([*scores, ev.score("", "g")])
    assert agg["rate"] == pytest.approx(3 / 6)
    assert ev.aggregate([ev.score("a", "a", "word"), ev.score("b", "b", "char")])["unit"] == "mixed"
    assert ev.aggregate([])["rate"] is None


def clip(id_: str, rel: str, language: str = "en", text: str = "", **kw) -> ev.Clip:
    return ev.Clip(
        id=id_,
        path=Path("/nowhere") / rel,
        rel_path=rel,
        group=ev.derive_group(rel),
        language=language,
        duration_s=kw.pop("duration_s", 1.0),
        text=text,
        **kw,
    )


def test_summarise_by_language_group_and_unit() -> None:
    rows = []
    for c, hyp in [
        (clip("a", "audio/g1/a.wav", text="Hello there, World."), "hello world"),  # 1/3
        (clip("b", "audio/g1/b.wav", text="one"), "one two"),  # "1" vs "12": 1/1
        (clip("c", "audio/g2/c.wav", "fr", "Bonjour le monde"), "bonjour le monde"),  # 0/3
        (clip("d", "audio/zh/d.wav", "zh", "广州市房地产"), "广州市房产"),  # 1/6 chars
    ]:
        rows.append(
            {
                "id": c.id,
                "group": c.group,
                "language": c.language,
                "status": "ok",
                "duration_s": c.duration_s,
                "latency_s": 0.5,
                **ev.score_clip(c, hyp),
            }
        )
    rows.append(
        {
            "id": "e",
            "group": "g2",
            "language": "fr",
            "status": "error",
            "duration_s": 1.0,
            "latency_s": 0.1,
            "error": "503",
        }
    )
    out = ev.summarise(rows)
    assert out["by_language"]["en"]["rate"] == pytest.approx(2 / 4)
    assert out["by_language"]["fr"] == {**out["by_language"]["fr"], "clips": 1, "errors": 0}
    assert out["by_group"]["g1"]["rate"] == pytest.approx(2 / 4)
    assert out["by_group"]["g2"]["rate"] == 0.0
    assert out["by_group"]["zh"]["unit"] == "char"
    assert out["overall_by_unit"]["word"]["rate"] == pytest.approx(2 / 7)
    assert out["overall_by_unit"]["char"]["rate"] == pytest.approx(1 / 6)
    assert out["overall"]["unit"] == "mixed"
    assert out["overall"]["rate"] == pytest.approx(3 / 13)
    assert (out["clips_ok"], out["clips_failed"]) == (4, 1)
    report = {
        "settings": {"model": "m", "base_url": "u", "language_hint": False, "concurrency": 1},
        "total_wall_s": 1.0,
        "clips": rows,
        **out,
    }
    md = ev.render_markdown(report)
    assert "| g1 | 2 | word | 4 |" in md and "**error**" in md


def test_multi_speaker_reference_and_recall() -> None:
    c = clip(
        "ami",
        "audio/multi_speaker/ami.wav",
        text="LEFT: ignored",
        speakers={"A": "alpha bravo charlie delta", "B": "echo foxtrot"},
    )
    row = ev.score_clip(c, "Echo, foxtrot. Alpha bravo delta!")
    assert row["reference_norm"] == "alpha bravo charlie delta echo foxtrot"
    assert row["ref_units"] == 6
    assert row["speaker_recall"]["A"] == {"ref_units": 4, "hits": 3, "recall": 0.75}
    assert row["speaker_recall"]["B"] == {"ref_units": 2, "hits": 2, "recall": 1.0}


# --------------------------------------------------------------------------------------------
# manifest


@pytest.mark.parametrize(
    ("path", "group"),
    [
        ("audio/fleurs_fr/fleurs-fr-001.ogg", "fleurs_fr"),
        ("audio/zh/aishell.wav", "zh"),
        ("audio/multi_speaker/sources/source0.wav", "multi_speaker"),
        ("other/dir/x.wav", "dir"),
        ("x.wav", "ungrouped"),
    ],
)
def test_derive_group(path: str, group: str) -> None:
    assert ev.derive_group(path) == group


def test_load_and_select_manifest(tmp_path: Path) -> None:
    entries = [
        {"id": "a", "path": "audio/en_x/a.wav", "language": "en", "duration_s": 3, "text": "x"},
        {"id": "b", "path": "audio/fr_x/b.ogg", "language": "fr", "duration_s": 20, "text": "y"},
        {
            "id": "c",
            "path": "audio/en_x/c.wav",
            "language": "en",
            "duration_s": 60,
            "text": "z",
            "speakers": {"A": "z"},
        },
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(e) for e in entries) + "\n\n")
    clips = ev.load_manifest(manifest)
    assert [c.group for c in clips] == ["en_x", "fr_x", "en_x"]
    assert clips[0].path == tmp_path / "audio/en_x/a.wav"
    assert clips[2].speakers == {"A": "z"}
    assert [c.id for c in ev.select_clips(clips, groups=["en_x"])] == ["a", "c"]
    assert [c.id for c in ev.select_clips(clips, ids=["b", "c"])] == ["b", "c"]
    assert [c.id for c in ev.select_clips(clips, max_seconds=30)] == ["a", "b"]
    with pytest.raises(SystemExit):
        ev.check_filters(clips, ["nope"], None)


# --------------------------------------------------------------------------------------------
# client plumbing (no request is sent)


def test_classify_error() -> None:
    import openai

    httpx = pytest.importorskip("httpx2")
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/audio/transcriptions")
    status = openai.APIStatusError("busy", response=httpx.Response(503, request=request), body=None)
    assert ev.classify_error(status) == "503"
    assert ev.classify_error(openai.APITimeoutError(request=request)) == "timeout"
    assert ev.classify_error(openai.APIConnectionError(request=request)) == "connection"
    assert ev.classify_error(ValueError("x")) == "ValueError"


def test_client_settings() -> None:
    client = ev.make_client("http://127.0.0.1:9/v1/", "k", 5.0)
    try:
        assert client.max_retries == 0
        assert str(client.base_url) == "http://127.0.0.1:9/v1/"
    finally:
        client.close()
    with pytest.raises(SystemExit):
        ev.check_base_url("127.0.0.1:3000")
    kwargs = ev.transcription_kwargs("m", "a.wav", b"x", None, "json")
    assert "language" not in kwargs and kwargs["file"] == ("a.wav", b"x")
    assert ev.transcription_kwargs("m", "a.wav", b"x", "de", "json")["language"] == "de"


# --------------------------------------------------------------------------------------------
# percentiles, buckets, level summary


def test_percentile_matches_numpy() -> None:
    rng = random.Random(7)
    for n in (1, 2, 3, 10, 101):
        values = [rng.uniform(0, 10) for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 95, 99, 100):
            assert load.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert load.percentile([1, 2, 3, 4], 50) == 2.5
    assert load.percentile([10, 0], 95) == pytest.approx(9.5)
    assert load.percentile([], 50) is None
    with pytest.raises(ValueError):
        load.percentile([1], 101)


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [
        (0, "<5s"),
        (4.99, "<5s"),
        (5, "5-15s"),
        (14.99, "5-15s"),
        (15, "15-30s"),
        (29.9, "15-30s"),
        (30, "30s+"),
        (106.5, "30s+"),
    ],
)
def test_bucket_for(seconds: float, bucket: str) -> None:
    assert load.bucket_for(seconds) == bucket


def test_summarise_level() -> None:
    records = [
        load.Record("a", 2.0, 0.0, 1.0, "ok"),
        load.Record("b", 10.0, 0.1, 2.0, "ok"),
        load.Record("c", 40.0, 0.2, 3.0, "ok"),
        load.Record("a", 2.0, 1.0, 9.0, "503"),
        load.Record("b", 10.0, 2.0, 9.0, "timeout"),
    ]
    level = load.summarise_level(records, wall_s=10.0, concurrency=4)
    assert level["throughput_audio_s_per_s"] == pytest.approx(5.2)
    assert level["throughput_requests_per_s"] == pytest.approx(0.3)
    assert level["errors"] == {"503": 1, "timeout": 1}
    assert level["latency_s"]["p50"] == 2.0
    assert level["latency_s"]["p95"] == pytest.approx(np.percentile([1, 2, 3], 95))
    assert set(level["latency_by_clip_length_s"]) == {"<5s", "5-15s", "30s+"}
    assert level["latency_by_clip_length_s"]["30s+"]["p99"] == 3.0
    table = load.render_table([level])
    assert "| 4 | 5 | 3 | 503: 1, timeout: 1 | 5.20 | 0.30 | 2.00 |" in table


def test_plot_levels(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    levels = [
        load.summarise_level([load.Record("a", 5.0, 0, 1.0, "ok")], 1.0, c) for c in (1, 4, 16)
    ]
    out = tmp_path / "plot.png"
    load.plot_levels(levels, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# head-of-line helpers


def test_hol_helpers() -> None:
    assert hol.parse_ffmpeg_duration("  Duration: 00:10:00.50, start: 0.0") == 600.5
    assert hol.parse_ffmpeg_duration("  Duration: 01:00:11.00, start") == 3611.0
    assert hol.parse_ffmpeg_duration("no such file") is None
    assert hol.plan_concat([10.0, 5.0], 22) == [0, 1, 0]
    assert hol.plan_concat([10.0], 10) == [0]
    assert hol.plan_concat([10.0], 0) == []
    with pytest.raises(ValueError):
        hol.plan_concat([], 5)
    cmd = hol.concat_command("ffmpeg", [Path("a.wav"), Path("b.flac")], 22, Path("o.flac"))
    assert cmd[-3:] == ["-t", "22.000", "o.flac"]
    assert "concat=n=2:v=0:a=1[out]" in cmd[cmd.index("-filter_complex") + 1]
    assert hol.ratio(3.0, 1.5) == 2.0
    assert hol.ratio(None, 1.0) is None and hol.ratio(1.0, 0) is None
    summary = hol.phase_summary(
        [hol.Shot(0, 1.0, "ok"), hol.Shot(0, 3.0, "ok"), hol.Shot(0, 9.0, "timeout")]
    )
    assert (summary["n"], summary["p50"], summary["errors"]) == (2, 2.0, {"timeout": 1})

"""Multi-speaker mixtures with known turns, built from single-speaker dev clips.

Each speaker's material is their dev clips joined (LJ Speech's one reader, four LibriSpeech
readers identified by the first part of the clip id, JFK), trimmed of
leading/trailing silence and brought to one loudness, so loudness is no cue. A mixture
alternates 2-4 speakers in turns of 1.5-4 s, each piece cut at the quietest 20 ms near its
planned end (not mid-word), with 0.15-0.6 s pauses between turns; a faint noise floor keeps the
pauses from being digital silence. The reference turns are where each piece has speech (by
energy on the clean piece, independent of the VAD under test).

    python benchmarks/mixtures.py --out /tmp/mixtures   # writes mix-NN.wav + mix-NN.rttm
"""

from __future__ import annotations

import argparse
import json
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EVAL_DIR = REPO.parent / "shared" / "eval"
SAMPLE_RATE = 16000

# Speaker -> the manifest ids of their clips. The stereo file's left channel is LibriSpeech
# 61-70968-0000, so speaker "61" also gets that channel (read by stereo_channels()).
SPEAKERS: dict[str, list[str]] = {
    "LJ": [f"LJ001-{i:04d}" for i in range(1, 17)],
    "1089": ["1089-134686-0001"],
    "1221": ["1221-135766-0001", "1221-135766-0002"],
    "1995": ["1995-1837-0001"],
    "61": ["61-70968-0002"],
    "jfk": ["jfk"],
}
TARGET_RMS = 0.05
NOISE_RMS = 0.0005  # -66 dBFS


@dataclass
class Mixture:
    name: str
    audio: np.ndarray  # 16 kHz mono float32
    turns: list[tuple[float, float, str]]  # reference (start, end, speaker)

    @property
    def speakers(self) -> list[str]:
        return sorted({t[2] for t in self.turns})


def manifest(eval_dir: Path = EVAL_DIR) -> dict[str, dict]:
    with open(eval_dir / "manifest.jsonl", encoding="utf-8") as fh:
        return {entry["id"]: entry for entry in map(json.loads, fh)}


def load(path: Path) -> np.ndarray:
    """16 kHz mono float32 (FFmpeg, as the server decodes uploads)."""
    from bentowhisper.server.audio import decode_audio

    return decode_audio(path)


def stereo_channels(eval_dir: Path = EVAL_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The stereo file's left and right channels (16-bit PCM at 16 kHz), as float32."""
    with wave.open(str(eval_dir / "audio/multi_speaker/stereo_diarization.wav")) as w:
        assert w.getframerate() == SAMPLE_RATE and w.getnchannels() == 2 and w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
    audio = pcm.astype(np.float32) / 32768
    return audio[:, 0].copy(), audio[:, 1].copy()


def frame_energy(audio: np.ndarray, frame: int = 320) -> np.ndarray:
    n = len(audio) // frame
    return np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)


def trim(audio: np.ndarray, frame: int = 320) -> np.ndarray:
    """Drop leading/trailing frames 35 dB below the clip's loudest 20 ms."""
    energy = frame_energy(audio, frame)
    loud = np.flatnonzero(energy > energy.max() * 10 ** (-35 / 20))
    if len(loud) == 0:
        return audio
    return audio[loud[0] * frame : (loud[-1] + 1) * frame]


def material(eval_dir: Path = EVAL_DIR) -> dict[str, np.ndarray]:
    """Each speaker's clips joined (trimmed, 0.3 s apart), at one loudness."""
    clips = manifest(eval_dir)
    out = {}
    left, _ = stereo_channels(eval_dir)
    for speaker, ids in SPEAKERS.items():
        parts = [trim(load(eval_dir / clips[i]["path"])) for i in ids]
        if speaker == "61":
            parts.append(trim(left))
        gap = np.zeros(int(0.3 * SAMPLE_RATE), np.float32)
        joined = np.concatenate([x for p in parts for x in (p, gap)])
        speech = joined[np.abs(joined) > 1e-4]
        out[speaker] = (joined * TARGET_RMS / np.sqrt(np.mean(speech**2))).astype(np.float32)
    return out


def speech(audio: np.ndarray, frame: int = 320, bridge: float = 0.3) -> list[tuple[float, float]]:
    """Where a clean single-speaker piece has speech (seconds): 20 ms frames within 30 dB of its
    loudest, pauses shorter than ``bridge`` kept inside (as annotators do)."""
    energy = frame_energy(audio, frame)
    active = np.flatnonzero(energy > energy.max() * 10 ** (-30 / 20))
    spans: list[tuple[float, float]] = []
    for i in active:
        start, end = i * frame / SAMPLE_RATE, (i + 1) * frame / SAMPLE_RATE
        if spans and start - spans[-1][1] < bridge:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def _piece(audio: np.ndarray, at: int, want: int) -> tuple[int, int]:
    """A piece from ``at`` about ``want`` samples long, ending at the quietest 20 ms in the last
    0.6 s before the planned end, so no word is cut in half."""
    frame = 320
    end = min(len(audio), at + want)
    lo = max(at + frame, end - int(0.6 * SAMPLE_RATE))
    if end - lo < frame:
        return at, end
    energy = frame_energy(audio[lo:end], frame)
    return at, lo + int(np.argmin(energy)) * frame + frame // 2


def build(
    n_speakers: int, seed: int, mat: dict[str, np.ndarray], turns_per_speaker: int = 3
) -> Mixture:
    rng = np.random.default_rng(seed)
    # Only speakers with enough material for their turns, so no piece repeats.
    pool = [s for s in mat if len(mat[s]) > turns_per_speaker * 2.0 * SAMPLE_RATE]
    speakers = [str(s) for s in rng.choice(pool, n_speakers, replace=False)]
    # Each speaker starts at a random point of their material, so mixtures differ in content,
    # early enough that their turns (at most 4 s each) rarely wrap round to the start.
    need = turns_per_speaker * 4 * SAMPLE_RATE
    cursor = {s: int(rng.integers(0, max(1, len(mat[s]) - need))) for s in speakers}
    order = [s for _ in range(turns_per_speaker) for s in speakers]
    rng.shuffle(order)
    # No speaker follows themselves: that would be one turn, and hide the change.
    for i in range(1, len(order)):
        if order[i] == order[i - 1]:
            for j in range(i + 1, len(order)):
                if order[j] != order[i - 1] and (j + 1 >= len(order) or order[j + 1] != order[i]):
                    order[i], order[j] = order[j], order[i]
                    break
    chunks: list[np.ndarray] = []
    turns: list[tuple[float, float, str]] = []
    t = int(rng.uniform(0.2, 0.6) * SAMPLE_RATE)
    chunks.append(np.zeros(t, np.float32))
    for speaker in order:
        audio = mat[speaker]
        if cursor[speaker] >= len(audio) - SAMPLE_RATE:
            cursor[speaker] = 0
        start, end = _piece(audio, cursor[speaker], int(rng.uniform(1.5, 4.0) * SAMPLE_RATE))
        cursor[speaker] = end
        piece = trim(audio[start:end])
        turns += [(t / SAMPLE_RATE + a, t / SAMPLE_RATE + b, speaker) for a, b in speech(piece)]
        pause = np.zeros(int(rng.uniform(0.15, 0.6) * SAMPLE_RATE), np.float32)
        chunks += [piece, pause]
        t += len(piece) + len(pause)
    mix = np.concatenate(chunks)
    mix = mix + rng.normal(0, NOISE_RMS, len(mix)).astype(np.float32)
    return Mixture(f"mix{n_speakers}-{seed:02d}", mix.astype(np.float32), turns)


def mixtures(count: int = 10, first_seed: int = 0, eval_dir: Path = EVAL_DIR) -> list[Mixture]:
    """``count`` mixtures each of 2, 3 and 4 speakers, the same on every run. Seeds 0-9 tuned
    the clustering; later seeds are held out."""
    mat = material(eval_dir)
    seeds = range(first_seed, first_seed + count)
    return [build(k, seed, mat) for k in (2, 3, 4) for seed in seeds]


def write_rttm(path: Path, name: str, turns: list[tuple[float, float, str]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for start, end, speaker in turns:
            fh.write(
                f"SPEAKER {name} 1 {start:.3f} {end - start:.3f} <NA> <NA> {speaker} <NA> <NA>\n"
            )


def write_wav(path: Path | BinaryIO, audio: np.ndarray) -> None:
    with wave.open(path if not isinstance(path, Path) else str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=10, help="mixtures per speaker count")
    parser.add_argument("--first-seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for mix in mixtures(args.count, args.first_seed):
        write_wav(args.out / f"{mix.name}.wav", mix.audio)
        write_rttm(args.out / f"{mix.name}.rttm", mix.name, mix.turns)
        print(mix.name, f"{len(mix.audio) / SAMPLE_RATE:.1f} s", " ".join(mix.speakers))


if __name__ == "__main__":
    main()

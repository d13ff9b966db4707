"""Voice activity detection in the API process: Silero VAD through onnxruntime, without torch.

The weights are silero-vad's own (MIT, shipped in its wheel, nothing downloaded). Its
``silero_vad_16k_sequence.onnx`` export runs a block of 32 ms frames per call and gives the
same probabilities as ``silero_vad.onnx`` fed one frame at a time (checked bit-exact on the
long-form dev file), in a quarter of the time: one onnxruntime call per 16 s instead of a
Python loop of 500 calls, so the GIL is mostly free while it runs. silero-vad's own Python
helpers import torch, so only its data files are used.

:class:`SpeechDetector` is fed 16 kHz samples in pieces of any size (a WebSocket session's
frames, or a whole file) and reports speech regions as they close, with OpenAI's ``server_vad``
parameters; :func:`detect_speech` runs it over a whole file.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
FRAME = 512  # samples per Silero frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame that each frame is fed with
MAX_FRAMES = 512  # frames per onnxruntime call (16.4 s): bounds its transient memory
HIDDEN = 128
MODEL_FILE = "silero_vad_16k_sequence.onnx"
# Silero's own hysteresis: once speech has started it continues while the probability stays
# above threshold - 0.15, so a word's quiet tail does not end the region.
HYSTERESIS = 0.15
# Speech shorter than this is dropped: a click or a burst of noise, not a word (Silero's
# min_speech_duration_ms default).
MIN_SPEECH_MS = 250


@dataclass(frozen=True)
class VadParams:
    """OpenAI's ``server_vad`` parameters, with the REST API's defaults."""

    threshold: float = 0.5  # speech probability at which speech starts
    prefix_padding_ms: int = 300  # audio kept before the detected start
    silence_duration_ms: int = 200  # silence that ends a region; kept at its end

    def samples(self, ms: int) -> int:
        return ms * SAMPLE_RATE // 1000


@dataclass(frozen=True)
class SpeechRegions:
    """Speech in a whole file: ``regions`` are (start, end) sample offsets, sorted and
    disjoint, padded as the parameters say; ``probs`` holds one speech probability per
    32 ms frame (the pause finder for cutting a long region)."""

    regions: list[tuple[int, int]]
    probs: np.ndarray
    n_samples: int


@lru_cache(maxsize=1)
def _session():  # onnxruntime.InferenceSession; run() may be called from several threads
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # One thread: VAD runs beside HTTP handling and FFmpeg in the API process, and a frame's
    # LSTM step is too small to split.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the export carries unused initializers it warns about
    # find_spec locates the package without running its __init__, which imports torch
    spec = find_spec("silero_vad")
    assert spec is not None and spec.submodule_search_locations, "silero-vad is not installed"
    model = Path(next(iter(spec.submodule_search_locations))) / "data" / MODEL_FILE
    return onnxruntime.InferenceSession(
        str(model), sess_options=options, providers=["CPUExecutionProvider"]
    )


_load_lock = threading.Lock()


def session():
    """The shared onnxruntime session (loaded once, about 1 MB)."""
    with _load_lock:
        return _session()


@dataclass
class SpeechDetector:
    """Incremental VAD over a 16 kHz stream: :meth:`feed` samples, get the regions that closed.

    A region starts at the first frame whose probability reaches ``threshold`` (less
    ``prefix_padding_ms``, but not before the previous region's end) and ends once the
    probability has stayed below ``threshold - 0.15`` for ``silence_duration_ms`` (that silence
    included). Offsets count samples from the first one fed. :attr:`in_speech` and
    :attr:`speech_start` tell a streaming caller that a region is open.
    """

    params: VadParams = field(default_factory=VadParams)
    keep_probs: bool = False  # keep every frame's probability (whole files; not for streams)
    probs: list[np.ndarray] = field(default_factory=list)
    _pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))
    _h: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, HIDDEN), np.float32))
    _c: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, HIDDEN), np.float32))
    _frames: int = 0  # frames scored so far
    _start: int | None = None  # first speech frame of the open region
    _last_speech: int = 0  # frame after the open region's last speech frame
    _previous_end: int = 0  # sample where the last closed region ended

    @property
    def in_speech(self) -> bool:
        return self._start is not None and self._speech_frames() >= self._min_frames

    @property
    def speech_start(self) -> int | None:
        """Where the open region starts (padding included), once it counts as speech."""
        return self._padded_start() if self.in_speech else None

    @property
    def samples_fed(self) -> int:
        return self._frames * FRAME + len(self._pending)

    def feed(self, samples: np.ndarray) -> list[tuple[int, int]]:
        """Score the complete frames now available; the regions that ended, in order."""
        audio = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        whole = len(audio) // FRAME * FRAME
        self._pending = audio[whole:]
        closed: list[tuple[int, int]] = []
        for first in range(0, whole, MAX_FRAMES * FRAME):
            block = audio[first : min(whole, first + MAX_FRAMES * FRAME)]
            closed += self._step(self._score(block))
        return closed

    def flush(self) -> list[tuple[int, int]]:
        """End of stream: score the last partial frame (zero-padded), close an open region."""
        end_of_audio = self.samples_fed
        closed: list[tuple[int, int]] = []
        if len(self._pending):
            tail = np.zeros(FRAME, np.float32)
            tail[: len(self._pending)] = self._pending
            self._pending = np.zeros(0, np.float32)
            closed += self._step(self._score(tail))
        if self._start is not None:
            region = self._close(min(end_of_audio, self._last_speech * FRAME + self._silence))
            if region:
                closed.append(region)
        return [(start, min(end, end_of_audio)) for start, end in closed]

    # ----------------------------------------------------------------------------------------

    @property
    def _silence(self) -> int:
        return self.params.samples(self.params.silence_duration_ms)

    @property
    def _min_frames(self) -> int:
        return -(-MIN_SPEECH_MS * SAMPLE_RATE // 1000 // FRAME)

    def _speech_frames(self) -> int:
        return self._last_speech - (self._start or 0)

    def _padded_start(self) -> int:
        assert self._start is not None
        pad = self.params.samples(self.params.prefix_padding_ms)
        return max(self._start * FRAME - pad, self._previous_end)

    def _score(self, block: np.ndarray) -> np.ndarray:
        frames = block.reshape(-1, FRAME)
        contexts = np.empty((len(frames), CONTEXT), np.float32)
        contexts[0] = self._context
        contexts[1:] = frames[:-1, -CONTEXT:]
        self._context = frames[-1, -CONTEXT:].copy()
        probs, self._h, self._c = session().run(
            None,
            {"input": np.concatenate([contexts, frames], axis=1), "h": self._h, "c": self._c},
        )
        probs = np.asarray(probs, np.float32).reshape(-1)
        if self.keep_probs:
            self.probs.append(probs)
        return probs

    def _step(self, probs: np.ndarray) -> list[tuple[int, int]]:
        closed: list[tuple[int, int]] = []
        threshold = self.params.threshold
        low = max(threshold - HYSTERESIS, 0.01)
        silence_frames = -(-self._silence // FRAME)
        for prob in probs.tolist():
            frame = self._frames
            self._frames += 1
            if self._start is None:
                if prob >= threshold:
                    self._start, self._last_speech = frame, frame + 1
                continue
            if prob >= low:
                self._last_speech = frame + 1
            elif frame + 1 - self._last_speech >= silence_frames:
                region = self._close(self._last_speech * FRAME + self._silence)
                if region:
                    closed.append(region)
        return closed

    def _close(self, end: int) -> tuple[int, int] | None:
        """End the open region at sample ``end``; None if it was too short to be speech."""
        long_enough = self._speech_frames() >= self._min_frames
        start = self._padded_start()
        self._start = None
        if not long_enough:
            return None
        self._previous_end = end
        return start, end


def detect_speech(audio: np.ndarray, params: VadParams | None = None) -> SpeechRegions:
    """Speech regions of a whole 16 kHz file (CPU bound: call it from a thread)."""
    detector = SpeechDetector(params or VadParams(), keep_probs=True)
    regions = detector.feed(audio) + detector.flush()
    probs = np.concatenate(detector.probs) if detector.probs else np.zeros(0, np.float32)
    return SpeechRegions(regions=regions, probs=probs, n_samples=len(audio))


# Loudness normalisation for chunking_strategy="auto": quiet recordings are brought up to
# speech level before the VAD and the model see them.
TARGET_RMS = 0.1  # -20 dBFS
MAX_GAIN = 10.0  # +20 dB at most, so that near-silence is not raised to speech level
LEVEL_PERCENTILE = 95  # the loud (speech) frames set the level, not the pauses


def normalize_loudness(audio: np.ndarray) -> np.ndarray:
    """``audio`` scaled so its loud 100 ms frames sit at -20 dBFS RMS, never clipping."""
    step = SAMPLE_RATE // 10
    usable = len(audio) // step * step
    if usable == 0:
        return audio
    rms = np.sqrt(np.mean(np.square(audio[:usable].reshape(-1, step), dtype=np.float64), axis=1))
    level = float(np.percentile(rms, LEVEL_PERCENTILE))
    peak = float(np.max(np.abs(audio)))
    if level <= 0 or peak <= 0:
        return audio
    gain = min(TARGET_RMS / level, MAX_GAIN, 0.99 / peak)
    return (audio * np.float32(gain)).astype(np.float32, copy=False)

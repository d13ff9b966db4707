"""Whisper's log-mel features in numpy, so that the API process never imports torch.

transformers' ``WhisperFeatureExtractor`` imports torch (and computes with it when present).
:class:`LogMel` computes the same features from the checkpoint's ``preprocessor_config.json``:
an STFT with a periodic Hann window over the reflect-padded 30 s window, the power spectrum
through Slaney-style mel filters, ``log10`` clamped at 1e-10, the last frame dropped, a floor
8 below the maximum, then ``(x + 4) / 4``. ``tests/test_layout.py`` checks it against
``WhisperFeatureExtractor`` (within 1e-4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class LogMel:
    """The features function of a checkpoint: 16 kHz samples, zero-padded or cut to 30 s, to
    float32 log-mel features of shape (n_mels, frames)."""

    n_mels: int = 80
    n_fft: int = 400
    hop_length: int = 160
    sampling_rate: int = 16000
    chunk_length: int = 30
    filters: np.ndarray = field(init=False, repr=False, compare=False)
    window: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        filters = mel_filters(self.sampling_rate, self.n_fft, self.n_mels)
        object.__setattr__(self, "filters", filters)
        # torch.hann_window's default: periodic, as Whisper's STFT uses it
        window = np.hanning(self.n_fft + 1)[:-1]
        object.__setattr__(self, "window", window)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> LogMel:
        """The extractor that ``preprocessor_config.json`` of ``checkpoint`` (a directory or a
        hub id) describes."""
        path = Path(checkpoint) / PREPROCESSOR_CONFIG
        if not path.is_file():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(checkpoint), PREPROCESSOR_CONFIG))
        config = json.loads(path.read_text())
        return cls(
            n_mels=config.get("feature_size", 80),
            n_fft=config.get("n_fft", 400),
            hop_length=config.get("hop_length", 160),
            sampling_rate=config.get("sampling_rate", 16000),
            chunk_length=config.get("chunk_length", 30),
        )

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        n_samples = self.chunk_length * self.sampling_rate
        audio = np.zeros(n_samples, np.float32)
        clipped = np.asarray(samples, np.float32)[:n_samples]
        audio[: len(clipped)] = clipped
        padded = np.pad(audio, self.n_fft // 2, mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(padded, self.n_fft)[:: self.hop_length]
        power = np.abs(np.fft.rfft(frames * self.window, axis=-1)) ** 2  # (frames, bins)
        mel = self.filters.T @ power[:-1].T  # (n_mels, frames - 1): Whisper drops the last
        log_spec = np.log10(np.maximum(mel, 1e-10))
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).astype(np.float32)


def mel_filters(sampling_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters, (n_fft // 2 + 1, n_mels), from 0 Hz
    to 8 kHz: what ``WhisperFeatureExtractor`` (and librosa) build for Whisper."""
    fft_freqs = np.linspace(0, sampling_rate // 2, n_fft // 2 + 1)
    mels = np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), n_mels + 2)
    edges = _mel_to_hz(mels)
    slopes = edges[None, :] - fft_freqs[:, None]
    widths = np.diff(edges)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[None, :]


# The Slaney mel scale: linear below 1 kHz, logarithmic above.
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = 15.0
_LOGSTEP = 27.0 / np.log(6.4)


def _hz_to_mel(hz: float) -> float:
    if hz < _MIN_LOG_HZ:
        return 3.0 * hz / 200.0
    return _MIN_LOG_MEL + np.log(hz / _MIN_LOG_HZ) * _LOGSTEP


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    linear = 200.0 * mels / 3.0
    logarithmic = _MIN_LOG_HZ * np.exp((mels - _MIN_LOG_MEL) / _LOGSTEP)
    return np.where(mels >= _MIN_LOG_MEL, logarithmic, linear)

"""The speaker encoder: 256-d voice embeddings of 1.6 s windows (torch lives here).

The weights are resemblyzer's ``pretrained.pt`` (GE2E, a 3-layer LSTM over 40-band mel frames;
Apache-2.0; 17 MB, shipped in the PyPI wheel). Resemblyzer's own package imports librosa,
webrtcvad and scipy at import time, so it is installed without dependencies and only its
weights file is read: the network and its mel front end are rebuilt here (librosa's
``melspectrogram`` defaults: 25 ms Hann window, 10 ms hop, reflect-padded centred frames, Slaney
mel filters, power spectrum, no log).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..wire import SPEAKER_DIM, SPEAKER_WINDOW, EmbedJob, EmbedResult

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 40
WINDOW_FRAMES = SPEAKER_WINDOW // HOP  # 160 frames: the partial-utterance length it was trained on
TARGET_DBFS = -30.0  # resemblyzer normalises its input to this level
MAX_BATCH = 256  # windows per LSTM call (bounds the activation memory of long files)


def resemblyzer_weights() -> Path:
    """Where resemblyzer's wheel put ``pretrained.pt``, found without importing the package."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the speaker encoder's weights come from the resemblyzer wheel: "
            "pip install --no-deps resemblyzer==0.1.4"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"
    if not path.is_file():
        raise FileNotFoundError(f"resemblyzer is installed but {path} is missing")
    return path


def _mel_filters() -> torch.Tensor:
    # Slaney-style mel filters, normalised by band width: librosa.filters.mel's defaults.
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(np.ascontiguousarray(bank.T, dtype=np.float32))  # (40, 201)


class SpeakerEncoder(nn.Module):
    """GE2E speaker encoder: mel frames of a window -> an L2-normalised 256-d embedding."""

    def __init__(self, weights: Path | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, SPEAKER_DIM)
        # weights_only: the file also holds an optimizer state, and no pickled code is run.
        checkpoint = torch.load(
            weights or resemblyzer_weights(), map_location="cpu", weights_only=True
        )
        state = {
            k: v for k, v in checkpoint["model_state"].items() if k.startswith(("lstm.", "linear."))
        }
        self.load_state_dict(state)
        self.register_buffer("mel_filters", _mel_filters(), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.device = torch.device(device)
        self.to(self.device).eval()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """``mels`` (batch, frames, 40) -> (batch, 256), non-negative and L2-normalised."""
        _, (hidden, _) = self.lstm(mels)
        raw = torch.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def mel(self, samples: torch.Tensor) -> torch.Tensor:
        """Power mel frames (frames, 40) of 16 kHz samples, frame i centred on sample i * 10 ms."""
        spec = torch.stft(
            samples,
            N_FFT,
            HOP,
            window=self.window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        return (self.mel_filters @ spec.abs().square()).T

    @torch.inference_mode()
    def embed(self, jobs: list[EmbedJob]) -> list[EmbedResult]:
        """Embed every window of every job, all jobs' windows in shared LSTM batches."""
        windows: list[torch.Tensor] = []
        for job in jobs:
            windows.extend(self._windows(job))
        if windows:
            stacked = torch.stack(windows)
            out = torch.cat(
                [self(stacked[i : i + MAX_BATCH]) for i in range(0, len(stacked), MAX_BATCH)]
            )
            embeddings = out.float().cpu().numpy()
        else:
            embeddings = np.zeros((0, SPEAKER_DIM), np.float32)
        results, at = [], 0
        for job in jobs:
            n = len(job.starts)
            results.append(EmbedResult.for_embeddings(embeddings[at : at + n]))
            at += n
        return results

    def _windows(self, job: EmbedJob) -> list[torch.Tensor]:
        samples = torch.from_numpy(job.samples().copy()).to(self.device)
        if not job.starts:
            return []
        # Zero-pad so the last window (possibly shorter speech) still has its 160 frames.
        end = max(job.starts) + SPEAKER_WINDOW
        padded = torch.nn.functional.pad(samples, (0, max(0, end - samples.numel())))
        mel = self.mel(padded)
        out = []
        for start in job.starts:
            frames = mel[start // HOP : start // HOP + WINDOW_FRAMES]
            speech = samples[start : start + SPEAKER_WINDOW]  # the real audio, not the padding
            # Level-normalise each window, as resemblyzer normalises its input: the power mel
            # scales with the square of the gain.
            rms = speech.square().mean().sqrt().clamp_min(1e-5)
            gain = 10 ** (TARGET_DBFS / 20) / rms
            out.append(frames * gain.square())
        return out

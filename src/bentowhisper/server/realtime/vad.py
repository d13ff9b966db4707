"""Speech probability per 32 ms frame for streams: Silero VAD (ONNX) through onnxruntime.

The network is shared by every stream (its weights are read-only; ``InferenceSession.run`` is
thread-safe); each stream keeps its own recurrent state and context, so a session feeds frames
as they arrive. Stands in for ``server/vad.py`` until that module (shared with chunked files)
exists; :class:`FrameVad` is the interface the session uses.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

FRAME_SAMPLES = 512  # Silero's frame at 16 kHz
_CONTEXT = 64  # samples of the previous frame Silero expects in front of each frame


class FrameVad(Protocol):
    """One stream's speech detector: 512 samples at 16 kHz in, a probability out."""

    def __call__(self, frame: np.ndarray) -> float: ...


def _model_path() -> Path:
    # Found without importing the package: its __init__ imports torch, which the API process
    # must not load.
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("silero-vad is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"


@lru_cache(maxsize=1)
def _session():  # -> onnxruntime.InferenceSession
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # one 32 ms frame is far too small to split
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(
        str(_model_path()), sess_options=options, providers=["CPUExecutionProvider"]
    )


class SileroStream:
    """:class:`FrameVad` over the shared Silero network, with this stream's state."""

    def __init__(self) -> None:
        self.session = _session()
        self.state = np.zeros((2, 1, 128), np.float32)
        self.context = np.zeros(_CONTEXT, np.float32)
        self.rate = np.array(16_000, np.int64)

    def __call__(self, frame: np.ndarray) -> float:
        x = np.concatenate([self.context, frame.astype(np.float32, copy=False)])[None, :]
        prob, self.state = self.session.run(
            None, {"input": x, "state": self.state, "sr": self.rate}
        )
        self.context = x[0, -_CONTEXT:]
        return float(prob[0, 0])

"""BentoML wiring: an OpenAI-compatible API service in front of a batching Whisper service.

``bentoml serve`` (from this directory) starts both. The API service (CPU) handles HTTP,
authentication, limits, audio decoding and response formats; it sends every 30 s window to the
model service, whose batchable ``decode`` runs the windows of concurrent requests together.
Each scales on its own (BentoCloud, Kubernetes). Settings: ``configs/`` and ``BENTOWHISPER_*``.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting took the CPU from everything else on a busy machine
# (base's jfk: 37-64 s instead of 5-7 s while another process ran); torch's OpenMP reads this
# when it loads, so it is set before anything imports torch. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import bentoml
import numpy as np
from transformers import WhisperFeatureExtractor

from bentowhisper.config import settings
from bentowhisper.engine.checkpoints import resolve_checkpoint
from bentowhisper.engine.decoding import EncoderCache, decode_batch
from bentowhisper.engine.loading import WhisperBundle, load_from_settings
from bentowhisper.server.app import Admission, Backend, LineBreakPathNotFound, create_app
from bentowhisper.server.bentoml_patch import patch_timeout_middleware
from bentowhisper.server.longform import WINDOW_SAMPLES, log_mel
from bentowhisper.vocabulary import load_vocabulary
from bentowhisper.wire import DecodeJob, DecodeResult

patch_timeout_middleware()  # else every request stays in memory for traffic.timeout seconds
SETTINGS = settings()
ON_GPU = SETTINGS.device.startswith("cuda")
DECODE_CALL_TIMEOUT_S = 2 * SETTINGS.max_latency_ms / 1000
# A model-store reference as a class attribute is what makes `bentoml build` pack the weights.
STORED = bentoml.models.BentoModel(SETTINGS.bento_model) if SETTINGS.bento_model else None


def checkpoint(stored: object | None) -> str:
    """The directory (or hub id) to load: the resolved store entry, else ``SETTINGS.model``."""
    if stored is not None:
        return stored.path
    return resolve_checkpoint(SETTINGS.model, SETTINGS.models_path)


@bentoml.service(
    name="whisper-model",
    workers=1,  # one batch dispatcher per model replica; scale with replicas, not workers
    resources={"gpu": 1} if ON_GPU else {"cpu": "1"},
    traffic={"timeout": SETTINGS.request_timeout_s},
)
class WhisperModel:
    stored = STORED

    def __init__(self) -> None:
        # One thread loads, warms up and runs the model: torch ran it 1.4x slower on threads
        # other than the one that loaded it, such as BentoML's pool for sync APIs
        # (benchmarks/profile_decode.py, docs/benchmarks.md).
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self.bundle = self.torch_thread.submit(self._load).result()
        # Encoder outputs of long files' windows between their slices (SETTINGS.slice_tokens).
        self.encoder_cache = EncoderCache(capacity=2 * SETTINGS.max_batch_size)

    def _load(self) -> WhisperBundle:
        bundle = load_from_settings(SETTINGS, checkpoint(self.stored))
        # Warm up on one silent window so the first request does not pay for lazy init.
        silence = log_mel(bundle.feature_extractor)(np.zeros(WINDOW_SAMPLES, np.float32))
        decode_batch(bundle, [DecodeJob.for_window(silence, language="en")])
        # under "bentoml", whose handlers BentoML sets up in its workers (ours show nothing)
        logging.getLogger("bentoml.whisper_model").info("precision: %s", bundle.speed.describe())
        return bundle

    @bentoml.api(
        batchable=True,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    async def decode(self, jobs: list[DecodeJob]) -> list[DecodeResult]:
        return await asyncio.get_running_loop().run_in_executor(
            self.torch_thread, decode_batch, self.bundle, jobs, self.encoder_cache
        )


app = create_app()


@bentoml.service(
    name="bentowhisper",
    workers=SETTINGS.api_workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
)
@bentoml.asgi_app(app, path="/")
class BentoWhisper:
    model = bentoml.depends(WhisperModel)
    stored = STORED

    def __init__(self) -> None:
        path = checkpoint(self.stored)
        app.state.backend = Backend(
            settings=SETTINGS,
            vocab=load_vocabulary(path),
            features=log_mel(WhisperFeatureExtractor.from_pretrained(path)),
            decode=self.decode_windows,
            admission=Admission(SETTINGS.max_concurrent_requests),
        )

    async def decode_windows(self, jobs: list[DecodeJob]) -> list[DecodeResult]:
        # A window waits at most max_latency_ms in the batcher before it is shed (503), so a
        # call still unanswered after twice that has lost its worker (in a container BentoML
        # does not restart it): give up rather than hold the request until its deadline.
        return await asyncio.wait_for(self._decode(jobs), timeout=DECODE_CALL_TIMEOUT_S)

    async def _decode(self, jobs: list[DecodeJob]) -> list[DecodeResult]:
        # The dependency's client connects lazily: resolve its method at call time. A pooled
        # connection the model service has just closed fails at once; decoding is idempotent,
        # so such a call is retried once.
        try:
            return await self.model.to_async.decode(jobs)
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            return await self.model.to_async.decode(jobs)


# Paths BentoML's own router cannot hand to the app still get OpenAI's 404 envelope.
BentoWhisper.add_asgi_middleware(LineBreakPathNotFound)

"""BentoML wiring: an OpenAI-compatible API service in front of a batching Whisper service.

``bentoml serve`` (from this directory) starts both. The API service (CPU) handles HTTP,
authentication, limits, audio decoding and response formats; it sends every 30 s window to the
model service, whose batchable ``decode`` runs the windows of concurrent requests together.
Each scales on its own (BentoCloud, Kubernetes). Settings: ``configs/`` and ``BENTOWHISPER_*``.

BentoML imports this module in every worker of both services, so it only reads the settings
and declares the services: the model service imports torch (``bentowhisper.engine``) in its
``__init__``, and the API side never does. docs/architecture.md shows who owns what.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting took the CPU from everything else on a busy machine
# (base's jfk: 37-64 s instead of 5-7 s while another process ran); torch's OpenMP reads this
# when it loads, so it is set before anything imports torch. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import asyncio
import logging
import sys
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import aiohttp
import bentoml
from bentoml.exceptions import BentoMLException

from bentowhisper.config import settings
from bentowhisper.engine.checkpoints import await_converted
from bentowhisper.server.app import create_app
from bentowhisper.server.bentoml_patch import patch_timeout_middleware
from bentowhisper.server.chunked import Lanes
from bentowhisper.server.docs import HomeRedirect
from bentowhisper.server.features import LogMel
from bentowhisper.server.instance import RequestLog, configure_logging, own_metrics_dir
from bentowhisper.server.middleware import LineBreakPathNotFound
from bentowhisper.server.readiness import (
    WATCHER,
    ReadyProbe,
    answer_while_starting,
    listening_url,
    started_marker,
)
from bentowhisper.server.serving import Admission, Backend, ModelUnavailable
from bentowhisper.vocabulary import load_vocabulary
from bentowhisper.wire import DecodeJob, DecodeResult, EmbedJob, EmbedResult

if TYPE_CHECKING:
    from bentowhisper.engine.decoding import EncoderCache
    from bentowhisper.engine.loading import WhisperBundle
    from bentowhisper.engine.speakers import SpeakerEncoder as Encoder

T = TypeVar("T")

own_metrics_dir()  # else two servers on one machine share (and wipe) each other's counters
configure_logging()
if "--fd" not in sys.argv:  # the `bentoml serve` process; its workers get their socket as --fd
    answer_while_starting()
SETTINGS = settings()
ON_GPU = SETTINGS.device.startswith("cuda")
DECODE_CALL_TIMEOUT_S = 2 * SETTINGS.max_latency_ms / 1000
# BentoML's answers to a call that the model service shed, or could not take: worth a retry.
TRANSIENT_STATUSES = {429, 503, 504}
# A model-store reference as a class attribute is what makes `bentoml build` pack the weights.
STORED = bentoml.models.BentoModel(SETTINGS.bento_model) if SETTINGS.bento_model else None


@bentoml.service(
    name="whisper-model",
    workers=1,  # one batch dispatcher per model replica; scale with replicas, not workers
    resources={"gpu": 1} if ON_GPU else {"cpu": "1"},
    traffic={"timeout": SETTINGS.request_timeout_s},
    # One access line per decode call (every window of every request) is noise by default.
    logging={"access": {"enabled": SETTINGS.log_decode_requests}},
)
class WhisperModel:
    stored = STORED

    def __init__(self) -> None:
        from bentowhisper.engine.decoding import EncoderCache

        patch_timeout_middleware()  # else every request stays in memory for traffic.timeout
        # One thread loads, warms up and runs the model: torch ran it 1.4x slower on threads
        # other than the one that loaded it, such as BentoML's pool for sync APIs
        # (benchmarks/profile_decode.py, docs/benchmarks.md).
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self.bundle: WhisperBundle = self.torch_thread.submit(self._load).result()
        # Encoder outputs of long files' windows between their slices (SETTINGS.slice_tokens).
        self.encoder_cache: EncoderCache = EncoderCache(capacity=2 * SETTINGS.max_batch_size)

    def _load(self) -> WhisperBundle:
        import numpy as np

        from bentowhisper.engine.decoding import decode_batch
        from bentowhisper.engine.loading import load_from_settings

        # This service converts an embedded model on first use; the API service waits for it.
        path = self.stored.path if self.stored else None
        bundle = load_from_settings(SETTINGS, path)
        # Warm up on one silent window so the first request does not pay for lazy init.
        features = LogMel.from_checkpoint(bundle.checkpoint)
        silence = features(np.zeros(0, np.float32))
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
        from bentowhisper.engine.decoding import decode_batch

        return await asyncio.get_running_loop().run_in_executor(
            self.torch_thread, decode_batch, self.bundle, jobs, self.encoder_cache
        )

    @bentoml.api
    async def info(self) -> dict[str, str]:
        """What is loaded; answered only once __init__ (load and warm-up) is done."""
        bundle = self.bundle
        return {"model": bundle.name, "device": str(bundle.device), "dtype": str(bundle.dtype)}


@bentoml.service(
    name="speaker-encoder",
    workers=1,
    # 4.9 % of Whisper base's time on the same audio (benchmarks/speaker_cost.py): on a CPU
    # of its own it never waits behind the decoder's batches, nor they behind it.
    resources={"cpu": "1"},
    traffic={"timeout": SETTINGS.request_timeout_s},
    logging={"access": {"enabled": SETTINGS.log_decode_requests}},
)
class SpeakerEncoder:
    """Speaker embeddings for ``diarized_json`` (engine/speakers.py: resemblyzer's weights)."""

    def __init__(self) -> None:
        patch_timeout_middleware()
        # One thread loads and runs the encoder, as WhisperModel does (torch ran slower on
        # threads other than the one that loaded it).
        self.torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
        self.encoder: Encoder = self.torch_thread.submit(self._load).result()

    def _load(self) -> Encoder:
        import torch

        from bentowhisper.engine.speakers import SpeakerEncoder as Encoder

        torch.set_num_threads(1)  # its CPU share is one core
        return Encoder()

    @bentoml.api(
        batchable=True,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    async def embed(self, jobs: list[EmbedJob]) -> list[EmbedResult]:
        return await asyncio.get_running_loop().run_in_executor(
            self.torch_thread, self.encoder.embed, jobs
        )


app = create_app()  # routes only; the backend is set in the service's __init__


@bentoml.service(
    name="bentowhisper",
    workers=SETTINGS.api_workers,
    traffic={"timeout": SETTINGS.request_timeout_s},
    # The app logs each request once itself, with its audio seconds (RequestLog).
    logging={"access": {"enabled": False}},
)
@bentoml.asgi_app(app, path="/")
class BentoWhisper:
    model = bentoml.depends(WhisperModel)
    if SETTINGS.diarization:  # else the speaker encoder is not started at all
        speakers = bentoml.depends(SpeakerEncoder)
    stored = STORED

    def __init__(self) -> None:
        patch_timeout_middleware()
        # Tokenizer and preprocessor files only: the model service loads (and converts) the
        # weights, so this process neither converts nor imports torch.
        if self.stored is not None:
            path = self.stored.path
        else:
            path = await_converted(
                SETTINGS.model, SETTINGS.models_path, timeout_s=SETTINGS.request_timeout_s
            )
        app.state.backend = Backend(
            settings=SETTINGS,
            vocab=load_vocabulary(path),
            features=LogMel.from_checkpoint(path),
            decode=self.decode_windows,
            embed=self.embed_windows if SETTINGS.diarization else None,
            admission=Admission(SETTINGS.max_concurrent_requests),
            # long files' chunks: max_chunks_in_flight in all, short requests first
            lanes=Lanes(SETTINGS.max_chunks_in_flight),
        )

    @bentoml.on_startup
    async def watch_readiness(self) -> None:
        # The client connects lazily: its methods exist only once called through it.
        WATCHER.start(lambda: self.model.to_async.info(), listening_url())
        started_marker().touch()  # this worker serves now: the arbiter stops answering for it

    @bentoml.on_shutdown
    async def stop_watching(self) -> None:
        await WATCHER.stop()

    async def decode_windows(self, jobs: list[DecodeJob]) -> list[DecodeResult]:
        return await self._call_model(self._decode(jobs))

    async def _call_model(self, call: Awaitable[T]) -> T:
        # A window waits at most max_latency_ms in the batcher before it is shed (503), so a
        # call still unanswered after twice that has lost its worker (in a container BentoML
        # does not restart it): give up rather than hold the request until its deadline.
        try:
            return await asyncio.wait_for(call, timeout=DECODE_CALL_TIMEOUT_S)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ModelUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except BentoMLException as exc:
            if exc.error_code in TRANSIENT_STATUSES:
                raise ModelUnavailable(f"{type(exc).__name__}: {exc}") from exc
            raise  # the model service failed on the call itself: a bug, not a retry

    async def embed_windows(self, jobs: list[EmbedJob]) -> list[EmbedResult]:
        # The same failure handling as the decoder's calls: transient ones are a 503.
        return await self._call_model(self._embed(jobs))

    async def _embed(self, jobs: list[EmbedJob]) -> list[EmbedResult]:
        try:
            return await self.speakers.to_async.embed(jobs)
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            return await self.speakers.to_async.embed(jobs)

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
BentoWhisper.add_asgi_middleware(ReadyProbe)  # answers at once, never waits on the model
# "/" to the playground page (it links nowhere else), not BentoML's stock page
BentoWhisper.add_asgi_middleware(HomeRedirect, home="/playground")
BentoWhisper.add_asgi_middleware(RequestLog)  # one line per request (BentoML's access log is off)

"""In-process decoding with batching across concurrent transcriptions, as the model service's
adaptive batching does, for the CLI's tools, the tests and the benchmarks (no BentoML)."""

from __future__ import annotations

import asyncio

from ..wire import DecodeJob, DecodeResult
from .decoding import EncoderCache, decode_batch
from .loading import WhisperBundle


class Batcher:
    """A decode function for concurrent transcriptions: the windows pending when the previous
    batch finishes (after they stop arriving for ``settle`` seconds) share one
    :func:`decode_batch` call, with an encoder cache as the model service has (``capacity=0``:
    one that always lost the window, so every resumed slice comes back ``evicted``)."""

    def __init__(
        self, bundle: WhisperBundle, settle: float = 0.25, max_batch: int = 32, capacity: int = 64
    ):
        self.bundle, self.settle, self.max_batch = bundle, settle, max_batch
        self.cache = EncoderCache(capacity=capacity)
        self.evicted = 0
        self.pending: list[tuple[list[DecodeJob], asyncio.Future[list[DecodeResult]]]] = []
        self.worker: asyncio.Task[None] | None = None
        self.sizes: list[int] = []

    async def __call__(self, jobs: list[DecodeJob]) -> list[DecodeResult]:
        future: asyncio.Future[list[DecodeResult]] = asyncio.get_running_loop().create_future()
        self.pending.append((jobs, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._work())
        return await future

    async def _work(self) -> None:
        while self.pending:
            seen = -1
            while seen != len(self.pending):  # let the other requests' windows arrive
                seen = len(self.pending)
                await asyncio.sleep(self.settle)
            batch: list[tuple[list[DecodeJob], asyncio.Future[list[DecodeResult]]]] = []
            size = 0
            while self.pending and (not batch or size + len(self.pending[0][0]) <= self.max_batch):
                batch.append(self.pending.pop(0))
                size += len(batch[-1][0])
            self.sizes.append(size)
            try:
                flat = [job for jobs, _ in batch for job in jobs]
                results = await asyncio.to_thread(decode_batch, self.bundle, flat, self.cache)
                self.evicted += sum(result.evicted for result in results)
            except BaseException as exc:  # never leave a request waiting forever
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                raise
            for jobs, future in batch:
                if not future.done():  # its caller may have gone (cancelled) meanwhile
                    future.set_result(results[: len(jobs)])
                results = results[len(jobs) :]

"""Requests that arrive together are scored as one batch: an asyncio queue that collects images for a
few milliseconds (or until ``max_batch`` images are waiting), then runs one forward pass per
``max_batch`` images in a worker thread, so the server keeps accepting requests meanwhile."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..inference.images import Prediction

#: (pixels uint8 [B, S, S, 3], sizes [(h, w)] * B, names) -> B predictions; a predictor's predict_uint8
ScoreFn = Callable[[np.ndarray, Sequence[tuple[int, int]], Sequence[Optional[str]]], list[Prediction]]


@dataclass
class _Job:
    """One request's images and the future its handler awaits."""

    pixels: list[np.ndarray]  # each [S, S, 3] uint8
    sizes: list[tuple[int, int]]
    names: list[Optional[str]]
    future: asyncio.Future = field(repr=False)


class BatchScorer:
    """``await scorer.score(pixels, sizes, names)`` from any request handler; ``start()`` and
    ``stop()`` from the application's lifespan (they need its running event loop)."""

    def __init__(self, score_fn: ScoreFn, max_batch: int = 8, wait_ms: float = 5.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.score_fn = score_fn
        self.max_batch = int(max_batch)
        self.wait_s = float(wait_ms) / 1000.0
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def score(self, pixels: list[np.ndarray], sizes: list[tuple[int, int]],
                    names: list[Optional[str]]) -> list[Prediction]:
        if self._queue is None:
            raise RuntimeError("BatchScorer.start() was not called (the application's lifespan starts it)")
        job = _Job(pixels, sizes, names, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    async def _run(self) -> None:
        while True:
            jobs = await self._collect()
            await self._score(jobs)

    async def _collect(self) -> list[_Job]:
        """The first waiting job, then whatever else arrives within ``wait_ms`` until ``max_batch``
        images are in hand."""
        loop = asyncio.get_running_loop()
        jobs = [await self._queue.get()]
        count = len(jobs[0].pixels)
        deadline = loop.time() + self.wait_s
        while count < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                job = await asyncio.wait_for(self._queue.get(), remaining)
            except asyncio.TimeoutError:
                break
            jobs.append(job)
            count += len(job.pixels)
        return jobs

    async def _score(self, jobs: list[_Job]) -> None:
        """One forward pass per ``max_batch`` images; each job gets its own predictions back (or the
        error, so that one failure answers its requests and the loop goes on)."""
        pixels = [p for j in jobs for p in j.pixels]
        sizes = [s for j in jobs for s in j.sizes]
        names = [n for j in jobs for n in j.names]
        try:
            preds: list[Prediction] = []
            for start in range(0, len(pixels), self.max_batch):
                stop = start + self.max_batch
                preds += await asyncio.to_thread(self.score_fn, np.stack(pixels[start:stop]), sizes[start:stop],
                                                 names[start:stop])
        except Exception as e:  # noqa: BLE001 - handed to every waiting request
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        start = 0
        for j in jobs:
            if not j.future.done():  # a client that went away cancelled its future
                j.future.set_result(preds[start:start + len(j.pixels)])
            start += len(j.pixels)

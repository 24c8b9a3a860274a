"""Link emulation: one FIFO pipe per direction, driven by asyncio timers only.

A frame entering a pipe waits for the frames ahead of it to finish serializing
(``len / bandwidth``), then travels ``latency`` seconds. Loss, duplication and reordering
are drawn from the device's seeded RNG, so a run is reproducible.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable


class Pipe:
    """One direction of a link (requests or responses)."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        bandwidth: float | None = None,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        reorder_delay: float = 0.05,
        rng: random.Random | None = None,
    ) -> None:
        self.latency = latency
        self.bandwidth = bandwidth
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.reorder_delay = reorder_delay
        self.rng = rng or random.Random(0)
        self._busy_until = 0.0
        self._fifo: deque[tuple[float, Callable[[], None]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._side: set[asyncio.TimerHandle] = set()
        self.lost = 0

    @property
    def busy_until(self) -> float:
        """Loop time at which everything sent so far has left (serialized + latency)."""
        return self._busy_until + self.latency

    def next_arrival(self, size: int) -> float:
        """When a frame of ``size`` bytes sent now would arrive (without reordering)."""
        now = asyncio.get_running_loop().time()
        start = max(now, self._busy_until)
        return start + (size / self.bandwidth if self.bandwidth else 0.0) + self.latency

    def send(self, size: int, deliver: Callable[[], None], *, lossy: bool = True) -> bool:
        """Queue a frame of ``size`` bytes; ``deliver`` runs when it arrives. False = lost."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._busy_until)
        self._busy_until = start + (size / self.bandwidth if self.bandwidth else 0.0)
        if lossy and self.loss and self.rng.random() < self.loss:
            self.lost += 1
            return False
        at = self._busy_until + self.latency
        if self.reorder and self.rng.random() < self.reorder:
            self._call_at(loop, at + self.reorder_delay, deliver)  # overtaken by later frames
        else:
            self._fifo.append((at, deliver))
            self._arm(loop)
        if self.duplicate and self.rng.random() < self.duplicate:
            self._call_at(loop, at + 0.001, deliver)
        return True

    def _call_at(self, loop: asyncio.AbstractEventLoop, at: float, cb: Callable[[], None]) -> None:
        handle: asyncio.TimerHandle

        def run() -> None:
            self._side.discard(handle)
            cb()

        handle = loop.call_at(at, run)
        self._side.add(handle)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is None and self._fifo:
            self._timer = loop.call_at(self._fifo[0][0], self._drain)

    def _drain(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._fifo and self._fifo[0][0] <= now:
            _, cb = self._fifo.popleft()
            cb()
        self._arm(loop)

    def clear(self) -> None:
        """Drop everything in flight (the far end went away)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for h in self._side:
            h.cancel()
        self._side.clear()
        self._fifo.clear()
        self._busy_until = 0.0

"""The cancel watcher never holds up a finished attempt (fault schedule seed 9, 2026-12-06).

Python 3.11's ``asyncio.wait_for`` can turn the cancellation of the watcher into a timeout
that the watcher's loop then swallows; the attempt that had just confirmed its image then
waited on the watcher until the harness gave up (50 s). Here the fleet server's cancel probe
is the worst case - it ignores cancellation outright - and the attempt must still end at once
after its confirm, with its final report."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator
from gateway.sources import build_source
from gateway.sources.base import Offer

pytestmark = pytest.mark.timeout(120)


async def test_a_probe_that_ignores_cancellation_does_not_hold_the_attempt(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim, health_check_s=0.2)
        src = build_source(cfg)
        probes = [0]

        async def canceled(offer: Offer) -> str | None:
            probes[0] += 1
            try:  # a probe stuck on the network that swallows its first cancellation
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(3600)
            return None

        src.canceled = canceled  # type: ignore[attr-defined]
        gw = Gateway(cfg, source=src)
        try:
            t0 = time.monotonic()
            out = (await asyncio.wait_for(gw.run_once(), 60)).outcomes[dev.id]
            took = time.monotonic() - t0
            (rep,) = gw.journal.reports()
            assert rep.state == "delivered", rep
        finally:
            gw.close()
        assert out.status == Status.UPDATED, out
        assert probes[0] >= 1
        # the first probe's bound (5 s), the update, the watcher's stop bound (5 s) - not forever
        assert took < 30, took

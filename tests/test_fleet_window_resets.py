"""No reset outside a maintenance window, ever - also when the window closes mid-attempt.

The admission checks the window when an attempt starts; an upload, a health window or the wait
for an application's confirm can outlast it. Every mark-and-reset and reset the engine and the
group runner issue goes through one check (``FleetOps.reset_gate``): outside a window the
attempt stops HELD, the journal keeps its step (a restarted gateway resumes), and the reset is
sent in the next window. The window's clock is the policy's (``MaintenancePolicy.clock``),
moved by the test at the device's own step (``on_progress``), never by sleeping.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.config import LinkConfig
from gateway.sim.simulator import Simulator

WINDOW = {"nightly": {"cron": "0 3 * * *", "duration_s": 3600, "timezone": "UTC"}}
OPEN = dt.datetime(2030, 5, 6, 3, 10, tzinfo=dt.UTC)
CLOSED = dt.datetime(2030, 5, 6, 5, 0, tzinfo=dt.UTC)
NEXT_OPEN = dt.datetime(2030, 5, 7, 3, 5, tzinfo=dt.UTC)


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def gateway(cfg: Any, clock: Clock, close_at_step: str | None = None) -> Gateway:
    """A gateway on the policy clock; the window closes (once) when a device first enters
    ``close_at_step``."""
    armed = [close_at_step is not None]

    def progress(_dev: str, step: str, _off: int, _total: int) -> None:
        if armed[0] and step == close_at_step:
            armed[0] = False
            clock.now = CLOSED

    gw = Gateway(cfg, on_progress=progress)
    gw.fleet.maint.clock = clock
    return gw


def slots(dev: Any) -> tuple[tuple[str, bool], Any]:
    states = dev.server.state_images()
    a = next(s for s in states if s.active)
    return (str(a.version), bool(a.confirmed)), next((s for s in states if s.slot == 1), None)


async def test_app_confirm_timeout_revert_waits_for_the_next_window(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)  # the app never confirms
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        data = bench.gateway_dict(sim, confirm="app",
                                  timeouts={"reset_s": 20, "request_s": 2.0, "app_confirm_s": 1.0})
        data["maintenance_windows"] = WINDOW
        cfg = parse_config(data, bench.root / "gateway.yaml")
        clock = Clock(OPEN)
        gw = gateway(cfg, clock, close_at_step="wait-app-confirm")
        try:
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.HELD, out
            assert "application did not confirm 2.0.0 within 1s" in out.detail
            assert "waits for a maintenance window" in out.detail
            assert "outside the maintenance windows" in out.detail
            assert gw.journal.reports() == []  # nothing decided yet
        finally:
            gw.close()
        resets = dev.counters["resets"]
        assert resets == 1  # the test boot only: no revert-reset after the window closed
        assert slots(dev)[0] == ("2.0.0", False)

        gw = gateway(cfg, clock)  # restarted, still outside the window: nothing is sent
        try:
            e = gw.journal.get(dev.id)
            assert e.step == "wait-app-confirm" and e.outcome is None
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.HELD, out
            assert dev.counters["resets"] == resets
            clock.now = NEXT_OPEN
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.ROLLED_BACK, out
            assert "application did not confirm" in out.detail
            (rep,) = gw.journal.reports()
            assert rep.state == "delivered" and rep.detail.startswith("rolled-back")
        finally:
            gw.close()
        assert slots(dev)[0] == ("1.0.0", True)


async def test_window_closing_during_the_upload_stops_before_the_mark(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        data = bench.gateway_dict(sim)
        data["maintenance_windows"] = WINDOW
        cfg = parse_config(data, bench.root / "gateway.yaml")
        clock = Clock(OPEN)
        gw = gateway(cfg, clock, close_at_step="upload")
        try:
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.HELD and "mark and the reset" in out.detail, out
            active, other = slots(dev)
            assert active == ("1.0.0", True) and str(other.version) == "2.0.0"
            assert not other.pending and dev.counters["resets"] == 0
            clock.now = NEXT_OPEN
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.UPDATED and out.bytes_uploaded == 0, out
        finally:
            gw.close()
        assert slots(dev)[0] == ("2.0.0", True)


async def test_group_waits_with_nobody_marked_when_the_window_closes_in_its_upload(
        bench_factory: Any) -> None:
    bench = bench_factory(udp=2, serial=0, image_size=16 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        data = bench.gateway_dict(sim, group="pair")
        data["maintenance_windows"] = WINDOW
        cfg = parse_config(data, bench.root / "gateway.yaml")
        clock = Clock(OPEN)
        gw = gateway(cfg, clock, close_at_step="upload")
        try:
            res = await gw.run_once()
            assert all(o.status == Status.HELD and "waits for a maintenance window" in o.detail
                       for o in res.outcomes.values()), res.outcomes
            assert gw.journal.group("pair").phase == "mark"  # type: ignore[union-attr]
            for dev in sim.devices.values():
                _, other = slots(dev)
                assert not other.pending and dev.counters["resets"] == 0
            res = await gw.run_once()  # still closed: the group is not touched
            assert all(o.status == Status.HELD for o in res.outcomes.values())
            clock.now = NEXT_OPEN
            res = await gw.run_once()
            assert all(o.status == Status.UPDATED for o in res.outcomes.values()), res.outcomes
        finally:
            gw.close()
        for dev in sim.devices.values():
            assert slots(dev)[0] == ("2.0.0", True)


async def test_group_take_back_waits_for_the_window_then_finishes(bench_factory: Any) -> None:
    """A member fails after another was confirmed, and the window has closed: the confirmed
    member's take-back (mark and reset of its previous image) waits; the group stays in its
    revert phase, unreported, and is taken back in the next window."""
    bench = bench_factory(udp=2, serial=0, image_size=16 * 1024)
    bench.sim_cfg.devices[1].link = LinkConfig(request_latency_s=0.3)  # confirmed second
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        first, second = sim.devices.values()
        data = bench.gateway_dict(sim, group="pair", health_check_s=1.0)
        data["maintenance_windows"] = WINDOW
        cfg = parse_config(data, bench.root / "gateway.yaml")
        clock = Clock(OPEN)
        gw = gateway(cfg, clock)

        async def fault() -> None:
            await first.wait_for(lambda d: any(e.kind == "state-write" and e.detail.get("confirm")
                                               for e in d.events), timeout_s=120)
            clock.now = CLOSED
            await second.power_cycle(wait=False)  # test-running 2.0.0: MCUboot reverts it

        try:
            injector = asyncio.create_task(fault())
            res = await gw.run_once()
            await asyncio.wait_for(injector, 5)
            assert all(o.status == Status.HELD for o in res.outcomes.values()), res.outcomes
            assert "waits for a maintenance window" in res.outcomes[first.id].detail
            assert gw.journal.group("pair").phase == "revert"  # type: ignore[union-attr]
            assert slots(first)[0] == ("2.0.0", True) and not slots(first)[1].pending
            resets = first.counters["resets"]
            assert gw.journal.reports() == []
            clock.now = NEXT_OPEN
            res = await gw.run_once()
            assert all(o.status == Status.ROLLED_BACK for o in res.outcomes.values()), res.outcomes
            assert first.counters["resets"] > resets
            assert gw.journal.group("pair").phase == "failed"  # type: ignore[union-attr]
        finally:
            gw.close()
        for dev in sim.devices.values():
            assert slots(dev)[0] == ("1.0.0", True)


async def test_reset_into_serial_recovery_waits_for_the_window(bench_factory: Any) -> None:
    """A single-slot update through serial recovery starts with a reset (os reset boot_mode=1):
    it goes through the same gate - the window closing after the state read holds it, nothing
    is erased or reset, and the next window runs it."""
    single = {"mcuboot_mode": "single-app", "os_reset_boot_mode": True,
              "serial_recovery": {"boot_mode": True, "no_application": True}}
    bench = bench_factory(udp=0, serial=1, device_kw=single)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        data = bench.gateway_dict(sim, recovery={"enabled": True}, mcuboot_mode="single-app")
        data["maintenance_windows"] = WINDOW
        cfg = parse_config(data, bench.root / "gateway.yaml")
        clock = Clock(OPEN)
        gw = gateway(cfg, clock, close_at_step="read-state")
        try:
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.HELD, out
            assert "waits for a maintenance window" in out.detail, out
            assert dev.counters["resets"] == 0 and not dev.in_recovery
            assert slots(dev)[0] == ("1.0.0", True)
            clock.now = NEXT_OPEN
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.UPDATED, out
        finally:
            gw.close()
        assert slots(dev)[0][0] == "2.0.0"

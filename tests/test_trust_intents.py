"""Intents are journalled before they are acted on and finished after any crash; the staged
rollout never deadlocks on the scheduler's limits; ``recovery: last_resort`` is wired.

* A cancel (hawkBit's cancelAction, or the operator's ``ctl cancel``) that arrives while the
  device reboots into the test image (a slow swap: the device is silent for seconds) is never
  lost: the image is never confirmed, the device ends on its old image, the intent row is
  closed, and hawkBit gets the cancel's acknowledgement only after the take-back - also when
  the gateway is restarted between the cancel and the take-back, and when the device was
  paused first.
* A canary rollout on 2 devices with ``max_concurrent: 1`` and on 4 with ``max_concurrent: 3``
  completes (the end-of-soak check of the canaries used to wait for a session slot held by
  the units waiting for it).
* A device whose application no longer answers but whose MCUboot serial recovery does is
  re-flashed by an ordinary gateway pass with ``recovery: {enabled, last_resort}``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from fleet_servers.common import serve
from fleet_servers.hawkbit import HawkbitServer
from modes_support import active as active3
from modes_support import run_pass

from gateway.config import parse_config
from gateway.control import request
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(180)

# the device is silent for SWAP_S while MCUboot swaps; a state read gives up after
# request_s x3 (request_s 1.0), so a take-back that reads once, at once, fails there
SWAP_S = 8.0
SLOW_SWAP = {"swap_time_s": SWAP_S}
TIMEOUTS = {"timeouts": {"reset_s": 30, "request_s": 1.0}, "health_check_s": 0.2}
FAST_RETRY = {"retry": {"base_s": 0.3, "max_s": 1.0, "max_attempts": 50}, "stop_timeout_s": 2}


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return str(a.version), bool(a.confirmed)


def confirms(dev: Any) -> list[dict[str, Any]]:
    """Every confirm the device's img_mgmt was asked for (state-write with confirm)."""
    return [dict(e.detail) for e in dev.events if e.kind == "state-write" and e.detail.get("confirm")]


def settled_back(dev: Any) -> bool:
    """Running 1.0.0 confirmed, slot 1 erased (the take-back's last step)."""
    st = dev.server.state_images()
    a = next((s for s in st if s.active), None)
    return (dev.state == "running" and a is not None and a.version == "1.0.0" and bool(a.confirmed)
            and not any(s.slot == 1 for s in st))


class CountingHawkbit(HawkbitServer):
    """The loopback hawkBit server; ``cancel_seen`` is set when the gateway read the cancel."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.cancel_seen = asyncio.Event()

    async def cancel_action(self, request: web.Request) -> web.Response:
        rsp = await super().cancel_action(request)
        if rsp.status == 200:
            self.cancel_seen.set()
        return rsp


def hb_cfg(bench: Any, sim: Simulator, base: str, hb: HawkbitServer) -> Any:
    data = bench.gateway_dict(sim, **TIMEOUTS)
    data["source"] = {"kind": "hawkbit", "url": base, "gateway_token": hb.gateway_token,
                      "poll_interval_s": 1, "min_poll_interval_s": 0.5}
    data.update(FAST_RETRY)
    return parse_config(data, bench.root / "gateway.yaml")


async def _until_rebooting(gw_progress: asyncio.Event, dev: Any) -> None:
    """The gateway reset the device into the test boot, and the device went down (swapping)."""
    await asyncio.wait_for(gw_progress.wait(), 60)
    await dev.wait_for(lambda d: d.state == "rebooting", 10)


def _progress(step: str) -> tuple[asyncio.Event, Any]:
    ev = asyncio.Event()

    def cb(dev_id: str, st: str, off: int, total: int) -> None:
        if st == step:
            ev.set()
    return ev, cb


async def test_server_cancel_during_the_test_boot_reset_is_never_confirmed(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024, device_kw=SLOW_SWAP)
    hb = CountingHawkbit(sleep="00:00:01")
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        act = hb.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0")
        booting, cb = _progress("wait-boot")
        gw = Gateway(hb_cfg(bench, sim, base, hb), on_progress=cb)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run_forever(stop))
        try:
            await _until_rebooting(booting, dev)
            hb.cancel(act)  # hawkBit cancels the action while MCUboot swaps
            await asyncio.wait_for(hb.cancel_seen.wait(), 30)
            await dev.wait_for(lambda d: settled_back(d) and act.status == "canceled", 90)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            left = gw.journal.open_intents("udp-1")
            gw.close()
        assert left == []  # the intent row is closed
        assert active(dev) == ("1.0.0", True)
        assert confirms(dev) == [], confirms(dev)  # 2.0.0 was never confirmed
        assert dev.boot_outcomes[-2:] == ["swap", "revert"]
        fb = act.cancel_feedback[-1]["status"]  # acknowledged once it was taken back
        assert fb["execution"] == "closed" and fb["result"]["finished"] == "success"
        assert len(act.cancel_feedback) == 1


async def test_server_cancel_survives_a_gateway_restart_before_the_take_back(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024, device_kw=SLOW_SWAP)
    hb = CountingHawkbit(sleep="00:00:01")
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        act = hb.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0")
        booting, cb = _progress("wait-boot")
        cfg = hb_cfg(bench, sim, base, hb)
        gw = Gateway(cfg, on_progress=cb)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run_forever(stop))
        try:
            await _until_rebooting(booting, dev)
            hb.cancel(act)
            await asyncio.wait_for(hb.cancel_seen.wait(), 30)
            # the gateway goes down while the device still swaps: nothing taken back yet
            stop.set()
            await asyncio.wait_for(task, 30)
        finally:
            gw.close()
        assert dev.state == "rebooting" and act.cancel_feedback == []
        # a new gateway on the same state directory finishes the cancel before anything else
        gw2 = Gateway(cfg)
        try:
            # journalled before it was acted on, visible to the operator (ctl list, status)
            assert [i.kind for i in gw2.journal.open_intents("udp-1")] == ["cancel"]
            assert "cancel by server" in gw2.fleet.list_devices()[0]["intents"][0]
            for _ in range(5):
                res = await gw2.run_once()
                if not gw2.journal.open_intents("udp-1") and settled_back(dev):
                    break
            out = res.outcomes["udp-1"]
            assert out.status != Status.UPDATED, out
            assert gw2.journal.open_intents("udp-1") == []
        finally:
            gw2.close()
        assert settled_back(dev) and active(dev) == ("1.0.0", True)
        assert confirms(dev) == [], confirms(dev)
        assert act.status == "canceled"
        fb = act.cancel_feedback[-1]["status"]
        assert fb["execution"] == "closed" and fb["result"]["finished"] == "success"


async def test_operator_cancel_of_a_paused_device_during_the_test_boot_reset(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024, device_kw=SLOW_SWAP)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        data = bench.gateway_dict(sim, **TIMEOUTS)
        data.update(FAST_RETRY)
        cfg = parse_config(data, bench.root / "gateway.yaml")
        booting, cb = _progress("wait-boot")
        gw = Gateway(cfg, on_progress=cb)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run_forever(stop))
        try:
            await _until_rebooting(booting, dev)
            sock = cfg.control_socket
            await request(sock, {"cmd": "pause", "device": "udp-1", "reason": "hold it"})
            assert "cancel" in await request(sock, {"cmd": "cancel", "device": "udp-1"})
            # a pause stops new work, not the taking back of a canceled test boot
            await dev.wait_for(settled_back, 90)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            left = gw.journal.open_intents("udp-1")
            closed = [e for e in gw.journal.events("udp-1") if e[2].startswith("intent-cancel")]
            gw.close()
        assert left == [] and closed[0][2] == "intent-cancel" and closed[-1][2] == "intent-cancel-done"
        assert active(dev) == ("1.0.0", True)
        assert confirms(dev) == [], confirms(dev)


def on_target(dev: Any) -> bool:
    return any(s.active and s.version == "2.0.0" and s.confirmed for s in dev.server.state_images())


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("n", "max_concurrent"), [(2, 1), (4, 3)])
async def test_canary_rollout_completes_with_few_session_slots(bench_factory, n: int,
                                                               max_concurrent: int) -> None:
    """The end of the canary's soak is checked with a session of the canary device; it used to
    be checked by a unit holding a session and a slot, while the other units waited for the
    rollout holding theirs: with every slot taken that never ended."""
    bench = bench_factory(udp=n, serial=0, image_size=16 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        data = bench.gateway_dict(sim)
        data.update(max_concurrent=max_concurrent, stop_timeout_s=2,
                    rollout={"canary": 1, "wait_s": 0.5, "max_failure_pct": 0})
        data["source"]["poll_interval_s"] = 0.5
        gw = Gateway(parse_config(data, bench.root / "gateway.yaml"))
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run_forever(stop))
        try:
            await asyncio.wait_for(asyncio.gather(
                *(d.wait_for(on_target, 60) for d in sim.devices.values())), 70)
            wave = next(iter(gw.fleet.rollout.waves.values()))
            assert wave.state == "open" and len(wave.canaries) == 1, wave
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            gw.close()
        assert gw.sessions_peak <= max_concurrent
        assert all(on_target(d) for d in sim.devices.values())


def recovery_uploads(dev: Any) -> int:
    return sum(1 for e in dev.events if e.kind == "recovery-upload-start")


async def test_last_resort_reflash_runs_in_an_ordinary_pass(bench_factory) -> None:
    """A swap device updated to 2.0.0 by the gateway; its primary slot is then corrupted and
    MCUboot stays in serial recovery (CONFIG_BOOT_SERIAL_NO_APPLICATION). An ordinary gateway
    pass with ``recovery: {enabled, last_resort}`` re-flashes 2.0.0 (the image it confirmed
    there); without ``last_resort`` nothing is sent."""
    bench = bench_factory(udp=0, serial=1, device_kw={
        "serial_recovery": {"boot_mode": False, "no_application": True}})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        assert res.outcomes[dev.id].status == Status.UPDATED
        dev.flash.write(0, 0x400, b"\x00" * 64, sync=True)  # the application's body corrupted
        await dev.power_cycle()
        assert dev.in_recovery
        res = await run_pass(bench.gateway_config(sim, recovery={"enabled": True}))
        assert res.outcomes[dev.id].status == Status.FAILED, res.outcomes
        assert recovery_uploads(dev) == 0 and dev.in_recovery
        cfg = bench.gateway_config(sim, recovery={"enabled": True, "last_resort": True,
                                                  "entry": "present"})
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED and "re-flashed 2.0.0" in out.detail, out
        assert recovery_uploads(dev) == 1
        assert active3(dev) == ("2.0.0", True, 0)
        res = await run_pass(cfg)  # the application answers again: an ordinary pass
        assert res.outcomes[dev.id].status == Status.UP_TO_DATE, res.outcomes
        assert recovery_uploads(dev) == 1

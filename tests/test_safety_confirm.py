"""Finding 1: a confirm must never make a crashed image permanent.

In Zephyr's img_mgmt, ``confirm=true`` *with a hash* of an image that is not running means
"install this permanently at the next boot" (``img_mgmt_set_next_boot_slot`` ->
``boot_set_next(fa, active=false, confirm=true)`` writes magic + image_ok into the secondary
trailer: MCUboot's PERM swap). If the image's watchdog fires as the confirm arrives, MCUboot
reverts; a *retried* confirm-by-hash then lands on the reverted device and schedules the
crashed image permanently. These tests put the crash exactly there (the simulated device
swallows the confirm and its watchdog fires) and check the device, not the gateway's word.
"""

from __future__ import annotations

from typing import Any

import pytest
from safety_support import Request, Tap, active_state, crash_now, slot1_flags

from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(90)

GW_KW = {"health_check_s": 0.6, "timeouts": {"reset_s": 10, "request_s": 1.0}}


def crash_at_first_confirm(tap: Tap) -> None:
    fired = [False]

    def hook(req: Request, frame: bytes, reply: Any) -> bool:
        if req.is_confirm and not fired[0]:
            fired[0] = True
            crash_now(tap.dev)  # the confirm is lost with the application
            return False
        return True

    tap.hook = hook


async def _one_pass(bench: Any, sim: Simulator, **kw: Any) -> Any:
    gw = Gateway(bench.gateway_config(sim, **{**GW_KW, **kw}))
    try:
        return await gw.run_once()
    finally:
        gw.close()


async def test_watchdog_during_confirm_never_makes_the_image_permanent(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()
        crash_at_first_confirm(tap)
        res = await _one_pass(bench, sim)
        out = res.outcomes[dev.id]
        # the device reverted: that is a rollback, and nothing may be scheduled for the next boot
        assert out.status == Status.ROLLED_BACK, out
        assert active_state(dev) == ("1.0.0", True)
        flags = slot1_flags(dev)
        assert not flags.get("pending") and not flags.get("permanent"), flags
        assert dev.trailer(1).magic != "good", dev.trailer(1)
        # no confirm ever named a hash, and none was re-sent blindly
        confirms = tap.requests(lambda r: r.is_confirm)
        assert confirms and all(not r.body.get("hash") for r in confirms), confirms
        # the worst case: power goes now. The crashed image must not come back as confirmed.
        await dev.power_cycle(wait=True)
        assert active_state(dev) == ("1.0.0", True)
        assert "swap" not in dev.boot_outcomes[-1], dev.boot_outcomes


async def test_group_confirm_crash_never_makes_the_image_permanent(bench_factory: Any) -> None:
    """The group's confirm phase (``UpdateEngine.confirm``) has the same rule."""
    bench = bench_factory(udp=2, serial=0, image_size=8 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        devs = list(sim.devices.values())
        tap = Tap(devs[1]).install()
        crash_at_first_confirm(tap)
        await _one_pass(bench, sim, group="pair")
        bad = devs[1]
        flags = slot1_flags(bad)
        assert not flags.get("permanent"), flags
        assert bad.trailer(1).magic != "good", bad.trailer(1)
        assert all(not r.body.get("hash") for r in tap.requests(lambda r: r.is_confirm))
        await bad.power_cycle(wait=True)
        assert active_state(bad) == ("1.0.0", True)


async def test_confirm_answer_lost_is_checked_not_resent(bench_factory: Any) -> None:
    """The confirm lands but its answer is lost: the gateway re-reads the state and reports
    success without confirming again."""
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()
        lost = [False]

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_confirm and not lost[0]:
                lost[0] = True
                tap.deliver(frame, lambda _rsp: None)  # handled; the answer is lost
                return False
            return True

        tap.hook = hook
        res = await _one_pass(bench, sim)
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert active_state(dev) == ("2.0.0", True)
        assert len(tap.requests(lambda r: r.is_confirm)) == 1

"""Round-2 review of the reset wait (gateway/smp/reboot.py): the reviewer's repros, each failing
on e51dba3 - one device error answer after the reset (A; and through cancel's reset, B), a reset
whose answer was lost while the device acted on it (C; and through cancel, D) - and E, cancel's
own check that no canceled image is left pending, whatever the wait did."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest
from modes_support import active, resets, run_pass
from safety_support import Request, Tap

from gateway.cancel import CANCELED, undo
from gateway.daemon import Gateway
from gateway.engine import Stage, Status
from gateway.sim.simulator import Simulator
from gateway.smp.reboot import GONE_PROBE_S

pytestmark = pytest.mark.timeout(120)

SLOW = {"reset_delay_s": GONE_PROBE_S + 2.0}


def is_state_read(r: Request) -> bool:
    return r.op == 0 and r.group == 1 and r.cmd == 0


def hdr(req: Request, frame: bytes) -> tuple[int, int, int, int, int]:
    return (req.op, (frame[0] >> 3) & 3, req.group, req.seq, req.cmd)


def slot1(dev: Any) -> Any:
    return next((s for s in dev.server.state_images() if s.slot == 1), None)


async def test_A_one_device_error_on_the_state_read_after_the_reset(bench_factory: Any) -> None:
    """A: wait_reboot returns on any SMPError from the state read after an acknowledged
    reset; the caller then reads the OLD boot's state: FAILED 'bootloader did not take the
    image' - the CI failure - and 2.0.0 then test-boots unwatched."""
    bench = bench_factory(udp=1, serial=0, device_kw=SLOW)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        st = {"reset": False, "done": False}
        tap = Tap(dev).install()

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_reset:
                st["reset"] = True
            elif is_state_read(req) and st["reset"] and not st["done"]:
                st["done"] = True
                reply(dev.server._pack(hdr(req, frame), {"rc": 2}))  # MGMT_ERR_ENOMEM, once
                return False
            return True

        tap.hook = hook
        res = await run_pass(bench.gateway_config(sim, health_check_s=0.5))
        out = res.outcomes[dev.id]
        assert st["done"]
        assert out.status == Status.UPDATED, (out.status, out.detail, resets(dev))
        assert active(dev) == ("2.0.0", True, 0)


async def test_B_cancel_closed_while_the_canceled_image_test_boots(bench_factory: Any) -> None:
    """B: the same one device error during cancel's reset ('marked' phase): undo reads the
    old boot, journals CANCELED (done), and the device then test-boots the canceled image and
    keeps running it."""
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024, device_kw=SLOW)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim)
        gw = Gateway(cfg)
        dev_cfg = cfg.devices[0]
        dev = sim.devices["udp-1"]
        try:
            async with gw.session(dev_cfg) as s:
                plan = await gw.plan(dev_cfg, s)
                out = await gw.engine(dev_cfg, s).run(plan.image, None, until=Stage.MARKED)
                assert out.status == Status.HELD
                st = {"reset": False, "done": False}
                tap = Tap(dev).install()

                def hook(req: Request, frame: bytes, reply: Any) -> bool:
                    if req.is_reset:
                        st["reset"] = True
                    elif is_state_read(req) and st["reset"] and not st["done"]:
                        st["done"] = True
                        reply(dev.server._pack(hdr(req, frame), {"rc": 2}))
                        return False
                    return True

                tap.hook = hook
                res = await undo(s, dev_cfg, gw.journal, plan.image.hash, "canceled by test",
                                 reset_allowed=True)
            await asyncio.sleep(SLOW["reset_delay_s"] + 2)  # let the device act on its reset
            e = gw.journal.get("udp-1")
            assert not (res.done and e.outcome == CANCELED
                        and active(dev)[0] == "2.0.0"), (res, active(dev), dev.boot_outcomes)
            assert res.done and e.outcome == CANCELED, res
            assert active(dev)[:2] == ("1.0.0", True) and (
                slot1(dev) is None or not slot1(dev).pending), (active(dev), slot1(dev))
        finally:
            gw.close()


async def test_C_lost_reset_answer_on_a_slow_device_take_back(bench_factory: Any) -> None:
    """C: an unanswered (but received) reset drops the state evidence: link-only judgement,
    the old CI failure. confirm: app revert reset: FAILED 'the device still runs it' though
    MCUboot reverts it a moment later."""
    # slow by more than the reset's own 2 s answer timeout + GONE_PROBE_S
    bench = bench_factory(udp=1, serial=0, device_kw={"reset_delay_s": GONE_PROBE_S + 5.0})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()
        st = {"n": 0}

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_reset:
                st["n"] += 1
                if st["n"] == 2:  # the revert reset: acted on, its answer lost
                    tap.deliver(frame, lambda b: None)
                    return False
            return True

        tap.hook = hook
        cfg = bench.gateway_config(sim, confirm="app", timeouts={"app_confirm_s": 1.5,
                                                                 "reset_s": 20, "request_s": 2})
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        assert st["n"] == 2
        await asyncio.sleep(GONE_PROBE_S + 7.0)
        assert active(dev)[:2] == ("1.0.0", True)  # MCUboot did revert it
        assert out.status == Status.ROLLED_BACK, (out.status, out.detail, active(dev))


async def test_D_cancel_with_a_lost_reset_answer_on_a_slow_device(bench_factory: Any) -> None:
    """D: as B, but no device error: cancel's reset is received and its answer lost
    (reset_and_wait drops `before` when unacknowledged) - CANCELED while the canceled image
    test-boots right after."""
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024,
                          device_kw={"reset_delay_s": GONE_PROBE_S + 5.0})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim)
        gw = Gateway(cfg)
        dev_cfg = cfg.devices[0]
        dev = sim.devices["udp-1"]
        try:
            async with gw.session(dev_cfg) as s:
                plan = await gw.plan(dev_cfg, s)
                out = await gw.engine(dev_cfg, s).run(plan.image, None, until=Stage.MARKED)
                assert out.status == Status.HELD
                tap = Tap(dev).install()
                st = {"n": 0}

                def hook(req: Request, frame: bytes, reply: Any) -> bool:
                    if req.is_reset:
                        st["n"] += 1
                        if st["n"] == 1:
                            tap.deliver(frame, lambda b: None)
                            return False
                    return True

                tap.hook = hook
                res = await undo(s, dev_cfg, gw.journal, plan.image.hash, "canceled by test",
                                 reset_allowed=True)
            await asyncio.sleep(GONE_PROBE_S + 7.0)
            e = gw.journal.get("udp-1")
            assert not (res.done and e.outcome == CANCELED
                        and active(dev)[0] == "2.0.0"), (res, active(dev), dev.boot_outcomes)
            assert res.done and e.outcome == CANCELED, res
            assert active(dev)[:2] == ("1.0.0", True) and (
                slot1(dev) is None or not slot1(dev).pending), (active(dev), slot1(dev))
        finally:
            gw.close()


async def test_E_cancel_never_closed_with_the_canceled_image_still_pending(
        bench_factory: Any) -> None:
    """E: a device slower than the whole wait's bound (reboots 3 s past GONE_PROBE_S +
    reset_s): the wait ends with the device still reporting 2.0.0 pending. Cancel must not be
    journalled done then (the next reset, anyone's, would test-boot the canceled image): the
    intent stays open; its next call takes it back."""
    reset_s = 2.0
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024,
                          device_kw={"reset_delay_s": GONE_PROBE_S + reset_s + 3.0})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim, timeouts={"reset_s": reset_s})
        gw = Gateway(cfg)
        dev_cfg = cfg.devices[0]
        dev = sim.devices["udp-1"]
        try:
            async with gw.session(dev_cfg) as s:
                plan = await gw.plan(dev_cfg, s)
                out = await gw.engine(dev_cfg, s).run(plan.image, None, until=Stage.MARKED)
                assert out.status == Status.HELD
                res = await undo(s, dev_cfg, gw.journal, plan.image.hash, "canceled by test",
                                 reset_allowed=True)
                assert not res.done and "still pending" in res.detail, res
                assert gw.journal.get("udp-1").outcome != CANCELED
                assert slot1(dev) is not None and slot1(dev).pending  # (b) as the check read it
        finally:
            gw.close()

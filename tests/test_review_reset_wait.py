"""Review of e37993f (the wait for a reboot on the device's state, gateway/smp/reboot.py): the
reviewer's repros, each failing on that commit - one garbled state answer after the reset, a
device error on the read before it, one lost answer to that read, and a wait that ran past its
bound."""
from __future__ import annotations

import time
from typing import Any

import pytest
from modes_support import active, resets, run_pass
from safety_support import Request, Tap

from gateway.engine import Status
from gateway.sim.simulator import Simulator
from gateway.smp.reboot import GONE_PROBE_S

pytestmark = pytest.mark.timeout(120)

SLOW = {"reset_delay_s": GONE_PROBE_S + 2.0}


def is_state_read(r: Request) -> bool:
    return r.op == 0 and r.group == 1 and r.cmd == 0


def hdr(req: Request, frame: bytes) -> tuple[int, int, int, int, int]:
    return (req.op, (frame[0] >> 3) & 3, req.group, req.seq, req.cmd)


async def test_one_unusable_state_answer_after_the_reset_is_asked_again(
        bench_factory: Any) -> None:
    """F1: wait_reboot's state loop catches SMPTimeout/TransportError only; one malformed
    answer (SMPProtocolError, which every other read re-asks) ends the attempt FAILED although
    the device test-booted the image fine. Before e37993f the read after the reset was
    read_slots (retries=2: re-asked)."""
    bench = bench_factory(udp=1, serial=0)
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
                reply(dev.server._pack(hdr(req, frame), {"images": 5}))  # unusable answer
                return False
            return True

        tap.hook = hook
        res = await run_pass(bench.gateway_config(sim, health_check_s=0.5))
        out = res.outcomes[dev.id]
        assert st["done"]
        assert out.status == Status.UPDATED, (out.detail, active(dev), resets(dev))
        assert active(dev) == ("2.0.0", True, 0)


async def test_device_error_on_the_read_before_the_reset_does_not_stop_it(
        bench_factory: Any) -> None:
    """F2: state_before_reset catches SMPProtocolError but not a device's SMPError (rc):
    the new extra read, after Step.RESET is journalled, raises and the reset is never sent -
    the update ends FAILED with 2.0.0 left pending (it test-boots unwatched at the next
    power cycle). Before e37993f there was no read there: the reset went out."""
    bench = bench_factory(udp=1, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        st = {"marked": False, "done": False}
        tap = Tap(dev).install()

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_test:
                st["marked"] = True
            elif is_state_read(req) and st["marked"] and not st["done"]:
                st["done"] = True
                reply(dev.server._pack(hdr(req, frame), {"rc": 10}))  # MGMT_ERR_EBUSY
                return False
            return True

        tap.hook = hook
        res = await run_pass(bench.gateway_config(sim, health_check_s=0.5))
        out = res.outcomes[dev.id]
        assert st["done"]
        assert resets(dev) == 1, (out, resets(dev))
        assert out.status == Status.UPDATED, (out.detail, active(dev), resets(dev))


async def test_slow_reset_survives_one_lost_state_read(bench_factory: Any) -> None:
    """F3: the fix rests on one read with retries=0 just before the reset (under the very
    load that makes the reset slow). One lost answer -> before=None -> link-only judgement
    -> the old CI failure (FAILED: 'bootloader did not take the image'), though the engine
    had the device's pending state from the test mark's own answer a moment earlier."""
    bench = bench_factory(udp=1, serial=0, device_kw=SLOW)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        st = {"marked": False, "done": False}
        tap = Tap(dev).install()

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_test:
                st["marked"] = True
            elif is_state_read(req) and st["marked"] and not st["done"]:
                st["done"] = True
                return False  # one lost datagram
            return True

        tap.hook = hook
        res = await run_pass(bench.gateway_config(sim, health_check_s=0.5))
        out = res.outcomes[dev.id]
        assert st["done"]
        assert out.status == Status.UPDATED, (out.detail, active(dev), resets(dev))
        assert active(dev) == ("2.0.0", True, 0)
        assert resets(dev) == 1


async def test_wait_after_reset_is_bounded_by_reset_s(bench_factory: Any) -> None:
    """F4: wait_reboot's state loop called wait_answer(timeout_s) afresh after an unanswered
    read, so the wait ran to ~2 x reset_s + request_s. Its bound is one deadline now,
    GONE_PROBE_S + reset_s from the reset (the link-only wait's bound before). Device:
    acknowledges the reset, keeps answering echoes but no state read, and goes silent just
    before reset_s has passed."""
    import asyncio

    reset_s, request_s = 10.0, 1.0
    bench = bench_factory(udp=1, serial=0, device_kw={"reset_delay_s": 300.0})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        loop = asyncio.get_running_loop()
        st: dict[str, Any] = {"reset_at": None, "end": None}
        tap = Tap(dev).install()

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_reset and st["reset_at"] is None:
                st["reset_at"] = loop.time()
                return True
            if st["reset_at"] is None:
                return True
            if loop.time() - st["reset_at"] > reset_s - 0.7:
                return False  # silent from just before reset_s
            return not is_state_read(req)

        tap.hook = hook
        t0 = time.monotonic()
        res = await run_pass(bench.gateway_config(
            sim, health_check_s=0.5, timeouts={"reset_s": reset_s, "request_s": request_s}))
        out = res.outcomes[dev.id]
        waited = loop.time() - st["reset_at"]
        assert waited <= reset_s + GONE_PROBE_S + request_s + 1.0, (
            waited, out.status, out.detail, time.monotonic() - t0)
        assert out.status == Status.FAILED and "did not come back" in out.detail, out

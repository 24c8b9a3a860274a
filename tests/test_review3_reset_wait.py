"""Round-3 review of the reset wait (gateway/smp/reboot.py): the reviewer's repros, each failing
on d4a166a - a reset request lost with the state read that crossed the wait's deadline answered
late (F1), one error answer to an echo of the wait (F2), a cancel that reset the device at every
session when its bootloader kept the mark (F3)."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from modes_support import active, resets, run_pass
from safety_support import Request, Tap

from gateway.engine import Status
from gateway.sim.simulator import Simulator
from gateway.smp.reboot import GONE_PROBE_S

pytestmark = pytest.mark.timeout(120)


def is_state_read(r: Request) -> bool:
    return r.op == 0 and r.group == 1 and r.cmd == 0



def slot1(dev: Any) -> Any:
    return next((x for x in dev.server.state_images() if x.slot == 1), None)


async def test_F1_lost_reset_request_then_a_slow_last_state_read(bench_factory: Any) -> None:
    """F1: the first `os reset` never reaches the device (a lost request: the case the
    attempt loop in mark_reset re-sends it for). The wait now polls the (unchanged) state to
    its deadline; the state read that straddles the deadline times out, wait_reboot then calls
    wait_answer with an expired deadline, which raises SMPTimeout at once: FAILED 'device did
    not come back' for a device that answered every echo - the reset is never re-sent.
    At ca04a27 (link-only wait) this was UPDATED with one reset."""
    reset_s = 4.0
    bench = bench_factory(udp=1, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()
        loop = asyncio.get_running_loop()
        st: dict[str, Any] = {"n": 0, "t": None, "slowed": 0}

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_reset:
                st["n"] += 1
                if st["n"] == 1:  # lost on the way: never reaches the device
                    st["t"] = time.monotonic()
                    return False
                return True
            if is_state_read(req) and st["n"] == 1 and st["t"] is not None:
                # wait's deadline: reset's 2 s answer timeout + GONE_PROBE_S + reset_s
                deadline = st["t"] + 2.0 + GONE_PROBE_S + reset_s
                if deadline - 1.0 <= time.monotonic() < deadline:
                    # a loaded device/emulator: this answer takes 1.2 s (well within request_s)
                    st["slowed"] += 1
                    tap.deliver(frame, lambda b: loop.call_later(1.2, reply, b))
                    return False
            return True

        tap.hook = hook
        cfg = bench.gateway_config(sim, health_check_s=0.5,
                                   timeouts={"reset_s": reset_s, "request_s": 3.0})
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        assert st["slowed"] >= 1
        assert out.status == Status.UPDATED, (out.status, out.detail, resets(dev))
        assert active(dev)[:2] == ("2.0.0", True)


def is_echo(r: Request) -> bool:
    return r.op == 2 and r.group == 0 and r.cmd == 0


async def test_F2_one_error_answer_to_an_echo_of_the_reset_wait(bench_factory: Any) -> None:
    """F2: the wait's echoes (gap probe, wait_answer) catch only SMPTimeout/TransportError: one
    device error answer (MGMT_ERR_ENOMEM, what smp_on_err sends when the device has no free
    netbuf) or one garbled echo answer (SMPProtocolError) after the acknowledged reset escapes
    the wait as SMPError: the attempt is FAILED (UPDATE_FAILED) while the device test-boots
    2.0.0 unwatched. The state reads got this fix in rounds 1-2; the echoes did not."""
    bench = bench_factory(udp=1, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()
        st = {"reset": False, "done": False}

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_reset:
                st["reset"] = True
            elif is_echo(req) and st["reset"] and not st["done"]:
                st["done"] = True
                reply(dev.server._pack((req.op, (frame[0] >> 3) & 3, req.group, req.seq,
                                        req.cmd), {"rc": 2}))
                return False
            return True

        tap.hook = hook
        res = await run_pass(bench.gateway_config(sim, health_check_s=0.5))
        out = res.outcomes[dev.id]
        assert st["done"]
        assert out.status == Status.UPDATED, (out.status, out.detail, active(dev))


async def test_F3_cancel_closed_as_not_taken_back_when_the_mark_outlives_the_resets(
        bench_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """F3: the round-2 cancel check ('still pending after the reset: the intent stays open')
    had no end: a device whose bootloader reboots but leaves the mark in place (modelled by
    MCUboot finding no upgrade to do, swap type NONE: the trailer untouched) got a reset, a full
    GONE_PROBE_S + reset_s wait and 'not done' at every session, for ever. Now after
    TAKE_BACK_RESETS such sessions the cancel is closed as not taken back: the row failed
    (never 'canceled'), its test-boot claim dropped (never confirmed by this gateway), no
    further reset."""
    import gateway.sim.boot as simboot
    from gateway.cancel import TAKE_BACK_RESETS
    from gateway.daemon import Gateway
    from gateway.engine import Stage

    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim, timeouts={"reset_s": 2.0})
        gw = Gateway(cfg)
        dev_cfg = cfg.devices[0]
        dev = sim.devices["udp-1"]
        try:
            async with gw.session(dev_cfg) as s:
                plan = await gw.plan(dev_cfg, s)
                out = await gw.engine(dev_cfg, s).run(plan.image, None, until=Stage.MARKED)
                assert out.status == Status.HELD
            th = plan.image.hash.hex()
            assert gw.journal.get("udp-1").tested_hash == th
            gw.journal.put_intent("udp-1", "cancel", th, "operator", "canceled by test")
            monkeypatch.setattr(simboot, "swap_type",
                                lambda f, i=0, **kw: simboot.SwapType.NONE)
            r0 = resets(dev)
            sessions = 0
            while gw.journal.open_intents("udp-1") and sessions < TAKE_BACK_RESETS + 2:
                (intent,) = gw.journal.open_intents("udp-1")
                async with gw.session(dev_cfg) as s:
                    await gw.fleet.finish_cancel(dev_cfg, s, intent)
                sessions += 1
            assert not gw.journal.open_intents("udp-1")
            assert sessions == TAKE_BACK_RESETS and resets(dev) - r0 == TAKE_BACK_RESETS
            e = gw.journal.get("udp-1")
            assert e.outcome == "failed" and "not taken back" in (e.last_error or ""), e
            assert e.tested_hash != th  # never confirmed as this gateway's test boot
            assert slot1(dev) is not None and slot1(dev).pending  # (b) what was left, said so
        finally:
            gw.close()

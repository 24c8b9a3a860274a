"""The wait after a reset (gateway/smp/reboot.py): "the device rebooted" rests on its own state
(b), not on a gap in its echoes.

Found by CI at ca04a27: real MCUboot in Renode, two suites on two cores. The board answered the
gateway's ``os reset`` and kept answering from its old boot past the gateway's look for the
link's gap; the gateway read that state as a bootloader that did not take the image (single
image, ``failed``) or read into the middle of the swap (image set). Here the simulated device
reboots ``GONE_PROBE_S + 2`` seconds (or more) after its answer, so the link shows no gap in
time. The other side of the bound - a device whose state never changes after an acknowledged
reset is still reported within ``timeouts.reset_s`` as a bootloader that did not take the image
- runs on real Zephyr without MCUboot: tests/test_zephyr_native_flow.py (``check_verdict``).

Three adversarial reviews of the fix reproduced what follows the first two tests (r1-r3, each
failing on the code it reviewed): single answers garbled, erroneous or lost around the reset,
the wait's deadline, and the cancel's take-back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from modes_support import active, publish_entry, resets, run_pass
from safety_support import Request, Tap
from test_multi_image import set_entry, two_images

from gateway.cancel import CANCELED, STILL_PENDING, STUCK, TAKE_BACK_RESETS, undo
from gateway.daemon import Gateway
from gateway.engine import Outcome, Stage, Status
from gateway.sim.simulator import Simulator
from gateway.smp.reboot import GONE_PROBE_S
from gateway.sources.base import UpdateResult

pytestmark = pytest.mark.timeout(120)

SLOW = {"reset_delay_s": GONE_PROBE_S + 2.0}
# slower than a reset whose answer is lost (its own 2 s timeout) plus the gap probe
SLOWER = {"reset_delay_s": GONE_PROBE_S + 5.0}
LOST = None  # ``once``: the request never reaches the device
ACTED = "acted"  # ``once``: the device acts on it, its answer is lost


def is_state_read(r: Request) -> bool:
    return r.op == 0 and r.group == 1 and r.cmd == 0


def is_echo(r: Request) -> bool:
    return r.op == 2 and r.group == 0 and r.cmd == 0


def slot1(dev: Any) -> Any:
    return next((x for x in dev.server.state_images() if x.slot == 1), None)


def once(dev: Any, match: Callable[[Request], bool], answer: dict[str, Any] | str | None,
         after: Callable[[Request], bool] | None = None) -> dict[str, bool]:
    """A tap on ``dev``: once a request ``after`` matches (at once without ``after``), the next
    request ``match`` matches gets ``answer`` (an SMP body) instead of the device's, or is
    ``LOST``, or ``ACTED`` on with its answer lost. The returned dict's ``hit`` says it fired."""
    st = {"armed": after is None, "hit": False}
    tap = Tap(dev).install()

    def hook(req: Request, frame: bytes, reply: Any) -> bool:
        if not st["armed"]:
            st["armed"] = after is not None and after(req)
            return True
        if st["hit"] or not match(req):
            return True
        st["hit"] = True
        if answer == ACTED:
            tap.deliver(frame, lambda b: None)
        elif isinstance(answer, dict):
            reply(dev.server._pack((req.op, (frame[0] >> 3) & 3, req.group, req.seq, req.cmd),
                                   answer))
        return False

    tap.hook = hook
    return st


async def one_pass(bench: Any, sim: Simulator, **cfg: Any) -> Outcome:
    res = await run_pass(bench.gateway_config(sim, health_check_s=0.5, **cfg))
    (out,) = res.outcomes.values()
    return out


def published_bench(bench_factory: Any, device_kw: dict[str, Any] | None = None, **kw: Any) -> Any:
    bench = bench_factory(udp=1, serial=0, device_kw=device_kw or {}, **kw)
    bench.publish("2.0.0")
    return bench


@contextlib.asynccontextmanager
async def marked(bench: Any, **cfg_kw: Any) -> AsyncIterator[tuple[Gateway, Any, Any, bytes]]:
    """The update of 2.0.0 run up to its test mark (held there); yields the gateway, the
    device's config, the simulated device and the image's hash - for a cancel's take-back."""
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim, **cfg_kw)
        gw = Gateway(cfg)
        dev_cfg = cfg.devices[0]
        try:
            async with gw.session(dev_cfg) as s:
                plan = await gw.plan(dev_cfg, s)
                out = await gw.engine(dev_cfg, s).run(plan.image, None, until=Stage.MARKED)
                assert out.status == Status.HELD
            yield gw, dev_cfg, sim.devices[dev_cfg.id], plan.image.hash
        finally:
            gw.close()


async def take_back(gw: Gateway, dev_cfg: Any, image_hash: bytes) -> Any:
    async with gw.session(dev_cfg) as s:
        return await undo(s, dev_cfg, gw.journal, image_hash, "canceled by test",
                          reset_allowed=True)


def assert_taken_back(gw: Gateway, dev: Any, res: Any) -> None:
    """Canceled, and (b) nothing of the update left: 1.0.0 confirmed, nothing pending."""
    assert res.done and gw.journal.get(dev.id).outcome == CANCELED, res
    assert active(dev)[:2] == ("1.0.0", True) and (
        slot1(dev) is None or not slot1(dev).pending), (active(dev), slot1(dev))


# --- the CI failure ----------------------------------------------------------------------------
async def test_single_image_updated_on_a_device_slow_to_reset(bench_factory: Any) -> None:
    bench = published_bench(bench_factory, SLOW)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        out = await one_pass(bench, sim)
        assert out.status == Status.UPDATED and out.result == UpdateResult.SUCCESS, out
        assert active(dev) == ("2.0.0", True, 0)
        assert resets(dev) == 1  # one reset: waited for, not sent again


async def test_image_set_updated_on_a_device_slow_to_reset(bench_factory: Any) -> None:
    """Before: a false ``rolled-back`` (which blocks the artifact)."""
    bench, imgs = two_images(bench_factory, **SLOW)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        out = await one_pass(bench, sim)
        assert out.status == Status.UPDATED, out
        assert active(dev, 0)[:2] == ("2.0.0", True) and active(dev, 1)[:2] == ("2.0.0", True)
        assert resets(dev) == 1


# --- review round 1 ----------------------------------------------------------------------------
async def test_r1_a_garbled_state_answer_after_the_reset_is_asked_again(
        bench_factory: Any) -> None:
    bench = published_bench(bench_factory)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        st = once(dev, is_state_read, {"images": 5}, after=lambda r: r.is_reset)
        out = await one_pass(bench, sim)
        assert st["hit"] and out.status == Status.UPDATED, out
        assert active(dev) == ("2.0.0", True, 0)


async def test_r1_a_device_error_on_the_read_before_the_reset_does_not_stop_it(
        bench_factory: Any) -> None:
    """That read only informs the wait: EBUSY there must not keep the reset from being sent
    (2.0.0 would stay pending, to test-boot unwatched at the next power cycle)."""
    bench = published_bench(bench_factory)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        st = once(dev, is_state_read, {"rc": 10}, after=lambda r: r.is_test)
        out = await one_pass(bench, sim)
        assert st["hit"] and resets(dev) == 1, (out, resets(dev))
        assert out.status == Status.UPDATED, out


async def test_r1_one_lost_answer_to_the_read_before_the_reset_is_asked_again(
        bench_factory: Any) -> None:
    """Without that read's evidence the slow reset is judged by the link alone: the CI failure."""
    bench = published_bench(bench_factory, SLOW)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        st = once(dev, is_state_read, LOST, after=lambda r: r.is_test)
        out = await one_pass(bench, sim)
        assert st["hit"] and out.status == Status.UPDATED, out
        assert active(dev) == ("2.0.0", True, 0) and resets(dev) == 1


async def test_r1_the_wait_has_one_deadline(bench_factory: Any) -> None:
    """The wait once restarted its full bound after an unanswered read (~2 x reset_s). Device:
    acknowledges the reset, answers echoes but no state read, silent from just before
    reset_s: the wait ends by GONE_PROBE_S + reset_s (+ one request) from the reset."""
    reset_s, request_s = 10.0, 1.0
    bench = published_bench(bench_factory, {"reset_delay_s": 300.0})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        loop = asyncio.get_running_loop()
        st: dict[str, Any] = {"reset_at": None}
        tap = Tap(dev).install()

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if st["reset_at"] is None:
                if req.is_reset:
                    st["reset_at"] = loop.time()
                return True
            if loop.time() - st["reset_at"] > reset_s - 0.7:
                return False  # silent from just before reset_s
            return not is_state_read(req)

        tap.hook = hook
        t0 = time.monotonic()
        out = await one_pass(bench, sim, timeouts={"reset_s": reset_s, "request_s": request_s})
        waited = loop.time() - st["reset_at"]
        assert waited <= reset_s + GONE_PROBE_S + request_s + 1.0, (
            waited, out, time.monotonic() - t0)
        assert out.status == Status.FAILED and "did not come back" in out.detail, out


# --- review round 2 ----------------------------------------------------------------------------
async def test_r2_an_error_answer_to_the_state_read_after_the_reset_is_asked_again(
        bench_factory: Any) -> None:
    """ENOMEM once after the reset ended the wait on the old boot's state: the CI failure."""
    bench = published_bench(bench_factory, SLOW)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        st = once(dev, is_state_read, {"rc": 2}, after=lambda r: r.is_reset)
        out = await one_pass(bench, sim)
        assert st["hit"] and out.status == Status.UPDATED, (out, resets(dev))
        assert active(dev) == ("2.0.0", True, 0)


async def test_r2_cancel_with_an_error_answer_during_its_reset_is_taken_back(
        bench_factory: Any) -> None:
    """Before: the same answer let ``undo`` journal ``canceled`` with the canceled image still
    pending - the device test-booted it a moment later."""
    bench = published_bench(bench_factory, SLOW, image_size=16 * 1024)
    async with marked(bench) as (gw, dev_cfg, dev, h):
        st = once(dev, is_state_read, {"rc": 2}, after=lambda r: r.is_reset)
        res = await take_back(gw, dev_cfg, h)
        assert st["hit"]
        assert_taken_back(gw, dev, res)


async def test_r2_a_revert_reset_whose_answer_was_lost_is_waited_for(bench_factory: Any) -> None:
    """confirm: app, the application never confirms: the revert reset is acted on, its answer
    lost. Judged by the link alone, the wait ended before the revert: ``failed`` "still runs
    it" though MCUboot reverted it a moment later."""
    bench = published_bench(bench_factory, SLOWER)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        st = once(dev, lambda r: r.is_reset, ACTED, after=lambda r: r.is_reset)
        out = await one_pass(bench, sim, confirm="app", timeouts={
            "app_confirm_s": 1.5, "reset_s": 20, "request_s": 2})
        assert st["hit"] and resets(dev) == 2
        assert out.status == Status.ROLLED_BACK, out
        assert active(dev)[:2] == ("1.0.0", True)  # (b) MCUboot did revert it


async def test_r2_cancel_whose_reset_answer_was_lost_is_taken_back(bench_factory: Any) -> None:
    bench = published_bench(bench_factory, SLOWER, image_size=16 * 1024)
    async with marked(bench) as (gw, dev_cfg, dev, h):
        st = once(dev, lambda r: r.is_reset, ACTED)
        res = await take_back(gw, dev_cfg, h)
        assert st["hit"]
        assert_taken_back(gw, dev, res)


async def test_r2_cancel_never_closed_with_the_canceled_image_still_pending(
        bench_factory: Any) -> None:
    """A device slower than the whole wait (reboots 3 s past GONE_PROBE_S + reset_s): cancel
    must not be journalled done (the next reset, anyone's, would test-boot the canceled
    image): the intent stays open, its next session goes on."""
    reset_s = 2.0
    bench = published_bench(bench_factory, {"reset_delay_s": GONE_PROBE_S + reset_s + 3.0},
                       image_size=16 * 1024)
    async with marked(bench, timeouts={"reset_s": reset_s}) as (gw, dev_cfg, dev, h):
        res = await take_back(gw, dev_cfg, h)
        assert not res.done and res.stuck and "still pending" in res.detail, res
        assert gw.journal.get(dev.id).outcome != CANCELED
        assert slot1(dev) is not None and slot1(dev).pending  # (b) as the check read it


# --- review round 3 ----------------------------------------------------------------------------
async def test_r3_a_lost_reset_with_a_late_read_at_the_deadline_is_sent_again(
        bench_factory: Any) -> None:
    """The first reset never reaches the device; the state read that crosses the wait's
    deadline is answered 1.2 s late (within request_s). It was cut to the time left, and its
    timeout ended as "did not come back" - the reset never sent again. Now it gets its full
    timeout, and a silent one leaves the verdict to the caller's read (reset again)."""
    reset_s = 4.0
    bench = published_bench(bench_factory)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()
        loop = asyncio.get_running_loop()
        st: dict[str, Any] = {"n": 0, "t": None, "slowed": 0}

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_reset:
                st["n"] += 1
                if st["n"] == 1:  # lost on the way
                    st["t"] = time.monotonic()
                    return False
                return True
            if is_state_read(req) and st["n"] == 1:
                # the wait's deadline: the reset's 2 s answer timeout + GONE_PROBE_S + reset_s
                deadline = st["t"] + 2.0 + GONE_PROBE_S + reset_s
                if deadline - 1.0 <= time.monotonic() < deadline:
                    st["slowed"] += 1
                    tap.deliver(frame, lambda b: loop.call_later(1.2, reply, b))
                    return False
            return True

        tap.hook = hook
        out = await one_pass(bench, sim, timeouts={"reset_s": reset_s, "request_s": 3.0})
        assert st["slowed"] >= 1
        assert out.status == Status.UPDATED, (out, resets(dev))
        assert active(dev)[:2] == ("2.0.0", True)


async def test_r3_an_error_answer_to_an_echo_of_the_wait_counts_as_up(bench_factory: Any) -> None:
    """ENOMEM (Zephyr's ``smp_on_err`` without a free buffer) to one echo after the reset ended
    the update ``failed`` while the device test-booted 2.0.0 unwatched."""
    bench = published_bench(bench_factory)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        st = once(dev, is_echo, {"rc": 2}, after=lambda r: r.is_reset)
        out = await one_pass(bench, sim)
        assert st["hit"] and out.status == Status.UPDATED, (out, active(dev))


async def test_r3_cancel_closed_as_not_taken_back_when_the_mark_outlives_the_resets(
        bench_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bootloader that reboots but keeps the mark (modelled: MCUboot finds no upgrade to do,
    swap type NONE, the trailer untouched) got a reset, a full wait and "not done" at every
    session, for ever. Now after TAKE_BACK_RESETS such sessions the cancel is closed as not
    taken back: the row ``failed`` (never ``canceled``), its test-boot claim dropped (never
    confirmed by this gateway), no further reset."""
    import gateway.sim.boot as simboot

    bench = published_bench(bench_factory, image_size=16 * 1024)
    async with marked(bench, timeouts={"reset_s": 2.0}) as (gw, dev_cfg, dev, h):
        th = h.hex()
        assert gw.journal.get(dev.id).tested_hash == th
        gw.journal.put_intent(dev.id, "cancel", th, "operator", "canceled by test")
        monkeypatch.setattr(simboot, "swap_type", lambda f, i=0, **kw: simboot.SwapType.NONE)
        r0, sessions = resets(dev), 0
        while gw.journal.open_intents(dev.id) and sessions < TAKE_BACK_RESETS + 2:
            (intent,) = gw.journal.open_intents(dev.id)
            async with gw.session(dev_cfg) as s:
                await gw.fleet.finish_cancel(dev_cfg, s, intent)
            sessions += 1
        assert not gw.journal.open_intents(dev.id)
        assert sessions == TAKE_BACK_RESETS and resets(dev) - r0 == TAKE_BACK_RESETS
        e = gw.journal.get(dev.id)
        assert e.outcome == "failed" and "not taken back" in (e.last_error or ""), e
        assert e.tested_hash != th
        assert slot1(dev) is not None and slot1(dev).pending  # (b) what was left, said so


# --- review round 4 ----------------------------------------------------------------------------
@pytest.mark.parametrize("reason", [f"{STILL_PENDING} - please revert",
                                    f"{STUCK}{STILL_PENDING} - please revert"])
async def test_r4_a_cancel_reason_cannot_fool_the_count_of_stuck_sessions(
        bench_factory: Any, monkeypatch: pytest.MonkeyPatch, reason: str) -> None:
    """The count of sessions whose reset left the image pending matched the events' detail,
    which starts with the cancel's reason (outside input): a reason reading like the marker
    made two sessions deferred outside the maintenance window (no reset) count, and the first
    real one closed the cancel after one reset. The count rests on the gateway's own label."""
    import gateway.sim.boot as simboot

    bench = published_bench(bench_factory, image_size=16 * 1024)
    async with marked(bench, timeouts={"reset_s": 2.0}) as (gw, dev_cfg, dev, h):
        gw.journal.put_intent(dev.id, "cancel", h.hex(), "operator", reason)
        allowed = {"v": False}
        monkeypatch.setattr(gw.fleet.maint, "reset_allowed", lambda d: allowed["v"])
        monkeypatch.setattr(simboot, "swap_type", lambda f, i=0, **kw: simboot.SwapType.NONE)
        for session in range(2 + TAKE_BACK_RESETS):  # 2 outside the window (no reset), then 3
            allowed["v"] = session >= 2
            (intent,) = gw.journal.open_intents(dev.id)
            async with gw.session(dev_cfg) as s:
                await gw.fleet.finish_cancel(dev_cfg, s, intent)
            assert bool(gw.journal.open_intents(dev.id)) == (session < 1 + TAKE_BACK_RESETS), (
                session, gw.journal.get(dev.id).last_error)
        assert resets(dev) == TAKE_BACK_RESETS

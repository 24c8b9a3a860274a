"""Cancellation in each phase leaves the device on its previous confirmed image with nothing
of the update left: during the upload (slot 1 erased), after the test mark before the reset
(MCUboot left to revert: test boot + revert), and while the new image test-runs (reset ->
MCUboot reverts)."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.cancel import CANCELED, undo
from gateway.config import parse_config
from gateway.control import request
from gateway.daemon import Gateway
from gateway.engine import Stage, Status
from gateway.sim.simulator import Simulator


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return a.version, bool(a.confirmed)


def slot1(dev: Any) -> Any:
    return next((s for s in dev.server.state_images() if s.slot == 1), None)


async def _daemon_cancel_at(bench: Any, step: str, **device_kw: Any) -> tuple[Any, Any, Any]:
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        data = bench.gateway_dict(sim, **device_kw)
        cfg = parse_config(data, bench.root / "gateway.yaml")
        reached = asyncio.Event()

        def progress(dev_id: str, st: str, off: int, total: int) -> None:
            if st == step and (step != "upload" or 0 < off < total):
                reached.set()

        gw = Gateway(cfg, on_progress=progress)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run_forever(stop))
        try:
            await asyncio.wait_for(reached.wait(), 60)
            sock = cfg.control_socket
            await request(sock, {"cmd": "pause", "device": "udp-1", "reason": "no retry"})
            assert "cancel requested" in await request(sock, {"cmd": "cancel", "device": "udp-1"})
            dev = sim.devices["udp-1"]
            await dev.wait_for(lambda d: gw.journal.get("udp-1").outcome == CANCELED, 60)
            entry = gw.journal.get("udp-1")
            audit = gw.fleet.ops.audit_log()
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            gw.close()
        return dev, entry, audit


async def test_cancel_during_upload_erases_slot1(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=96 * 1024,
                          device_kw={"link": {"bandwidth_bps": 40_000}})
    dev, entry, audit = await _daemon_cancel_at(bench, "upload")
    assert active(dev) == ("1.0.0", True)
    assert slot1(dev) is None and dev.image_info(1) is None  # erased
    assert dev.counters["resets"] == 0
    assert "phase upload" in (await _last_detail(entry, audit))


async def test_cancel_while_test_running_reverts(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    dev, entry, audit = await _daemon_cancel_at(
        bench, "wait-app-confirm", confirm="app", timeouts={"app_confirm_s": 120, "reset_s": 20})
    assert active(dev) == ("1.0.0", True)
    s1 = slot1(dev)
    assert s1 is None or not (s1.pending or s1.confirmed)
    assert dev.boot_outcomes[-2:] == ["swap", "revert"]  # test boot, then MCUboot's revert
    assert "phase booted" in (await _last_detail(entry, audit))


async def _last_detail(entry: Any, audit: Any) -> str:
    assert entry.step == CANCELED and entry.outcome == CANCELED
    return next(a[4] for a in audit if a[2] == "cancel")


async def test_cancel_after_test_mark_before_reset(bench_factory) -> None:
    """img_mgmt cannot take a test mark back: the undo test-boots the image and resets again
    (no confirmation), and MCUboot reverts; slot 1 is then erased."""
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim)
        gw = Gateway(cfg)
        dev_cfg = cfg.devices[0]
        try:
            async with gw.session(dev_cfg) as s:
                plan = await gw.plan(dev_cfg, s)
                out = await gw.engine(dev_cfg, s).run(plan.image, None, until=Stage.MARKED)
                assert out.status == Status.HELD
                dev = sim.devices["udp-1"]
                assert slot1(dev).pending and dev.counters["resets"] == 0
                res = await undo(s, dev_cfg, gw.journal, plan.image.hash, "canceled by test",
                                 reset_allowed=True)
            assert res.done and res.phase == "marked", res
            assert active(dev) == ("1.0.0", True)
            s1 = slot1(dev)
            assert s1 is None or not s1.pending
            assert dev.counters["resets"] == 2
            assert dev.boot_outcomes[-2:] == ["swap", "revert"]
            e = gw.journal.get("udp-1")
            assert e.outcome == CANCELED and e.tested_hash is None
        finally:
            gw.close()


async def test_cancel_needing_a_reset_waits_for_the_window(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim)
        gw = Gateway(cfg)
        dev_cfg = cfg.devices[0]
        try:
            async with gw.session(dev_cfg) as s:
                plan = await gw.plan(dev_cfg, s)
                await gw.engine(dev_cfg, s).run(plan.image, None, until=Stage.MARKED)
                res = await undo(s, dev_cfg, gw.journal, plan.image.hash, "canceled",
                                 reset_allowed=False)
            assert res.deferred and not res.done
            assert sim.devices["udp-1"].counters["resets"] == 0
            assert gw.journal.get("udp-1").step == "cancel-pending"
            # the next session (no window configured: resets allowed) finishes the revert first,
            # then follows the source, which still offers 2.0.0
            out = await gw.update_device(dev_cfg)
            dev = sim.devices["udp-1"]
            assert dev.boot_outcomes[1:3] == ["swap", "revert"]
            assert any("canceled in phase marked" in e[3] for e in gw.journal.events("udp-1"))
            assert out.status == Status.UPDATED and active(dev) == ("2.0.0", True)
        finally:
            gw.close()


async def test_cancel_that_comes_too_late_is_no_failure(bench_factory) -> None:
    """The operator cancels just as the confirm reaches the device (its answer is lost): the
    device runs 2.0.0 confirmed, so the cancel is too late. The attempt is the update it was
    (UPDATED, a success report), not a FAILED attempt counted against the device/rollout."""
    from safety_support import Tap

    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        gw = Gateway(bench.gateway_config(sim, timeouts={"reset_s": 30, "request_s": 6.0}))
        tap = Tap(dev)

        def hook(req: Any, frame: bytes, reply: Any) -> bool:
            if req.is_confirm:
                assert gw.fleet.request_cancel("udp-1", "canceled by the operator (test)")
                tap.deliver(frame, lambda _b: None)  # confirmed; the answer is lost
                return False
            return True

        tap.hook = hook
        tap.install()
        try:
            out = (await gw.run_once()).outcomes["udp-1"]
            assert active(dev) == ("2.0.0", True)
            assert out.status == Status.UPDATED and "too late" in out.detail, out
            assert gw.journal.open_intents() == []
            assert gw.journal.get("udp-1").outcome == Status.UPDATED.value
            assert [r.result for r in gw.journal.reports("udp-1")] == [1]  # success, once
            out = (await gw.run_once()).outcomes["udp-1"]
            assert out.status == Status.UP_TO_DATE, out
            assert [r.result for r in gw.journal.reports("udp-1")] == [1]
        finally:
            gw.close()


async def test_ignore_window_given_while_a_cancel_waits_is_not_left_for_the_next_offer(
        bench_factory) -> None:
    """``ctl update --ignore-window`` while a cancel's revert waits for a window: the
    operator's update check is answered by the waiting cancel; the override is not kept for
    the server's next offer, which would then be installed (marked, reset) outside the
    maintenance windows."""
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        data = bench.gateway_dict(sim)
        data["maintenance_windows"] = {"nightly": {"cron": "0 0 1 1 *", "duration_s": 60,
                                                   "timezone": "UTC"}}  # 1 January only
        cfg = parse_config(data, bench.root / "gateway.yaml")
        gw = Gateway(cfg)
        dev_cfg = cfg.devices[0]
        dev = sim.devices["udp-1"]
        try:
            async with gw.session(dev_cfg) as s:
                plan = await gw.plan(dev_cfg, s)
                eng = gw.engine(dev_cfg, s)
                eng.reset_gate = None  # marked in an earlier window
                await eng.run(plan.image, None, until=Stage.MARKED)
            assert gw.fleet.request_cancel("udp-1", "canceled by the operator (test)")
            await gw.fleet.handle({"cmd": "update", "device": "udp-1", "ignore_window": True},
                                  "tester")
            out = await gw.update_device(dev_cfg)
            assert out.status == Status.HELD and "maintenance window" in out.detail, out
            assert dev.counters["resets"] == 0
            # the revert is done in a window (since closed): the cancel is finished
            (intent,) = gw.journal.open_intents("udp-1")
            async with gw.session(dev_cfg) as s:
                res = await undo(s, dev_cfg, gw.journal, plan.image.hash, "canceled",
                                 reset_allowed=True)
            assert res.done
            gw.journal.intent_progress(intent.id, "done", "taken back: in a window")
            resets = dev.counters["resets"]
            out = await gw.update_device(dev_cfg)  # the source still offers 2.0.0
            assert out.status == Status.HELD, out  # staged only: outside the windows
            assert dev.counters["resets"] == resets
            assert active(dev) == ("1.0.0", True)
        finally:
            gw.close()

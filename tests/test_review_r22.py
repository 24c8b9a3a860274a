"""Review r22: attacks on the #22 changes (confirmed-elsewhere health check, take-back second
read, power-cut judge)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from modes_support import active, confirm_writes, health_hook, publish_entry, run_pass, sign

from gateway.engine import Status
from gateway.sim.config import ExtraImageConfig
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(180)




async def test_image_set_confirmed_at_boot_still_gets_its_health_check(bench_factory: Any) -> None:
    """An image set whose test-marked image 0 comes back already confirmed (an application that
    confirms itself, or a torn trailer - the #22 case) must get the health window and the
    health_check: hook like a single image (_check_permanent). _set_after_boot only runs them
    when verdict.testing is non-empty: the failing hook never runs and the set is UPDATED."""
    bench = bench_factory(udp=1, serial=0, device_kw={"buf_size": 2475})
    img1_old = sign(bench, "img1-1.0.0.bin", "1.0.0", size=16 * 1024)
    img1_new = sign(bench, "img1-2.0.0.bin", "2.0.0", size=16 * 1024)
    bench.sim_cfg.devices[0].extra_images = [
        ExtraImageConfig(slot_size=0x40000, initial_image=img1_old, update="swap")]
    bench.sim_cfg.devices[0].app_confirms_after_s = 0.0  # confirmed as soon as it boots
    bench.device_overrides = {"udp-1": health_hook(3)}
    publish_entry(bench, {"images": [{"file": str(bench.images["2.0.0"]), "image": 0},
                                     {"file": str(img1_new), "image": 1}]})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, health_check_s=0.3))
        out = res.outcomes[dev.id]
        assert active(dev, 0)[:2] == ("2.0.0", True)
        assert not any(w.detail.get("slot") == 0 for w in confirm_writes(dev))
    assert out.status != Status.UPDATED, out  # the hook fails: never a success
    assert "probe said 3" in out.detail, out.detail


async def test_overwrite_only_failed_health_check_is_not_a_success_on_the_next_pass(
        bench_factory: Any) -> None:
    """_after_install now runs the health_check: hook (FAILED, no revert possible, when it
    fails). The next pass at the same image finds 2.0.0 running confirmed with the journal's
    tested_hash kept (a FAILED attempt keeps it): plan.py reports it UPDATED ("running 2.0.0,
    confirmed") without the hook - _check_permanent is only reached when flow.test_boot. The
    same holds for a daemon restarted inside the health window."""
    bench = bench_factory(udp=1, serial=0, device_kw={"mcuboot_mode": "overwrite-only"})
    bench.device_overrides = {"udp-1": health_hook(3)}
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim, health_check_s=0.3)
        out1 = (await run_pass(cfg)).outcomes[dev.id]
        assert out1.status == Status.FAILED, out1
        assert "probe said 3" in out1.detail, out1.detail
        out2 = (await run_pass(cfg)).outcomes.get(dev.id)
        assert active(dev)[:2] == ("2.0.0", True)
    # the hook still fails: the second pass must not turn the failure into a success
    assert out2 is None or out2.status not in (Status.UPDATED, Status.UP_TO_DATE), out2


async def test_permanent_image_that_crash_loops_in_its_health_window_is_not_updated(
        bench_factory: Any) -> None:
    """_check_permanent's health window reads through reboots (_read_slots_through_reboot):
    an image that is already permanent (here: the application confirmed itself at boot - to
    the gateway the same as the torn trailer of #22) and then crashes and reboots every
    0.4 s, through MCUboot straight back into itself, is still the active hash at every read;
    the window "passes" and the outcome is UPDATED, "health check passed". For a test-booted
    image a reboot in the window means MCUboot reverted it; for a permanent one the reboot
    itself is the only sign, and it is ignored.

    Fixed (``EngineState._permanent_window``): reads are not re-sent, and a window where at
    least 2 and 40 % of the reads went unanswered fails. Only a reboot that a read runs into
    can be seen (Zephyr's SMP has no boot counter): the board here takes 1.5 s to boot (MCUboot
    checking a signature on a real board takes about that), so a crash 0.4 s after each boot
    keeps it down most of the time. A crash loop faster than the reads is the
    ``health_check:`` hook's to find."""
    import asyncio

    bench = bench_factory(udp=1, serial=0)
    bench.sim_cfg.devices[0].app_confirms_after_s = 0.0
    bench.sim_cfg.devices[0].boot_time_s = 1.5
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()

        async def crash_loop() -> None:
            while True:
                await asyncio.sleep(0.05)
                if any(e.kind == "app-confirm" for e in dev.events):
                    break
            dev.cfg.crash_on_boot_versions = ["2.0.0"]
            dev.cfg.crash_after_s = 0.4
            dev._watchdog("2.0.0")

        task = asyncio.create_task(crash_loop())
        try:
            out = (await run_pass(bench.gateway_config(sim, health_check_s=4.0))).outcomes[dev.id]
        finally:
            task.cancel()
        crashes = [e for e in dev.events if e.kind == "crash"]
    assert len(crashes) >= 3, [e.kind for e in dev.events]  # it crash-looped in the window
    assert out.status != Status.UPDATED, out  # was: updated, "...; health check passed"


async def test_held_test_boot_failed_check_stays_failed_on_the_next_pass(bench_factory: Any) -> None:
    """(held up) The swap path: a self-confirmed image whose hook fails is FAILED again on the
    next pass (plan.py reaches _check_permanent through the kept tested_hash)."""
    bench = bench_factory(udp=1, serial=0)
    bench.sim_cfg.devices[0].app_confirms_after_s = 0.0
    bench.device_overrides = {"udp-1": health_hook(3)}
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim, health_check_s=0.3)
        out1 = (await run_pass(cfg)).outcomes[dev.id]
        out2 = (await run_pass(cfg)).outcomes.get(dev.id)
    assert out1.status == Status.FAILED, out1
    assert out2 is None or out2.status == Status.FAILED, out2


async def test_held_take_back_with_a_device_alternating_forever_is_bounded(
        bench_factory: Any) -> None:
    """(held up) A member whose state reads alternate forever between its pre-mark answer and
    the truth after the mark: the take-back never calls it rolled back with 2.0.0 pending."""
    from gateway.daemon import Gateway

    bench = bench_factory(udp=2, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        _first, second = sim.devices.values()
        cfg = bench.gateway_config(sim, group="pair", health_check_s=0.3,
                                   timeouts={"reset_s": 3, "request_s": 0.3})
        orig = second.frame_arrived
        st: dict[str, Any] = {"last": None, "marked": False, "drop_info": 0, "n": 0}

        def arrived(frame: bytes, reply: Any, **kw: Any) -> None:
            import cbor2
            op, group, cmd = frame[0] & 7, int.from_bytes(frame[4:6], "big"), frame[7]
            if op == 0 and group == 1 and cmd == 0:
                if st["marked"] and st["last"] is not None:
                    st["n"] += 1
                    if st["n"] % 2 == 1:
                        last = st["last"]
                        reply(last[:6] + frame[6:7] + last[7:])
                        return

                def keep(b: bytes) -> None:
                    if not st["marked"]:
                        st["last"] = b
                    reply(b)
                orig(frame, keep, **kw)
                return
            if op == 2 and group == 1 and cmd == 0:
                if cbor2.loads(frame[8:]).get("confirm") is False:
                    st["marked"] = True
                    st["drop_info"] = 3
            elif op == 0 and group == 0 and cmd == 7 and st["drop_info"] > 0:
                st["drop_info"] -= 1
                return
            orig(frame, reply, **kw)

        second.frame_arrived = arrived  # type: ignore[method-assign]
        gw = Gateway(cfg)
        try:
            res = await asyncio.wait_for(gw.run_once(), 120)
        finally:
            gw.close()
        out = res.outcomes[second.id]
        pending = any(s.pending for s in second.server.state_images())
    assert not (out.status == Status.ROLLED_BACK and pending), out


def test_power_cut_judge_passes_updated_after_a_failed_unrepeated_health_check(tmp_path: Any) -> None:
    """benchmarks/power_cuts.py judge_state: a permanent-without-confirm image passes as soon as
    ANY journal event starts with CONFIRMED_ELSEWHERE after the first mark - that is the
    *start* of _check_permanent's window, not its verdict. A run whose check failed (step
    failed, "health check failed") and whose later pass reported updated without checking
    again (the shape of the overwrite-only finding above) is judged a survived cut. The judge
    should require a passed check (or no failed one) after the last mark, before the final."""
    import test_power_cuts_renode as t

    ce = t.pc.CONFIRMED_ELSEWHERE
    events = [("upload", "done"), t.MARK, ("reset", "x"), ("wait-boot", "x"), ("verify", ""),
              ("confirm", f"{ce}; health check 2s"),
              ("failed", "... no revert possible; its health check failed: exited 3"),
              ("read-state", "running=1.0.0 target=2.0.0 resume=False"),
              ("done", "running 2.0.0, confirmed")]
    problems = t._judge(tmp_path, t._slots(t.NEW), {"result": "updated"},
                        t._journal("updated", t.NEW, events=events), [8, 1])
    assert problems, "the judge let an updated after a failed, never repeated health check pass"


async def test_held_group_member_confirmed_at_boot_with_failing_hook_is_not_updated(
        bench_factory: Any) -> None:
    """(held up) A group member whose application confirms itself at boot and whose hook
    fails: the group does not report it updated."""
    from gateway.daemon import Gateway

    bench = bench_factory(udp=2, serial=0)
    bench.sim_cfg.devices[0].app_confirms_after_s = 0.0
    bench.device_overrides = {"udp-1": health_hook(3)}
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        gw = Gateway(bench.gateway_config(sim, group="pair", health_check_s=0.3))
        try:
            res = await asyncio.wait_for(gw.run_once(), 120)
        finally:
            gw.close()
    assert all(o.status != Status.UPDATED for o in res.outcomes.values()), res.outcomes

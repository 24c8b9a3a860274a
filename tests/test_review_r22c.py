"""Review r22 (third round): attacks on the r22b fixes (device.py _target permanent_by_itself,
state.py _permanent_window, recovery.py _check_permanent)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from modes_support import health_hook
from test_groups_take_back import active, confirms, old_test_boot

from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.config import LinkConfig
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(300)


async def test_group_take_back_then_member_alone_does_not_reinstall_blocked_image(
        bench_factory: Any) -> None:
    """Group take-back re-installs 1.0.0 on the confirmed member by a test swap
    (MARK_TEST tested_hash=1.0.0) and confirms it in _confirm_previous - with no CONFIRM_SENT
    event. Outcome ROLLED_BACK, tested_hash == active hash, confirmed, no CONFIRM_SENT since
    the mark: _target's permanent_by_itself + runs_tested. The source still offers 2.0.0
    (== entry.target_version): "checking the permanent 2.0.0 again" resumes the journal's
    2.0.0 image with resume_path set, so the group block (blocked_hash) is skipped."""
    bench = bench_factory(udp=2, serial=0)
    bench.sim_cfg.devices[1].link = LinkConfig(request_latency_s=0.3)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        first, second = sim.devices.values()
        cfg = bench.gateway_config(sim, group="pair", health_check_s=1.0,
                                   timeouts={"reset_s": 3, "request_s": 1.0})

        async def faults() -> None:
            await first.wait_for(lambda d: bool(confirms(d)), timeout_s=120)
            await second.power_cycle(wait=False)
            await first.wait_for(old_test_boot, timeout_s=120)

        gw = Gateway(cfg)
        try:
            injector = asyncio.create_task(faults())
            res = await gw.run_once()
            await asyncio.wait_for(injector, 30)
            for _ in range(2):
                if all(o.status == Status.ROLLED_BACK for o in res.outcomes.values()):
                    break
                res = await gw.run_once()
            assert all(o.status == Status.ROLLED_BACK for o in res.outcomes.values()), res.outcomes
            for dev in sim.devices.values():
                assert active(dev) == ("1.0.0", True)
            e = gw.journal.get(first.id)
            print("first entry", e)
            n_events = len(first.events)
            res = await gw.run_once()
            print({k: (o.status, o.detail) for k, o in res.outcomes.items()})
            print([ev for ev in first.events[n_events:]][:20])
            for dev in sim.devices.values():
                assert active(dev) == ("1.0.0", True), (dev.id, dev.image_states())
            assert all(o.status not in (Status.UPDATED,) for o in res.outcomes.values()), \
                res.outcomes
        finally:
            gw.close()
        # the operator dissolves the group (or a member is run on its own): the journal still
        # says tested_hash=1.0.0 (the take-back's mark), ROLLED_BACK, 1.0.0 confirmed without
        # CONFIRM_SENT -> _target "checking the permanent 2.0.0 again" resumes the BLOCKED
        # 2.0.0 with resume_path set, which skips the blocked_hash check
        cfg2 = bench.gateway_config(sim, health_check_s=1.0,
                                    timeouts={"reset_s": 3, "request_s": 1.0})
        gw = Gateway(cfg2)
        try:
            res = await gw.run_once()
            print({k: (o.status, o.detail[:200]) for k, o in res.outcomes.items()})
        finally:
            gw.close()
        assert active(first)[0] == "1.0.0", "blocked 2.0.0 re-installed on " + first.id



async def test_failed_permanent_image_does_not_shadow_a_new_artifact_with_the_same_version(
        bench_factory: Any) -> None:
    """overwrite-only + failing health_check hook: pass 1 installs 2.0.0 (build A), FAILED.
    The server then offers a different artifact, build B, also versioned 2.0.0 (a re-build /
    re-signed fix). _target's "checking the permanent again" branch compares only
    str(offer.version) == entry.target_version, so the journal's build A is resumed and
    re-checked; build B is never fetched or installed (and the report goes to A's handle)."""
    from modes_support import active, publish_entry, run_pass, sign, states

    bench = bench_factory(udp=1, serial=0, device_kw={"mcuboot_mode": "overwrite-only"})
    # allow_downgrade: the gateway's own policy lets a same-version build through (with the
    # default it is refused "not-newer" - then the symptom is that offer B is never answered:
    # the report goes to the journal's handle of A)
    bench.device_overrides = {"udp-1": {**health_hook(3), "allow_downgrade": True}}
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim, health_check_s=0.3)
        out1 = (await run_pass(cfg)).outcomes[dev.id]
        assert out1.status == Status.FAILED and "probe said 3" in out1.detail, out1
        a_hash = next(s["hash"] for s in states(dev) if s["active"])
        b = sign(bench, "fixed", "2.0.0", payload_seed="fixed-build-B")
        publish_entry(bench, {"file": str(b)})
        out2 = (await run_pass(cfg)).outcomes.get(dev.id)
        b_hash = next(s["hash"] for s in states(dev) if s["active"])
        print(out2)
    assert active(dev)[0] == "2.0.0"
    assert b_hash != a_hash, ("build B never installed; pass 2:", out2)


async def test_one_lost_read_at_the_start_of_a_permanent_window_fails_a_healthy_image(
        bench_factory: Any) -> None:
    """A healthy overwrite-only image, DEFAULT health_check_s (3 s) and request_s (5 s): the
    first state read of the health window loses its response (one lost datagram). The miss
    costs request_s (5 s) > the window, so _permanent_window breaks out with answered == 0 and
    raises Unanswered ("no answer at all") -> FAILED "installed permanently, no revert
    possible ... health check failed". The old window forgave one miss and read again. A
    single lost packet at the wrong moment fails a healthy device; the same whenever
    request_s >= health_check_s (e.g. BLE/serial links with long timeouts)."""
    from safety_support import Tap

    bench = bench_factory(udp=1, serial=0, device_kw={"mcuboot_mode": "overwrite-only"})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim)
        gw = Gateway(cfg)
        dropped: list[int] = []

        def hook(req: Any, frame: bytes, reply: Any) -> bool:
            is_read = req.op == 0 and req.group == 1 and req.cmd == 0
            if is_read and not dropped and gw.journal.get(dev.id).step == "confirm":
                dropped.append(req.seq)
                return False
            return True

        Tap(dev, hook).install()
        try:
            out = (await gw.run_once()).outcomes[dev.id]
        finally:
            gw.close()
        assert [e for e in dev.events if e.kind == "crash"] == []
    assert dropped, "no read dropped"
    assert out.status == Status.UPDATED, out.detail


async def test_serial_recovery_install_failed_check_is_not_up_to_date_on_the_next_pass(
        bench_factory: Any) -> None:
    """single-app through MCUboot serial recovery + failing health_check hook. Pass 1: the
    new _check_permanent runs the hook -> FAILED. Pass 2: _target resumes the journal's
    image ("checking the permanent 2.0.0 again"), but RecoveryStep._run_recovery computes
    ``resuming = prev.target_hash == th and prev.outcome is None`` - False after the FAILED
    outcome - so the new ``resuming and prev.tested_hash == th`` re-check never fires, and the
    fresh Entry drops tested_hash: "running 2.0.0", UP_TO_DATE over a failed check."""
    from modes_support import active, run_pass

    bench = bench_factory(udp=0, serial=1, device_kw={
        "mcuboot_mode": "single-app", "os_reset_boot_mode": True,
        "serial_recovery": {"boot_mode": True, "no_application": True}})
    bench.device_overrides = {"serial-1": health_hook(3)}
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim, recovery={"enabled": True}, mcuboot_mode="single-app",
                                   health_check_s=0.3)
        out1 = (await run_pass(cfg)).outcomes[dev.id]
        out2 = (await run_pass(cfg)).outcomes.get(dev.id)
        assert active(dev)[:2] == ("2.0.0", True)
    assert out1.status == Status.FAILED and "probe said 3" in out1.detail, out1
    assert out2 is None or out2.status not in (Status.UPDATED, Status.UP_TO_DATE), out2.detail


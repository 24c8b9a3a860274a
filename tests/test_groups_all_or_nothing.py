"""A group ends all-new or all-old, whatever member fails and whenever (review finding 4).

Every case runs the real gateway against simulated devices (Zephyr smp_svr + MCUboot swap
model on UDP sockets); the fault is injected into the simulator at a moment chosen from the
devices' own events (a confirm landing on a member), never by timing guesses.
"""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.config import LinkConfig
from gateway.sim.simulator import Simulator


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return str(a.version), bool(a.confirmed)


def pending(dev: Any) -> bool:
    return any(s.pending for s in dev.server.state_images())


def confirms(dev: Any) -> list[Any]:
    return [e for e in dev.events if e.kind == "state-write" and e.detail.get("confirm")]


def assert_all_old(sim: Simulator, version: str = "1.0.0") -> None:
    """The group's invariant after a failure: every member on its old image, confirmed."""
    for dev in sim.devices.values():
        assert active(dev) == (version, True), (dev.id, dev.image_states())
        assert not pending(dev), (dev.id, dev.image_states())


async def assert_not_pushed_again(gw: Gateway, sim: Simulator) -> None:
    """The next pass (the source still offers 2.0.0) neither uploads nor resets anything."""
    uploads = {d.id: sum(1 for e in d.events if e.kind == "upload-start") for d in sim.devices.values()}
    boots = {d.id: d.boots for d in sim.devices.values()}
    res = await gw.run_once()
    assert all(o.status == Status.ROLLED_BACK for o in res.outcomes.values()), res.outcomes
    assert all("waiting for a different artifact" in o.detail for o in res.outcomes.values())
    assert {d.id: d.boots for d in sim.devices.values()} == boots
    assert {d.id: sum(1 for e in d.events if e.kind == "upload-start")
            for d in sim.devices.values()} == uploads


async def test_member_failing_after_another_was_confirmed_takes_the_confirmed_one_back(
        bench_factory: Any) -> None:
    """The first member is confirmed; then the second resets (MCUboot reverts it) before its own
    confirm. Before the fix: first member confirmed on 2.0.0, second back on 1.0.0."""
    bench = bench_factory(udp=3, serial=0)
    # the second member answers slowly: its confirm cannot overtake the fault below
    bench.sim_cfg.devices[1].link = LinkConfig(request_latency_s=0.3)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        first, second, _third = sim.devices.values()
        gw = Gateway(bench.gateway_config(sim, group="rack", health_check_s=1.0))

        async def fault() -> None:
            await first.wait_for(lambda d: bool(confirms(d)), timeout_s=120)
            await second.power_cycle(wait=False)  # test-running 2.0.0, unconfirmed: reverts

        try:
            injector = asyncio.create_task(fault())
            res = await gw.run_once()
            assert injector.done() and injector.exception() is None
            assert_all_old(sim)
            # the first member really was confirmed on 2.0.0, then re-installed 1.0.0 (test swap)
            assert confirms(first)[0].detail["slot"] == 0
            versions = [e.detail.get("version") for e in first.events if e.kind == "boot"]
            assert versions[-3:] == ["1.0.0", "2.0.0", "1.0.0"], versions
            for dev_id, out in res.outcomes.items():
                assert out.status == Status.ROLLED_BACK, (dev_id, out)
                assert out.group == "rack"
                assert f"group rack failed: member {second.id}" in out.detail, out.detail
            assert "re-installed 1.0.0" in res.outcomes[first.id].detail
            assert gw.journal.group("rack").phase == "failed"  # type: ignore[union-attr]
            assert gw.metrics.get("group_failures_total", group="rack") == 1
            await assert_not_pushed_again(gw, sim)
        finally:
            gw.close()


async def test_member_failing_between_its_health_check_and_the_first_confirm(
        bench_factory: Any) -> None:
    """The second member passes its health check, then crashes while a slower member is still
    booting: nobody may be confirmed. Before the fix the two others were confirmed."""
    bench = bench_factory(udp=3, serial=0)
    bench.sim_cfg.devices[1].crash_on_boot_versions = ["2.0.0"]
    bench.sim_cfg.devices[1].crash_after_s = 3.0  # after its 1 s health check
    bench.sim_cfg.devices[2].boot_time_s = 4.5  # the group's boot phase ends after that crash
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        _first, second, third = sim.devices.values()
        gw = Gateway(bench.gateway_config(sim, group="rack", health_check_s=1.0))
        try:
            res = await gw.run_once()
            assert_all_old(sim)
            assert [d.id for d in sim.devices.values() if confirms(d)] == []  # nobody confirmed
            crash = next(e for e in second.events if e.kind == "crash")
            held = max(e.t for e in third.events if e.kind == "boot")  # the slow member's boot
            assert crash.t < held  # the fault landed between second's health check and the confirm
            for dev_id, out in res.outcomes.items():
                assert out.status == Status.ROLLED_BACK, (dev_id, out)
                assert f"member {second.id} rolled-back" in out.detail, out.detail
                assert "re-check before confirm" in out.detail
            await assert_not_pushed_again(gw, sim)
        finally:
            gw.close()


async def test_take_back_interrupted_by_a_gateway_crash_resumes(bench_factory: Any) -> None:
    """The gateway dies while it re-installs the old image on a confirmed member; the next
    start follows the journaled decision (revert) and finishes taking every member back."""
    bench = bench_factory(udp=2, serial=0)
    bench.sim_cfg.devices[1].link = LinkConfig(request_latency_s=0.3)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        first, second = sim.devices.values()
        cfg = bench.gateway_config(sim, group="pair", health_check_s=1.0)
        gw = Gateway(cfg)

        async def fault() -> None:
            await first.wait_for(lambda d: bool(confirms(d)), timeout_s=120)
            await second.power_cycle(wait=False)

        def marks_old(d: Any) -> bool:  # the take-back marks 1.0.0 (slot 1) for test
            return any(e.kind == "state-write" and not e.detail.get("confirm") for e in d.events
                       if e.t > confirms(d)[0].t) if confirms(d) else False

        try:
            injector = asyncio.create_task(fault())
            run = asyncio.create_task(gw.run_once())
            await first.wait_for(marks_old, timeout_s=120)
            run.cancel()  # the gateway dies right after the mark, before the reset
            await asyncio.gather(run, return_exceptions=True)
            await injector
            assert gw.journal.group("pair").phase == "revert"  # type: ignore[union-attr]
            assert active(first) == ("2.0.0", True) and pending(first)
        finally:
            gw.close()
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
            assert_all_old(sim)
            assert all(o.status == Status.ROLLED_BACK for o in res.outcomes.values()), res.outcomes
            assert all(f"member {second.id}" in o.detail for o in res.outcomes.values())
            assert gw.journal.group("pair").phase == "failed"  # type: ignore[union-attr]
            # one final report per member, each a failure, none lost across the crash
            reps = gw.journal.reports()
            assert sorted(r.device_id for r in reps) == sorted(sim.devices)
            assert all(r.state == "delivered" and r.result == 8 for r in reps), reps
        finally:
            gw.close()


async def test_group_confirmed_one_by_one_after_a_recheck(bench_factory: Any) -> None:
    """The good path: every member re-read before the first confirm, confirms one at a time."""
    bench = bench_factory(udp=3, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        gw = Gateway(bench.gateway_config(sim, group="trio"))
        try:
            res = await gw.run_once()
            assert all(o.status == Status.UPDATED for o in res.outcomes.values()), res.outcomes
            for dev in sim.devices.values():
                assert active(dev) == ("2.0.0", True)
                assert len(confirms(dev)) == 1 and confirms(dev)[0].detail["slot"] == 0
            ids = list(sim.devices)
            order = sorted(ids, key=lambda i: confirms(sim.devices[i])[0].t)
            assert order == ids  # in configuration order, one after the other
            assert gw.journal.group("trio").phase == "done"  # type: ignore[union-attr]
            assert [r.state for r in gw.journal.reports()] == ["delivered"] * 3
        finally:
            gw.close()


def test_groups_do_not_import_the_daemon() -> None:
    """No daemon <-> groups cycle: groups get what they need through ``GroupHost``."""
    import gateway.groups

    tree = ast.parse(Path(gateway.groups.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "gateway.daemon" not in imported, imported  # not even under TYPE_CHECKING
    code = "import sys, gateway.groups; sys.exit(int('gateway.daemon' in sys.modules))"
    subprocess.run([sys.executable, "-c", code], check=True)

"""Group updates: all members switch together, or every member ends on its old image."""

from __future__ import annotations

from typing import Any

from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return a.version, bool(a.confirmed)


def pending(dev: Any) -> bool:
    return any(s.pending for s in dev.server.state_images())


def kinds(dev: Any, kind: str) -> int:
    return sum(1 for e in dev.events if e.kind == kind)


async def test_group_member_crashing_on_boot_reverts_the_whole_group(bench_factory: Any) -> None:
    bench = bench_factory(udp=3, serial=0)
    # the second member's new image crashes (watchdog) 1 s after it boots
    bench.sim_cfg.devices[1].crash_on_boot_versions = ["2.0.0"]
    bench.sim_cfg.devices[1].crash_after_s = 0.5
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim, group="rack-1", health_check_s=2.0)
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
            ids = list(sim.devices)
            crasher = ids[1]
            for dev_id, out in res.outcomes.items():
                assert out.status == Status.ROLLED_BACK, (dev_id, out)
                assert out.group == "rack-1"
                assert f"group rack-1 failed: member {crasher} rolled-back" in out.detail, out.detail
            for dev in sim.devices.values():
                assert active(dev) == ("1.0.0", True), dev.id
                assert not pending(dev), dev.id
            # every member got its image before anybody was reset, and was reset exactly once
            uploads_done = [e.t for d in sim.devices.values() for e in d.events
                            if e.kind == "upload-done"]
            first_reset = min(e.t for d in sim.devices.values() for e in d.events
                              if e.kind == "reset")
            assert len(uploads_done) == 3 and max(uploads_done) < first_reset
            assert all(kinds(d, "upload-done") == 1 for d in sim.devices.values())
            assert gw.journal.group("rack-1").phase == "failed"  # type: ignore[union-attr]
            assert gw.metrics.get("group_failures_total", group="rack-1") == 1

            # the source still offers 2.0.0: it is not attempted again (no upload, no reset)
            boots = {d.id: d.boots for d in sim.devices.values()}
            res2 = await gw.run_once()
            assert all(o.status == Status.ROLLED_BACK for o in res2.outcomes.values())
            assert all("waiting for a different artifact" in o.detail
                       for o in res2.outcomes.values()), res2.outcomes
            assert {d.id: d.boots for d in sim.devices.values()} == boots
            assert all(kinds(d, "upload-start") == 1 for d in sim.devices.values())
        finally:
            gw.close()


async def test_group_all_members_boot_then_all_confirmed(bench_factory: Any) -> None:
    bench = bench_factory(udp=3, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim, group="pair")
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
            assert all(o.status == Status.UPDATED for o in res.outcomes.values()), res.outcomes
            for dev in sim.devices.values():
                assert active(dev) == ("2.0.0", True)
            # nobody was confirmed before every member had booted its new image
            boots_new = [e.t for d in sim.devices.values() for e in d.events
                         if e.kind == "boot" and e.detail.get("version") == "2.0.0"]
            confirms = [e.t for d in sim.devices.values() for e in d.events
                        if e.kind == "state-write" and e.detail.get("confirm")]
            assert len(boots_new) == 3 and len(confirms) == 3
            assert max(boots_new) < min(confirms)
            assert gw.journal.group("pair").phase == "done"  # type: ignore[union-attr]
        finally:
            gw.close()

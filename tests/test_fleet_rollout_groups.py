"""Staged rollout over groups: a group is one unit, and it is gated like a lone device.

Two groups of two simulated devices, ``rollout: {canary: 1}``: the group that asks first is the
canary; the other is not touched (no byte uploaded, no reset) until the canary group confirmed
its image and stayed healthy, and never when the canary group failed (the rollout halts).
"""

from __future__ import annotations

from typing import Any

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator

GROUPS = {"udp-1": "left", "udp-2": "left", "udp-3": "right", "udp-4": "right"}


def untouched(dev: Any) -> bool:
    return dev.image_info(1) is None and dev.counters["resets"] == 0


def two_groups(bench: Any, sim: Simulator, rollout: dict[str, Any]) -> Gateway:
    data = bench.gateway_dict(sim)
    for d in data["devices"]:
        d["group"] = GROUPS[d["id"]]
    data["rollout"] = rollout
    return Gateway(parse_config(data, bench.root / "gateway.yaml"))


def by_group(res: Any) -> dict[str, set[Status]]:
    out: dict[str, set[Status]] = {}
    for dev_id, o in res.outcomes.items():
        out.setdefault(GROUPS[dev_id], set()).add(o.status)
    return out


async def test_the_other_group_waits_for_the_canary_group(bench_factory: Any) -> None:
    bench = bench_factory(udp=4, serial=0, image_size=16 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        gw = two_groups(bench, sim, {"canary": 1, "wait_s": 0, "max_failure_pct": 0})
        try:
            res = await gw.run_once()
            groups = by_group(res)
            canary = next(g for g, st in groups.items() if st == {Status.UPDATED})
            rest = next(g for g in groups if g != canary)
            assert groups[rest] == {Status.HELD}, res.outcomes
            for dev_id, g in GROUPS.items():
                if g == rest:
                    assert "waiting for the canaries" in res.outcomes[dev_id].detail
                    assert untouched(sim.devices[dev_id]), dev_id
            wave = next(iter(gw.fleet.rollout.waves.values()))
            assert wave.canaries == {f"group:{canary}": "ok"} and wave.state == "soak"

            res = await gw.run_once()  # the canary group stayed healthy: the rest may start
            groups = by_group(res)
            assert groups[canary] == {Status.UP_TO_DATE} and groups[rest] == {Status.UPDATED}
            assert wave.state == "open" and sorted(wave.succeeded) == sorted(
                f"group:{g}" for g in groups)
        finally:
            gw.close()
        for dev in sim.devices.values():
            a = next(s for s in dev.server.state_images() if s.active)
            assert (a.version, a.confirmed) == ("2.0.0", True)


async def test_a_failed_canary_group_halts_the_rollout(bench_factory: Any) -> None:
    bench = bench_factory(udp=4, serial=0, image_size=16 * 1024,
                          device_kw={"crash_on_boot_versions": ["2.0.0"], "crash_after_s": 0.3})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        gw = two_groups(bench, sim, {"canary": 1, "wait_s": 0, "max_failure_pct": 0})
        try:
            res = await gw.run_once()
            groups = by_group(res)
            canary = next(g for g, st in groups.items() if st == {Status.ROLLED_BACK})
            rest = next(g for g in groups if g != canary)
            assert groups[rest] == {Status.HELD}, res.outcomes
            wave = next(iter(gw.fleet.rollout.waves.values()))
            assert wave.state == "halted" and f"group:{canary}" in wave.reason, wave
            res = await gw.run_once()
            for dev_id, g in GROUPS.items():
                if g == rest:
                    out = res.outcomes[dev_id]
                    assert out.status == Status.HELD and "halted" in out.detail, out
        finally:
            gw.close()
        for dev_id, g in GROUPS.items():
            dev = sim.devices[dev_id]
            if g == rest:
                assert untouched(dev), dev_id
            a = next(s for s in dev.server.state_images() if s.active)
            assert (a.version, a.confirmed) == ("1.0.0", True)

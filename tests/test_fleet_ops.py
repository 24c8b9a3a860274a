"""Fleet operations end to end, on simulated devices and the real daemon code: staged rollout,
maintenance windows, cancellation in each phase, operator control over the UNIX socket."""

from __future__ import annotations

import asyncio
import os
import stat
from typing import Any

from gateway.config import parse_config
from gateway.control import ControlError, request
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator

NEVER = {"cron": "0 0 1 1 *", "duration_s": 60, "timezone": "UTC"}  # 1 January, 00:00-00:01
ALWAYS = {"cron": "* * * * *", "duration_s": 3600, "timezone": "Europe/Berlin"}


def cfg_of(bench: Any, sim: Simulator, **top: Any) -> Any:
    data = bench.gateway_dict(sim)
    data.update(top)
    return parse_config(data, bench.root / "gateway.yaml")


def untouched(dev: Any) -> bool:
    return dev.image_info(1) is None and dev.counters["resets"] == 0


async def test_staged_rollout_stops_after_the_canaries_fail(bench_factory) -> None:
    """20 devices, 2 canaries whose new image crashes at boot: the rollout halts, and the 18
    others are never touched (no byte uploaded, no reset), in this pass or the next."""
    bench = bench_factory(udp=20, serial=0, image_size=16 * 1024,
                          device_kw={"crash_on_boot_versions": ["2.0.0"], "crash_after_s": 0.3})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = cfg_of(bench, sim, rollout={"canary": "10%", "wait_s": 0, "max_failure_pct": 0})
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
            canaries = sorted(i for i, o in res.outcomes.items() if o.status == Status.ROLLED_BACK)
            held = sorted(i for i, o in res.outcomes.items() if o.status == Status.HELD)
            assert len(canaries) == 2, res.outcomes
            assert len(held) == 18
            assert all("waiting for the canaries" in res.outcomes[i].detail
                       or "halted" in res.outcomes[i].detail for i in held)
            wave = next(iter(gw.fleet.rollout.waves.values()))
            assert wave.state == "halted" and "2 of 2 unit(s) failed" in wave.reason
            res2 = await gw.run_once()
            for i in held:
                assert res2.outcomes[i].status == Status.HELD
                assert "halted" in res2.outcomes[i].detail
        finally:
            gw.close()
        for i in held:
            assert untouched(sim.devices[i]), i
        for i in canaries:
            d = sim.devices[i]
            active = next(s for s in d.server.state_images() if s.active)
            assert active.version == "1.0.0" and active.confirmed


async def test_rollout_opens_after_healthy_canaries(bench_factory) -> None:
    bench = bench_factory(udp=4, serial=0, image_size=16 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = cfg_of(bench, sim, rollout={"canary": 1, "wait_s": 0.5, "max_failure_pct": 0})
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
            assert sum(o.status == Status.UPDATED for o in res.outcomes.values()) == 1
            assert sum(o.status == Status.HELD for o in res.outcomes.values()) == 3
            await asyncio.sleep(0.6)  # the soak time itself (what is tested: nothing earlier)
            res = await gw.run_once()
            assert all(o.status in (Status.UPDATED, Status.UP_TO_DATE) for o in res.outcomes.values())
            assert next(iter(gw.fleet.rollout.waves.values())).state == "open"
        finally:
            gw.close()


async def test_reset_never_outside_a_maintenance_window(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=1, image_size=16 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        gw = Gateway(cfg_of(bench, sim, maintenance_windows={"nightly": NEVER}))
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        for dev_id, dev in sim.devices.items():
            out = res.outcomes[dev_id]
            assert out.status == Status.HELD and "outside the maintenance windows" in out.detail
            # downloaded and staged: the image sits complete in slot 1, not marked, no reset
            assert str(dev.image_info(1).version) == "2.0.0"
            slot1 = next(s for s in dev.server.state_images() if s.slot == 1)
            assert not slot1.pending and dev.counters["resets"] == 0
        gw = Gateway(cfg_of(bench, sim, maintenance_windows={"nightly": ALWAYS}))
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        for dev_id, dev in sim.devices.items():
            assert res.outcomes[dev_id].status == Status.UPDATED, res.outcomes[dev_id]
            assert res.outcomes[dev_id].bytes_uploaded == 0  # staged before: not sent again
            assert dev.counters["resets"] >= 1


async def test_ctl_socket_pause_resume_unblock_list(bench_factory) -> None:
    bench = bench_factory(udp=2, serial=0, image_size=16 * 1024)
    async with Simulator(bench.sim_cfg) as sim:
        cfg = cfg_of(bench, sim)
        gw = Gateway(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run_forever(stop))
        try:
            sock = cfg.control_socket
            for _ in range(200):
                if sock.exists():
                    break
                await asyncio.sleep(0.05)
            st = os.stat(sock)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == os.getuid()
            rows = await request(sock, {"cmd": "list"})
            assert sorted(r["device"] for r in rows) == ["udp-1", "udp-2"]
            assert "paused" in await request(sock, {"cmd": "pause", "device": "udp-1",
                                                    "reason": "field test"})
            # a paused device is not updated, the other one is
            bench.publish("2.0.0")
            await request(sock, {"cmd": "update", "device": "udp-2"})
            await request(sock, {"cmd": "update", "device": "udp-1"})
            await sim.devices["udp-2"].wait_for(
                lambda d: any(s.active and s.version == "2.0.0" and s.confirmed
                              for s in d.server.state_images()), timeout_s=60)
            assert untouched(sim.devices["udp-1"])
            rows = {r["device"]: r for r in await request(sock, {"cmd": "list"})}
            assert "field test" in rows["udp-1"]["paused"]
            await request(sock, {"cmd": "resume", "device": "udp-1"})
            await sim.devices["udp-1"].wait_for(
                lambda d: any(s.active and s.version == "2.0.0" and s.confirmed
                              for s in d.server.state_images()), timeout_s=60)
            try:
                await request(sock, {"cmd": "unblock", "device": "udp-1"})
                raise AssertionError("unblock of a device without a blocked image succeeded")
            except ControlError as exc:
                assert "no blocked image" in str(exc)
            try:
                await request(sock, {"cmd": "pause", "device": "nope"})
                raise AssertionError("unknown device accepted")
            except ControlError as exc:
                assert "no device 'nope'" in str(exc)
            audit = await request(sock, {"cmd": "audit"})
            assert {a[2] for a in audit} >= {"pause", "resume", "update"}
            events = [e for e in gw.journal.events("udp-1") if "operator" in e[3]]
            assert any("operator pause" in e[3] for e in events)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            gw.close()
        assert not cfg.control_socket.exists()


async def test_group_waits_for_the_window_untouched(bench_factory) -> None:
    bench = bench_factory(udp=2, serial=0, image_size=16 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        data = bench.gateway_dict(sim, group="pair")
        data["maintenance_windows"] = {"nightly": NEVER}
        gw = Gateway(parse_config(data, bench.root / "gateway.yaml"))
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        for dev_id, dev in sim.devices.items():
            out = res.outcomes[dev_id]
            assert out.status == Status.HELD and "maintenance window" in out.detail, out
            assert untouched(dev)

"""Scheduling limits, asserted from the devices' side: global cap, one session per serial port."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import serial

from gateway.config import parse_config
from gateway.daemon import Gateway, backoff_delay
from gateway.engine import Status
from gateway.sim.config import LinkConfig
from gateway.sim.simulator import Simulator


def _track_sessions(sim: Simulator) -> dict[tuple[str, Any], list[float]]:
    """(device, gateway UDP source address) -> [first, last] time a request of it was served.

    Every gateway session opens its own UDP socket, so a source address is a session as the
    device sees it. Recorded through the simulator's waiter hook, called at every served request.
    """
    spans: dict[tuple[str, Any], list[float]] = {}

    def observer(dev: Any) -> bool:
        src = dev._last_source  # the source of the request being served
        if src is not None and dev.counters["requests"]:
            now = asyncio.get_running_loop().time()
            span = spans.setdefault((dev.id, src), [now, now])
            span[1] = now
        return False  # never satisfied: observe until cancelled

    for dev in sim.devices.values():
        asyncio.get_running_loop().create_task(dev.wait_for(observer, timeout_s=3600))
    return spans


def _max_overlap(spans: list[list[float]]) -> int:
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in edges:
        cur += d
        best = max(best, cur)
    return best


async def test_global_cap_bounds_concurrent_sessions_seen_by_devices(bench_factory: Any) -> None:
    bench = bench_factory(udp=8, serial=0, image_size=24 * 1024)
    for d in bench.sim_cfg.devices:
        d.link = LinkConfig(latency_s=0.005, bandwidth_bps=20000)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        spans = _track_sessions(sim)
        data = bench.gateway_dict(sim)
        data["max_concurrent"] = 3
        cfg = parse_config(data, bench.root / "gateway.yaml")
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        assert all(o.status == Status.UPDATED for o in res.outcomes.values()), res.outcomes
        overlap = _max_overlap(list(spans.values()))
        assert overlap <= 3, overlap
        assert overlap == 3  # the cap was reached: the test can see a violation
        assert gw.sessions_peak == 3


async def test_one_session_per_serial_port(bench_factory: Any) -> None:
    """Two configured devices share one PTY (e.g. two MCUboot images of one MCU): their sessions
    never overlap, the device never sees interleaved frames, and another process cannot open
    the port while the gateway holds it (pyserial's exclusive flock)."""
    bench = bench_factory(udp=0, serial=1, image_size=24 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        dev = next(iter(sim.devices.values()))
        data = bench.gateway_dict(sim)
        twin = {**data["devices"][0], "id": "serial-1-twin"}
        data["devices"].append(twin)
        cfg = parse_config(data, bench.root / "gateway.yaml")
        gw = Gateway(cfg)
        port = data["devices"][0]["transport"]["port"]
        try:
            run = asyncio.create_task(gw.run_once())
            await dev.wait_for(lambda d: d.counters["upload_bytes_received"] > 2000, 30)
            try:
                other = serial.Serial(port, 115200, exclusive=True, timeout=0)
            except serial.SerialException as exc:
                refused: str | None = str(exc)
            else:
                other.close()
                refused = None
            res = await run
        finally:
            gw.close()
        assert refused is not None, "a second process could open the port the gateway holds"
        outs = res.outcomes
        assert {o.status for o in outs.values()} == {Status.UPDATED, Status.UP_TO_DATE}, outs
        assert dev.counters["bad_serial_frames"] == 0
        assert [e.kind for e in dev.events].count("upload-start") == 1
        assert gw.sessions_peak == 1


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    for n, lo, hi in ((1, 0.5, 1.5), (2, 1.0, 3.0), (3, 2.0, 6.0), (10, 5.0, 15.0)):
        for _ in range(50):
            assert lo <= backoff_delay(n, 1.0, 10.0, rng) <= hi


async def test_ble_adapters_get_their_own_caps(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0)
    async with Simulator(bench.sim_cfg) as sim:
        data = bench.gateway_dict(sim)
        data["devices"] += [
            {"id": f"ble-{i}", "hardware": "sim_board",
             "transport": {"kind": "ble", "name": f"n{i}", "adapter": a}}
            for i, a in enumerate(["hci0", "hci0", "hci1"])]
        data.update(ble_per_adapter=2, ble_adapters={"hci1": 5})
        gw = Gateway(parse_config(data, bench.root / "gateway.yaml"))
        try:
            sems = {d.id: gw._ble_sem(d) for d in gw.cfg.devices}
        finally:
            gw.close()
        assert sems["udp-1"] is None
        assert sems["ble-0"] is sems["ble-1"] and sems["ble-0"] is not sems["ble-2"]
        assert sems["ble-0"]._value == 2 and sems["ble-2"]._value == 5  # type: ignore[union-attr]

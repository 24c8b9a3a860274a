"""Finding 8: one session at a time per physical device, whatever its transport.

Two config entries can address one device (e.g. ``image: 0`` and ``image: 1`` of a multi-image
MCU, or a device listed twice by mistake). Their sessions must never overlap: one entry's reset
would reboot the device under the other's upload or test boot (an unconfirmed test image is
reverted by any reset). The lock was per serial port only; it is per device address now: UDP
``host:port``, BLE address (or name), serial port (symlinks resolved).

The simulator models one image pair, so the twin entries here use the same image number; the
lock is keyed by the address whatever the image number.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from safety_support import max_overlap, track_sessions

from gateway.config import parse_config
from gateway.daemon import Gateway, device_address
from gateway.engine import Status
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(120)


async def test_two_entries_for_one_udp_device_never_run_at_once(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=24 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        spans = track_sessions(sim)
        data = bench.gateway_dict(sim, health_check_s=0.3)
        data["devices"].append({**data["devices"][0], "id": "udp-1-twin"})
        gw = Gateway(parse_config(data, bench.root / "gateway.yaml"))
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        outs = res.outcomes
        assert {o.status for o in outs.values()} == {Status.UPDATED, Status.UP_TO_DATE}, outs
        assert len(spans) == 2  # two sessions (two UDP sockets) reached the device ...
        assert max_overlap(list(spans.values())) == 1  # ... one after the other
        assert gw.sessions_peak == 1


def test_device_address_identifies_the_device(tmp_path: Path) -> None:
    tty = tmp_path / "ttyACM0"
    tty.write_text("")
    link = tmp_path / "by-id-usb-ZEPHYR"
    os.symlink(tty, link)
    base = {"hardware": "b", "transport": {"kind": "udp", "host": "127.0.0.1", "port": 1337}}
    data = {"state_dir": str(tmp_path / "s"), "trusted_keys": [str(tty)],
            "source": {"kind": "local", "path": str(tmp_path)},
            "devices": [
                {**base, "id": "a", "image": 0},
                {**base, "id": "b", "image": 1},
                {**base, "id": "c", "transport": {"kind": "udp", "host": "127.0.0.1", "port": 1338}},
                {**base, "id": "d", "transport": {"kind": "serial", "port": str(tty)}},
                {**base, "id": "e", "transport": {"kind": "serial", "port": str(link)}},
                {**base, "id": "f", "transport": {"kind": "ble", "address": "C4:12:34:56:78:9A"}},
                {**base, "id": "g", "transport": {"kind": "ble", "address": "c4:12:34:56:78:9a",
                                                  "adapter": "hci1"}},
            ]}
    cfg = parse_config(data, tmp_path / "g.yaml")
    addr = {d.id: device_address(d) for d in cfg.devices}
    assert addr["a"] == addr["b"] != addr["c"]
    assert addr["d"] == addr["e"]
    assert addr["f"] == addr["g"]
    assert len({addr["a"], addr["c"], addr["d"], addr["f"]}) == 4

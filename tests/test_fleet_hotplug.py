"""Hot-plug: a simulated USB serial device appears in a watched directory of port symlinks,
is found, identified by what it reports (not by its port name) and updated by the daemon; it
is unplugged mid-upload and comes back under another port name, and the upload resumes from
the device's offset.

pyserial's ``list_ports`` does not list PTYs, so the "ports" here are a directory of symlinks
(what /dev/serial/by-id is), matched by the discovery glob; the test plays udev: it removes
the link when the simulator pulls the cable and makes a new one, with another name, when the
device is back."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.sim.simulator import Simulator


def fleet_cfg(bench: Any, ports: Path) -> Any:
    data = {
        "gateway_id": "t", "state_dir": str(bench.root / "gw-state"),
        "trusted_keys": [str(bench.key)],
        "source": {"kind": "local", "path": str(bench.updates_dir), "poll_interval_s": 1},
        "discovery": {"serial": {"paths": [str(ports / "tty*")], "hotplug": "poll", "poll_s": 0.2},
                      "interval_s": 2},
        "device_templates": [{"name": "sim", "match": {"transport": "serial", "board": "sim_board"},
                              "id": "{node}", "slot_size": 0x40000, "health_check_s": 0.5,
                              "timeouts": {"reset_s": 15, "request_s": 2.0}}],
    }
    return parse_config(data, bench.root / "gateway.yaml")


async def play_udev(dev: Any, ports: Path) -> None:
    """Mirror the simulator's cable: link ttyACM0 now; on unplug remove it; on replug link
    ttyACM1 to the new PTY."""
    (ports / "ttyACM0").symlink_to(dev.transport.pty_path)
    await dev.wait_for(lambda d: any(e.kind == "unplug" for e in d.events), 120)
    (ports / "ttyACM0").unlink()
    await dev.wait_for(lambda d: any(e.kind == "replug" for e in d.events), 30)
    (ports / "ttyACM1").symlink_to(dev.transport.pty_path)


async def test_hotplugged_device_found_updated_and_resumed_after_replug(bench_factory) -> None:
    bench = bench_factory(udp=0, serial=1, image_size=96 * 1024,
                          device_kw={"unplug_during_upload_at": 40 * 1024, "unplug_for_s": 0.5})
    (d,) = bench.sim_cfg.devices
    d.serial.link = bench.root / "sim-links" / "serial-1"  # the simulator's own, not watched
    ports = bench.root / "ports"
    ports.mkdir()
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["serial-1"]
        cfg = fleet_cfg(bench, ports)
        assert cfg.devices == []  # nothing configured by hand
        finished = asyncio.Event()
        gw = Gateway(cfg, on_progress=lambda i, step, off, tot: finished.set() if step == "done"
                     else None)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run_forever(stop))
        udev = asyncio.create_task(play_udev(dev, ports))
        try:
            await asyncio.wait_for(finished.wait(), 120)
            await udev
            assert any(s.active and s.version == "2.0.0" and s.confirmed
                       for s in dev.server.state_images())
            found = gw.fleet.discovery.devices["serial-1"]
            assert found.config.transport.port == str(ports / "ttyACM1")
            assert found.facts.node == "serial-1"
            e = gw.journal.get("serial-1")
            assert e.outcome == "updated" and e.target_version == "2.0.0"
            details = [x[3] for x in gw.journal.events("serial-1")]
            assert "upload-interrupted" in details  # the cable was pulled mid-upload
            # resumed from the device's offset, not restarted: the device took in the image's
            # bytes about once (a restart would have sent the first ~36 KiB again)
            image = bench.images["2.0.0"].stat().st_size
            assert dev.counters["upload_bytes_received"] < image + 30 * 1024
        finally:
            udev.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await udev
            stop.set()
            await asyncio.wait_for(task, 30)
            gw.close()

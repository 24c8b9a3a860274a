"""Which physical device gets an image rests on what the devices report and on the config:

* two UDP devices answering with one identity (found through a CIDR range) are both
  quarantined - no upload, mark or reset to either, one warning naming both addresses, the
  quarantine in ``status --json`` / ``ctl list`` - until one of them is gone; the other one,
  identified again, is then updated;
* a static ``devices:`` entry whose address now answers with another board's identity is not
  updated or confirmed as that device (the reason is reported, its journal row stays);
* bootloader mode numbers have one name everywhere (inventory, discovery, ``modes``).

Real simulator devices on real UDP sockets (two loopback addresses, one port), real signed
images, the daemon in-process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.bootmodes.modes import MODE_NUMBERS
from gateway.config import DeviceConfig, parse_config
from gateway.daemon import Gateway
from gateway.demo import Bench
from gateway.discovery.identify import DeviceFacts
from gateway.engine import Status
from gateway.inventory import record
from gateway.journal import Journal
from gateway.sim.config import SimConfig, UdpTransportConfig
from gateway.sim.simulator import Simulator
from gateway.smp.session import BootloaderInfo


def twin_sim(bench: Bench, name: str, host: str, port: int, dev_id: str = "twin") -> SimConfig:
    """One simulated device ``dev_id`` (its os info node name) at ``host:port``."""
    base = bench.sim_cfg.devices[0]
    d = base.model_copy(update={"id": dev_id, "udp": UdpTransportConfig(host=host, port=port)})
    return SimConfig(state_dir=bench.root / f"sim-{name}", devices=[d])


async def wait_until(pred: Any, within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)  # polling the in-process daemon's state, not a fixed wait


def status_json(cfg_path: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "-c", str(cfg_path),
                          "--offline", "--json"], capture_output=True, text=True, timeout=60)
    assert out.stdout, out.stderr
    return {r["device"]: r for r in json.loads(out.stdout)["devices"]}


def status_text(cfg_path: Path) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "status", "-c", str(cfg_path),
                          "--offline"], capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout + out.stderr


async def test_one_identity_at_two_udp_addresses_is_quarantined_until_one_goes(
        bench_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    bench = bench_factory(udp=1, serial=0)
    bench.publish("2.0.0")
    caplog.set_level(logging.INFO)
    async with Simulator(twin_sim(bench, "a", "127.0.0.1", 0)) as sim_a:
        port = sim_a.devices["twin"].endpoint()["port"]
        sim_b = Simulator(twin_sim(bench, "b", "127.0.0.2", port))
        await sim_b.start()
        a, b = sim_a.devices["twin"], sim_b.devices["twin"]
        data = {
            "gateway_id": "t", "state_dir": str(bench.root / "gw-state"),
            "trusted_keys": [str(bench.key)],
            "source": {"kind": "local", "path": str(bench.updates_dir), "poll_interval_s": 1},
            "retry": {"base_s": 0.5, "max_s": 1.0},
            "discovery": {"udp": {"hosts": ["127.0.0.0/30"], "port": port, "probe_timeout_s": 0.3},
                          "interval_s": 0.5},
            "device_templates": [{"name": "sim", "match": {"board": "sim_board"}, "id": "{node}",
                                  "slot_size": 0x40000, "health_check_s": 0.5,
                                  "timeouts": {"reset_s": 15, "request_s": 2.0}}],
        }
        cfg_path = bench.root / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump(data))
        gw = Gateway(parse_config(data, cfg_path))
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run_forever(stop))
        try:
            disc = gw.fleet.discovery
            assert disc is not None
            # both answer as "twin": the daemon's attempt is refused, nothing reaches either
            await wait_until(lambda: "twin" in gw.last, 60, "an attempt on twin")
            for d in (a, b):
                assert d.counters["upload_bytes_received"] == 0 and d.image_info(1) is None
            assert disc.quarantined("twin") is not None
            out = gw.last["twin"]
            assert out.status == Status.FAILED and "quarantined" in out.detail, out
            a_addr, b_addr = f"127.0.0.1:{port}", f"127.0.0.2:{port}"
            warn = [r.getMessage() for r in caplog.records
                    if r.levelno == logging.WARNING and "quarantined" in r.getMessage()]
            assert len(warn) == 1 and a_addr in warn[0] and b_addr in warn[0], warn
            # the operator sees it: ctl list and status --json
            (row,) = [r for r in gw.fleet.list_devices() if r["device"] == "twin"]
            assert row["quarantine"] and a_addr in row["quarantine"] and b_addr in row["quarantine"]
            rec = status_json(cfg_path)["twin"]
            assert "cannot be told" in rec["quarantine"]
            # more scans and attempts (each refused, journaled): nothing went to either device

            def refusals() -> int:
                return sum("quarantined" in str(ev[3]) for ev in gw.journal.events("twin"))

            await wait_until(lambda: refusals() >= 3, 30, "three refused attempts")
            for d in (a, b):
                assert d.counters["upload_bytes_received"] == 0
                assert d.image_info(1) is None and d.counters["resets"] == 0
            # one of them goes away (the one the quarantined record points at): the other,
            # identified again, is the device and is updated - at its own address
            await sim_a.stop()
            disc.rescan("test: one twin gone")
            await wait_until(lambda: gw.journal.get("twin").outcome == "updated", 90, "the update")
            assert any(s.active and s.version == "2.0.0" and s.confirmed
                       for s in b.server.state_images())
            assert a.counters["upload_bytes_received"] == 0 and a.image_info(1) is None
            assert disc.quarantined("twin") is None
            assert disc.devices["twin"].config.transport.host == "127.0.0.2"
            assert "quarantine" not in status_json(cfg_path)["twin"]
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
            gw.close()
            await sim_b.stop()


async def test_static_device_address_answering_as_another_board_is_refused(
        bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0)
    sim_cfg = twin_sim(bench, "orig", "127.0.0.1", 0, dev_id="board-a")
    bench.publish("1.0.0")  # what it runs
    async with Simulator(sim_cfg) as sim:
        port = sim.devices["board-a"].endpoint()["port"]
        cfg = bench.gateway_config(sim)  # devices: board-a at 127.0.0.1:port (static)
        gw = Gateway(cfg)
        try:
            first = (await gw.run_once()).outcomes["board-a"]
            assert first.status == Status.UP_TO_DATE, first
        finally:
            gw.close()
    before = journal_row(cfg.state_dir, "board-a")
    bench.publish("2.0.0")
    # another board now holds the address (a swapped board, a reused lease)
    async with Simulator(twin_sim(bench, "other", "127.0.0.1", port, dev_id="board-b")) as sim2:
        other = sim2.devices["board-b"]
        gw = Gateway(cfg)
        try:
            out = (await gw.run_once()).outcomes["board-a"]
        finally:
            gw.close()
        assert out.status == Status.FAILED and "not the journal's device" in out.detail, out
        assert "node=board-b" in out.detail and "node=board-a" in out.detail
        assert other.counters["upload_bytes_received"] == 0 and other.image_info(1) is None
        assert other.counters["resets"] == 0
        after = journal_row(cfg.state_dir, "board-a")
        assert after["outcome"] == before["outcome"] and after["outcome"] != "updated"
        assert after["target_version"] == before["target_version"]
        assert "not the journal's device" in (after["last_error"] or "")
        rec = status_json(bench.root / "gateway.yaml")["board-a"]
        assert "not the journal's device" in rec["quarantine"]
        rc, text = status_text(bench.root / "gateway.yaml")
        assert rc != 0 and "QUARANTINED" in text, text
    # the journal's own board back at its address: updated, the quarantine is lifted
    async with Simulator(twin_sim(bench, "orig", "127.0.0.1", port, dev_id="board-a")) as sim3:
        gw = Gateway(cfg)
        try:
            out = (await gw.run_once()).outcomes["board-a"]
        finally:
            gw.close()
        assert out.status == Status.UPDATED, out
        assert sim3.devices["board-a"].counters["upload_bytes_received"] > 0
        assert "quarantine" not in status_json(bench.root / "gateway.yaml")["board-a"]


def journal_row(state_dir: Path, dev_id: str) -> dict[str, Any]:
    j = Journal(state_dir / "journal.sqlite")
    try:
        e = j.get(dev_id)
        return {"outcome": e.outcome, "target_version": e.target_version, "last_error": e.last_error}
    finally:
        j.close()


@pytest.mark.parametrize("number", range(-1, 12))
def test_mode_numbers_have_one_name(tmp_path: Path, number: int) -> None:
    """Inventory (``status --json``, fleet servers), discovery and ``modes`` agree; 8 and 9
    are MCUboot's MCUBOOT_MODE_SINGLE_SLOT_RAM_LOAD and MCUBOOT_MODE_SWAP_USING_OFFSET."""
    dev = DeviceConfig.model_validate({"id": "d", "hardware": "b",
                                       "transport": {"kind": "udp", "host": "127.0.0.1"}})
    inv = record(dev, bootloader_mode=number)["mcuboot_mode"]
    disc = DeviceFacts(bootloader=BootloaderInfo("MCUboot", number, False)).mcuboot_mode
    if number in MODE_NUMBERS:
        want = MODE_NUMBERS[number].value
    else:
        want = "unknown" if number == -1 else f"mode {number}"
    assert inv == disc == want
    assert {8: "single-slot-ram-load", 9: "swap-using-offset"}.get(number, want) == want

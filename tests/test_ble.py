"""SMP over BLE, end to end through a software Bluetooth stack (no radio, no BlueZ).

The simulated device is a Bumble GATT peripheral with the MCUmgr SMP service on a virtual
controller; the gateway's BLE link (``backend: bumble``) is a Bumble central on a second
virtual controller of the same in-process link. Everything between them is real Bluetooth
host traffic: advertising, scanning, LE connection, ATT MTU exchange, GATT discovery, CCC
subscription, ATT Write Commands and Handle Value Notifications, HCI disconnection.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest

from gateway.config import BleTransport, ConfigError, parse_config
from gateway.daemon import Gateway, make_transport
from gateway.demo import Bench
from gateway.engine import Status
from gateway.sim.config import SimConfig, SimDeviceConfig
from gateway.sim.simulator import Simulator
from gateway.smp.ble import BleLink, BleUnavailable, adapter_key, adapter_limit
from gateway.smp.session import SMPSession
from gateway.smp.transport import TransportError

_links = itertools.count(1)


def ble_bench(bench: Bench, *, device_mtu: int = 498, reassembly: bool = True,
              name: str = "smp-ble-1") -> tuple[Bench, str]:
    """Turn the bench's single UDP device into a BLE one on a fresh in-process radio link."""
    hci = f"link:test-{next(_links)}"
    (d,) = bench.sim_cfg.devices
    raw = d.model_dump()
    raw.update(id="ble-1", udp=None,
               ble={"hci": hci, "name": name, "mtu": device_mtu, "reassembly": reassembly})
    bench.sim_cfg = SimConfig(state_dir=bench.sim_cfg.state_dir,
                              devices=[SimDeviceConfig.model_validate(raw)])
    return bench, hci


def gateway_cfg(bench: Bench, sim: Simulator, hci: str, device_kw: dict[str, Any] | None = None,
                **transport: Any) -> Any:
    ble = {"kind": "ble", "backend": "bumble", "hci": hci, "adapter": "sim0",
           "name": "smp-ble-1", "scan_timeout_s": 5, **transport}
    bench.device_overrides["ble-1"] = {"transport": ble}
    data = bench.gateway_dict(sim, **(device_kw or {}))
    return parse_config(data, bench.root / "gateway.yaml")


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return a.version, bool(a.confirmed)


@pytest.mark.parametrize(("gw_mtu", "dev_mtu"), [(498, 498), (185, 247), (23, 498)],
                         ids=["mtu498", "mtu185", "mtu23"])
async def test_ble_update_v1_to_v2_with_reconnect(bench_factory, gw_mtu: int, dev_mtu: int) -> None:
    image_size = 24 * 1024 if gw_mtu == 23 else 96 * 1024
    bench, hci = ble_bench(bench_factory(udp=1, serial=0, image_size=image_size), device_mtu=dev_mtu)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["ble-1"]
        assert dev.endpoint()["transport"] == "ble"
        gw = Gateway(gateway_cfg(bench, sim, hci, mtu=gw_mtu))
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        out = res.outcomes["ble-1"]
        assert out.status == Status.UPDATED, out
        assert active(dev) == ("2.0.0", True)
        assert dev.boot_outcomes[-1] == "swap"
        # the reset dropped the link and the gateway connected again to the re-advertising device
        assert dev.counters["resets"] == 1
        assert dev.counters["ble_disconnections"] >= 1
        assert dev.counters["ble_connections"] >= 2
        assert dev.counters["ble_advertising_starts"] >= 2
        # requests were cut into ATT writes and reassembled by the device
        assert dev.counters["ble_writes"] > dev.counters["requests"]
        assert dev.counters["bad_ble_packets"] == 0
        assert dev.counters["requests.1.1"] >= 1
        # the state writes: mark-test, then the gateway's confirm
        writes = [e.detail["confirm"] for e in dev.events if e.kind == "state-write"]
        assert writes == [False, True]


async def test_ble_app_confirm_policy(bench_factory) -> None:
    bench, hci = ble_bench(bench_factory(udp=1, serial=0, image_size=32 * 1024,
                                         device_kw={"app_confirms_after_s": 0.3}))
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        gw = Gateway(gateway_cfg(bench, sim, hci, device_kw={"confirm": "app"}))
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        dev = sim.devices["ble-1"]
        assert res.ok, res.outcomes
        assert "confirmed by the application" in res.outcomes["ble-1"].detail
        assert active(dev) == ("2.0.0", True)


async def test_ble_without_device_reassembly_sends_one_packet_per_write(bench_factory) -> None:
    bench, hci = ble_bench(bench_factory(udp=1, serial=0, image_size=16 * 1024),
                           device_mtu=247, reassembly=False)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        gw = Gateway(gateway_cfg(bench, sim, hci, mtu=247, reassembly=False))
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        dev = sim.devices["ble-1"]
        assert res.ok, res.outcomes
        assert active(dev) == ("2.0.0", True)
        assert dev.counters["ble_writes"] == dev.counters["requests"]


async def test_ble_session_reconnects_after_reset(bench_factory) -> None:
    """The link layer alone: reset -> TransportError on the session -> reopen -> same device."""
    bench, hci = ble_bench(bench_factory(udp=1, serial=0, image_size=8 * 1024))
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["ble-1"]
        link = BleLink(BleTransport(name="smp-ble-1", backend="bumble", hci=hci, adapter="sim0",
                                    scan_timeout_s=5, mtu=64))
        s = SMPSession(link, device_id="ble-1", timeout_s=2)
        await s.open()
        try:
            assert link.att_mtu == 64 and link.max_write == 61
            long = "x" * 300  # answer spans several notifications
            assert await s.echo(long) == long
            assert await s.reset()
            with pytest.raises(TransportError, match="lost"):
                for _ in range(50):
                    await s.echo("still there?", timeout_s=0.5)
                    await asyncio.sleep(0.05)
            assert link.disconnects and "0x08" in link.disconnects[0]
            await s.close()
            await s.open()  # waits for the device to advertise again after its boot
            assert await s.echo("back") == "back"
            assert link.connects == 2
            assert dev.boots == 2
        finally:
            await s.close()


async def test_ble_open_times_out_when_nothing_advertises() -> None:
    t = BleTransport(name="nobody", backend="bumble", hci=f"link:empty-{next(_links)}",
                     adapter="sim0", scan_timeout_s=0.5)
    link = BleLink(t)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TransportError, match=r"no advertisement from name=nobody within 0\.5s on sim0"):
        await link.open()
    assert loop.time() - t0 < 3
    await link.close()


async def test_bleak_backend_without_bluez_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # no system bus here (and none in CI's view, forced by the address below)
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/system_bus_socket")
    link = make_transport(parse_config({
        "state_dir": "/tmp/unused", "trusted_keys": [__file__],
        "source": {"kind": "local", "path": "/tmp"},
        "devices": [{"id": "d", "hardware": "hw",
                     "transport": {"kind": "ble", "address": "C0:11:22:33:44:55",
                                   "scan_timeout_s": 1}}],
    }).devices[0])
    assert isinstance(link, BleLink)
    with pytest.raises(BleUnavailable) as info:
        await asyncio.wait_for(link.open(), 10)
    msg = str(info.value)
    assert msg.startswith("BLE needs BlueZ over D-Bus: ")
    assert "not available on this machine: " in msg
    assert isinstance(info.value, TransportError)  # the daemon reports it as a link failure


def test_ble_config_keys_and_adapter_cap(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("x")
    base = {"state_dir": str(tmp_path), "trusted_keys": [str(key)],
            "source": {"kind": "local", "path": str(tmp_path)},
            "ble_per_adapter": 2, "ble_adapters": {"hci1": 5}}
    dev = {"id": "d", "hardware": "hw", "transport": {"kind": "ble", "name": "n", "backend": "bumble"}}
    with pytest.raises(ConfigError, match="needs 'hci'"):
        parse_config({**base, "devices": [dev]})
    dev["transport"]["hci"] = "usb:0"  # type: ignore[index]
    cfg = parse_config({**base, "devices": [dev]})
    t = cfg.devices[0].transport
    assert isinstance(t, BleTransport) and t.reassembly and t.mtu == 498
    assert adapter_key(t) == "usb:0" and adapter_limit(cfg, "usb:0") == 2  # bumble: its transport
    assert adapter_limit(cfg, "hci1") == 5
    with pytest.raises(ConfigError, match="address or its advertised name"):
        parse_config({**base, "devices": [{**dev, "transport": {"kind": "ble"}}]})


async def test_two_ble_devices_share_one_adapter(bench_factory) -> None:
    """Two peripherals, one central controller: shared Bumble host, serialised scans, cap 1."""
    bench = bench_factory(udp=2, serial=0, image_size=16 * 1024)
    hci = f"link:test-{next(_links)}"
    devs = []
    for i, d in enumerate(bench.sim_cfg.devices, 1):
        raw = d.model_dump()
        raw.update(id=f"ble-{i}", udp=None, ble={"hci": hci, "name": f"smp-ble-{i}"})
        devs.append(SimDeviceConfig.model_validate(raw))
    bench.sim_cfg = SimConfig(state_dir=bench.sim_cfg.state_dir, devices=devs)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        for i in (1, 2):
            bench.device_overrides[f"ble-{i}"] = {"transport": {
                "kind": "ble", "backend": "bumble", "hci": hci, "adapter": "sim0",
                "name": f"smp-ble-{i}", "scan_timeout_s": 5}}
        data = {**bench.gateway_dict(sim), "ble_per_adapter": 1}
        gw = Gateway(parse_config(data, bench.root / "gateway.yaml"))
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        assert res.ok, res.outcomes
        for dev in sim.devices.values():
            assert active(dev) == ("2.0.0", True)
            assert dev.counters["ble_connections"] >= 2

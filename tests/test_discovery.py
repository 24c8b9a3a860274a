"""Discovery: serial ports (a directory of symlinks to simulator PTYs), UDP probes, templates,
identity from what the device reports, identity changes, and the config errors of templates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.demo import Bench
from gateway.discovery import Discovery
from gateway.discovery.templates import render
from gateway.opstate import OpState
from gateway.sim.simulator import Simulator


def fleet_cfg(bench: Bench, **top: Any) -> Any:
    data: dict[str, Any] = {
        "gateway_id": "t", "state_dir": str(bench.root / "gw-state"),
        "trusted_keys": [str(bench.key)],
        "source": {"kind": "local", "path": str(bench.updates_dir), "poll_interval_s": 1},
        **top,
    }
    return parse_config(data, bench.root / "gateway.yaml")


SIM_TEMPLATE = {"name": "sim", "match": {"board": "sim_board"}, "id": ["{hwid}", "{node}"],
                "slot_size": 0x40000, "health_check_s": 0.5,
                "timeouts": {"reset_s": 10, "request_s": 2.0}}


def serial_links(bench: Bench, linkdir: Path) -> None:
    """Give each simulated serial device a symlink ``<linkdir>/tty<id>`` to its PTY."""
    for d in bench.sim_cfg.devices:
        if d.serial is not None:
            d.serial.link = linkdir / f"tty{d.id}"


async def test_serial_and_udp_devices_found_from_templates(bench_factory) -> None:
    bench = bench_factory(udp=2, serial=2)
    linkdir = bench.root / "ports"
    serial_links(bench, linkdir)
    async with Simulator(bench.sim_cfg) as sim:
        udp1 = sim.endpoints()["udp-1"]
        # the simulator's UDP devices share 127.0.0.1 on ephemeral ports: one template per port
        templates = [{**SIM_TEMPLATE, "name": "serial", "match": {"transport": "serial",
                                                                   "board": "sim_board"}}]
        cfg = fleet_cfg(bench, device_templates=templates, discovery={
            "serial": {"paths": [str(linkdir / "tty*")], "hotplug": "poll"}})
        ops = OpState(cfg.state_dir / "fleet.sqlite")
        disc = Discovery(cfg, ops)
        ch = await disc.scan_once()
        assert sorted(d.id for d in ch.added) == ["serial-1", "serial-2"]
        dev = disc.devices["serial-1"].config
        assert dev.transport.kind == "serial" and dev.transport.port == str(linkdir / "ttyserial-1")
        assert dev.hardware == "sim_board" and dev.slot_size == 0x40000
        assert disc.devices["serial-1"].facts.active() is not None
        assert disc.devices["serial-1"].facts.mcuboot_mode == "swap-using-scratch"
        # unchanged ports are not asked again; a second scan changes nothing
        assert not await disc.scan_once()
        # UDP: each simulated device listens on its own port of 127.0.0.1
        from gateway.discovery.udp import probe

        cfg_u = fleet_cfg(bench, device_templates=[{**SIM_TEMPLATE, "name": "udp"}],
                          discovery={"udp": {"hosts": [udp1["host"]], "port": udp1["port"]}})
        found = await probe(cfg_u.discovery.udp)
        assert [c.transport for c in found] == [{"kind": "udp", "host": "127.0.0.1", "port": udp1["port"]}]
        d2 = Discovery(cfg_u)
        ch2 = await d2.scan_once()
        assert [d.id for d in ch2.added] == ["udp-1"]
        assert ops.known()["serial-2"].fingerprint
        ops.close()
        # identification only reads: nothing was written to any device
        for d in sim.devices.values():
            assert d.image_info(1) is None and d.counters["resets"] == 0


async def test_identity_change_on_same_port_is_a_new_device(bench_factory) -> None:
    """Another board answering on a port where a known device was: a new id, its own journal."""
    bench = bench_factory(udp=0, serial=1)
    linkdir = bench.root / "ports"
    serial_links(bench, linkdir)
    tmpl = {**SIM_TEMPLATE, "id": "{port}"}  # an id rule that cannot tell boards apart
    async with Simulator(bench.sim_cfg) as sim:
        cfg = fleet_cfg(bench, device_templates=[tmpl],
                        discovery={"serial": {"paths": [str(linkdir / "*")]}})
        ops = OpState(cfg.state_dir / "fleet.sqlite")
        disc = Discovery(cfg, ops)
        ch = await disc.scan_once()
        assert [d.id for d in ch.added] == ["ttyserial-1"]
        fp = disc.devices["ttyserial-1"].fingerprint
        # another board: the simulator's node name is its id
        dev = sim.devices["serial-1"]
        dev.server.cfg = dev.server.cfg.model_copy(update={"id": "other-board"})
        # the port is re-created (replug): same path, a new tty
        await dev.transport.close()
        await dev.transport.open()
        ch = await disc.scan_once()
        new = [d.id for d in ch.added]
        assert len(new) == 1 and new[0].startswith("ttyserial-1-") and new[0] != "ttyserial-1"
        assert disc.devices[new[0]].fingerprint != fp
        assert "ttyserial-1" in ch.gone
        ops.close()


def test_id_rules_render_only_known_keys() -> None:
    assert render("{board}-{usb_serial}", {"board": "nrf52840dk", "usb_serial": "E6614"}) == \
        "nrf52840dk-E6614"
    assert render("{board}-{usb_serial}", {"board": "nrf52840dk"}) is None
    assert render("{node}", {"node": "my node/1"}) == "my_node_1"


@pytest.mark.parametrize(("template", "key", "words"), [
    ({"name": "a", "slot_size": -1}, "device_templates[0].slot_size", "greater than 0"),
    ({"name": "a", "confirm": "maybe"}, "device_templates[0].confirm", "gateway"),
    ({"name": "a", "serial": {"baudrate": 9600}}, "device_templates[0].serial.baudrate",
     "unknown transport option"),
    ({"name": "a", "serial": {"baud": 0}}, "device_templates[0].serial.baud", "greater than 0"),
    ({"name": "a", "match": {"usb_vid_pid": ["2fe3"]}}, "device_templates[0].match.usb_vid_pid",
     "VVVV:PPPP"),
    ({"name": "a", "maintenance": ["nightly"]}, "device_templates[0].maintenance", "not defined"),
    ({"name": "a", "transport": {"kind": "udp"}}, "device_templates[0].transport", "serial:, udp:"),
    ({"name": "a", "timeouts": {"reset": 3}}, "device_templates[0].timeouts.reset", "unknown key"),
])
def test_template_config_errors_name_the_key(tmp_path: Path, template: dict[str, Any], key: str,
                                             words: str) -> None:
    k = tmp_path / "k.pem"
    k.write_text("x")
    data = {"state_dir": str(tmp_path), "trusted_keys": [str(k)],
            "source": {"kind": "local", "path": str(tmp_path)},
            "discovery": {"serial": {}}, "device_templates": [template]}
    with pytest.raises(ConfigError) as ei:
        parse_config(data, tmp_path / "gw.yaml")
    assert ei.value.key == key, str(ei.value)
    assert words in ei.value.message
    assert str(tmp_path / "gw.yaml") in str(ei.value)


def test_templates_need_discovery_and_devices_may_be_empty(tmp_path: Path) -> None:
    k = tmp_path / "k.pem"
    k.write_text("x")
    base = {"state_dir": str(tmp_path), "trusted_keys": [str(k)],
            "source": {"kind": "local", "path": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"devices: .* or device_templates"):
        parse_config(base, tmp_path / "gw.yaml")
    with pytest.raises(ConfigError, match="need a discovery"):
        parse_config({**base, "device_templates": [{"name": "a"}]}, tmp_path / "gw.yaml")
    with pytest.raises(ConfigError, match="CIDR"):
        parse_config({**base, "device_templates": [{"name": "a"}],
                      "discovery": {"udp": {"hosts": ["10.0.0.0/33"]}}}, tmp_path / "gw.yaml")
    cfg = parse_config({**base, "device_templates": [{"name": "a", "serial": {"baud": 1000000}}],
                        "discovery": {"serial": {"paths": ["/dev/ttyACM*"]}}}, tmp_path / "gw.yaml")
    assert cfg.devices == [] and cfg.device_templates[0].settings == {}
    assert os.fspath(cfg.control_socket).endswith("control.sock")


async def test_dns_sd_announced_device_found(bench_factory) -> None:
    """A device announcing ``_mcumgr._udp`` over mDNS (here: zeroconf on the loopback
    interface, for the simulated device's port) is found without any host list."""
    import socket

    from zeroconf import ServiceInfo
    from zeroconf.asyncio import AsyncZeroconf

    bench = bench_factory(udp=1, serial=0)
    async with Simulator(bench.sim_cfg) as sim:
        ep = sim.endpoints()["udp-1"]
        pub = AsyncZeroconf(interfaces=["127.0.0.1"])
        info = ServiceInfo("_mcumgr._udp.local.", "udp-1._mcumgr._udp.local.",
                           addresses=[socket.inet_aton(ep["host"])], port=ep["port"],
                           properties={"hw": "sim_board"}, server="udp-1.local.")
        await pub.async_register_service(info)
        try:
            cfg = fleet_cfg(bench, device_templates=[{**SIM_TEMPLATE, "name": "mdns",
                                                      "match": {"transport": "udp"}}],
                            discovery={"udp": {"mdns": True, "mdns_interfaces": ["127.0.0.1"],
                                               "probe_timeout_s": 2}})
            disc = Discovery(cfg)
            await disc.start()
            try:
                await disc.collect_mdns(2.0)
                ch = await disc.scan_once()
            finally:
                await disc.close()
        finally:
            await pub.async_unregister_service(info)
            await pub.async_close()
        assert [d.id for d in ch.added] == ["udp-1"]
        f = disc.devices["udp-1"]
        assert f.candidate.attrs["txt_hw"] == "sim_board" and f.candidate.attrs["mdns_name"] == "udp-1"
        assert f.config.transport.port == ep["port"]

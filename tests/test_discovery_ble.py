"""BLE discovery through Bumble (no radio): a simulated device advertising the SMP service is
found by a scan on a virtual controller (service UUID or name pattern), identified over GATT
by what it reports, and updated by ``run --once`` with no device listed in the configuration."""

from __future__ import annotations

import itertools
from typing import Any

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.discovery import Discovery
from gateway.engine import Status
from gateway.sim.config import SimConfig, SimDeviceConfig
from gateway.sim.simulator import Simulator

_links = itertools.count(1)


def ble_fleet(bench_factory: Any, name: str = "smp-ble-7") -> tuple[Any, str]:
    bench = bench_factory(udp=1, serial=0, image_size=24 * 1024)
    hci = f"link:disc-{next(_links)}"
    (d,) = bench.sim_cfg.devices
    raw = d.model_dump()
    raw.update(id="ble-7", udp=None, ble={"hci": hci, "name": name})
    bench.sim_cfg = SimConfig(state_dir=bench.sim_cfg.state_dir,
                              devices=[SimDeviceConfig.model_validate(raw)])
    return bench, hci


def cfg_for(bench: Any, hci: str, pattern: str | None = "smp-ble-*") -> Any:
    return parse_config({
        "state_dir": str(bench.root / "gw-state"), "trusted_keys": [str(bench.key)],
        "source": {"kind": "local", "path": str(bench.updates_dir)},
        # the simulator's name and the 128-bit service UUID do not both fit in 31 bytes and
        # Bumble's virtual controller sends no scan responses: match the name as well
        "discovery": {"ble": [{"adapter": "sim0", "backend": "bumble", "hci": hci, "scan_s": 1.5,
                               "min_interval_s": 0, "name": pattern}]},
        "device_templates": [{"name": "ble-sensors", "match": {"transport": "ble", "board": "sim_board"},
                              "id": "{node}", "slot_size": 0x40000, "health_check_s": 0.5,
                              "ble": {"scan_timeout_s": 5},
                              "timeouts": {"reset_s": 20, "request_s": 3.0}}],
    }, bench.root / "gateway.yaml")


async def test_ble_device_found_by_service_uuid_alone(bench_factory) -> None:
    bench, hci = ble_fleet(bench_factory, name="b7")  # short: the service UUID fits the advert
    async with Simulator(bench.sim_cfg):
        ch = await Discovery(cfg_for(bench, hci, pattern=None)).scan_once()
        assert [d.id for d in ch.added] == ["ble-7"]


async def test_ble_device_found_by_scan_identified_and_updated(bench_factory) -> None:
    bench, hci = ble_fleet(bench_factory)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = cfg_for(bench, hci)
        disc = Discovery(cfg)
        ch = await disc.scan_once()
        assert [d.id for d in ch.added] == ["ble-7"]
        f = disc.devices["ble-7"]
        assert f.candidate.attrs["ble_name"] == "smp-ble-7"
        assert f.candidate.attrs["ble_address_type"] == "random-static"
        assert f.facts.board == "sim_board" and f.fingerprint
        t = f.config.transport
        assert t.kind == "ble" and t.backend == "bumble" and t.address == sim.devices["ble-7"].endpoint()[
            "address"]
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        assert res.outcomes["ble-7"].status == Status.UPDATED, res.outcomes
        dev = sim.devices["ble-7"]
        assert any(s.active and s.version == "2.0.0" and s.confirmed for s in dev.server.state_images())

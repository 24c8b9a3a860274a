"""Fleet sources carrying one artifact per device that holds all its images: an nRF Connect SDK
``dfu_application.zip`` (manifest.json + images) as a hawkBit artifact, as the payload of an
RDFM (Mender-format) artifact, and as a latest-release download - each against a loopback server
and a simulated two-image device, updated as one set."""

from __future__ import annotations

from typing import Any

import pytest
from fleet_servers.common import serve
from fleet_servers.hawkbit import HawkbitServer
from fleet_servers.latest_release import ReleaseServer
from fleet_servers.rdfm import RdfmServer
from modes_support import active, dfu_zip, resets, sign

from gateway.artifacts.mender import build_zephyr_artifact
from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.config import ExtraImageConfig
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(180)

# the gateway's idea of slot 0: image 0 (~97 KiB + trailer) fits, the two-image zip does not -
# a source must not refuse the set for being larger than one slot
SLOT = 112 * 1024


def two_image_bench(bench_factory: Any) -> tuple[Any, bytes]:
    bench = bench_factory(udp=1, serial=0, device_kw={"buf_size": 2475})
    img1_v1 = sign(bench, "img1-1.0.0.bin", "1.0.0", size=16 * 1024)
    img1_v2 = sign(bench, "img1-2.0.0.bin", "2.0.0", size=16 * 1024)
    bench.sim_cfg.devices[0].extra_images = [ExtraImageConfig(slot_size=0x40000,
                                                              initial_image=img1_v1)]
    z = dfu_zip(bench.root / "dfu_application.zip", [
        {"path": bench.images["2.0.0"], "image": 0}, {"path": img1_v2, "image": 1}])
    data = z.read_bytes()
    assert len(data) > SLOT
    return bench, data


def config(bench: Any, sim: Simulator, source: dict[str, Any]) -> Any:
    data = bench.gateway_dict(sim, slot_size=SLOT, images={1: {"slot_size": 0x40000}})
    data["source"] = source
    return parse_config(data, bench.root / "gateway.yaml")


async def run(cfg: Any) -> Any:
    gw = Gateway(cfg)
    try:
        return await gw.run_once()
    finally:
        gw.close()


def both_updated(dev: Any) -> None:
    assert active(dev, 0) == ("2.0.0", True, 0)
    assert active(dev, 1) == ("2.0.0", True, 0)
    assert resets(dev) == 1


async def test_hawkbit_artifact_holding_both_images(bench_factory) -> None:
    bench, data = two_image_bench(bench_factory)
    hb = HawkbitServer()
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        act = hb.deploy(dev.id, data, "2.0.0", filename="dfu_application.zip")
        res = await run(config(bench, sim, {"kind": "hawkbit", "url": base,
                                            "gateway_token": hb.gateway_token}))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        both_updated(dev)
        final = act.feedback[-1]["status"]
        assert final["execution"] == "closed" and final["result"]["finished"] == "success"


async def test_rdfm_artifact_whose_payload_is_the_image_set(bench_factory) -> None:
    bench, data = two_image_bench(bench_factory)
    srv = RdfmServer()
    async with serve(srv.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = config(bench, sim, {"kind": "rdfm", "url": base, "key_bits": 2048})
        await run(cfg)  # first contact: registration pending
        srv.accept(dev.id)
        srv.assign(dev.id, build_zephyr_artifact(data, device_types=["sim_board"],
                                                 version="2.0.0"), "2.0.0", "sim_board")
        res = await run(cfg)
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        both_updated(dev)


async def test_latest_release_zip(bench_factory) -> None:
    bench, data = two_image_bench(bench_factory)
    rs = ReleaseServer()
    rs.files.add("sim_board-2.0.0.zip", data)  # a release whose artifact is the image set
    rs.releases[("sim_board", "main")] = ("2.0.0", "sim_board-2.0.0.zip")
    async with serve(rs.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run(config(bench, sim, {"kind": "latest_release", "url": base,
                                            "project_key": rs.project_key}))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        both_updated(dev)

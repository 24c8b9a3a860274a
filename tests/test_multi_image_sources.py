"""Fleet sources carrying one artifact per device that holds all its images: an nRF Connect SDK
``dfu_application.zip`` (manifest.json + images) as a hawkBit artifact, as the payload of an
RDFM (Mender-format) artifact, and as a latest-release download - each against a loopback server
and a simulated two-image device, updated as one set."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from aiohttp import web
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


async def test_hawkbit_download_only_set_is_installed_without_uploading_again(bench_factory) -> None:
    """A download-only action stages both images (nothing marked, no reset); the install action
    that follows marks and resets them with no byte sent again - the journal proves both uploads
    complete - and the set ends installed."""
    bench, data = two_image_bench(bench_factory)
    hb = HawkbitServer(sleep="00:00:01")
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = config(bench, sim, {"kind": "hawkbit", "url": base,
                                  "gateway_token": hb.gateway_token})
        hb.deploy(dev.id, data, "2.0.0", filename="dfu_application.zip", update="skip")
        out = (await run(cfg)).outcomes[dev.id]
        assert out.status == Status.HELD and resets(dev) == 0, out
        starts = [e for e in dev.events if e.kind == "upload-start"]
        assert len(starts) == 2, starts
        hb.deploy(dev.id, data, "2.0.0", filename="dfu_application.zip")
        out = (await run(cfg)).outcomes[dev.id]
        assert out.status == Status.UPDATED and out.bytes_uploaded == 0, out
        assert len([e for e in dev.events if e.kind == "upload-start"]) == 2
        both_updated(dev)


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


class TwoModuleHawkbit(HawkbitServer):
    """The loopback hawkBit with a distribution set of two software modules - one MCUboot image
    each, told apart by target-visible module metadata ``image_index`` (the test's input)."""

    def __init__(self, images: dict[int, bytes]) -> None:
        super().__init__()
        self.images = images

    async def deployment(self, request: web.Request) -> web.Response:
        act = self.actions.get(int(request.match_info["aid"]))
        if act is None or act.status != "running":
            return web.Response(status=404)
        chunks = []
        for idx, data in sorted(self.images.items()):
            name = f"image{idx}.signed.bin"
            self.files.add(f"{act.id}-{name}", data)
            href = f"{request.scheme}://{request.host}/artifacts/{act.id}-{name}"
            chunks.append({"part": "os" if idx == 0 else f"image{idx}", "version": act.version,
                           "name": f"module-{idx}",
                           "metadata": [{"key": "image_index", "value": str(idx)}],
                           "artifacts": [{"filename": name, "size": len(data),
                                          "hashes": {"sha256": hashlib.sha256(data).hexdigest()},
                                          "_links": {"download-http": {"href": href}}}]})
        return web.json_response({"id": str(act.id), "deployment": {
            "download": "forced", "update": act.update, "chunks": chunks}})


async def test_hawkbit_distribution_set_of_two_modules(bench_factory) -> None:
    bench, _ = two_image_bench(bench_factory)
    img1 = (bench.root / "images" / "img1-2.0.0.bin").read_bytes()
    hb = TwoModuleHawkbit({0: bench.images["2.0.0"].read_bytes(), 1: img1})
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        act = hb.deploy(dev.id, b"unused", "2.0.0")
        res = await run(config(bench, sim, {"kind": "hawkbit", "url": base,
                                            "gateway_token": hb.gateway_token}))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert "image set" in out.detail
        both_updated(dev)
        final = act.feedback[-1]["status"]
        assert final["execution"] == "closed" and final["result"]["finished"] == "success"

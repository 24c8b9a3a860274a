"""End to end per backend: loopback fleet server -> gateway -> simulated device -> report."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fleet_servers.common import FileStore, serve
from fleet_servers.hawkbit import HawkbitServer
from fleet_servers.jobs_service import JobsService
from fleet_servers.latest_release import ReleaseServer
from fleet_servers.mosquitto import mosquitto
from fleet_servers.rdfm import RdfmServer

from gateway.artifacts.mender import build_zephyr_artifact
from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator
from gateway.sources.base import UpdateResult

pytestmark = pytest.mark.slow


def active_version(dev: Any) -> str:
    return str(next(s for s in dev.server.state_images() if s.active).version)


def config(bench: Any, sim: Simulator, source: dict[str, Any]) -> Any:
    data = bench.gateway_dict(sim)
    data["source"] = source
    return parse_config(data, bench.root / "gateway.yaml")


async def run(cfg: Any) -> Any:
    gw = Gateway(cfg)
    try:
        return await gw.run_once()
    finally:
        gw.close()


async def test_hawkbit_success(bench_factory) -> None:  # type: ignore[no-untyped-def]
    bench = bench_factory(udp=1, serial=0)
    hb = HawkbitServer()
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        act = hb.deploy(dev.id, bench.images["2.0.0"].read_bytes(), "2.0.0")
        res = await run(
            config(bench, sim, {"kind": "hawkbit", "url": base, "gateway_token": hb.gateway_token})
        )
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes[dev.id]
        assert active_version(dev) == "2.0.0"
        assert act.status == "finished"
        final = act.feedback[-1]["status"]
        assert final["execution"] == "closed" and final["result"]["finished"] == "success"
        assert any(f["status"]["execution"] == "proceeding" for f in act.feedback)


async def test_hawkbit_rollback_reported_as_failure(bench_factory) -> None:  # type: ignore[no-untyped-def]
    bench = bench_factory(
        udp=1, serial=0, device_kw={"crash_on_boot_versions": ["2.0.0"], "crash_after_s": 0.2}
    )
    hb = HawkbitServer()
    async with serve(hb.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        act = hb.deploy(dev.id, bench.images["2.0.0"].read_bytes(), "2.0.0")
        cfg = config(bench, sim, {"kind": "hawkbit", "url": base, "gateway_token": hb.gateway_token})
        res = await run(cfg)
        out = res.outcomes[dev.id]
        assert out.status == Status.ROLLED_BACK, out
        assert active_version(dev) == "1.0.0"
        final = act.feedback[-1]["status"]
        assert final["execution"] == "closed" and final["result"]["finished"] == "failure"
        assert final["code"] == int(out.result) == int(UpdateResult.UPDATE_FAILED)
        assert f"LwM2M result {int(out.result)}" in final["details"][0]
        assert act.status == "error"


async def test_rdfm_success(bench_factory) -> None:  # type: ignore[no-untyped-def]
    bench = bench_factory(udp=1, serial=0)
    srv = RdfmServer()
    async with serve(srv.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = config(bench, sim, {"kind": "rdfm", "url": base, "key_bits": 2048})
        res = await run(cfg)  # first contact: registration pending
        assert active_version(dev) == "1.0.0"
        srv.accept(dev.id)
        art = build_zephyr_artifact(
            bench.images["2.0.0"].read_bytes(), device_types=["sim_board"], version="2.0.0"
        )
        srv.assign(dev.id, art, "2.0.0", "sim_board")
        res = await run(cfg)
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes[dev.id]
        assert active_version(dev) == "2.0.0"
        outcomes = [json.loads(e["entry"]) for e in srv.logs]
        assert outcomes[-1]["result"] == int(UpdateResult.SUCCESS)
        await run(cfg)  # the next check tells the server the new version runs
        assert srv.checks[-1][0] == 204 and srv.checks[-1][1]["rdfm.software.version"] == "2.0.0"


async def test_latest_release_success(bench_factory) -> None:  # type: ignore[no-untyped-def]
    bench = bench_factory(udp=1, serial=0)
    rs = ReleaseServer()
    async with serve(rs.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        rs.publish("sim_board", "2.0.0", bench.images["2.0.0"].read_bytes())
        cfg = config(bench, sim, {"kind": "latest_release", "url": base, "project_key": rs.project_key})
        res = await run(cfg)
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes[dev.id]
        assert active_version(dev) == "2.0.0"


@pytest.mark.parametrize("crash", [False, True])
async def test_mqtt_jobs(bench_factory, tmp_path: Path, crash: bool) -> None:  # type: ignore[no-untyped-def]
    kw = {"crash_on_boot_versions": ["2.0.0"], "crash_after_s": 0.2} if crash else {}
    bench = bench_factory(udp=1, serial=0, device_kw=kw)
    fs = FileStore()
    app = web.Application()
    fs.routes(app)
    img = bench.images["2.0.0"].read_bytes()
    async with (
        mosquitto(tmp_path) as port,
        serve(app) as base,
        JobsService(port) as svc,
        Simulator(bench.sim_cfg) as sim,
    ):
        (dev,) = sim.devices.values()
        url = base + fs.add("fw.bin", img)
        job = await svc.add_job(
            dev.id,
            "j1",
            {
                "files": [
                    {
                        "url": url,
                        "sha256": hashlib.sha256(img).hexdigest(),
                        "size": len(img),
                        "version": "2.0.0",
                    }
                ]
            },
        )
        cfg = config(bench, sim, {"kind": "mqtt_jobs", "host": "127.0.0.1", "port": port, "tls": False})
        res = await run(cfg)
        out = res.outcomes[dev.id]
        if crash:
            assert out.status == Status.ROLLED_BACK, out
            assert job.status == "FAILED"
            assert job.updates[-1]["statusDetails"]["lwm2m_result"] == str(int(out.result))
        else:
            assert out.status == Status.UPDATED, out
            assert job.status == "SUCCEEDED"
            assert active_version(dev) == "2.0.0"
        assert job.updates[0]["status"] == "IN_PROGRESS"


CRASH = {"crash_on_boot_versions": ["2.0.0"], "crash_after_s": 0.2}


async def test_rdfm_rollback_reported_as_failure(bench_factory) -> None:  # type: ignore[no-untyped-def]
    """RDFM has no deployment-status API: the outcome goes to its device log, and the next
    check tells the server the device still runs the old version."""
    bench = bench_factory(udp=1, serial=0, device_kw=CRASH)
    srv = RdfmServer()
    async with serve(srv.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = config(bench, sim, {"kind": "rdfm", "url": base, "key_bits": 2048})
        await run(cfg)  # first contact registers the device; an operator accepts it
        srv.accept(dev.id)
        art = build_zephyr_artifact(
            bench.images["2.0.0"].read_bytes(), device_types=["sim_board"], version="2.0.0"
        )
        srv.assign(dev.id, art, "2.0.0", "sim_board")
        res = await run(cfg)
        out = res.outcomes[dev.id]
        assert out.status == Status.ROLLED_BACK, out
        assert active_version(dev) == "1.0.0"
        outcomes = [json.loads(e["entry"]) for e in srv.logs]
        assert outcomes[-1]["result"] == int(UpdateResult.UPDATE_FAILED)
        await run(cfg)
        assert srv.checks[-1][1]["rdfm.software.version"] == "1.0.0"


async def test_latest_release_rollback_is_not_retried(bench_factory) -> None:  # type: ignore[no-untyped-def]
    """A release-API server has no report endpoint: the gateway reports the rollback in its
    log and journal, the next query carries the old current_version, and the same release is
    not pushed again (it is blocked until the server offers a different one)."""
    bench = bench_factory(udp=1, serial=0, device_kw=CRASH)
    rs = ReleaseServer()
    async with serve(rs.app()) as base, Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        rs.publish("sim_board", "2.0.0", bench.images["2.0.0"].read_bytes())
        cfg = config(bench, sim, {"kind": "latest_release", "url": base,
                                  "project_key": rs.project_key})
        res = await run(cfg)
        out = res.outcomes[dev.id]
        assert out.status == Status.ROLLED_BACK, out
        assert out.result == UpdateResult.UPDATE_FAILED
        uploads_before = dev.counters["requests.1.1"]
        res2 = await run(cfg)
        assert rs.queries[-1]["current_version"] == "1.0.0"
        assert dev.counters["requests.1.1"] == uploads_before
        assert active_version(dev) == "1.0.0"
        assert res2.outcomes[dev.id].status != Status.UPDATED

"""Inventory upstream and cancellation on the other backends: MQTT jobs (real mosquitto, the
loopback jobs service) gets a retained shadow document per thing and a job canceled during the
upload is taken back; RDFM gets the inventory as string metadata next to its three keys."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import aiomqtt
from aiohttp import web
from fleet_servers.common import FileStore, serve
from fleet_servers.jobs_service import JobsService
from fleet_servers.mosquitto import mosquitto
from fleet_servers.rdfm import RdfmServer

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator


def cfg_of(bench: Any, sim: Simulator, source: dict[str, Any]) -> Any:
    data = bench.gateway_dict(sim)
    data["source"] = source
    return parse_config(data, bench.root / "gateway.yaml")


async def retained(port: int, topic: str) -> dict[str, Any]:
    async with aiomqtt.Client("127.0.0.1", port, identifier="shadow-reader") as c:
        await c.subscribe(topic, qos=1)
        async for msg in c.messages:
            return dict(json.loads(msg.payload))  # type: ignore[arg-type]
    raise AssertionError("no retained message")


async def test_mqtt_shadow_and_job_canceled_during_upload(bench_factory, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=96 * 1024,
                          device_kw={"link": {"bandwidth_bps": 30_000}})
    fs = FileStore()
    app = web.Application()
    fs.routes(app)
    img = bench.images["2.0.0"].read_bytes()
    async with (mosquitto(tmp_path) as port, serve(app) as base, JobsService(port) as svc,
                Simulator(bench.sim_cfg) as sim):
        dev = sim.devices["udp-1"]
        job = await svc.add_job("udp-1", "j1", {"files": [{
            "url": base + fs.add("fw.bin", img), "sha256": hashlib.sha256(img).hexdigest(),
            "size": len(img), "version": "2.0.0"}]})
        uploading = asyncio.Event()
        cfg = cfg_of(bench, sim, {"kind": "mqtt_jobs", "host": "127.0.0.1", "port": port,
                                  "tls": False, "poll_interval_s": 1})
        gw = Gateway(cfg, on_progress=lambda i, st, off, tot: uploading.set()
                     if st == "upload" and off else None)
        try:
            run = asyncio.create_task(gw.run_once())
            await asyncio.wait_for(uploading.wait(), 60)
            job.status = "CANCELED"  # the operator cancels the job (CancelJob)
            res = await asyncio.wait_for(run, 120)
        finally:
            gw.close()
        out = res.outcomes["udp-1"]
        assert "canceled" in out.detail and "job j1 canceled" in out.detail, out
        assert dev.image_info(1) is None and dev.counters["resets"] == 0
        assert next(s for s in dev.server.state_images() if s.active).version == "1.0.0"
        shadow = await retained(port, "smp-gateway/demo-gateway/things/udp-1/shadow")
        rep = shadow["state"]["reported"]
        assert rep["device"] == "udp-1" and rep["mcuboot_mode"] == "swap-using-scratch"
        assert rep["slots"][0]["version"] == "1.0.0"


async def test_rdfm_metadata_carries_the_inventory_as_strings(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    srv = RdfmServer()
    async with serve(srv.app()) as base, Simulator(bench.sim_cfg) as sim:
        cfg = cfg_of(bench, sim, {"kind": "rdfm", "url": base, "key_bits": 2048})
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()  # registers (pending acceptance): the metadata went out
        finally:
            gw.close()
        assert res.outcomes["udp-1"].status == Status.HELD  # waiting for acceptance: not ok
        assert "not accepted" in res.outcomes["udp-1"].detail and not res.ok
        (meta,) = list(srv.registrations.values())
        assert {"rdfm.hardware.devtype", "rdfm.software.version", "rdfm.hardware.macaddr"} <= set(meta)
        assert all(isinstance(v, str) for v in meta.values())
        assert meta["smp-gateway.slot0.version"] == "1.0.0"
        assert meta["smp-gateway.mcuboot_mode"] == "swap-using-scratch"

"""MQTT jobs backend (AWS IoT Jobs layout) with a real mosquitto and a test jobs service."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

import pytest
from aiohttp import web
from fleet_servers.common import FileStore, serve
from fleet_servers.jobs_service import JobsService
from fleet_servers.mosquitto import mosquitto

from gateway.mcuboot import Version
from gateway.sources.base import DeviceView, Report, UpdateResult, UpdateState
from gateway.sources.mqtt_jobs import MqttJobsSource
from gateway.sources.settings import MqttJobsSourceConfig

IMG = os.urandom(30_000)
DEV = DeviceView("mcu-3", "nrf5340", Version(1, 0, 0))


@pytest.fixture
async def env(tmp_path: Path):
    fs = FileStore()
    app = web.Application()
    fs.routes(app)
    async with mosquitto(tmp_path) as port, serve(app) as base, JobsService(port) as svc:
        yield port, svc, base + fs.add("fw.bin", IMG), fs


def source(port: int, tmp_path: Path, **kw: object) -> MqttJobsSource:
    cfg = MqttJobsSourceConfig(
        host="127.0.0.1", port=port, tls=False, client_id="gw-test", password="hunter2-secret", **kw
    )  # type: ignore[arg-type]
    return MqttJobsSource(cfg, tmp_path / "state", gateway_id="gw-test")


async def test_start_next_update_flow(env, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    port, svc, url, _fs = env
    caplog.set_level(logging.DEBUG)
    src = source(port, tmp_path, progress_interval_s=3600)
    try:
        assert await src.check(DEV) is None  # nothing queued: accepted without execution
        assert svc.start_next_requests[-1]["clientToken"]
        job = await svc.add_job(
            "mcu-3",
            "job-1",
            {
                "devices": ["mcu-3"],
                "files": [
                    {
                        "url": url,
                        "sha256": hashlib.sha256(IMG).hexdigest(),
                        "size": len(IMG),
                        "version": "1.4.0",
                    }
                ],
            },
        )
        offer = await src.check(DEV)
        assert offer is not None and offer.version == Version(1, 4, 0)
        assert job.status == "IN_PROGRESS"
        p = await src.fetch(offer, max_size=None)
        assert p.read_bytes() == IMG
        await src.report(offer, Report(UpdateState.UPDATING, progress=0.1))
        await src.report(offer, Report(UpdateState.UPDATING, progress=0.2))  # rate-limited away
        await src.report(offer, Report(UpdateState.IDLE, UpdateResult.SUCCESS, detail="confirmed"))
        await svc.wait_for(lambda: job.status == "SUCCEEDED")
        assert [u["status"] for u in job.updates] == ["IN_PROGRESS", "SUCCEEDED"]
        assert job.updates[0]["statusDetails"]["progress"] == "10"
        assert job.updates[-1]["statusDetails"]["lwm2m_result"] == "1"
        assert job.updates[-1]["statusDetails"]["detail"] == "confirmed"
        assert await src.check(DEV) is None
    finally:
        await src.close()
    assert "hunter2-secret" not in caplog.text


async def test_failure_and_notify_next(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port, svc, url, _fs = env
    src = source(port, tmp_path)
    try:
        assert await src.check(DEV) is None  # subscribes to notify-next
        job = await svc.add_job("mcu-3", "job-2", {"url": url})
        # notify-next makes the next poll come soon
        await asyncio.wait_for(src.notified.wait(), 10)
        assert src.poll_interval() == 1.0
        offer = await src.check(DEV)
        assert offer is not None and offer.sha256 is None
        await src.report(offer, Report(UpdateState.IDLE, UpdateResult.INTEGRITY_FAILURE, detail="rollback"))
        await svc.wait_for(lambda: job.status == "FAILED")
        d = job.updates[-1]["statusDetails"]
        assert d["lwm2m_result"] == "5" and d["lwm2m_result_name"] == "INTEGRITY_FAILURE"
    finally:
        await src.close()


async def test_job_for_other_device_rejected(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port, svc, url, _fs = env
    src = source(port, tmp_path, thing="{gateway}")
    try:
        job = await svc.add_job("gw-test", "job-3", {"devices": ["other"], "files": [{"url": url}]})
        assert await src.check(DEV) is None
        await svc.wait_for(lambda: job.status == "REJECTED")
    finally:
        await src.close()

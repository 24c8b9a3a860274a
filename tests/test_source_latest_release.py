"""Memfault-style latest-release backend: 200 / 204 / 503 Retry-After."""

from __future__ import annotations

import email.utils
import os
import time
from pathlib import Path

import pytest
from fleet_servers.common import serve
from fleet_servers.latest_release import ReleaseServer

from gateway.mcuboot import Version
from gateway.sources.base import DeviceView, Report, UpdateResult, UpdateState
from gateway.sources.latest_release import LatestReleaseSource
from gateway.sources.settings import LatestReleaseSourceConfig

IMG = os.urandom(40_000)
DEV = DeviceView("sn-42", "evt2", Version(1, 0, 0))


@pytest.fixture
async def rs():
    srv = ReleaseServer()
    async with serve(srv.app()) as base:
        srv.base = base  # type: ignore[attr-defined]
        yield srv


def source(srv: ReleaseServer, tmp_path: Path) -> LatestReleaseSource:
    cfg = LatestReleaseSourceConfig(url=srv.base, project_key=srv.project_key)  # type: ignore[attr-defined]
    return LatestReleaseSource(cfg, tmp_path / "state")


async def test_200_then_204(rs: ReleaseServer, tmp_path: Path) -> None:
    src = source(rs, tmp_path)
    try:
        assert await src.check(DEV) is None  # nothing published: 204
        rs.publish("evt2", "1.1.0", IMG)
        offer = await src.check(DEV)
        assert offer is not None and offer.version == Version(1, 1, 0) and offer.size == len(IMG)
        assert rs.queries[-1] == {
            "device_serial": "sn-42",
            "hardware_version": "evt2",
            "software_type": "main",
            "current_version": "1.0.0",
        }
        p = await src.fetch(offer, max_size=None)
        assert p.read_bytes() == IMG
        await src.report(offer, Report(UpdateState.IDLE, UpdateResult.SUCCESS))
        assert await src.check(DeviceView("sn-42", "evt2", Version(1, 1, 0))) is None
    finally:
        await src.close()


async def test_503_retry_after_seconds_honoured(rs: ReleaseServer, tmp_path: Path) -> None:
    src = source(rs, tmp_path)
    try:
        rs.publish("evt2", "1.1.0", IMG)
        rs.unavailable.append("120")
        assert await src.check(DEV) is None
        assert 110 < src.poll_interval() <= 300
        n = len(rs.queries)
        assert await src.check(DEV) is None  # not asked again before Retry-After
        assert len(rs.queries) == n
        assert src.retry_at() - time.time() > 110
    finally:
        await src.close()


async def test_503_retry_after_http_date(rs: ReleaseServer, tmp_path: Path) -> None:
    src = source(rs, tmp_path)
    try:
        rs.unavailable.append(email.utils.formatdate(time.time() + 3600, usegmt=True))
        assert await src.check(DEV) is None
        assert 3500 < src.retry_at() - time.time() <= 3600
        assert src.poll_interval() > 3500
    finally:
        await src.close()

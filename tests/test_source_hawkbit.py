"""hawkBit DDI backend against the loopback DDI server."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from fleet_servers.common import serve
from fleet_servers.hawkbit import HawkbitServer

from gateway.config import parse_config
from gateway.mcuboot import Version
from gateway.sources import build_source
from gateway.sources.base import DeviceView, Offer, Report, ServerCanceled, UpdateResult, UpdateState
from gateway.sources.hawkbit import HawkbitSource, parse_sleep
from gateway.sources.settings import HawkbitSourceConfig

IMG = os.urandom(50_000)
DEV = DeviceView("mcu-7", "stm32f4", Version(1, 0, 0), bytes(32))


@pytest.fixture
async def hb():
    srv = HawkbitServer()
    async with serve(srv.app()) as base:
        srv.base = base  # type: ignore[attr-defined]
        yield srv


def source(srv: HawkbitServer, tmp_path: Path, **kw: object) -> HawkbitSource:
    cfg = HawkbitSourceConfig(url=srv.base, gateway_token=srv.gateway_token, **kw)  # type: ignore[arg-type, attr-defined]
    return HawkbitSource(cfg, tmp_path / "state", gateway_id="gw-1")


def test_parse_sleep() -> None:
    assert parse_sleep("00:05:00") == 300
    assert parse_sleep("01:00:30") == 3630
    with pytest.raises(ValueError):
        parse_sleep("5m")


async def test_poll_deploy_feedback_success(hb: HawkbitServer, tmp_path: Path) -> None:
    src = source(hb, tmp_path, progress_interval_s=0)
    try:
        assert await src.check(DEV) is None
        assert src.poll_interval() == 5.0  # polling.sleep honoured
        assert hb.attributes["mcu-7"]["hw_type"] == "stm32f4"
        assert hb.attributes["mcu-7"]["sw_version"] == "1.0.0"
        assert hb.attributes["mcu-7"]["image_hash"] == "00" * 32
        n_puts = len(hb.config_puts)
        assert await src.check(DEV) is None
        assert len(hb.config_puts) == n_puts  # unchanged attributes are not sent again

        act = hb.deploy("mcu-7", IMG, "1.1.0")
        offer = await src.check(DEV)
        assert offer is not None and offer.version == Version(1, 1, 0) and offer.size == len(IMG)
        path = await src.fetch(offer, max_size=len(IMG))
        assert path.read_bytes() == IMG
        await src.report(offer, Report(UpdateState.DOWNLOADED))
        await src.report(offer, Report(UpdateState.UPDATING, progress=0.5))
        await src.report(offer, Report(UpdateState.IDLE, UpdateResult.SUCCESS, detail="confirmed"))
        fb = act.feedback
        assert fb[1]["status"]["result"]["progress"] == {"cnt": 50, "of": 100}
        assert fb[1]["status"]["execution"] == "proceeding"
        assert fb[-1]["status"]["execution"] == "closed"
        assert fb[-1]["status"]["result"]["finished"] == "success"
        assert "LwM2M result 1 (SUCCESS)" in fb[-1]["status"]["details"][0]
        assert act.status == "finished"
        # new running version → configData again
        await src.check(DeviceView("mcu-7", "stm32f4", Version(1, 1, 0), bytes(32)))
        assert hb.attributes["mcu-7"]["sw_version"] == "1.1.0"
        assert hb.unauthorized == 0
    finally:
        await src.close()


async def test_failure_carries_lwm2m_result(hb: HawkbitServer, tmp_path: Path) -> None:
    src = source(hb, tmp_path)
    try:
        act = hb.deploy("mcu-7", IMG, "1.1.0")
        offer = await src.check(DEV)
        assert offer is not None
        await src.report(
            offer, Report(UpdateState.IDLE, UpdateResult.INTEGRITY_FAILURE, detail="rolled back")
        )
        st = act.feedback[-1]["status"]
        assert st["execution"] == "closed" and st["result"]["finished"] == "failure"
        assert st["code"] == 5 and "INTEGRITY_FAILURE" in st["details"][0]
        assert act.status == "error"
    finally:
        await src.close()


async def test_cancel_is_reported_then_confirmed(hb: HawkbitServer, tmp_path: Path) -> None:
    """The source does not decide a cancel (it cannot know what reached the device): check()
    reports it (ServerCanceled naming the action); the gateway's confirmation closes it."""
    src = source(hb, tmp_path)
    try:
        act = hb.deploy("mcu-7", IMG, "1.1.0")
        offer = await src.check(DEV)
        assert offer is not None
        hb.cancel(act)
        with pytest.raises(ServerCanceled) as seen:
            await src.check(DEV)
        assert seen.value.names(offer.report_handle())
        assert act.cancel_feedback == [] and act.status != "canceled"  # nothing decided yet
        await src.acknowledge_cancel(seen.value.offer, True, "nothing reached the device")
        assert act.cancel_feedback[-1]["status"]["execution"] == "closed"
        assert act.cancel_feedback[-1]["status"]["result"]["finished"] == "success"
        assert act.status == "canceled"
        assert await src.check(DEV) is None
    finally:
        await src.close()


async def test_cancel_too_late_is_rejected_also_after_a_restart(hb: HawkbitServer,
                                                                tmp_path: Path) -> None:
    """A cancel the gateway cannot take back is rejected - by a restarted source too (its
    acknowledgement works from the journaled report handle alone)."""
    src = source(hb, tmp_path)
    try:
        act = hb.deploy("mcu-7", IMG, "1.1.0")
        offer = await src.check(DEV)
        assert offer is not None
        await src.report(offer, Report(UpdateState.UPDATING, progress=0.1))
    finally:
        await src.close()
    hb.cancel(act)
    src = source(hb, tmp_path)  # a restart
    try:
        with pytest.raises(ServerCanceled) as seen:
            await src.check(DEV)
        assert seen.value.names(offer.report_handle())
        rebuilt = Offer.from_handle(offer.report_handle())
        assert await src.canceled(rebuilt)  # (what the gateway asks before it answers)
        await src.acknowledge_cancel(rebuilt, False, "too late: installed and confirmed")
        assert act.cancel_feedback[-1]["status"]["execution"] == "rejected"
        assert act.status == "running"
        await src.report(rebuilt, Report(UpdateState.IDLE, UpdateResult.SUCCESS))
        assert act.status == "finished"
    finally:
        await src.close()


async def test_build_source_and_secret_not_logged(
    hb: HawkbitServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "k.pem"
    key.write_text("x")
    cfg = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "trusted_keys": [str(key)],
            "source": {"kind": "hawkbit", "url": hb.base, "gateway_token": hb.gateway_token},  # type: ignore[attr-defined]
            "devices": [
                {"id": "mcu-7", "hardware": "stm32f4", "transport": {"kind": "udp", "host": "127.0.0.1"}}
            ],
        }
    )
    caplog.set_level(logging.DEBUG)
    src = build_source(cfg)
    assert isinstance(src, HawkbitSource)
    try:
        act = hb.deploy("mcu-7", IMG, "1.1.0")
        offer = await src.check(DEV)
        assert offer is not None
        await src.fetch(offer, max_size=None)
        await src.report(offer, Report(UpdateState.IDLE, UpdateResult.SUCCESS))
        assert act.status == "finished"
    finally:
        await src.close()
    assert hb.gateway_token not in caplog.text
    assert hb.gateway_token not in repr(cfg)
    assert hb.gateway_token not in str(cfg.model_dump())

"""Fleet sources against hostile servers (r3-fleet follow-ups): answers bounded in bytes for
every HTTP source, garbage in hawkBit's links is the server's problem (never a dead cancel
watch or a download left running), statusDetails keys that cannot merge two devices, and a
shared AWS execution that does not declare success for a device it has not heard from."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fleet_servers.common import serve
from fleet_servers.mosquitto import mosquitto
from servers.aws_jobs import AwsJobs
from servers.hawkbit_ddi import HawkbitDDI
from test_conformance_aws_jobs import IMG, doc_for, files_app, view

from gateway.sources.base import DeviceView, FetchError, Report, UpdateResult, UpdateState
from gateway.sources.hawkbit import HawkbitSource
from gateway.sources.latest_release import LatestReleaseSource
from gateway.sources.mqtt_jobs import MqttJobsSource, _key
from gateway.sources.settings import (
    HawkbitSourceConfig,
    LatestReleaseSourceConfig,
    MqttJobsSourceConfig,
)

DEEP = b"[" * 100_000  # valid-looking JSON start, nested beyond any parser's recursion limit


# -- answers bounded in bytes: latest-release -------------------------------------------------
class Answers:
    """One HTTP answer per test: ``body`` and how it is framed; counts what got out."""

    def __init__(self, body: bytes, *, chunked: bool = False, pad: int = 0) -> None:
        self.body, self.chunked, self.pad, self.sent = body, chunked, pad, 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "application/json"}
        if not self.chunked:
            headers["Content-Length"] = str(len(self.body) + self.pad)
        resp = web.StreamResponse(headers=headers)
        if self.chunked:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(self.body)
        self.sent = len(self.body)
        block = b" " * (1 << 20)
        try:
            for _ in range(self.pad // len(block)):
                await resp.write(block)
                self.sent += len(block)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    def app(self, path: str) -> web.Application:
        app = web.Application()
        app.router.add_route("*", path, self.handle)
        return app


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_latest_release_answer_is_bounded_in_bytes(tmp_path: Path, chunked: bool) -> None:
    """A 64 MiB release answer (declared, or chunked without a length) is refused as the
    server's error, read no further than the cap - never read and parsed whole."""
    srv = Answers(json.dumps({"version": "2.0.0", "url": "http://x/y"}).encode(),
                  chunked=chunked, pad=64 * 1024 * 1024)
    async with serve(srv.app("/api/v0/releases/latest")) as base:
        cfg = LatestReleaseSourceConfig(url=base, project_key="k")  # type: ignore[arg-type]
        src = LatestReleaseSource(cfg, tmp_path / "state")
        try:
            with pytest.raises(FetchError) as err:
                await src.check(DeviceView("d1", "nrf"))
        finally:
            await src.close()
    assert err.value.result == UpdateResult.CONNECTION_LOST  # the server's, not the device's
    assert srv.sent < 8 * 1024 * 1024, f"the gateway read {srv.sent} bytes of one answer"


async def test_latest_release_deeply_nested_answer_is_a_server_error(tmp_path: Path) -> None:
    """A small answer nested too deep for the parser (RecursionError) is an unusable answer
    of the server (FetchError), not an internal error of the gateway."""
    srv = Answers(DEEP)
    async with serve(srv.app("/api/v0/releases/latest")) as base:
        cfg = LatestReleaseSourceConfig(url=base, project_key="k")  # type: ignore[arg-type]
        src = LatestReleaseSource(cfg, tmp_path / "state")
        try:
            with pytest.raises(FetchError):
                await src.check(DeviceView("d1", "nrf"))
        finally:
            await src.close()


# -- hawkBit: garbage in the controller base --------------------------------------------------
class HostileDDI(HawkbitDDI):
    """A DDI server whose controller base turns hostile (``hostile``) once set."""

    hostile: bytes | None = None
    hostile_served: int = 0

    async def base(self, request: web.Request) -> web.Response:  # type: ignore[override]
        if self.hostile is not None:
            self.hostile_served += 1
            return web.Response(body=self.hostile, content_type="application/hal+json")
        return await super().base(request)


def hb_source(ddi: HawkbitDDI, tmp_path: Path) -> HawkbitSource:
    cfg = HawkbitSourceConfig.model_validate(
        {"url": ddi.url, "gateway_token": ddi.gateway_token, "poll_interval_s": 0.5,
         "min_poll_interval_s": 0.5})
    return HawkbitSource(cfg, tmp_path / "state")


@pytest.mark.parametrize("hostile", [
    json.dumps({"_links": ["cancelAction"]}).encode(),
    json.dumps({"_links": "cancelAction"}).encode(),
    json.dumps({"_links": {"cancelAction": {"href": ["x"]}}, "config": []}).encode(),
    DEEP,
], ids=["links-list", "links-string", "href-list", "deep"])
async def test_hawkbit_garbage_during_the_download_is_no_cancel(tmp_path: Path,
                                                                hostile: bytes) -> None:
    """While the artifact downloads, the cancel watch reads the controller base; garbage
    there (links of the wrong type, nesting too deep) is a server hiccup: the watch goes on,
    the download completes and fetch() returns it - never an exception with the download left
    running in the background (and no final report)."""
    data = os.urandom(40 * 1024)
    async with HostileDDI() as ddi:
        ddi.deploy("udp-1", data, "2.0.0")
        src = hb_source(ddi, tmp_path)
        try:
            offer = await src.check(DeviceView("udp-1", "nrf"))
            assert offer is not None
            ddi.slow_artifacts = 0.25  # 10 pieces: a few cancel checks during the download
            ddi.hostile = hostile
            path = await src.fetch(offer, None)
        finally:
            await src.close()
        assert path.read_bytes() == data
        assert ddi.hostile_served >= 1, "the watch never read the hostile controller base"


async def test_hawkbit_link_with_credentials_is_a_server_error(tmp_path: Path) -> None:
    """A deploymentBase href carrying user:password@ on the server's own origin is refused
    as the server's error (FetchError, CONNECTION_LOST), not a ValueError from the HTTP client
    that the gateway counts against the device."""
    async with HostileDDI() as ddi:
        src = hb_source(ddi, tmp_path)
        host = re.sub(r"^http://", "", ddi.url)
        ddi.hostile = json.dumps({"_links": {"deploymentBase": {
            "href": f"http://u:p@{host}/DEFAULT/controller/v1/udp-1/deploymentBase/1"}}}).encode()
        try:
            with pytest.raises(FetchError) as err:
                await src.check(DeviceView("udp-1", "nrf"))
        finally:
            await src.close()
        assert err.value.result == UpdateResult.CONNECTION_LOST


# -- AWS IoT Jobs -----------------------------------------------------------------------------
def test_status_details_keys_are_distinct_and_valid() -> None:
    """Distinct device ids give distinct statusDetails keys, each one AWS takes."""
    ids = ["pump.1", "pump_1", "pump-1", "pump:2e1", "pump:3a2e1", "pümp", "p u", "a" * 200,
           "a" * 199 + "b", "." * 150, ":" * 150, "x" * 121 + ".", "x" * 121 + ":"]
    keys = [_key("result:", d) for d in ids]
    assert len(set(keys)) == len(ids), keys
    assert all(re.fullmatch(r"[a-zA-Z0-9:_-]{1,128}", k) for k in keys), keys
    assert _key("result:", "pump-1") == "result:pump-1"  # plain ids keep their readable key


def mqtt_source(port: int, tmp: Path, devices: list[tuple[str, str | None]],
                **kw: Any) -> MqttJobsSource:
    cfg = MqttJobsSourceConfig.model_validate(
        {"host": "127.0.0.1", "port": port, "tls": False, "client_id": "gw",
         "thing": "{gateway}", **kw})
    return MqttJobsSource(cfg, tmp / "state", gateway_id="gw", devices=devices, roster_open=True)


async def test_shared_execution_waits_for_a_named_device_not_seen_yet(tmp_path: Path) -> None:
    """One thing for the gateway, discovery on (pump-b is discovered, not configured): a job
    naming pump-a and pump-b must not be closed SUCCEEDED when pump-a is done - pump-b was
    never heard from. It closes once pump-b reported."""
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws, serve(files_app({})) as base:
        (ex,) = await aws.create_job("j1", doc_for(base + "/f/x", IMG,
                                                   devices=["pump-a", "pump-b"]), ["gw"])
        src = mqtt_source(port, tmp_path, [("pump-a", None)])
        try:
            oa = await src.check(view("pump-a"))
            assert oa is not None
            await src.report(oa, Report(UpdateState.IDLE, UpdateResult.SUCCESS, detail="ok"))
            assert ex.status == "IN_PROGRESS", "success declared for a device never heard from"
            assert await src.check(view("pump-a")) is None  # its part is done; still waiting
            assert ex.status == "IN_PROGRESS"
            ob = await src.check(view("pump-b"))  # discovered meanwhile: it asks
            assert ob is not None
            await src.report(ob, Report(UpdateState.IDLE, UpdateResult.SUCCESS, detail="ok"))
            assert ex.status == "SUCCEEDED"
        finally:
            await src.close()


async def test_shared_execution_wait_for_an_unseen_device_is_bounded(tmp_path: Path) -> None:
    """The wait for a named device that never shows up is bounded (``roster_wait_s``): after
    it, the next check closes the execution with the devices that did report."""
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws, serve(files_app({})) as base:
        (ex,) = await aws.create_job("j1", doc_for(base + "/f/x", IMG,
                                                   devices=["pump-a", "pump-z"]), ["gw"])
        src = mqtt_source(port, tmp_path, [("pump-a", None)], roster_wait_s=0)
        try:
            oa = await src.check(view("pump-a"))
            assert oa is not None
            await src.report(oa, Report(UpdateState.IDLE, UpdateResult.SUCCESS, detail="ok"))
            assert ex.status == "SUCCEEDED"
        finally:
            await src.close()


# -- hawkBit: a staged action canceled after a restart ----------------------------------------
async def test_hawkbit_cancel_of_a_staged_action_after_a_restart(bench_factory: Any) -> None:
    """As test_review_fleet's staged cancel, with the gateway restarted between staging and
    the cancel: the decision rests on the journal (slot 1 holds this action's image), not on
    the process's memory - the image is erased, the cancel confirmed, nothing installed."""
    from test_review_fleet import FAST, active, cfg

    from gateway.daemon import Gateway
    from gateway.engine import Status
    from gateway.sim.simulator import Simulator

    bench = bench_factory(**FAST)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0",
                         maintenance="unavailable")
        gw = Gateway(cfg(bench, sim, ddi))
        try:
            out = (await gw.run_once()).outcomes["udp-1"]
        finally:
            gw.close()
        assert out.status == Status.HELD and dev.image_info(1) is not None, out
        ddi.cancel(act)
        gw = Gateway(cfg(bench, sim, ddi))  # a restart
        try:
            out = (await gw.run_once()).outcomes["udp-1"]
            ddi.open_window(act)  # (only matters if the cancel was rejected)
            await gw.run_once()
        finally:
            gw.close()
        cfb = [f["status"]["execution"] for f in act.cancel_feedback]
        assert cfb and cfb[-1] == "closed", (cfb, out)
        assert dev.image_info(1) is None, "the canceled image stayed in slot 1"
        assert active(dev) == ("1.0.0", True) and dev.counters["resets"] == 0

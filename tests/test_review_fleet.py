"""Adversarial review (r3-fleet): fleet-protocol sources against hostile / unlucky servers.

Each test FAILS on the code it was written against because of the bug it names."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from aiohttp import web
from servers.hawkbit_ddi import HawkbitDDI

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator

FAST = {"udp": 1, "serial": 0, "image_size": 16 * 1024}


def cfg(bench: Any, sim: Simulator, ddi: HawkbitDDI, **src: Any) -> Any:
    data = bench.gateway_dict(sim)
    data["source"] = {"kind": "hawkbit", "url": ddi.url, "gateway_token": ddi.gateway_token,
                      "poll_interval_s": 1, "min_poll_interval_s": 0.5, **src}
    return parse_config(data, bench.root / "gateway.yaml")


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return str(a.version), bool(a.confirmed)


async def once(bench: Any, sim: Simulator, ddi: HawkbitDDI, **src: Any) -> Any:
    gw = Gateway(cfg(bench, sim, ddi, **src))
    try:
        return (await gw.run_once()).outcomes["udp-1"]
    finally:
        gw.close()


async def test_hawkbit_window_gate_survives_a_gateway_restart(bench_factory) -> None:
    """A forced action inside hawkBit's maintenance window; the gateway dies mid-upload; the
    window closes. The restarted gateway resumes from the journal - and must still hold the
    mark/reset until hawkBit's window is open again (install_gate). The rebuilt _Action has
    window=None, and the window is only refreshed when it is not None: the gate is gone."""
    from safety_support import Request, Tap

    bench = bench_factory(**FAST)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        tap = Tap(dev).install()
        stalled = asyncio.Event()

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_upload and int(req.body.get("off", 0)) > 0:
                stalled.set()
                return False
            return True

        tap.hook = hook
        act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0",
                         maintenance="available")
        gw = Gateway(cfg(bench, sim, ddi))
        try:
            task = asyncio.create_task(gw.run_once())
            await asyncio.wait_for(stalled.wait(), 30)
            task.cancel()  # the gateway dies mid-upload
            with pytest.raises(asyncio.CancelledError):
                await task
            assert gw.journal.get("udp-1").outcome is None
        finally:
            gw.close()
        tap.hook = None
        ddi.close_window(act)  # hawkBit's maintenance window closes meanwhile
        out = await once(bench, sim, ddi)
        assert dev.counters["resets"] == 0, (out, "reset outside hawkBit's maintenance window")
        assert active(dev) == ("1.0.0", True)
        assert out.status == Status.HELD, out


async def test_hawkbit_cancel_of_a_staged_action_is_honoured(bench_factory) -> None:
    """An action staged outside hawkBit's maintenance window (image in slot 1, `downloaded`,
    nothing marked) is canceled by the operator in hawkBit. Nothing was installed: the cancel
    can be taken back. The gateway rejects it ("transfer already started") - hawkBit puts the
    action back to RUNNING, and when the window opens the canceled update is installed."""
    bench = bench_factory(**FAST)
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        act = ddi.deploy("udp-1", bench.images["2.0.0"].read_bytes(), "2.0.0",
                         maintenance="unavailable")
        gw = Gateway(cfg(bench, sim, ddi))
        try:
            out = (await gw.run_once()).outcomes["udp-1"]
            assert out.status == Status.HELD and dev.counters["resets"] == 0, out
            assert act.feedback[-1]["status"]["execution"] == "downloaded"
            ddi.cancel(act)  # the operator cancels the staged action in hawkBit
            await gw.run_once()
            cfb = [f["status"]["execution"] for f in act.cancel_feedback]
            ddi.open_window(act)  # (only matters if the cancel was rejected)
            for _ in range(2):
                await gw.run_once()
        finally:
            gw.close()
        assert active(dev) == ("1.0.0", True), (cfb, act.status, "canceled update installed")
        assert cfb and cfb[-1] == "closed", cfb


# -- hawkBit: a 200 answer of any size is read whole ----------------------------------------
class HugeBodyDDI(HawkbitDDI):
    """Answers the controller base with a valid JSON object followed by ``pad`` bytes of
    whitespace (still valid JSON); counts what it got to send before the client hung up."""

    pad: int = 64 * 1024 * 1024
    sent: int = 0

    async def base(self, request: web.Request) -> web.StreamResponse:  # type: ignore[override]
        head = json.dumps({"config": {"polling": {"sleep": "00:00:01"}}, "_links": {}}).encode()
        resp = web.StreamResponse(headers={"Content-Type": "application/hal+json",
                                           "Content-Length": str(len(head) + self.pad)})
        await resp.prepare(request)
        await resp.write(head)
        self.sent = len(head)
        block = b" " * (1 << 20)
        try:
            for _ in range(self.pad // len(block)):
                await resp.write(block)
                self.sent += len(block)
        except (ConnectionError, RuntimeError):
            pass
        return resp


async def test_hawkbit_json_answer_is_bounded_in_bytes(tmp_path) -> None:
    """Every read on input from outside is bounded in bytes: a controller base of 64 MiB must
    not be read (and parsed) whole. _request() calls r.json() on any 200, without a cap."""
    from gateway.sources.base import DeviceView, FetchError
    from gateway.sources.hawkbit import HawkbitSource
    from gateway.sources.settings import HawkbitSourceConfig

    async with HugeBodyDDI() as ddi:
        scfg = HawkbitSourceConfig.model_validate(
            {"url": ddi.url, "gateway_token": ddi.gateway_token, "request_timeout_s": 60})
        src = HawkbitSource(scfg, tmp_path / "state")
        try:
            with contextlib.suppress(FetchError):  # refusing the answer is fine; reading it all is not
                await src.check(DeviceView("udp-1", "nrf"))
        finally:
            await src.close()
        assert ddi.sent < 8 * 1024 * 1024, f"the gateway read {ddi.sent} bytes of one answer"


# -- AWS IoT Jobs: one hostile message kills the MQTT session for good ----------------------
async def test_mqtt_deeply_nested_message_does_not_kill_the_source(tmp_path) -> None:
    """A message under the 256 KiB cap that is deeply nested JSON on a subscribed topic
    (notify-next): json.loads raises RecursionError, which _dispatch does not catch (only
    ValueError); it ends the _run task, which start() never restarts (_runner is not None):
    every later check waits request_timeout_s and fails - the source is backed off forever."""
    import aiomqtt
    from fleet_servers.mosquitto import mosquitto
    from servers.aws_jobs import AwsJobs

    from gateway.mcuboot import Version
    from gateway.sources.base import DeviceView
    from gateway.sources.mqtt_jobs import MqttJobsSource
    from gateway.sources.settings import MqttJobsSourceConfig

    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws:
        scfg = MqttJobsSourceConfig.model_validate(
            {"host": "127.0.0.1", "port": port, "tls": False, "client_id": "gw",
             "request_timeout_s": 2})
        src = MqttJobsSource(scfg, tmp_path / "state", gateway_id="gw")
        view = DeviceView("t1", "nrf", Version(1, 0, 0))
        try:
            assert await src.check(view) is None  # connected, subscribed, nothing pending
            async with aiomqtt.Client("127.0.0.1", port, identifier="hostile") as c:
                await c.publish("$aws/things/t1/jobs/notify-next", b"[" * 100_000, qos=1)
            await asyncio.sleep(1.0)
            await aws.create_job("j1", {"files": [{"url": "http://127.0.0.1:9/x",
                                                   "sha256": "00" * 32, "size": 1}]}, ["t1"])
            offer = await src.check(view)  # the source must still work
            assert offer is not None and offer.report_to["job_id"] == "j1"
        finally:
            await src.close()


async def test_hawkbit_download_only_then_install_of_another_build_same_version(bench_factory) -> None:
    """A download-only action stages build X of 2.0.0; then a forced action assigns build Y,
    also 2.0.0 (another build). The device must end up running Y (what its hash says, (b)),
    never X because the version matches."""
    from gateway import devkit
    from gateway.mcuboot import parse_image

    bench = bench_factory(**FAST)
    y_path = devkit.sign_image(bench.root / "images" / "app-2.0.0-y.bin", version="2.0.0",
                               key=bench.key, size=20 * 1024)
    x, y = bench.images["2.0.0"].read_bytes(), y_path.read_bytes()
    assert parse_image(x).hash != parse_image(y).hash
    async with HawkbitDDI() as ddi, Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        a = ddi.deploy("udp-1", x, "2.0.0", action_type="downloadonly")
        gw = Gateway(cfg(bench, sim, ddi))
        try:
            out = (await gw.run_once()).outcomes["udp-1"]
            assert out.status == Status.HELD and a.status == "downloaded", out
            b = ddi.deploy("udp-1", y, "2.0.0", filename="app-y.signed.bin")
            out = (await gw.run_once()).outcomes["udp-1"]
        finally:
            gw.close()
        running = next(s for s in dev.server.state_images() if s.active)
        assert out.status == Status.UPDATED, out
        assert bytes(running.hash) == parse_image(y).hash, "the staged build X was installed"
        assert b.status == "finished"


async def test_mqtt_shared_execution_results_of_two_devices_do_not_merge(tmp_path) -> None:
    """One thing for two configured devices whose ids differ only in a character statusDetails
    keys cannot hold ("pump.1" / "pump_1": both "result:pump_1"). pump.1 succeeds; the gateway
    restarts; the restarted source reads pump.1's result as pump_1's (_adopt) and skips pump_1:
    it is never updated, and no final status is ever sent for the execution."""
    from fleet_servers.common import serve
    from fleet_servers.mosquitto import mosquitto
    from servers.aws_jobs import AwsJobs
    from test_conformance_aws_jobs import IMG, doc_for, files_app, source, view

    from gateway.sources.base import Report, UpdateResult, UpdateState

    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws, serve(files_app({})) as base:
        (ex,) = await aws.create_job("j1", doc_for(base + "/f/x", IMG), ["gw"])
        devs = [("pump.1", None), ("pump_1", None)]
        src = source(port, tmp_path, devices=devs, thing="{gateway}")
        try:
            o1 = await src.check(view("pump.1"))
            assert o1 is not None
            await src.report(o1, Report(UpdateState.IDLE, UpdateResult.SUCCESS, detail="ok"))
            assert ex.status == "IN_PROGRESS"
        finally:
            await src.close()
        src = source(port, tmp_path, devices=devs, thing="{gateway}")  # a restart
        try:
            o2 = await src.check(view("pump_1"))
        finally:
            await src.close()
        assert o2 is not None, "pump_1 was never updated: pump.1's result was taken for its own"

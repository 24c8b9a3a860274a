"""Azure IoT Hub device twins for the MCUs behind the gateway: the azure_iot_hub source on
Microsoft's own SDK (``azure-iot-device``, asyncio) against ``servers/azure_hub.py`` - IoT Hub's
device-side MQTT API as Microsoft documents it, on a real mosquitto with TLS (a test CA made
here) - with simulator devices and imgtool-signed images.

Covers: a desired version -> update -> reported success (and the hostile offers: wrong
hardware, a downgrade, an image whose header is not the desired version, an oversized/deep
twin, hostile direct-method payloads); a patch missed while disconnected, recovered by the
twin re-read on reconnect; a broker restart mid-update; a cancel by direct method in each
phase; pause/resume/update_now on the ctl path; a final reported patch refused or unanswered
-> retried from the journal, never lost; configs/azure.yaml and the README section end to end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from daemon_support import serving
from fleet_servers.common import serve
from servers.azure_hub import AzureHub, hub_broker

from gateway.config import ConfigError, parse_config
from gateway.daemon import Gateway
from gateway.sim.simulator import Simulator

if not os.environ.get("CI"):  # in CI (the test extra installs the SDK) a failure, never a skip
    pytest.importorskip("azure.iot.device")
# the SDK builds its paho client with callback API version 1 (paho's DeprecationWarning)
pytestmark = pytest.mark.filterwarnings("ignore:Callback API version 1:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return a.version, bool(a.confirmed)


def files_app(blobs: dict[str, bytes], gate: dict[str, asyncio.Event] | None = None,
              started: dict[str, asyncio.Event] | None = None) -> web.Application:
    """Blob storage: ``gate[name]`` holds a download after its first half until set."""

    async def get(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        data = blobs[name]
        if gate is None or name not in gate:
            return web.Response(body=data)
        resp = web.StreamResponse()
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        if started is not None:
            started.setdefault(name, asyncio.Event()).set()
        await gate[name].wait()
        await resp.write(data[len(data) // 2:])
        return resp

    app = web.Application()
    app.router.add_get("/blob/{name}", get)
    return app


def entry(base: str, name: str, data: bytes, version: str = "2.0.0", **kw: Any) -> dict[str, Any]:
    return {"url": f"{base}/blob/{name}?sv=2024-01-01&sig=SECRET", "version": version,
            "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **kw}


def gw_cfg(bench: Any, sim: Simulator, hub: AzureHub, **source: Any) -> Any:
    data = bench.gateway_dict(sim)
    data["retry"] = {"base_s": 0.5, "max_s": 2}
    data["source"] = {"kind": "azure_iot_hub", "connection_string": hub.connection_string(),
                      "server_verification_cert": str(hub.broker.tls.ca),
                      "poll_interval_s": 1, "progress_interval_s": 0, "reconnect_interval_s": 1,
                      "request_timeout_s": 5, **source}
    return parse_config(data, bench.root / "gateway.yaml")


def mcu(hub: AzureHub, dev: str) -> dict[str, Any]:
    return dict(hub.reported.get("mcus", {}).get(dev) or {})


def outcome(hub: AzureHub, dev: str) -> dict[str, Any]:
    return dict(mcu(hub, dev).get("last_outcome") or {})


def running(cfg: Any, on_progress: Any = None) -> AbstractAsyncContextManager[Gateway]:
    return serving(Gateway(cfg, on_progress=on_progress))


async def test_desired_version_updates_and_reports_success(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=5, serial=0, image_size=24 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    async with (hub_broker(tmp_path) as broker, AzureHub(broker) as hub,
                serve(files_app({"v2": img})) as base, Simulator(bench.sim_cfg) as sim):
        hw = sim.devices["udp-1"].cfg.hardware
        hub.desired = {"mcus": {
            "udp-1": entry(base, "v2", img, hardware=hw),
            "udp-2": entry(base, "v2", img, hardware="other-board"),  # not its hardware (c)
            "udp-3": entry(base, "v2", img, version="0.9.0"),  # a downgrade (b)
            "udp-4": entry(base, "v2", img, version="2.1.0"),  # the header (a) says 2.0.0
            "udp-5": {**entry(base, "v2", img), "sha256": "ab" * 32},  # not the blob's hash
        }}
        cfg = gw_cfg(bench, sim, hub)
        gw = Gateway(cfg)
        try:
            res = await asyncio.wait_for(gw.run_once(), 60)
        finally:
            gw.close()
        assert active(sim.devices["udp-1"]) == ("2.0.0", True), res.outcomes
        for d in ("udp-2", "udp-3", "udp-4", "udp-5"):
            assert sim.devices[d].counters["upload_bytes_received"] == 0
            assert active(sim.devices[d]) == ("1.0.0", True)
    o = outcome(hub, "udp-1")
    assert o["result_name"] == "SUCCESS" and o["version"] == "2.0.0" and o["report_id"]
    assert mcu(hub, "udp-1")["state"] == "idle"
    states = [p["mcus"]["udp-1"].get("state") for p in hub.reported_patches
              if "udp-1" in p.get("mcus", {})]
    assert "downloading" in states and "updating" in states
    assert mcu(hub, "udp-1")["running_version"] == "1.0.0"  # inventory: as the device reported
    assert "hardware 'other-board'" in mcu(hub, "udp-2")["reason"]
    assert mcu(hub, "udp-2")["result_name"] == "UNSUPPORTED_PACKAGE"
    assert "downgrade" in mcu(hub, "udp-3")["reason"]
    assert "the image is version 2.0.0" in outcome(hub, "udp-4")["reason"]
    assert outcome(hub, "udp-4")["result_name"] == "UNSUPPORTED_PACKAGE"
    assert outcome(hub, "udp-5")["result_name"] == "INTEGRITY_FAILURE"
    assert "sha256 mismatch for http" in outcome(hub, "udp-5")["reason"]
    assert "SECRET" not in json.dumps(hub.reported)  # the SAS token is a credential


def reached(step: str) -> tuple[asyncio.Event, Any]:
    ev = asyncio.Event()

    def progress(dev_id: str, st: str, off: int, total: int) -> None:
        if st == step and (step != "upload" or 0 < off < total):
            ev.set()

    return ev, progress


async def test_missed_patch_recovered_by_twin_read_on_reconnect(bench_factory: Any,
                                                                tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    async with (hub_broker(tmp_path) as broker, AzureHub(broker) as hub,
                serve(files_app({"v2": img})) as base, Simulator(bench.sim_cfg) as sim):
        async with running(gw_cfg(bench, sim, hub, poll_interval_s=600)) as gw:
            await hub.wait_reported(lambda r: "udp-1" in r.get("mcus", {}))  # inventory: read
            reads = gw.source.stats["twin_reads"]  # type: ignore[attr-defined]
            await hub.set_desired({"mcus": {"udp-1": entry(base, "v2", img)}}, deliver=False)
            await broker.restart()  # the SDK reconnects: the whole twin is read again
            await hub.wait_reported(lambda r: outcome(hub, "udp-1").get("result_name") == "SUCCESS")
            assert active(sim.devices["udp-1"]) == ("2.0.0", True)
            assert gw.source.stats["twin_reads"] > reads  # type: ignore[attr-defined]


async def test_broker_restart_mid_update(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=64 * 1024,
                          device_kw={"link": {"bandwidth_bps": 60_000}})
    img = bench.images["2.0.0"].read_bytes()
    ev, progress = reached("upload")
    async with (hub_broker(tmp_path) as broker, AzureHub(broker) as hub,
                serve(files_app({"v2": img})) as base, Simulator(bench.sim_cfg) as sim):
        hub.desired = {"mcus": {"udp-1": entry(base, "v2", img)}}
        async with running(gw_cfg(bench, sim, hub), progress) as gw:
            await asyncio.wait_for(ev.wait(), 30)
            await broker.restart()
            await hub.wait_reported(lambda r: outcome(hub, "udp-1").get("result_name") == "SUCCESS",
                                    40)
            assert active(sim.devices["udp-1"]) == ("2.0.0", True)
            await sim.devices["udp-1"].wait_for(lambda _d: not gw.journal.unreported("udp-1"), 10)
    assert broker.restarts == 1


@pytest.mark.parametrize("phase", ["download", "upload", "test-run"])
async def test_cancel_by_direct_method_in_each_phase(bench_factory: Any, tmp_path: Path,
                                                      phase: str) -> None:
    kw: dict[str, Any] = {}
    if phase == "upload":
        kw = {"device_kw": {"link": {"bandwidth_bps": 40_000}}}
    bench = bench_factory(udp=1, serial=0, image_size=(96 if phase == "upload" else 16) * 1024, **kw)
    img = bench.images["2.0.0"].read_bytes()
    gate = {"v2": asyncio.Event()} if phase == "download" else None
    started: dict[str, asyncio.Event] = {"v2": asyncio.Event()}
    step = {"upload": "upload", "test-run": "wait-app-confirm"}.get(phase, "")
    ev, progress = reached(step)
    async with (hub_broker(tmp_path) as broker, AzureHub(broker) as hub,
                serve(files_app({"v2": img}, gate, started)) as base,
                Simulator(bench.sim_cfg) as sim):
        hub.desired = {"mcus": {"udp-1": entry(base, "v2", img)}}
        cfg = gw_cfg(bench, sim, hub)
        if phase == "test-run":
            data = bench.gateway_dict(sim, confirm="app",
                                      timeouts={"app_confirm_s": 120, "reset_s": 20})
            data["source"], data["retry"] = cfg.source.model_dump(mode="json"), {"base_s": 0.5}
            data["source"]["connection_string"] = hub.connection_string()
            cfg = parse_config(data, bench.root / "gateway.yaml")
        async with running(cfg, progress) as gw:
            await asyncio.wait_for((started["v2"] if phase == "download" else ev).wait(), 30)
            status, body = await hub.invoke("cancel", {"mcu": "udp-1"})
            assert status == 200, body
            if gate is not None:
                gate["v2"].set()
            await hub.wait_reported(lambda r: mcu(hub, "udp-1").get("canceled") is True, 40)
            dev = sim.devices["udp-1"]
            await dev.wait_for(lambda d: active(d) == ("1.0.0", True) and not d.image_info(1), 30)
            events = gw.journal.events("udp-1", steps=("intent-cancel",))
            assert events and "by server" in events[0][3], events  # journalled first
            await dev.wait_for(lambda _d: not gw.journal.open_intents("udp-1"), 10)
            assert (await hub.invoke("cancel", {"mcu": "udp-1"}))[0] == 409  # nothing left
        assert mcu(hub, "udp-1")["reason"].startswith("canceled")
        if phase == "download":
            assert dev.counters["upload_bytes_received"] == 0


async def test_final_report_refused_or_unanswered_is_retried_never_lost(
        bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    answers = iter([429, None, 500])  # throttled, no answer at all, server error; then 204
    refused: list[int | None] = []

    def answer(patch: dict[str, Any]) -> int | None:
        if "last_outcome" not in patch.get("mcus", {}).get("udp-1", {}):
            return 204
        status = next(answers, 204)
        refused.append(status)
        return status

    async with (hub_broker(tmp_path) as broker, AzureHub(broker) as hub,
                serve(files_app({"v2": img})) as base, Simulator(bench.sim_cfg) as sim):
        hub.reported_answer = answer
        hub.desired = {"mcus": {"udp-1": entry(base, "v2", img)}}
        async with running(gw_cfg(bench, sim, hub, request_timeout_s=1.5)) as gw:
            await hub.wait_reported(lambda r: outcome(hub, "udp-1").get("result_name") == "SUCCESS",
                                    45)
            assert refused[:4] == [429, None, 500, 204]
            await sim.devices["udp-1"].wait_for(lambda _d: not gw.journal.unreported("udp-1"), 10)
            (rep,) = [r for r in gw.journal.reports("udp-1") if r.state == "delivered"]
            assert str(outcome(hub, "udp-1")["report_id"]).endswith(f":{rep.id}")
        assert active(sim.devices["udp-1"]) == ("2.0.0", True)


async def test_direct_methods_take_the_ctl_path_hostile_payloads_refused(
        bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=2, serial=0, image_size=16 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    async with (hub_broker(tmp_path) as broker, AzureHub(broker) as hub,
                serve(files_app({"v2": img})) as base, Simulator(bench.sim_cfg) as sim):
        async with running(gw_cfg(bench, sim, hub)) as gw:
            await hub.wait_reported(lambda r: "udp-2" in r.get("mcus", {}))
            assert (await hub.invoke("reboot", {"mcu": "udp-1"}))[0] == 404
            assert (await hub.invoke("pause", {"mcu": "udp-1", "pad": "x" * 5000}))[0] == 413
            assert (await hub.invoke("pause", {"mcu": {"a": {"b": {"c": 1}}}}))[0] == 413
            assert (await hub.invoke("pause", {"mcu": 5}))[0] == 400
            assert (await hub.invoke("pause", [1, 2]))[0] == 400
            assert (await hub.invoke("pause", {"mcu": "nope"}))[0] == 404
            assert not gw.fleet.ops.is_paused("udp-1")  # nothing of that did anything
            status, body = await hub.invoke("pause", {"mcu": "udp-1", "reason": "line stop"})
            assert status == 200 and "paused" in body["result"]
            assert gw.fleet.ops.is_paused("udp-1")
            audit = gw.fleet.ops.audit_log()
            assert any("azure-iot-hub direct method" in str(a) and "pause" in str(a) for a in audit)
            await hub.set_desired({"mcus": {"udp-1": entry(base, "v2", img),
                                            "udp-2": entry(base, "v2", img)}})
            await hub.wait_reported(lambda r: outcome(hub, "udp-2").get("result_name") == "SUCCESS")
            assert sim.devices["udp-1"].counters["upload_bytes_received"] == 0  # paused
            assert (await hub.invoke("resume", {"mcu": "udp-1"}))[0] == 200
            await hub.wait_reported(lambda r: outcome(hub, "udp-1").get("result_name") == "SUCCESS")
            assert active(sim.devices["udp-1"]) == ("2.0.0", True)
            # a refused offer is reported once; update_now asks again at once (same ctl path)
            await hub.set_desired({"mcus": {"udp-2": {"version": "3.0.0", "hardware": "x"}}})
            await hub.wait_reported(lambda r: "hardware 'x'" in mcu(hub, "udp-2").get("reason", ""))
            n = len(hub.reported_patches)
            status, body = await hub.invoke("update_now", {"mcu": "udp-2"})
            assert status == 200 and "update check now" in body["result"]
            await hub.wait_reported(lambda r: any("hardware 'x'" in json.dumps(p) for p in
                                                  hub.reported_patches[n:]))
            assert (await hub.invoke("cancel", {"mcu": "udp-2"}))[0] == 409


async def test_hostile_twin_bounded_patch_flood_reread(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    deep: dict[str, Any] = {"x": 1}
    for _ in range(20):
        deep = {"d": deep}
    async with (hub_broker(tmp_path) as broker, AzureHub(broker) as hub,
                serve(files_app({"v2": img})) as base, Simulator(bench.sim_cfg) as sim):
        hub.desired = {"mcus": {f"m{i}": {"version": "1.0.0"} for i in range(40)}}  # > max_mcus
        async with running(gw_cfg(bench, sim, hub, max_mcus=32, max_patches_per_minute=10,
                                  max_twin_bytes=4096)) as gw:
            src: Any = gw.source
            await sim.devices["udp-1"].wait_for(lambda _d: gw.source_health.down, 20)
            assert "more than 32" in gw.source_health.last_error
            await hub.set_desired({"mcus": None})  # the hub's twin becomes usable
            await hub.wait_reported(lambda r: "udp-1" in r.get("mcus", {}), 20)
            await hub.set_desired({"mcus": {"junk": deep}})  # too deep: refused, not taken
            await hub.set_desired({"mcus": {"junk": None}})
            await hub.set_desired({"mcus": {"udp-1": {"version": "9.9.9", "url": "x" * 5000}}})
            for i in range(30):  # a flood: more than 10 a minute are dropped, the twin re-read
                await hub.set_desired({"mcus": {"udp-1": entry(base, "v2", img, note=str(i))}})
            await hub.wait_reported(lambda r: outcome(hub, "udp-1").get("result_name") == "SUCCESS")
            assert src.stats["refused"] >= 2 and src.stats["patches_dropped"] > 0
            assert active(sim.devices["udp-1"]) == ("2.0.0", True)
            assert sim.devices["udp-1"].counters["upload_bytes_received"] < 2 * len(img)


def readme_configuration() -> dict[str, Any]:
    """The automatic device configuration's content as the README gives it."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- azure-configuration -->\s*```json\n(.*?)```", text, re.S)
    assert m, "the README's Azure section lost its configuration example"
    return dict(json.loads(m.group(1)))


async def test_readme_section_end_to_end(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    async with (hub_broker(tmp_path) as broker, AzureHub(broker) as hub,
                serve(files_app({"sensor-2.0.0.bin": img})) as base,
                Simulator(bench.sim_cfg) as sim):
        # 1. the connection string in a file; 2. configs/azure.yaml with this bench's devices
        cs = tmp_path / "azure-connection-string"
        cs.write_text(hub.connection_string("line-3-gateway") + "\n")
        data = yaml.safe_load((ROOT / "configs" / "azure.yaml").read_text())
        assert data["source"]["connection_string"] == {"file": "/etc/smp-gateway/azure-connection-string"}
        data["source"]["connection_string"] = {"file": str(cs)}
        data["source"]["server_verification_cert"] = str(broker.tls.ca)
        sim_dev = bench.gateway_dict(sim)["devices"][0]
        hw = sim_dev["hardware"]
        data["devices"] = [{**sim_dev, "id": "sensor-1"}]
        data.update(state_dir=str(tmp_path / "state"), trusted_keys=[str(bench.key)])
        cfg = parse_config(data, tmp_path / "azure.yaml")
        # 3./4. the blob and the configuration's content, applied as IoT Hub applies it
        content = readme_configuration()["deviceContent"]
        desired: dict[str, Any] = {}
        for path, value in content.items():
            assert path.startswith("properties.desired.")
            node = desired
            *parents, last = path.split(".")[2:]
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        want = desired["mcus"]["sensor-1"]
        assert want["hardware"] == "nrf52840dk" and want["version"] == "2.0.0"
        want.update(url=f"{base}/blob/sensor-2.0.0.bin?sv=2024&sig=SAS", size=len(img),
                    sha256=hashlib.sha256(img).hexdigest(), hardware=hw)
        async with running(cfg) as gw:
            await hub.wait_reported(lambda r: "sensor-1" in r.get("mcus", {}))
            await hub.set_desired(desired)
            # 5. the reported properties the README names
            await hub.wait_reported(lambda r: outcome(hub, "sensor-1").get("result_name")
                                    == "SUCCESS")
            rep = mcu(hub, "sensor-1")
            for k in ("state", "result", "result_name", "reason", "version", "running_version",
                      "slots", "last_outcome"):
                assert k in rep, k
            assert rep["state"] == "idle" and rep["version"] == "2.0.0"
            assert active(sim.devices["udp-1"]) == ("2.0.0", True)
            # 6. a direct method as the README calls it
            status, body = await hub.invoke("pause", {"mcu": "sensor-1"})
            assert status == 200 and gw.fleet.ops.is_paused("sensor-1"), body
        assert "SAS" not in json.dumps(hub.reported)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_text("x")
    base = {"state_dir": str(tmp_path), "trusted_keys": [str(key)]}
    with pytest.raises(ConfigError, match=r"source.*exactly one of connection_string or dps"):
        parse_config({**base, "source": {"kind": "azure_iot_hub"}}, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"source\.dps.*symmetric_key"):
        parse_config({**base, "source": {"kind": "azure_iot_hub", "dps": {"id_scope": "0ne"}}},
                     tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"source\.max_mcus"):
        parse_config({**base, "source": {"kind": "azure_iot_hub", "connection_string": "x",
                                         "max_mcus": 0}}, tmp_path / "c.yaml")

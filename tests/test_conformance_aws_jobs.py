"""The MQTT-jobs source against an AWS IoT Jobs service written from AWS's documentation
(``tests/servers/aws_jobs.py``) on a real mosquitto, with simulator devices and signed images.

Covers: the service itself answering as documented; a job canceled on the server in each phase
(before the upload: nothing sent; during the upload: slot 1 erased; after the test mark: taken
back, never confirmed); one execution for several devices behind one thing (worked as a whole,
one final status); a closed execution found by a rejected progress update; upload progress in
statusDetails; a lost start-next answer asked again; separate TLS trust for broker and downloads.
"""

from __future__ import annotations

import asyncio
import datetime
import getpass
import hashlib
import ipaddress
import json
import os
import ssl
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fleet_servers.common import require_tool, serve
from fleet_servers.mosquitto import free_port, mosquitto
from servers.aws_jobs import AwsJobs

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.mcuboot import Version
from gateway.sim.simulator import Simulator
from gateway.sources.base import DeviceView, FetchError, Report, ReportRefused, UpdateResult, UpdateState
from gateway.sources.mqtt_jobs import MqttJobsSource
from gateway.sources.settings import MqttJobsSourceConfig

IMG = os.urandom(20_000)


def files_app(blobs: dict[str, bytes], on_get: Any = None) -> web.Application:
    async def get(request: web.Request) -> web.Response:
        if on_get is not None:
            await on_get(request.match_info["name"])
        return web.Response(body=blobs[request.match_info["name"]])

    app = web.Application()
    app.router.add_get("/f/{name}", get)
    return app


def doc_for(url: str, data: bytes, version: str = "2.0.0", **extra: Any) -> dict[str, Any]:
    return {"files": [{"url": url, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                       "version": version}], **extra}


def source(port: int, tmp: Path, devices: Sequence[tuple[str, str | None]] = (),
           **kw: Any) -> MqttJobsSource:
    cfg = MqttJobsSourceConfig.model_validate(
        {"host": "127.0.0.1", "port": port, "tls": False, "client_id": "gw", **kw})
    return MqttJobsSource(cfg, tmp / "state", gateway_id="gw", devices=devices)


def view(dev_id: str) -> DeviceView:
    return DeviceView(dev_id, "nrf", Version(1, 0, 0))


# -- the service answers as documented -------------------------------------------------------
async def test_service_answers_as_documented(tmp_path: Path) -> None:
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws, \
            aiomqtt.Client("127.0.0.1", port, identifier="dev") as c:
        await c.subscribe("$aws/things/t1/jobs/#", qos=1)

        async def ask(topic: str, body: Any, raw: bytes | None = None) -> tuple[str, dict[str, Any]]:
            await c.publish(topic, raw if raw is not None else json.dumps(body), qos=1)
            async for msg in c.messages:
                t = msg.topic.value
                if t.startswith(topic + "/"):
                    return t.rsplit("/", 1)[1], json.loads(msg.payload)  # type: ignore[arg-type]
            raise AssertionError("no answer")

        base = "$aws/things/t1/jobs"
        v, a = await ask(f"{base}/start-next", {"clientToken": "c1"})
        assert v == "accepted" and a["clientToken"] == "c1" and "execution" not in a
        assert isinstance(a["timestamp"], int)
        await aws.create_job("j1", {"x": 1}, ["t1", "t1"])  # one execution per (job, thing)
        assert len(aws.executions["t1"]) == 1
        v, a = await ask(f"{base}/start-next", {"clientToken": "c2", "statusDetails": {"k": "v"}})
        ex = a["execution"]
        assert (ex["jobId"], ex["status"], ex["jobDocument"], ex["statusDetails"]) == (
            "j1", "IN_PROGRESS", {"x": 1}, {"k": "v"})
        assert ex["versionNumber"] == 2 and ex["executionNumber"] == 1
        v, a = await ask(f"{base}/j1/update", {"status": "IN_PROGRESS", "statusDetails": {"k": ""}})
        assert (v, a["code"]) == ("rejected", "InvalidRequest")  # values: 1-1024 characters
        v, a = await ask(f"{base}/j1/update", {"status": "IN_PROGRESS", "statusDetails": {"b d": "x"}})
        assert a["code"] == "InvalidRequest"  # keys: [a-zA-Z0-9:_-]
        v, a = await ask(f"{base}/j1/update", {"status": "QUEUED"})
        assert a["code"] == "InvalidRequest"
        v, a = await ask(f"{base}/j1/update", {"status": "IN_PROGRESS", "expectedVersion": 7})
        assert a["code"] == "VersionMismatch" and a["executionState"]["versionNumber"] == 2
        v, a = await ask(f"{base}/j1/update", {"status": "IN_PROGRESS", "executionNumber": 9})
        assert a["code"] == "ResourceNotFound"
        v, a = await ask(f"{base}/j1/update", {"status": "SUCCEEDED", "expectedVersion": 2,
                                                "clientToken": "c3"})
        assert v == "accepted" and a["clientToken"] == "c3" and "executionState" not in a
        v, a = await ask(f"{base}/j1/get", {})
        assert (v, a["code"]) == ("rejected", "TerminalStateReached")
        assert "executionState" not in a
        v, a = await ask(f"{base}/j1/update", {"status": "FAILED"})
        assert a["code"] == "InvalidStateTransition" and a["executionState"]["status"] == "SUCCEEDED"
        v, a = await ask(f"{base}/nope/get", {})
        assert a["code"] == "ResourceNotFound"
        v, a = await ask(f"{base}/j1/frob", {})
        assert a["code"] == "InvalidTopic"
        v, a = await ask(f"{base}/get", None, raw=b"\xff{")
        assert a["code"] == "InvalidJson"
        # CancelJob without force leaves IN_PROGRESS executions alone; with force cancels them
        await aws.create_job("j2", {}, ["t1"])
        await ask(f"{base}/start-next", {})
        await aws.cancel_job("j2")
        assert aws.execution("t1", "j2").status == "IN_PROGRESS"  # type: ignore[union-attr]
        await aws.cancel_job("j2", force=True)
        assert aws.execution("t1", "j2").status == "CANCELED"  # type: ignore[union-attr]


# -- a job canceled on the server, in each phase (finding 5) -----------------------------------
def gw_cfg(bench: Any, sim: Simulator, port: int, **source: Any) -> Any:
    data = bench.gateway_dict(sim)
    data["source"] = {"kind": "mqtt_jobs", "host": "127.0.0.1", "port": port, "tls": False,
                      "poll_interval_s": 0.5, "request_timeout_s": 3, **source}
    return parse_config(data, bench.root / "gateway.yaml")


def active(dev: Any) -> tuple[str, bool]:
    a = next(s for s in dev.server.state_images() if s.active)
    return a.version, bool(a.confirmed)


async def _cancel_run(bench: Any, tmp: Path, phase: str, **dev_kw: Any) -> tuple[Any, Any, Any]:
    img = bench.images["2.0.0"].read_bytes()
    hit = asyncio.Event()
    aws_box: list[AwsJobs] = []

    async def on_get(_name: str) -> None:
        if phase == "before-upload":  # the operator cancels while the gateway downloads
            await aws_box[0].cancel_execution("j1", "udp-1", force=True)

    async with (mosquitto(tmp) as port, AwsJobs(port) as aws,
                serve(files_app({"fw.bin": img}, on_get)) as base, Simulator(bench.sim_cfg) as sim):
        aws_box.append(aws)
        await aws.create_job("j1", doc_for(base + "/f/fw.bin", img), ["udp-1"])
        data = bench.gateway_dict(sim, **dev_kw)
        data["source"] = {"kind": "mqtt_jobs", "host": "127.0.0.1", "port": port, "tls": False,
                          "poll_interval_s": 0.5, "request_timeout_s": 3}
        cfg = parse_config(data, bench.root / "gateway.yaml")

        def progress(_dev: str, st: str, off: int, total: int) -> None:
            if (phase == "upload" and st == "upload" and 0 < off < total) or (
                    phase == "marked" and st == "mark-test"):
                hit.set()

        async def operator() -> None:
            await hit.wait()
            await aws.cancel_execution("j1", "udp-1", force=True)

        op = asyncio.create_task(operator())
        gw = Gateway(cfg, on_progress=progress)
        try:
            res = await asyncio.wait_for(gw.run_once(), 90)
        finally:
            op.cancel()
            gw.close()
        return sim.devices["udp-1"], res.outcomes["udp-1"], aws.execution("udp-1", "j1")


async def test_cancel_before_upload_sends_nothing(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    dev, out, ex = await _cancel_run(bench, tmp_path, "before-upload")
    assert "canceled" in out.detail, out
    assert dev.counters["upload_bytes_received"] == 0 and dev.image_info(1) is None
    assert active(dev) == ("1.0.0", True) and dev.counters["resets"] == 0
    assert ex.status == "CANCELED" and ex.finals() == []


async def test_cancel_during_upload_erases_slot1(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=96 * 1024,
                          device_kw={"link": {"bandwidth_bps": 40_000}})
    dev, out, ex = await _cancel_run(bench, tmp_path, "upload")
    assert "canceled" in out.detail, out
    assert dev.image_info(1) is None and dev.counters["resets"] == 0
    assert active(dev) == ("1.0.0", True)
    assert ex.status == "CANCELED" and ex.finals() == []


async def test_cancel_after_mark_takes_it_back(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    dev, out, ex = await _cancel_run(bench, tmp_path, "marked", health_check_s=3.0)
    assert "canceled" in out.detail, out
    assert active(dev) == ("1.0.0", True)  # never confirmed: MCUboot reverted
    s1 = next((s for s in dev.server.state_images() if s.slot == 1), None)
    assert s1 is None or not (s1.pending or s1.confirmed)
    assert ex.status == "CANCELED" and ex.finals() == []


# -- one execution for several devices behind one thing (finding 6, and 9's progress) ----------
async def test_one_thing_for_three_devices(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=3, serial=0, image_size=64 * 1024)
    bench.sim_cfg.devices[0] = bench.sim_cfg.devices[0].model_copy(
        update={"link": bench.sim_cfg.devices[0].link.model_copy(update={"bandwidth_bps": 40_000})})
    bench.sim_cfg.devices[2] = bench.sim_cfg.devices[2].model_copy(
        update={"initial_image": bench.images["2.0.0"]})  # udp-3 is up to date already
    img = bench.images["2.0.0"].read_bytes()
    async with (mosquitto(tmp_path) as port, AwsJobs(port) as aws,
                serve(files_app({"fw.bin": img})) as base, Simulator(bench.sim_cfg) as sim):
        thing = "demo-gateway"
        (ex,) = await aws.create_job(
            "j6", doc_for(base + "/f/fw.bin", img, devices=["udp-1", "udp-3"]), [thing])
        cfg = gw_cfg(bench, sim, port, thing="{gateway}", progress_interval_s=0)
        gw = Gateway(cfg)
        try:
            res = await asyncio.wait_for(gw.run_once(), 90)
        finally:
            gw.close()
        assert active(sim.devices["udp-1"]) == ("2.0.0", True), res.outcomes
        assert active(sim.devices["udp-3"]) == ("2.0.0", True)
        assert active(sim.devices["udp-2"]) == ("1.0.0", True)  # not targeted: untouched
        assert sim.devices["udp-2"].counters["upload_bytes_received"] == 0
    assert [u["status"] for u in ex.updates if u["status"] != "IN_PROGRESS"] == ["SUCCEEDED"]
    assert ex.status == "SUCCEEDED" and ex.updates[-1]["status"] == "SUCCEEDED"
    final = ex.updates[-1]["statusDetails"]
    assert final["result:udp-1"] == "SUCCESS" and final["result:udp-3"] == "SUCCESS"
    assert not any("udp-2" in k for k in final) and "REJECTED" not in ex.history
    # upload progress reached the job while udp-1 uploaded
    pcts = [int(u["statusDetails"]["progress:udp-1"]) for u in ex.updates
            if "progress:udp-1" in u["statusDetails"]]
    assert any(0 < p < 100 for p in pcts), pcts


async def test_shared_execution_fails_with_per_device_details(tmp_path: Path) -> None:
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws, serve(files_app({})) as base:
        (ex,) = await aws.create_job("j7", doc_for(base + "/f/x", IMG), ["gw"])
        src = source(port, tmp_path, devices=[("a", None), ("b", None)], thing="{gateway}")
        try:
            oa, ob = await src.check(view("a")), await src.check(view("b"))
            assert oa is not None and ob is not None
            await src.report(oa, Report(UpdateState.IDLE, UpdateResult.SUCCESS, detail="ok"))
            assert ex.status == "IN_PROGRESS" and ex.finals() == []  # b is not done yet
            await src.report(ob, Report(UpdateState.IDLE, UpdateResult.INTEGRITY_FAILURE,
                                        detail="rolled back\nby MCUboot"))
            await aws.wait_for(lambda: ex.status == "FAILED")
            d = ex.updates[-1]["statusDetails"]
            assert d["result:a"] == "SUCCESS" and d["result:b"] == "INTEGRITY_FAILURE"
            assert d["detail:b"] == "rolled back by MCUboot"  # no control characters
            assert "failed: b INTEGRITY_FAILURE" in d["detail"]
            assert len(ex.finals()) == 1
            await src.report(ob, Report(UpdateState.IDLE, UpdateResult.INTEGRITY_FAILURE,
                                        detail="rolled back\nby MCUboot"))  # a retry: delivered
        finally:
            await src.close()


# -- a rejected progress update closes the work (finding 7) ------------------------------------
async def test_rejected_progress_update_stops_the_work(tmp_path: Path) -> None:
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws, serve(files_app({})) as base:
        await aws.create_job("j8", doc_for(base + "/f/x", IMG), ["d1"])
        src = source(port, tmp_path, devices=[("d1", None)])
        try:
            offer = await src.check(view("d1"))
            assert offer is not None and await src.canceled(offer) is None
            await aws.cancel_execution("j8", "d1", force=True)
            with pytest.raises(ReportRefused):
                await src.report(offer, Report(UpdateState.UPDATING, progress=0.2))
            aws.reject["describe"] = ["InternalError"]  # the describe would not tell
            why = await src.canceled(offer)
            assert why is not None and "canceled" in why
        finally:
            await src.close()


# -- a lost start-next answer is asked again (finding 9) ---------------------------------------
async def test_lost_start_next_answer_is_asked_again(tmp_path: Path) -> None:
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws, serve(files_app({})) as base:
        await aws.create_job("j9", doc_for(base + "/f/x", IMG), ["d1"])
        src = source(port, tmp_path, devices=[("d1", None)], request_timeout_s=0.5)
        try:
            aws.drop["start-next"] = 1
            aws.reject["start-next"] = ["RequestThrottled"]
            offer = await src.check(view("d1"))
            assert offer is not None and offer.version == Version(2, 0, 0)
            starts = [b for t, b in aws.requests if t.endswith("/start-next")]
            assert len(starts) == 3
            aws.drop["start-next"] = 5  # never answered: bounded, then a FetchError
            with pytest.raises(FetchError, match="no usable answer after 3 tries"):
                await src.check(view("d1"))
        finally:
            await src.close()


# -- separate TLS trust for the broker and for downloads (finding 8) ---------------------------
def _ca(tmp: Path, name: str) -> tuple[Any, Any, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subj = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subj).issuer_name(subj)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = tmp / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def _leaf(tmp: Path, name: str, ca_key: Any, ca_cert: Any) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    cp, kp = tmp / f"{name}.crt", tmp / f"{name}.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp


async def test_broker_and_download_trust_are_separate(tmp_path: Path) -> None:
    broker_ca = _ca(tmp_path, "broker-ca")
    files_ca = _ca(tmp_path, "files-ca")
    bcert, bkey = _leaf(tmp_path, "broker", broker_ca[0], broker_ca[1])
    fcert, fkey = _leaf(tmp_path, "files", files_ca[0], files_ca[1])
    plain = free_port()
    tls_port = free_port()
    conf = tmp_path / "mosq-tls.conf"
    conf.write_text(f"user {getpass.getuser()}\n"  # keeps the key file readable (no privilege drop)
                    f"per_listener_settings false\nallow_anonymous true\npersistence false\n"
                    f"listener {plain} 127.0.0.1\nlistener {tls_port} 127.0.0.1\n"
                    f"certfile {bcert}\nkeyfile {bkey}\n")
    proc = await asyncio.create_subprocess_exec(require_tool("mosquitto", "mosquitto"), "-c", str(conf),
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(fcert, fkey)
    app = files_app({"fw.bin": IMG})
    runner = web.AppRunner(app)
    await runner.setup()
    https_port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", https_port, ssl_context=ctx)
    await site.start()
    try:
        for _ in range(200):  # mosquitto up
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", plain)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        url = f"https://127.0.0.1:{https_port}/f/fw.bin"
        async with AwsJobs(plain) as aws:
            await aws.create_job("jt", doc_for(url, IMG), ["d1"])
            for extra, ok in (({"download_ca_file": str(files_ca[2])}, True), ({}, False)):
                src = source(tls_port, tmp_path / uuid.uuid4().hex, devices=[("d1", None)],
                             tls=True, ca_file=str(broker_ca[2]), download_retries=0, **extra)
                try:
                    offer = await src.check(view("d1"))  # over TLS, trusting the broker's CA
                    assert offer is not None
                    if ok:
                        assert (await src.fetch(offer, None)).read_bytes() == IMG
                    else:  # downloads default to the system CAs: the private root is not one
                        with pytest.raises(FetchError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
                            await src.fetch(offer, None)
                finally:
                    await src.close()
    finally:
        await runner.cleanup()
        proc.terminate()
        await proc.wait()

"""AWS IoT OTA (FreeRTOS ``afr_ota`` jobs) for the MCUs behind the gateway: the aws_ota source
against the Jobs service (``servers/aws_jobs.py``) and the MQTT streams service
(``servers/aws_streams.py``), both written from AWS's documentation, on a real mosquitto, with
simulator devices and imgtool-signed images.

Covers: a ~300 KB image over MQTT streams with lost data messages (resumed by the bitmap: each
block delivered exactly once); two files (fileid 1 and 2) of one job for two MCUs, fileid 0
ignored; a bad code-signing signature (REJECTED, zero bytes to the device); a job with only
fileid 0 left untouched; malformed documents REJECTED with the reason; the HTTP presigned-URL
variant; a gateway restart mid-stream (resumed from the bitmap in the state directory).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import random
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fleet_servers.common import serve
from fleet_servers.mosquitto import mosquitto
from servers.aws_jobs import AwsJobs
from servers.aws_streams import AwsStreams, wanted_blocks
from test_conformance_aws_jobs import active, files_app

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.sim.simulator import Simulator
from gateway.sources.aws_ota import AwsOtaSource
from gateway.sources.aws_ota.streams import Bitmap
from gateway.sources.base import DeviceView
from gateway.sources.settings import AwsOtaSourceConfig

THING = "demo-gateway"
BLOCK = 4096


def codesign(tmp: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    """A code-signing key and its self-signed certificate in a certificate store directory."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "codesign")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
    store = tmp / "certs"
    store.mkdir(exist_ok=True)
    (store / "codesign.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, store


def ota_file(fileid: int, data: bytes, key: ec.EllipticCurvePrivateKey | None,
             url: str | None = None, signed: bytes | None = None) -> dict[str, Any]:
    f: dict[str, Any] = {"filepath": f"/mcu/app-{fileid}.bin", "filesize": len(data),
                         "fileid": fileid, "certfile": "codesign.crt", "fileType": 0,
                         "unknown_key": {"ignored": True}}
    if key is not None:
        sig = key.sign(signed if signed is not None else data, ec.ECDSA(hashes.SHA256()))
        f["sig-sha256-ecdsa"] = base64.b64encode(sig).decode()
    if url is not None:
        f.update(update_data_url=url, auth_scheme="aws.s3.presigned")
    return f


def ota_doc(files: list[dict[str, Any]], protocols: tuple[str, ...] = ("MQTT",)) -> dict[str, Any]:
    return {"afr_ota": {"protocols": list(protocols), "streamname": "AFR_OTA-s1", "files": files}}


def gw_cfg(bench: Any, sim: Simulator, port: int, store: Path, **source: Any) -> Any:
    data = bench.gateway_dict(sim)
    data["source"] = {"kind": "aws_ota", "host": "127.0.0.1", "port": port, "tls": False,
                      "poll_interval_s": 0.5, "request_timeout_s": 3, "progress_interval_s": 0,
                      "routes": [{"fileid": 1, "device": "udp-1"}, {"fileid": 2, "device": "udp-2"}],
                      "code_signing_cert_dir": str(store), "block_size": BLOCK,
                      "blocks_per_request": 16, "block_timeout_s": 0.5, **source}
    return parse_config(data, bench.root / "gateway.yaml")


async def run_gw(cfg: Any, within_s: float = 60) -> Any:
    gw = Gateway(cfg)
    try:
        return await asyncio.wait_for(gw.run_once(), within_s)
    finally:
        gw.close()


def statuses(ex: Any) -> list[str]:
    return [u["status"] for u in ex.updates]


def self_tests(ex: Any, dev: str) -> list[str]:
    return [u["statusDetails"].get(f"self_test:{dev}") for u in ex.updates
            if u["statusDetails"].get(f"self_test:{dev}")]


def test_bitmap_is_lsb_first_with_bits_past_the_end_clear() -> None:
    b = Bitmap(10)
    assert bytes(b.data) == b"\xff\x03"
    b.got(0)
    b.got(9)
    assert bytes(b.data) == b"\xfe\x01" and b.missing() == 8
    assert wanted_blocks(bytes(b.data), 0, 10) == [1, 2, 3, 4, 5, 6, 7, 8]


async def test_stream_with_lost_blocks_resumes_by_bitmap(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=2, serial=0, image_size=300 * 1024, slot_size=0x60000)
    img = bench.images["2.0.0"].read_bytes()
    key, store = codesign(tmp_path)
    rng = random.Random(7)
    async with (mosquitto(tmp_path) as port, AwsJobs(port) as aws, AwsStreams(port) as st,
                Simulator(bench.sim_cfg) as sim):
        st.streams["AFR_OTA-s1"] = {1: img}
        st.lose = lambda _f, _i, nth: nth == 0 and rng.random() < 0.1  # ~10% lost once
        (ex,) = await aws.create_job("ota-1", ota_doc([ota_file(1, img, key)]), [THING])
        res = await run_gw(gw_cfg(bench, sim, port, store))
        assert active(sim.devices["udp-1"]) == ("2.0.0", True), res.outcomes
        assert sim.devices["udp-2"].counters["upload_bytes_received"] == 0
    total = (len(img) + BLOCK - 1) // BLOCK
    assert st.lost, "the test lost no block"
    # every block reached the gateway exactly once: only the missing ones were asked again
    assert sorted(st.sent) == [(1, i) for i in range(total)]
    for r in st.requests:
        assert r["o"] == 0 and r["l"] == BLOCK and r["n"] <= 16 and r["fmt"] == "cbor"
    lost = {i for _f, i in st.lost}
    later = {i for r in st.requests[1:] for i in wanted_blocks(r["b"], 0, total)}
    assert lost <= later
    assert ex.status == "SUCCEEDED" and statuses(ex)[-1] == "SUCCEEDED"
    final = ex.updates[-1]["statusDetails"]
    assert final["reason"] == "accepted v2.0.0" and final["result:udp-1"] == "SUCCESS"
    assert self_tests(ex, "udp-1")[:1] == ["ready"] and "active" in self_tests(ex, "udp-1")
    assert not list((bench.root / "gateway-state" / "aws_ota").iterdir())  # removed when done
    got = [int(u["statusDetails"]["receive"].split("/")[0]) for u in ex.updates
           if "receive" in u["statusDetails"]]
    assert got and 0 < got[0] < total and got == sorted(got), got  # download progress


async def test_two_files_for_two_mcus_fileid_0_ignored(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=3, serial=0, image_size=24 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    key, store = codesign(tmp_path)
    async with (mosquitto(tmp_path) as port, AwsJobs(port) as aws, AwsStreams(port) as st,
                Simulator(bench.sim_cfg) as sim):
        st.streams["AFR_OTA-s1"] = {0: b"connectivity", 1: img, 2: img}
        doc = ota_doc([ota_file(0, b"x" * 100, key), ota_file(1, img, key), ota_file(2, img, key)])
        (ex,) = await aws.create_job("ota-2", doc, [THING])
        res = await run_gw(gw_cfg(bench, sim, port, store))
        assert active(sim.devices["udp-1"]) == ("2.0.0", True), res.outcomes
        assert active(sim.devices["udp-2"]) == ("2.0.0", True), res.outcomes
        assert sim.devices["udp-3"].counters["upload_bytes_received"] == 0  # no route
    assert {r["f"] for r in st.requests} == {1, 2}  # fileid 0 never asked for
    assert [s for s in statuses(ex) if s != "IN_PROGRESS"] == ["SUCCEEDED"]
    final = ex.updates[-1]["statusDetails"]
    assert final["result:udp-1"] == final["result:udp-2"] == "SUCCESS"
    assert final["reason:udp-1"] == final["reason:udp-2"] == "accepted v2.0.0"


async def test_bad_code_signature_rejected_zero_bytes(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    key, store = codesign(tmp_path)
    async with (mosquitto(tmp_path) as port, AwsJobs(port) as aws, AwsStreams(port) as st,
                Simulator(bench.sim_cfg) as sim):
        st.streams["AFR_OTA-s1"] = {1: img}
        bad = ota_file(1, img, key, signed=img[:-1] + bytes([img[-1] ^ 1]))
        (ex,) = await aws.create_job("ota-3", ota_doc([bad]), [THING])
        res = await run_gw(gw_cfg(bench, sim, port, store))
        dev = sim.devices["udp-1"]
        assert dev.counters["upload_bytes_received"] == 0, res.outcomes
        assert active(dev) == ("1.0.0", True) and dev.image_info(1) is None
    assert ex.status == "REJECTED", statuses(ex)
    d = ex.updates[-1]["statusDetails"]
    assert "code signature" in d["reason"] and d["reason"].startswith("rejected")
    assert not list((bench.root / "gateway-state" / "aws_ota").iterdir())  # nothing kept
    assert d["lwm2m_result_name"] == "INTEGRITY_FAILURE"


async def test_missing_signature_rejected_before_download(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    _key, store = codesign(tmp_path)
    async with (mosquitto(tmp_path) as port, AwsJobs(port) as aws, AwsStreams(port) as st,
                Simulator(bench.sim_cfg) as sim):
        st.streams["AFR_OTA-s1"] = {1: img}
        (ex,) = await aws.create_job("ota-4", ota_doc([ota_file(1, img, None)]), [THING])
        await run_gw(gw_cfg(bench, sim, port, store))
        assert sim.devices["udp-1"].counters["upload_bytes_received"] == 0
    assert st.requests == [] and ex.status == "REJECTED"
    assert "no signature" in ex.updates[-1]["statusDetails"]["reason"]


async def test_http_presigned_url(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=24 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    key, store = codesign(tmp_path)
    async with (mosquitto(tmp_path) as port, AwsJobs(port) as aws,
                serve(files_app({"fw.bin": img})) as base, Simulator(bench.sim_cfg) as sim):
        doc = ota_doc([ota_file(1, img, key, url=base + "/f/fw.bin?X-Amz-Signature=abc")],
                      protocols=("HTTP",))
        (ex,) = await aws.create_job("ota-5", doc, [THING])
        res = await run_gw(gw_cfg(bench, sim, port, store))
        assert active(sim.devices["udp-1"]) == ("2.0.0", True), res.outcomes
    assert ex.status == "SUCCEEDED"
    assert ex.updates[-1]["statusDetails"]["reason"] == "accepted v2.0.0"


def _source(port: int, tmp: Path, **kw: Any) -> AwsOtaSource:
    cfg = AwsOtaSourceConfig.model_validate(
        {"host": "127.0.0.1", "port": port, "tls": False, "client_id": "gw", "request_timeout_s": 3,
         "routes": [{"fileid": 1, "device": "a"}], **kw})
    return AwsOtaSource(cfg, tmp / "state", gateway_id=THING, devices=[("a", None)])


@pytest.mark.parametrize("doc,why", [
    ({"files": [{"url": "https://x"}]}, "no afr_ota"),
    ({"afr_ota": {"protocols": ["FTP"], "streamname": "s", "files": [{"fileid": 1, "filesize": 9}]}},
     "protocols"),
    ({"afr_ota": {"streamname": "s", "files": []}}, "non-empty"),
    ({"afr_ota": {"streamname": "s", "files": [{"fileid": "1", "filesize": 9}]}}, "fileid"),
    ({"afr_ota": {"streamname": "a/#", "files": [{"fileid": 1, "filesize": 9}]}}, "streamname"),
    ({"afr_ota": {"streamname": "s", "files": [{"fileid": 1, "filesize": 9,
                                                "sig-sha256-ecdsa": "%%%"}]}}, "base64"),
    ({"afr_ota": {"protocols": ["HTTP"], "files": [{"fileid": 1, "filesize": 9}]}}, "no way"),
    ({"afr_ota": {"streamname": "s", "files": [{"fileid": 1, "filesize": 9}] * 2000}},
     "more than 32 files"),  # a huge files[] list: refused whole, before any per-file work
])
async def test_malformed_document_rejected_with_reason(tmp_path: Path, doc: Any, why: str) -> None:
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws:
        (ex,) = await aws.create_job("bad", doc, [THING])
        src = _source(port, tmp_path)
        try:
            assert await src.check(DeviceView("a", "nrf")) is None
        finally:
            await src.close()
    assert ex.status == "REJECTED" and why in ex.status_details["reason"], ex.status_details


async def test_job_with_only_fileid_0_left_queued(tmp_path: Path) -> None:
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws:
        doc = ota_doc([{"fileid": 0, "filesize": 100, "filepath": "/self"}])
        (ex,) = await aws.create_job("own", doc, [THING])
        src = _source(port, tmp_path)
        try:
            assert await src.check(DeviceView("a", "nrf")) is None
        finally:
            await src.close()
    assert ex.status == "QUEUED" and ex.updates == []


async def test_gateway_restart_mid_stream_resumes_by_bitmap(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=120 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    total = (len(img) + BLOCK - 1) // BLOCK
    key, store = codesign(tmp_path)
    async with (mosquitto(tmp_path) as port, AwsJobs(port) as aws, AwsStreams(port) as st,
                Simulator(bench.sim_cfg) as sim):
        st.streams["AFR_OTA-s1"] = {1: img}

        def stall(_f: int, _i: int) -> None:
            if len(st.sent) == 16:  # after two requests of 8: the service stalls
                st.hold.clear()

        st.after_block = stall
        (ex,) = await aws.create_job("ota-6", ota_doc([ota_file(1, img, key)]), [THING])
        cfg = gw_cfg(bench, sim, port, store, blocks_per_request=8, block_timeout_s=5)
        gw = Gateway(cfg)
        run = asyncio.create_task(gw.run_once())
        await st.wait_for(lambda: len(st.requests) == 3)  # the 2nd round's bitmap is saved
        run.cancel()  # the gateway goes away mid-stream
        with pytest.raises(asyncio.CancelledError):
            await run
        gw.close()
        assert sim.devices["udp-1"].counters["upload_bytes_received"] == 0
        st.after_block = None
        st.hold.set()
        res = await run_gw(gw_cfg(bench, sim, port, store, blocks_per_request=8))
        assert active(sim.devices["udp-1"]) == ("2.0.0", True), res.outcomes
    first_after = st.requests[3]
    assert wanted_blocks(first_after["b"], 0, total)[0] >= 16  # blocks 0-15 never asked again
    assert ex.status == "SUCCEEDED"


async def test_canceled_job_removes_its_stream_download(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=64 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws, AwsStreams(port) as st:
        st.streams["AFR_OTA-s1"] = {1: img}

        def stall(_f: int, _i: int) -> None:
            if len(st.sent) == 4:
                st.hold.clear()  # the rest never comes: the download is mid-way

        st.after_block = stall
        (ex,) = await aws.create_job("ota-c", ota_doc([ota_file(1, img, None)]), [THING])
        src = _source(port, tmp_path, block_size=BLOCK, blocks_per_request=4, block_timeout_s=0.3)
        root = tmp_path / "state" / "aws_ota"
        try:
            offer = await src.check(DeviceView("a", "nrf"))
            assert offer is not None
            run = asyncio.create_task(src.fetch(offer, None))
            await st.wait_for(lambda: len(st.requests) == 2)  # the 1st round's bitmap is saved
            assert any(p.suffix == ".bitmap" for p in root.iterdir())
            await aws.cancel_job("ota-c", force=True)
            assert "canceled" in (await src.canceled(offer) or "")
            with pytest.raises(Exception, match="called off"):
                await run
        finally:
            await src.close()
    assert ex.status == "CANCELED" and not list(root.iterdir())

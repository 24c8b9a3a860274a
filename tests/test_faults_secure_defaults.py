"""Secure defaults: TLS verification, secrets out of logs, signatures, downgrade and security
counter, download caps, and private state files (0600) and directories (0700)."""

from __future__ import annotations

import logging
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fleet_servers.common import serve
from fleet_servers.latest_release import ReleaseServer

from gateway import devkit
from gateway.daemon import Gateway
from gateway.download import Downloader, make_ssl
from gateway.engine import Status
from gateway.images import ImageRefused, Refusal, check_image
from gateway.mcuboot import TrustedKey
from gateway.sim.simulator import Simulator
from gateway.sources.base import DeviceView, FetchError, UpdateResult
from gateway.sources.latest_release import LatestReleaseSource
from gateway.sources.settings import (
    HawkbitSourceConfig,
    LatestReleaseSourceConfig,
    MqttJobsSourceConfig,
    RdfmSourceConfig,
)

pytestmark = pytest.mark.timeout(60)


# --- TLS ------------------------------------------------------------------------------------------
def test_tls_verification_is_on_by_default(caplog: pytest.LogCaptureFixture) -> None:
    ctx = make_ssl(None, False, "x")
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    for cfg in (RdfmSourceConfig(url="https://r"),
                HawkbitSourceConfig(url="https://h", gateway_token="t"),
                LatestReleaseSourceConfig(url="https://m", project_key="k"),
                MqttJobsSourceConfig(host="broker")):
        assert cfg.insecure is False
    assert MqttJobsSourceConfig(host="broker").tls is True
    with caplog.at_level(logging.WARNING):
        assert make_ssl(None, True, "artifact downloads") is False
    assert "verification is DISABLED for artifact downloads" in caplog.text


def test_mqtt_tls_context_verifies_and_insecure_warns(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from gateway.sources.mqtt_jobs import MqttJobsSource

    src = MqttJobsSource(MqttJobsSourceConfig(host="broker"), tmp_path, gateway_id="g")
    ctx = src._tls_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    with caplog.at_level(logging.WARNING):
        insecure = MqttJobsSource(MqttJobsSourceConfig(host="broker", insecure=True), tmp_path,
                                  gateway_id="g")._tls_context()
    assert insecure is not None and insecure.verify_mode == ssl.CERT_NONE
    assert "DISABLED" in caplog.text


# --- secrets ----------------------------------------------------------------------------------------
async def test_secrets_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-project-key-XYZ"
    srv = ReleaseServer(project_key=secret)
    srv.publish("evt", "1.1.0", b"\0" * 1000)
    caplog.set_level(logging.DEBUG)
    async with serve(srv.app()) as base:
        cfg = LatestReleaseSourceConfig(url=base, project_key=secret)
        assert secret not in repr(cfg) and secret not in str(cfg.model_dump())
        src = LatestReleaseSource(cfg, tmp_path)
        try:
            offer = await src.check(DeviceView("d", "evt"))
            assert offer is not None
            await src.fetch(offer, None)
            bad = LatestReleaseSource(LatestReleaseSourceConfig(url=base, project_key=secret + "!"),
                                      tmp_path)
            with pytest.raises(FetchError):
                await bad.check(DeviceView("d", "evt"))
            await bad.close()
        finally:
            await src.close()
    assert secret not in caplog.text


# --- images -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sec")
    key = devkit.make_key(root / "k.pem")
    return {"root": root, "key": key}


def test_unsigned_refused_unless_allowed(keyed: dict[str, Any]) -> None:
    img = devkit.sign_image(keyed["root"] / "u.bin", version="1.0.0", key=None, size=2000).read_bytes()
    keys = [TrustedKey.load(keyed["key"])]
    with pytest.raises(ImageRefused) as ei:
        check_image(img, keys)
    assert ei.value.reason == Refusal.UNSIGNED and "allow_unsigned" in ei.value.message
    info, signer = check_image(img, keys, allow_unsigned=True)
    assert signer is None and str(info.version) == "1.0.0"


async def test_security_counter_of_running_image_respected(bench_factory: Any) -> None:
    """Running image (counter 5) is in the gateway's store: a newer version with counter 3 is
    refused before a byte is sent, as MCUboot's hardware rollback protection would refuse it."""
    bench = bench_factory(udp=1, serial=0)
    v1 = devkit.sign_image(bench.root / "images" / "sc-1.0.0.bin", version="1.0.0", key=bench.key,
                           size=30_000, security_counter=5)
    v2 = devkit.sign_image(bench.updates_dir / "sc-2.0.0.bin", version="2.0.0", key=bench.key,
                           size=30_000, security_counter=3)
    for d in bench.sim_cfg.devices:
        d.initial_image = v1
    (bench.updates_dir / "manifest.yaml").write_text(f"images:\n  - {{file: {v2.name}, "
                                                     "hardware: sim_board}\n")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        gw = Gateway(bench.gateway_config(sim))
        try:
            gw.store.add_file(v1, hardware=None)  # the gateway knows the running image
            res = await gw.run_once()
        finally:
            gw.close()
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert out.detail.startswith(Refusal.SECURITY_COUNTER.value)
        assert dev.counters["upload_bytes_received"] == 0


async def test_downgrade_refused_by_default(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0, versions=("1.0.0", "0.9.0"))
    bench.publish("0.9.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        gw = Gateway(bench.gateway_config(sim))
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        assert res.outcomes[dev.id].status == Status.REFUSED
        assert res.outcomes[dev.id].detail.startswith(Refusal.NOT_NEWER.value)
        assert dev.counters["upload_bytes_received"] == 0


# --- downloads are capped ---------------------------------------------------------------------------
async def test_download_size_cap_without_content_length(tmp_path: Path) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"\0" * 4096)
        return resp

    app = web.Application()
    app.router.add_get("/a", endless)
    async with serve(app) as base:
        d = Downloader(tmp_path, retries=0)
        try:
            with pytest.raises(FetchError) as ei:
                await d.fetch(f"{base}/a", sha256=None, max_size=10_000)
        finally:
            await d.close()
    assert ei.value.result == UpdateResult.NOT_ENOUGH_FLASH
    assert not any((tmp_path / "downloads").glob("*.bin"))


# --- private state ----------------------------------------------------------------------------------
def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_state_files_0600_and_directories_0700(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0)
    image = bench.images["2.0.0"].read_bytes()
    srv = ReleaseServer()
    srv.publish("sim_board", "2.0.0", image)
    async with serve(srv.app()) as base, Simulator(bench.sim_cfg) as sim:
        data = bench.gateway_dict(sim)
        data["source"] = {"kind": "latest_release", "url": base, "project_key": srv.project_key}
        from gateway.config import parse_config

        cfg = parse_config(data, bench.root / "gw.yaml")
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        assert res.ok, res.outcomes
    state = cfg.state_dir
    dirs = [state, state / "images", state / "downloads"]
    files = [state / "journal.sqlite", *(state / "images").glob("*.bin"),
             *(state / "downloads").glob("*.bin"),
             *[p for p in state.glob("journal.sqlite-*")]]
    # RDFM device keys
    from gateway.sources.rdfm import RdfmSource

    rdfm = RdfmSource(RdfmSourceConfig(url="https://r", key_bits=2048), state)
    rdfm._load_or_create_key("dev-1")
    dirs.append(rdfm.key_path("dev-1").parent)
    files.append(rdfm.key_path("dev-1"))
    await rdfm.close()
    assert len(files) >= 4
    bad = {str(p): oct(_mode(p)) for p in dirs if _mode(p) & 0o077}
    bad |= {str(p): oct(_mode(p)) for p in files if _mode(p) & 0o077}
    assert not bad, f"readable by others: {bad}"

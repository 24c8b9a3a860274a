"""Fault-injection matrix: every case ends with a bootable device, a truthful report and no
unverified byte on the device. Each case adds a row to docs/reliability.md (see conftest.py).

The simulator's fault knobs live in gateway/sim/faults.py; fleet-server faults use the
loopback release server of tests/fleet_servers with the real ``LatestReleaseSource`` and
``Downloader``.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import os
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fleet_servers.common import serve
from fleet_servers.latest_release import ReleaseServer

from gateway.daemon import Gateway
from gateway.demo import Bench
from gateway.engine import Status
from gateway.mcuboot import parse_image
from gateway.sim.device import SimDevice
from gateway.sim.simulator import Simulator
from gateway.sources.base import FleetSource, Offer, Report, UpdateResult
from gateway.sources.latest_release import LatestReleaseSource
from gateway.sources.settings import LatestReleaseSourceConfig

pytestmark = pytest.mark.timeout(120)


# --- the verdict every case ends with ----------------------------------------------------------
@dataclass
class Run:
    """What happened across the gateway passes of one case."""

    outcomes: list[Any] = field(default_factory=list)  # Outcome per pass (this device)
    reports: list[list[Report]] = field(default_factory=list)  # finished reports per pass
    notes: list[str] = field(default_factory=list)


def verified_shas(state_dir: Path) -> set[bytes]:
    d = state_dir / "images"
    return {hashlib.sha256(p.read_bytes()).digest() for p in d.glob("*.bin")} if d.is_dir() else set()


def unverified_bytes(dev: SimDevice, state_dir: Path) -> int:
    ok = verified_shas(state_dir)
    starts = [bytes.fromhex(e.detail["sha"]) for e in dev.events if e.kind == "upload-start"]
    if any(s not in ok for s in starts):
        return int(dev.counters["upload_bytes_received"])
    if not starts and dev.counters["upload_bytes_received"]:
        return int(dev.counters["upload_bytes_received"])
    return 0


def active_slot(dev: SimDevice) -> Any:
    return next((s for s in dev.server.state_images() if s.active), None)


async def verdict(
    reliability: list[dict[str, Any]], case: str, link: str, dev: SimDevice, state_dir: Path,
    run: Run, target_hash: bytes, t0: float, *, faults: str = "", expect: set[Status] | None = None,
) -> None:
    """Check and record the case: report truth, then power-cycle and check bootability."""
    problems: list[str] = []
    # 1. the source was told the truth, every time it had offered something
    for i, (out, reps) in enumerate(zip(run.outcomes, run.reports, strict=True)):
        if out.status in (Status.UPDATED, Status.ROLLED_BACK, Status.REFUSED) and len(reps) != 1:
            problems.append(f"pass {i + 1}: {out.status} but {len(reps)} final reports")
        if len(reps) > 1:
            problems.append(f"pass {i + 1}: {len(reps)} final reports")
        for r in reps:
            if (r.result == UpdateResult.SUCCESS) != (out.status in (Status.UPDATED, Status.UP_TO_DATE)):
                problems.append(f"pass {i + 1}: reported {r.result.name} for {out.status}")
    act = active_slot(dev)
    on_target = (act is not None and act.hash is not None and bytes(act.hash) == target_hash
                 and bool(act.confirmed))
    last_ok = [o for o in run.outcomes if o.status != Status.UP_TO_DATE]
    final = run.outcomes[-1] if run.outcomes else None
    if final is not None and final.status == Status.UPDATED and not on_target:
        problems.append("reported updated, but the device does not run the target confirmed")
    if final is not None and final.status != Status.UPDATED and on_target and not (
            final.status == Status.UP_TO_DATE and any(o.status == Status.UPDATED for o in last_ok)):
        problems.append(f"reported {final.status}, but the device runs the target confirmed")
    report_ok = not problems
    if expect is not None and final is not None and final.status not in expect:
        problems.append(f"final outcome {final.status} ({final.detail}), expected {expect}")
    # 2. no byte of an image the gateway did not verify
    unverified = unverified_bytes(dev, state_dir)
    if unverified:
        problems.append(f"{unverified} unverified bytes uploaded")
    # 3. the worst case: power goes now. The device must boot a confirmed image.
    await dev.power_cycle(wait=True)
    act = active_slot(dev)
    bootable = dev.state == "running" and act is not None and bool(act.confirmed)
    confirmed = f"{act.version}" if bootable and act is not None else "-"
    if bootable and act is not None and on_target and bytes(act.hash) != target_hash:
        problems.append("the confirmed target did not survive a power cycle")
    if not bootable:
        problems.append(f"device not bootable on a confirmed image: state={dev.state} "
                        f"boots={dev.boot_outcomes[-3:]}")
    fired = dict(dev.faults.fired)
    for e in dev.events:
        if e.kind in ("crash", "hang"):
            k = f"{e.kind}({e.detail.get('reason', e.detail.get('version', ''))})"
            fired[k] = fired.get(k, 0) + 1
    c = dev.counters
    for k in ("lost_requests", "lost_responses", "dropped_oversize"):
        if c[k]:
            fired[k.replace("_", "-")] = c[k]
    link_faults = ", ".join(f"{k} x{v}" for k, v in sorted(fired.items()))
    reliability.append({
        "case": case, "link": link,
        "faults": "; ".join(x for x in (faults, link_faults) if x) or "-",
        "outcomes": " → ".join(o.status.value for o in run.outcomes) or "-",
        "bootable": bootable, "confirmed": confirmed, "report_ok": report_ok,
        "unverified_bytes": unverified, "seconds": time.monotonic() - t0,
        "note": "; ".join(run.notes),
    })
    assert not problems, problems


# --- a recording source over the local directory --------------------------------------------
class Recording(FleetSource):
    """Wraps a real source and keeps every report (the 'server side' of the truth check)."""

    def __init__(self, inner: FleetSource) -> None:
        self.inner = inner
        self.name = inner.name
        self.reports: list[tuple[str, Report]] = []

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def check(self, device: Any) -> Offer | None:
        return await self.inner.check(device)

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        return await self.inner.fetch(offer, max_size)

    async def report(self, offer: Offer, report: Report) -> None:
        self.reports.append((offer.device_id, report))
        await self.inner.report(offer, report)

    def poll_interval(self) -> float:
        return self.inner.poll_interval()


async def run_passes(
    bench: Bench, sim: Simulator, *, passes: int = 1, gw_kw: dict[str, Any] | None = None,
    source: Callable[[], FleetSource] | None = None,
    between: Callable[[int], Awaitable[None]] | None = None,
) -> Run:
    """Up to ``passes`` gateway passes (stopping at the first success)."""
    run = Run()
    (dev_id,) = sim.devices
    for i in range(passes):
        cfg = bench.gateway_config(sim, **(gw_kw or {}))
        cfg = cfg.model_copy(update={"retry": cfg.retry.model_copy(update={"base_s": 0.01})})
        from gateway.sources import build_source

        src = Recording(source() if source else build_source(cfg))
        gw = Gateway(cfg, source=src)
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        out = res.outcomes[dev_id]
        run.outcomes.append(out)
        run.reports.append([r for d, r in src.reports if d == dev_id and r.finished])
        if out.ok:
            break
        if between is not None and i + 1 < passes:
            await between(i)
    return run


def target_hash(bench: Bench, version: str = "2.0.0") -> bytes:
    return parse_image(bench.images[version].read_bytes()).hash


# --- device and link faults -------------------------------------------------------------------
LINK_CASES: list[tuple[str, str, dict[str, Any], dict[str, Any], set[Status], int]] = [
    # (case, link, device knobs, gateway device config, acceptable final outcome, passes)
    ("udp-loss-1%", "udp", {"link": {"request_loss": 0.01, "response_loss": 0.01, "seed": 1}},
     {}, {Status.UPDATED}, 1),
    ("udp-loss-5%", "udp", {"link": {"request_loss": 0.05, "response_loss": 0.05, "seed": 2}},
     {}, {Status.UPDATED}, 1),
    ("udp-loss-20%", "udp", {"link": {"request_loss": 0.2, "response_loss": 0.2, "seed": 3}},
     {"timeouts": {"reset_s": 20, "request_s": 0.5}}, {Status.UPDATED}, 1),
    ("udp-duplicate-and-reorder", "udp",
     {"link": {"duplicate": 0.2, "reorder": 0.2, "reorder_delay_s": 0.03, "seed": 4}},
     {}, {Status.UPDATED}, 1),
    ("serial-loss-5%", "serial", {"link": {"request_loss": 0.05, "response_loss": 0.05, "seed": 5}},
     {}, {Status.UPDATED}, 1),
    ("reset-mid-upload", "udp", {"reboot_during_upload_at": 40_000}, {}, {Status.UPDATED}, 2),
    ("power-cut-mid-swap", "udp", {"power_cut_during_swap": True}, {}, {Status.UPDATED}, 1),
    ("power-cut-mid-swap", "serial", {"power_cut_during_swap": True}, {}, {Status.UPDATED}, 1),
    ("new-image-crashes-on-boot", "udp", {"crash_on_boot_versions": ["2.0.0"], "crash_after_s": 0.2},
     {"health_check_s": 2.0}, {Status.ROLLED_BACK}, 1),
    ("new-image-hangs-watchdog", "udp", {"hang_on_boot_versions": ["2.0.0"], "hang_watchdog_s": 1.5},
     {}, {Status.ROLLED_BACK}, 1),
    ("new-image-hangs-no-watchdog", "udp", {"hang_on_boot_versions": ["2.0.0"]},
     {"timeouts": {"reset_s": 4, "request_s": 1.0}}, {Status.FAILED}, 1),
    ("malformed-cbor-responses", "udp",
     {"response_faults": [{"kind": "malformed-cbor", "every": 4, "count": 4}]}, {}, {Status.UPDATED}, 1),
    ("malformed-cbor-responses", "serial",
     {"response_faults": [{"kind": "malformed-cbor", "every": 4, "count": 4}]}, {}, {Status.UPDATED}, 1),
    ("truncated-responses", "udp",
     {"response_faults": [{"kind": "truncated", "every": 5, "count": 3}]}, {}, {Status.UPDATED}, 1),
    ("wrong-sequence-numbers", "udp",
     {"response_faults": [{"kind": "wrong-seq", "every": 3, "count": 5}]}, {}, {Status.UPDATED}, 1),
    ("wrong-group-in-response", "udp",
     {"response_faults": [{"kind": "wrong-group", "every": 4, "count": 3}]}, {}, {Status.UPDATED}, 1),
    ("oversized-responses", "udp",
     {"response_faults": [{"kind": "oversized", "every": 3, "count": 4, "size": 8000}]}, {},
     {Status.UPDATED}, 1),
    ("oversized-responses", "serial",
     {"response_faults": [{"kind": "oversized", "every": 3, "count": 4, "size": 8000}]}, {},
     {Status.UPDATED}, 1),
]


@pytest.mark.parametrize(("case", "link", "knobs", "gw_kw", "expect", "passes"), LINK_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in LINK_CASES])
async def test_device_and_link_faults(bench_factory: Any, reliability: list[dict[str, Any]], case: str,
                                      link: str, knobs: dict[str, Any], gw_kw: dict[str, Any],
                                      expect: set[Status], passes: int) -> None:
    t0 = time.monotonic()
    serial = link == "serial"
    bench = bench_factory(udp=0 if serial else 1, serial=1 if serial else 0, device_kw=knobs)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        run = await run_passes(bench, sim, passes=passes, gw_kw=gw_kw)
        if case == "new-image-hangs-no-watchdog":
            run.notes.append("without a watchdog the hung image cannot be reached; the gateway "
                             "reports the failure and the next power cycle (this check) reverts it")
        knob_text = ", ".join(f"{k}={v}" for k, v in knobs.items() if k != "response_faults")
        knob_text = knob_text.replace("'seed'", "'s'").replace("{", "").replace("}", "")
        await verdict(reliability, case, link, dev, bench.root / "gateway-state", run, target_hash(bench),
                      t0, faults=knob_text, expect=expect)
    if case.startswith("power-cut"):
        assert dev.faults.fired.get("power-cut-during-swap") == 1
        assert any(o.startswith("resumed") for o in dev.boot_outcomes), dev.boot_outcomes


async def test_pty_closed_mid_transfer(bench_factory: Any, tmp_path: Path,
                                       reliability: list[dict[str, Any]]) -> None:
    """Cable pulled mid-upload: the PTY vanishes, then reappears at the same path."""
    t0 = time.monotonic()
    link = tmp_path / "ttyFAULT"
    bench = bench_factory(udp=0, serial=1, device_kw={
        "serial": {"link": str(link)}, "unplug_during_upload_at": 30_000, "unplug_for_s": 0.8})
    bench.publish("2.0.0")

    async def wait_replug(_: int) -> None:
        for _ in range(100):
            if link.exists():
                return
            await asyncio.sleep(0.05)

    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        run = await run_passes(bench, sim, passes=3, between=wait_replug)
        # the engine re-opens the port when it comes back and resumes within the same attempt
        assert [o.status for o in run.outcomes] == [Status.UPDATED]
        assert 0 < run.outcomes[0].resumed_from < len(bench.images["2.0.0"].read_bytes())
        await verdict(reliability, "pty-closed-mid-transfer", "serial", dev, bench.root / "gateway-state",
                      run, target_hash(bench), t0, expect={Status.UPDATED})
    assert dev.faults.fired.get("unplug") == 1


async def test_device_never_comes_back(bench_factory: Any, reliability: list[dict[str, Any]]) -> None:
    """The device dies at the reset that should boot the new image; power returns later."""
    t0 = time.monotonic()
    bench = bench_factory(udp=1, serial=0, device_kw={"dead_after_reset": 1})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()

        async def power_back(_: int) -> None:
            await dev.power_cycle(wait=True)

        run = await run_passes(bench, sim, passes=2, between=power_back,
                               gw_kw={"timeouts": {"reset_s": 2, "request_s": 1.0}})
        assert run.outcomes[0].status == Status.FAILED
        assert run.outcomes[0].result == UpdateResult.CONNECTION_LOST
        assert "did not come back" in run.outcomes[0].detail
        run.notes.append("pass 1 reports the lost device (connection lost); power returns, MCUboot "
                         "test-boots the pending image and pass 2 confirms it (journal: tested_hash)")
        await verdict(reliability, "device-never-comes-back-after-reset", "udp", dev,
                      bench.root / "gateway-state", run, target_hash(bench), t0, expect={Status.UPDATED})


# --- fleet-server faults ------------------------------------------------------------------------
class _Release(LatestReleaseSource):
    pass


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    c, k = tmp / "cert.pem", tmp / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


FLEET_CASES = ["http-5xx-then-ok", "http-read-timeout", "tls-untrusted-certificate",
               "truncated-download-resumed", "wrong-hash"]


@pytest.mark.parametrize("case", FLEET_CASES)
async def test_fleet_server_faults(bench_factory: Any, tmp_path: Path, reliability: list[dict[str, Any]],
                                   case: str) -> None:
    t0 = time.monotonic()
    bench = bench_factory(udp=1, serial=0)
    image = bench.images["2.0.0"].read_bytes()
    srv = ReleaseServer()
    srv.publish("sim_board", "2.0.0", image)
    name = "sim_board-2.0.0.bin"
    faults = ""
    expect = {Status.UPDATED}
    opts: dict[str, Any] = {"download_retries": 3, "download_read_timeout_s": 5.0,
                            "request_timeout_s": 5.0}
    if case == "http-5xx-then-ok":
        srv.files.fail[name] = [500, 502, 503]
        faults = "artifact URL answers 500, 502, 503 before 200"
    elif case == "http-read-timeout":
        srv.files.release = asyncio.Event()  # headers, then silence
        opts["download_read_timeout_s"] = 0.3
        opts["download_retries"] = 1
        faults = "server stops sending after the headers"
        expect = {Status.FAILED}
    elif case == "truncated-download-resumed":
        srv.files.cut_after[name] = 30_000
        faults = "connection closed after 30000 bytes"
    elif case == "wrong-hash":
        srv.files.corrupt.add(name)
        faults = "one byte of the artifact flipped (sha256 mismatch)"
        expect = {Status.FAILED}
    else:
        faults = "HTTPS with a self-signed certificate the gateway does not trust"
        expect = {Status.FAILED}

    async def run_with(base: str) -> Run:
        def src() -> FleetSource:
            cfg = LatestReleaseSourceConfig(url=base, project_key=srv.project_key, **opts)
            return _Release(cfg, bench.root / "gateway-state")

        async with Simulator(bench.sim_cfg) as sim:
            (dev,) = sim.devices.values()
            run = await run_passes(bench, sim, source=src)
            rx = dev.counters["upload_bytes_received"]
            if expect == {Status.FAILED}:
                assert rx == 0, "nothing may reach the device when the download fails"
                out = run.outcomes[-1]
                assert out.result in (UpdateResult.INTEGRITY_FAILURE, UpdateResult.CONNECTION_LOST), out
            await verdict(reliability, case, "udp + HTTP(S)", dev, bench.root / "gateway-state", run,
                          target_hash(bench), t0, faults=faults, expect=expect)
            return run

    if case == "tls-untrusted-certificate":
        cert, key = _self_signed(tmp_path)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        runner = web.AppRunner(srv.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            run = await run_with(f"https://127.0.0.1:{port}")
        finally:
            await runner.cleanup()
        assert "certificate" in run.outcomes[-1].detail.lower(), run.outcomes[-1].detail
        assert not srv.queries, "the request must not reach the application over unverified TLS"
        return
    async with serve(srv.app()) as base:
        try:
            run = await run_with(base)
        finally:
            if srv.files.release is not None:
                srv.files.release.set()
    if case == "truncated-download-resumed":
        assert srv.files.range_requests(name), "the download must resume with a Range request"


# --- the gateway's own disk is full -----------------------------------------------------------------
@pytest.fixture
def tiny_state_dir(tmp_path: Path) -> Any:
    d = tmp_path / "tiny"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(d)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate ENOSPC: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


async def test_state_directory_full(bench_factory: Any, tiny_state_dir: Path,
                                    reliability: list[dict[str, Any]]) -> None:
    """The state directory's filesystem fills up once the gateway has started (ENOSPC):
    48 KiB are left, the journal still fits, the 97 KiB image does not."""
    t0 = time.monotonic()
    bench = bench_factory(udp=1, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        run = Run()
        cfg = bench.gateway_config(sim).model_copy(update={"state_dir": tiny_state_dir})
        from gateway.sources import build_source

        src = Recording(build_source(cfg))
        gw = Gateway(cfg, source=src)
        filler = tiny_state_dir / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        os.truncate(filler, max(0, filler.stat().st_size - 48 * 1024))
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        out = res.outcomes[dev.id]
        run.outcomes.append(out)
        run.reports.append([r for d, r in src.reports if d == dev.id and r.finished])
        assert out.status == Status.FAILED, out
        assert "No space left" in out.detail or "full" in out.detail, out.detail
        assert str(tiny_state_dir) in out.detail, out.detail
        assert dev.counters["upload_bytes_received"] == 0
        await verdict(reliability, "state-directory-full-ENOSPC", "udp", dev, tiny_state_dir, run,
                      target_hash(bench), t0, faults="state_dir on a full tmpfs (48 KiB left)",
                      expect={Status.FAILED})

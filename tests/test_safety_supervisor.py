"""Finding 3: one device's unexpected exception never stops the daemon, and a dead supervisor
never exits 0.

Only SMP/transport/OS errors used to be caught per attempt: any other exception ended that
device's supervisor, the daemon took it for a stop, dropped the exception and exited 0 - so
systemd's ``Restart=on-failure`` never restarted it. The image store, which named files by the
image's hash TLV, produced such an exception: two files of one image (the same hash TLV, other
bytes, e.g. two ECDSA signatures) overwrote each other and the first one's ``read()`` raised.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any

import pytest

from gateway import cli, devkit
from gateway.daemon import Gateway
from gateway.engine import Status, Step
from gateway.images import ImageStore
from gateway.mcuboot import TrustedKey, parse_image
from gateway.sim.simulator import Simulator
from gateway.sources import build_source
from gateway.sources.base import FleetSource, Offer, Report, UpdateResult

pytestmark = pytest.mark.timeout(120)


def test_store_keeps_two_files_of_one_image_apart(tmp_path: Path) -> None:
    key = devkit.make_key(tmp_path / "k.pem")
    payload = devkit.fake_firmware(4096, "same")
    a = devkit.sign_image(tmp_path / "a.bin", version="2.0.0", key=key, payload=payload)
    b = devkit.sign_image(tmp_path / "b.bin", version="2.0.0", key=key, payload=payload)
    ia, ib = parse_image(a.read_bytes()), parse_image(b.read_bytes())
    assert ia.hash == ib.hash and a.read_bytes() != b.read_bytes()  # ECDSA: new signature
    store = ImageStore(tmp_path / "images", [TrustedKey.load(key)])
    va = store.add_file(a, hardware=None)
    vb = store.add_file(b, hardware=None)
    assert va.path != vb.path
    assert va.read() == a.read_bytes() and vb.read() == b.read_bytes()
    # each file is named by the SHA-256 of exactly the bytes it holds
    for v in (va, vb):
        assert v.path.name == f"{hashlib.sha256(v.path.read_bytes()).hexdigest()}.bin"


class Recording(FleetSource):
    def __init__(self, inner: FleetSource) -> None:
        self.inner = inner
        self.name = inner.name
        self.finals: list[tuple[str, Report]] = []

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def check(self, device: Any) -> Offer | None:
        return await self.inner.check(device)

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        return await self.inner.fetch(offer, max_size)

    async def report(self, offer: Offer, report: Report) -> None:
        if report.finished:
            self.finals.append((offer.device_id, report))
        await self.inner.report(offer, report)

    def poll_interval(self) -> float:
        return self.inner.poll_interval()


async def test_one_devices_exception_is_its_failed_outcome(bench_factory: Any,
                                                           caplog: Any) -> None:
    """A bug hit in one device's attempt (here: the progress callback raises for udp-1 as its
    upload starts) fails that attempt - journaled, reported, logged with its traceback - while
    the daemon keeps running: udp-2 is updated and udp-1 is retried."""
    bench = bench_factory(udp=2, serial=0, image_size=8 * 1024)
    bench.publish("2.0.0")
    caplog.set_level(logging.INFO)
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim, health_check_s=0.3)
        cfg = cfg.model_copy(update={"retry": cfg.retry.model_copy(
            update={"base_s": 0.05, "max_s": 0.2, "max_attempts": 100})})
        raised = [0]

        def progress(device_id: str, step: str, off: int, total: int) -> None:
            if device_id == "udp-1" and step == Step.UPLOAD.value:
                raised[0] += 1
                raise RuntimeError("progress display bug")

        src = Recording(build_source(cfg))
        gw = Gateway(cfg, source=src, on_progress=progress)
        stop = asyncio.Event()
        daemon = asyncio.create_task(gw.run_forever(stop))
        try:
            good = sim.devices["udp-2"]
            updated = asyncio.create_task(good.wait_for(
                lambda d: any(s.active and s.version == "2.0.0" and s.confirmed
                              for s in d.server.state_images()), 30))
            await asyncio.wait([daemon, updated], timeout=30,
                               return_when=asyncio.FIRST_COMPLETED)
            assert not daemon.done(), "the daemon stopped on one device's exception"
            await updated
            for _ in range(200):
                if raised[0] >= 2 or daemon.done():
                    break
                await asyncio.sleep(0.05)
            assert not daemon.done(), "the daemon stopped on one device's exception"
            assert raised[0] >= 2, "udp-1 was not retried"
        finally:
            stop.set()
            await asyncio.wait_for(daemon, 30)
            gw.close()
    out = gw.last["udp-1"]
    assert out.status == Status.FAILED and "RuntimeError: progress display bug" in out.detail, out
    finals = [r for d, r in src.finals if d == "udp-1"]
    assert finals and all(r.result != UpdateResult.SUCCESS for r in finals), finals
    assert any("progress display bug" in (r.detail or "") for r in finals), finals
    from gateway.journal import Journal

    j = Journal(cfg.state_dir / "journal.sqlite")
    try:
        assert "progress display bug" in (j.get("udp-1").last_error or "")
    finally:
        j.close()
    tb = [r for r in caplog.records if r.exc_info and "udp-1" in r.getMessage()]
    assert tb, "no traceback logged for udp-1"


class PollBroken(FleetSource):
    """A source whose scheduling hook raises (a bug outside any device's attempt)."""

    def __init__(self, inner: FleetSource) -> None:
        self.inner = inner
        self.name = inner.name

    async def check(self, device: Any) -> Offer | None:
        return await self.inner.check(device)

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        return await self.inner.fetch(offer, max_size)

    async def report(self, offer: Offer, report: Report) -> None:
        await self.inner.report(offer, report)

    def poll_interval(self) -> float:
        raise RuntimeError("poll_interval bug")


async def test_dead_supervisor_makes_the_daemon_exit_nonzero(bench_factory: Any,
                                                            monkeypatch: Any) -> None:
    """``smp-gateway run`` (the CLI's daemon entry) exits 1 - so that systemd's
    Restart=on-failure restarts it - when a device's supervisor dies."""
    bench = bench_factory(udp=2, serial=0, image_size=8 * 1024)
    bench.publish("1.0.0")  # up to date: the supervisor asks the source when to poll again
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim)
        monkeypatch.setattr("gateway.daemon.build_source",
                            lambda c: PollBroken(build_source(c)))
        rc = await asyncio.wait_for(cli._run(cfg, False), 60)
    assert rc == cli.EXIT_FAILED

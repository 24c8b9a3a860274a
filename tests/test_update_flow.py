"""End-to-end updates of simulated devices: real UDP sockets, real PTYs, imgtool images."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from gateway import devkit
from gateway.config import GatewayConfig
from gateway.daemon import Gateway, Pass, make_transport
from gateway.engine import Status
from gateway.images import Refusal
from gateway.mcuboot import parse_image
from gateway.sim.simulator import Simulator
from gateway.smp.session import SMPSession
from gateway.sources.base import DeviceView, FleetSource, Offer, Report, UpdateResult


def active(dev: object) -> tuple[str, bool]:
    st = dev.server.state_images()  # type: ignore[attr-defined]
    a = next(s for s in st if s.active)
    return a.version, bool(a.confirmed)


def uploads(dev: object) -> int:
    return int(dev.counters["requests.1.1"])  # type: ignore[attr-defined]


async def run_pass(cfg: GatewayConfig, source: FleetSource | None = None) -> Pass:
    """One ``--once`` pass of a fresh Gateway (closing its journal afterwards)."""
    gw = Gateway(cfg, source=source)
    try:
        return await gw.run_once()
    finally:
        gw.close()


class StaticSource(FleetSource):
    """A source that offers one given file to every device (an input, not the code under test)."""

    name = "static"

    def __init__(self, path: Path, hardware: str | None = "sim_board") -> None:
        self.path = path
        self.hardware = hardware
        self.reports: list[tuple[str, Report]] = []

    async def check(self, device: DeviceView) -> Offer | None:
        return Offer(device_id=device.id, source=self.name, artifact_id=self.path.name,
                     hardware=self.hardware)

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        return self.path

    async def report(self, offer: Offer, report: Report) -> None:
        self.reports.append((offer.device_id, report))


async def test_full_update_udp_and_serial(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=1)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        res = await run_pass(bench.gateway_config(sim))
        assert res.ok, res.outcomes
        for dev in sim.devices.values():
            assert active(dev) == ("2.0.0", True)
            assert dev.boot_outcomes[-1] == "swap"
        assert {o.status for o in res.outcomes.values()} == {Status.UPDATED}
        # a second pass finds everything up to date and sends no upload
        before = {i: uploads(d) for i, d in sim.devices.items()}
        res2 = await run_pass(bench.gateway_config(sim))
        assert {o.status for o in res2.outcomes.values()} == {Status.UP_TO_DATE}
        assert {i: uploads(d) for i, d in sim.devices.items()} == before


async def test_app_confirm_policy(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, device_kw={"app_confirms_after_s": 0.3})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        res = await run_pass(bench.gateway_config(sim, confirm="app"))
        (dev,) = sim.devices.values()
        assert res.ok, res.outcomes
        assert "confirmed by the application" in res.outcomes[dev.id].detail
        assert active(dev) == ("2.0.0", True)
        # the gateway never sent a confirm: the only state writes are the test mark
        writes = [e for e in dev.events if e.kind == "state-write"]
        assert writes and all(not e.detail["confirm"] for e in writes)


async def test_app_policy_without_app_confirm_reverts(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0)  # the application never confirms itself
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim, confirm="app", timeouts={"app_confirm_s": 1.5,
                                                                 "reset_s": 20, "request_s": 2})
        res = await run_pass(cfg)
        (dev,) = sim.devices.values()
        out = res.outcomes[dev.id]
        assert out.status == Status.ROLLED_BACK, out
        assert "did not confirm" in out.detail and "MCUboot reverted to 1.0.0" in out.detail
        assert active(dev) == ("1.0.0", True)


async def test_rollback_when_new_image_crashes_on_boot(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0,
                          device_kw={"crash_on_boot_versions": ["2.0.0"], "crash_after_s": 0.2})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        res = await run_pass(bench.gateway_config(sim, health_check_s=2.0))
        (dev,) = sim.devices.values()
        out = res.outcomes[dev.id]
        assert out.status == Status.ROLLED_BACK, out
        assert out.result == UpdateResult.UPDATE_FAILED
        assert "not confirmed" in out.detail
        assert active(dev) == ("1.0.0", True)
        assert "revert" in dev.boot_outcomes
        # the new image is still in the secondary slot, not pending: nothing was confirmed
        info = dev.image_info(1)
        assert info is not None and str(info.version) == "2.0.0"


async def test_mcuboot_refuses_image_the_device_does_not_trust(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0)
    other_key = devkit.make_key(bench.root / "keys" / "other.pem")
    img = devkit.sign_image(bench.root / "images" / "other-2.0.0.bin", version="2.0.0",
                            key=other_key, size=50_000)
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim)
        # the gateway trusts both keys; the device's MCUboot only the original one
        cfg = cfg.model_copy(update={"trusted_keys": [bench.key, other_key]})
        res = await run_pass(cfg, source=StaticSource(img))
        (dev,) = sim.devices.values()
        out = res.outcomes[dev.id]
        assert out.status == Status.ROLLED_BACK, out
        assert "MCUboot refused" in out.detail
        assert active(dev) == ("1.0.0", True)
        assert any(o.startswith("refused") for o in dev.boot_outcomes), dev.boot_outcomes
        assert dev.image_info(1) is None  # MCUboot erased the secondary slot


def _corrupt(src: Path, dst: Path, at: int, value: int = 0x5A) -> Path:
    data = bytearray(src.read_bytes())
    data[at] ^= value
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("case", ["bad-magic", "hash-mismatch", "untrusted", "unsigned",
                                  "too-large", "wrong-hardware", "not-newer"])
async def test_refusals_send_zero_bytes(bench_factory, case: str) -> None:
    bench = bench_factory(udp=1, serial=0, versions=("1.0.0", "2.0.0", "0.9.0"))
    v2 = bench.images["2.0.0"]
    d = bench.root / "bad"
    d.mkdir()
    hardware = "sim_board"
    device_kw: dict[str, object] = {}
    if case == "bad-magic":
        img = _corrupt(v2, d / "img.bin", 0)
        want = Refusal.BAD_FORMAT
    elif case == "hash-mismatch":
        img = _corrupt(v2, d / "img.bin", 0x200 + 100)  # a body byte
        want = Refusal.HASH_MISMATCH
    elif case == "untrusted":
        k = devkit.make_key(d / "rogue.pem")
        img = devkit.sign_image(d / "img.bin", version="3.0.0", key=k, size=40_000)
        want = Refusal.UNTRUSTED
    elif case == "unsigned":
        img = devkit.sign_image(d / "img.bin", version="3.0.0", key=None, size=40_000)
        want = Refusal.UNSIGNED
    elif case == "too-large":
        img = v2
        device_kw = {"slot_size": 64 * 1024}
        want = Refusal.TOO_LARGE
    elif case == "wrong-hardware":
        img = v2
        hardware = "other_board"
        want = Refusal.WRONG_HARDWARE
    else:
        img = bench.images["0.9.0"]
        want = Refusal.NOT_NEWER
    src = StaticSource(img, hardware=hardware)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        slot1_before = dev.slot_bytes(1)
        res = await run_pass(bench.gateway_config(sim, **device_kw), source=src)
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert out.detail.startswith(want.value), out.detail
        assert uploads(dev) == 0
        assert dev.counters["upload_bytes_received"] == 0
        assert dev.slot_bytes(1) == slot1_before
        assert active(dev) == ("1.0.0", True)
        # the source is told, in LwM2M terms
        final = [r for i, r in src.reports if r.finished]
        assert final and final[-1].result == want.lwm2m


async def test_downgrade_allowed_when_configured(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, versions=("1.0.0", "0.9.0"))
    async with Simulator(bench.sim_cfg) as sim:
        res = await run_pass(bench.gateway_config(sim, allow_downgrade=True),
                     source=StaticSource(bench.images["0.9.0"]))
        (dev,) = sim.devices.values()
        assert res.outcomes[dev.id].status == Status.UPDATED
        assert active(dev) == ("0.9.0", True)


async def test_upload_resumes_after_connection_dropped(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, device_kw={"link": {"bandwidth_bps": 200_000}})
    bench.publish("2.0.0")
    v2 = bench.images["2.0.0"].read_bytes()
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim)
        dcfg = cfg.devices[0]
        # first attempt: the link drops (session closed) once a third is on the device
        reached = asyncio.Event()

        def progress(off: int, total: int) -> None:
            if off > total // 3:
                reached.set()

        async with SMPSession(make_transport(dcfg), device_id=dcfg.id) as s:
            task = asyncio.create_task(s.upload(v2, progress=progress))
            await reached.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        received_first = dev.counters["upload_bytes_received"]
        # the gateway's pass picks up where the device stopped
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert out.resumed_from > len(v2) // 3
        assert active(dev) == ("2.0.0", True)
        assert parse_image(dev.slot_bytes(0)).hash == parse_image(v2).hash
        # the device received far less than two full images
        assert dev.counters["upload_bytes_received"] - received_first < len(v2)


async def test_gateway_does_not_confirm_an_image_it_did_not_test(bench_factory) -> None:
    """A device found test-running the target (someone else's test) is not confirmed."""
    bench = bench_factory(udp=1, serial=0)
    bench.publish("2.0.0")
    v2 = bench.images["2.0.0"].read_bytes()
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim)
        # another tool uploads, tests and resets; the device now runs 2.0.0 unconfirmed
        async with SMPSession(make_transport(cfg.devices[0]), device_id="other-tool") as s:
            await s.upload(v2)
            await s.image_test(parse_image(v2).hash)
            await s.reset()
        await dev.wait_booted(2)
        assert active(dev) == ("2.0.0", False)
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        assert out.status == Status.FAILED
        assert "did not test" in out.detail
        assert active(dev) == ("2.0.0", False)
        assert not any(e.kind == "state-write" and e.detail["confirm"] for e in dev.events)


def test_local_source_manifest_picks_newest_for_hardware(bench_factory, tmp_path: Path) -> None:
    from gateway.config import LocalSourceConfig
    from gateway.sources.local import LocalSource

    bench = bench_factory(udp=0, serial=0, versions=("1.0.0", "2.0.0", "1.5.0"))
    upd = tmp_path / "u"
    upd.mkdir()
    for v in ("1.0.0", "2.0.0", "1.5.0"):
        shutil.copy(bench.images[v], upd / f"{v}.bin")
    (upd / "manifest.yaml").write_text(
        "images:\n"
        "  - {file: 1.5.0.bin, hardware: sim_board}\n"
        "  - {file: 2.0.0.bin, hardware: other_board}\n"
        "  - {file: 1.0.0.bin, hardware: sim_board}\n"
    )
    src = LocalSource(LocalSourceConfig(path=upd))
    offer = asyncio.run(src.check(DeviceView(id="d", hardware="sim_board")))
    assert offer is not None and str(offer.version) == "1.5.0" and offer.hardware == "sim_board"
    offer2 = asyncio.run(src.check(DeviceView(id="d", hardware="nope")))
    assert offer2 is None


def test_local_source_sees_manifest_and_image_changes(bench_factory, tmp_path: Path) -> None:
    """The per-file cache must never serve a stale manifest or image."""
    from gateway.config import LocalSourceConfig
    from gateway.sources.local import LocalSource

    bench = bench_factory(udp=0, serial=0, versions=("1.0.0", "2.0.0", "3.0.0"))
    upd = tmp_path / "u"
    upd.mkdir()
    shutil.copy(bench.images["2.0.0"], upd / "app.bin")
    (upd / "manifest.yaml").write_text("images:\n  - {file: app.bin, hardware: sim_board}\n")
    src = LocalSource(LocalSourceConfig(path=upd))
    view = DeviceView(id="d", hardware="sim_board")
    first = asyncio.run(src.check(view))
    assert first is not None and str(first.version) == "2.0.0"
    # the same file name now holds 3.0.0 (a different size): picked up
    shutil.copy(bench.images["3.0.0"], upd / "app.bin")
    second = asyncio.run(src.check(view))
    assert second is not None and str(second.version) == "3.0.0"
    # the manifest now targets other hardware only: nothing for this device
    (upd / "manifest.yaml").write_text("images:\n  - {file: app.bin, hardware: other_board}\n")
    assert asyncio.run(src.check(view)) is None


async def test_status_shows_both_slots_live_and_the_journal(bench_factory) -> None:
    import sys

    bench = bench_factory(udp=1, serial=1)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim)
        assert (await run_pass(cfg)).ok
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "status", "--config", str(cfg.config_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    rows = [ln for ln in out.decode().splitlines() if "udp-1" in ln or "serial-1" in ln]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.split("│")]
        # running 2.0.0 active+confirmed; slot 1 holds the previous 1.0.0; journal says done
        assert "2.0.0" in cells and "active,confirmed" in cells and "1.0.0" in cells, cells
        assert "done (updated)" in cells and "100%" in cells, cells

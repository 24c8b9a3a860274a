"""The trust rule on image sets and direct-XIP, with hostile artifacts on the simulator.

* Which image is a network core (never test-marked, installed for good) comes from the device
  config (``images: {N: {netcore: true}}``), never from the artifact's manifest: a
  ``*_cpunet`` board or ``"netcore": true`` is only a claim, cross-checked. The version check
  applies to every member.
* Direct-XIP: the slot a build is linked for is proven by its signed ROM_FIXED load address
  against the config's ``slot_offsets``; the artifact's ``slot`` label is only cross-checked.
* The revert reset after a failed set goes through the one reset gate (maintenance windows),
  journalled first, finished when the window opens - also after a restart.

Real UDP sockets, simulated devices (their own img_mgmt / MCUboot model), imgtool-signed images.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from modes_support import (
    active,
    dfu_zip,
    entry,
    publish_entry,
    reports,
    resets,
    run_pass,
    sign,
    state_writes,
    states,
    upload_requests,
)

from gateway import devkit
from gateway.config import ConfigError, parse_config
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.images import Refusal
from gateway.sim.config import ExtraImageConfig
from gateway.sim.simulator import Simulator
from gateway.sources.base import UpdateResult

pytestmark = pytest.mark.timeout(180)

CPUNET = "nrf5340dk_nrf5340_cpunet"


def two_images(bench_factory: Any, *, update: str = "swap", **kw: Any) -> tuple[Any, dict[str, Path]]:
    """Image 0 (the application, 1.0.0) and image 1 (1.0.0), and builds for a set."""
    bench = bench_factory(udp=1, serial=0, device_kw={"buf_size": 2475, **kw})
    imgs = {
        "img1-1.0.0": sign(bench, "img1-1.0.0.bin", "1.0.0", size=16 * 1024),
        "img1-2.0.0": sign(bench, "img1-2.0.0.bin", "2.0.0", size=16 * 1024),
    }
    bench.sim_cfg.devices[0].extra_images = [
        ExtraImageConfig(slot_size=0x40000, initial_image=imgs["img1-1.0.0"], update=update)]
    return bench, imgs


def publish_zip(bench: Any, files: list[dict[str, Any]]) -> None:
    z = dfu_zip(bench.root / "dfu_application.zip", files)
    publish_entry(bench, {"file": str(z)})


# --- 1. a manifest tag never makes an image permanent ---------------------------------------
async def test_cpunet_tag_on_image_0_is_ignored_its_crash_is_reverted(bench_factory) -> None:
    """The attack: a two-image zip whose image 0 says board ``*_cpunet``; image 0 2.0.0 crashes
    at boot. Image 0 is test-marked all the same (not marked permanent by hash), the crash makes
    MCUboot revert it, the set is rolled back (LwM2M 8) and nothing is permanent."""
    bench, imgs = two_images(bench_factory, crash_on_boot_versions=["2.0.0"], crash_after_s=0.3,
                             allow_confirm_non_active_image_any=True)
    publish_zip(bench, [{"path": bench.images["2.0.0"], "image": 0, "board": CPUNET},
                        {"path": imgs["img1-2.0.0"], "image": 1}])
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, health_check_s=2.0,
                                                  images={1: {"mark": "test"}}))
        out = res.outcomes[dev.id]
        writes = state_writes(dev)
        assert {"slot": 1, "confirm": False} in writes  # image 0 test-marked
        assert not any(w["confirm"] for w in writes), writes  # nothing marked permanent
        assert out.status == Status.ROLLED_BACK, out
        assert out.result == UpdateResult.UPDATE_FAILED
        assert "permanently" not in out.detail
        assert active(dev, 0) == ("1.0.0", True, 0)
        assert active(dev, 1) == ("1.0.0", True, 0)
        assert reports(bench)[-1]["result"] == 8


async def test_a_tagged_image_0_is_version_checked(bench_factory) -> None:
    """A network-core tag used to skip the downgrade check: an older image 0 tagged cpunet (or
    ``"netcore": true``) is refused before a byte is sent."""
    bench, imgs = two_images(bench_factory)
    old = sign(bench, "img0-0.5.0.bin", "0.5.0")
    publish_zip(bench, [{"path": old, "image": 0, "board": CPUNET, "netcore": True},
                        {"path": imgs["img1-2.0.0"], "image": 1}])
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert out.detail.startswith(Refusal.NOT_NEWER.value), out.detail
        assert "image 0" in out.detail
        assert upload_requests(dev) == 0 and resets(dev) == 0 and not state_writes(dev)


@pytest.mark.parametrize("mark", [None, "test"])
async def test_cpunet_tag_on_image_1_without_config_is_an_ordinary_image(
        bench_factory, mark: str | None) -> None:
    """Image 1 tagged cpunet, the config says nothing of a network core: image 1 follows the
    ordinary rules - permanent by default (and checked as running confirmed, not as a
    consumed network core), or test-booted and confirmed by hash with ``mark: test``."""
    extra: dict[str, Any] = {"allow_confirm_non_active_image_any": True} if mark else {}
    bench, imgs = two_images(bench_factory, **extra)
    publish_zip(bench, [{"path": bench.images["2.0.0"], "image": 0},
                        {"path": imgs["img1-2.0.0"], "image": 1, "board": CPUNET}])
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        kw: dict[str, Any] = {"images": {1: {"mark": mark}}} if mark else {}
        res = await run_pass(bench.gateway_config(sim, **kw))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert "network core" not in out.detail
        writes = state_writes(dev)
        if mark == "test":
            assert {"slot": 3, "confirm": False} in writes  # test-marked like image 0
            assert "image 1 2.0.0: confirmed by the gateway" in out.detail
        else:
            assert {"slot": 3, "confirm": True} in writes
            assert "image 1 2.0.0: installed permanently" in out.detail
        assert active(dev, 0) == ("2.0.0", True, 0) and active(dev, 1) == ("2.0.0", True, 0)


async def test_config_declared_network_core_works_without_any_tag(bench_factory) -> None:
    """The config says image 1 is the network core; the zip says nothing (no board): image 1
    is marked permanent, never test-marked, and checked by its secondary being consumed."""
    bench, imgs = two_images(bench_factory, update="netcore")
    publish_zip(bench, [{"path": bench.images["2.0.0"], "image": 0},
                        {"path": imgs["img1-2.0.0"], "image": 1}])
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        assert entry(dev, 1, 0) is None  # the network core's flash is not readable
        res = await run_pass(bench.gateway_config(sim, images={1: {"netcore": True}}))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert "image 1 2.0.0: handed to the network core" in out.detail
        writes = state_writes(dev)
        assert {"slot": 3, "confirm": True} in writes
        assert not any(w["slot"] == 3 and not w["confirm"] for w in writes)
        assert {"slot": 1, "confirm": False} in writes
        assert active(dev, 0) == ("2.0.0", True, 0) and resets(dev) == 1


async def test_config_network_core_but_manifest_names_another_core_is_refused(
        bench_factory) -> None:
    """Cross-check: the config says image 1 is the network core, the artifact's manifest names
    the application core for it - a set built for another device: refused, nothing sent."""
    bench, imgs = two_images(bench_factory, update="netcore")
    publish_zip(bench, [{"path": bench.images["2.0.0"], "image": 0},
                        {"path": imgs["img1-2.0.0"], "image": 1,
                         "board": "nrf5340dk_nrf5340_cpuapp"}])
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, images={1: {"netcore": True}}))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert out.detail.startswith(Refusal.BAD_SET.value)
        assert "names another core" in out.detail
        assert upload_requests(dev) == 0 and resets(dev) == 0 and not state_writes(dev)


def test_config_refuses_a_network_core_on_image_0(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0)
    data = {"gateway_id": "g", "state_dir": str(bench.root / "st"),
            "trusted_keys": [str(bench.key)],
            "source": {"kind": "local", "path": str(bench.updates_dir)},
            "devices": [{"id": "d", "hardware": "h", "transport": {"kind": "udp", "host": "::1"},
                         "images": {0: {"netcore": True}}}]}
    with pytest.raises(ConfigError, match="never image 0"):
        parse_config(data, bench.root / "gw.yaml")
    data["devices"][0]["images"] = {1: {"netcore": True}}
    assert parse_config(data, bench.root / "gw.yaml").devices[0].images[1].netcore


# --- 6. direct-XIP: the signed load address decides, never the label -------------------------
SLOT0, SLOT1 = 0x10000, 0x50000  # the bench's slots (256 KiB each, packed from 0x10000)
XIP = {"mcuboot_mode": "direct-xip-with-revert", "flash_offsets": [SLOT0, SLOT1]}


def swapped_builds(bench: Any) -> tuple[Path, Path]:
    """2.0.0 linked for slot 0 and for slot 1, published with their ``slot`` labels swapped."""
    b0 = sign(bench, "app-2.0.0-slot0.bin", "2.0.0", "--rom-fixed", hex(SLOT0))
    b1 = sign(bench, "app-2.0.0-slot1.bin", "2.0.0", "--rom-fixed", hex(SLOT1))
    publish_entry(bench, {"images": [{"file": str(b0), "slot": 1}, {"file": str(b1), "slot": 0}]})
    return b0, b1


def image_hash(path: Path) -> str:
    from gateway.mcuboot import parse_image

    return parse_image(path.read_bytes()).hash.hex()


async def test_xip_swapped_labels_without_slot_offsets_are_refused(bench_factory) -> None:
    """Labels swapped, no slot_offsets: the label would send the slot-0 build into slot 1 (and
    MCUboot would skip it forever). Refused before a byte, the device untouched, the reason
    naming the config key."""
    bench = bench_factory(udp=1, serial=0, device_kw=XIP)
    swapped_builds(bench)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        before = states(dev)
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert out.detail.startswith(Refusal.WRONG_SLOT.value), out.detail
        assert "slot_offsets" in out.detail
        assert out.bytes_uploaded == 0
        assert upload_requests(dev) == 0 and resets(dev) == 0 and not state_writes(dev)
        assert entry(dev, 0, 1) is None
        assert states(dev) == before
        assert reports(bench)[-1]["result"] == int(Refusal.WRONG_SLOT.lwm2m)


async def test_xip_swapped_labels_with_slot_offsets_send_the_signed_slot_build(
        bench_factory) -> None:
    """The same artifact with slot_offsets in the config: the build whose signed ROM_FIXED
    address is slot 1's goes to slot 1 (whatever its label says), boots and is confirmed."""
    bench = bench_factory(udp=1, serial=0, device_kw=XIP)
    _b0, b1 = swapped_builds(bench)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, slot_offsets=[SLOT0, SLOT1]))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert entry(dev, 0, 1)["hash"] == image_hash(b1)
        assert active(dev) == ("2.0.0", True, 1)


async def test_xip_correct_labels_alone_do_not_decide(bench_factory) -> None:
    """Even correctly labelled builds are not sent on the label alone (it is not signed)."""
    bench = bench_factory(udp=1, serial=0, device_kw=XIP)
    b0 = sign(bench, "app-2.0.0-slot0.bin", "2.0.0", "--rom-fixed", hex(SLOT0))
    b1 = sign(bench, "app-2.0.0-slot1.bin", "2.0.0", "--rom-fixed", hex(SLOT1))
    publish_entry(bench, {"images": [{"file": str(b0), "slot": 0}, {"file": str(b1), "slot": 1}]})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED and "slot_offsets" in out.detail, out
        assert upload_requests(dev) == 0 and resets(dev) == 0


# --- 8. the revert reset of a failed set waits for the maintenance window ---------------------
WINDOW = {"nightly": {"cron": "0 3 * * *", "duration_s": 3600, "timezone": "UTC"}}
OPEN = dt.datetime(2030, 5, 6, 3, 10, tzinfo=dt.UTC)
CLOSED = dt.datetime(2030, 5, 6, 5, 0, tzinfo=dt.UTC)
NEXT_OPEN = dt.datetime(2030, 5, 7, 3, 5, tzinfo=dt.UTC)


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def window_gateway(cfg: Any, clock: Clock, close_at_step: str | None = None) -> Gateway:
    """A gateway on the policy clock; the window closes (once) when the device first enters
    ``close_at_step`` (the device's own progress, no sleeping)."""
    armed = [close_at_step is not None]

    def progress(_dev: str, step: str, _off: int, _total: int) -> None:
        if armed[0] and step == close_at_step:
            armed[0] = False
            clock.now = CLOSED

    gw = Gateway(cfg, on_progress=progress)
    gw.fleet.maint.clock = clock
    return gw


async def test_failed_set_revert_reset_waits_for_the_window(bench_factory, tmp_path) -> None:
    """Image 1 is refused by the device's MCUboot at the set's reset while image 0 test-boots:
    the set failed and image 0 must be reset back - but the window closed during the boot. No
    reset until it opens: the intent is journalled, kept across a gateway restart, and the
    revert is done in the next window (ROLLED_BACK, LwM2M 8)."""
    bench, _imgs = two_images(bench_factory)
    other = devkit.make_key(tmp_path / "other.pem")  # trusted by the gateway, not the device
    bad1 = sign(bench, "img1-2.0.0-other.bin", "2.0.0", key=other, size=16 * 1024)
    publish_entry(bench, {"images": [{"file": str(bench.images["2.0.0"]), "image": 0},
                                     {"file": str(bad1), "image": 1}]})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        data = bench.gateway_dict(sim)
        data["trusted_keys"].append(str(other))
        data["maintenance_windows"] = WINDOW
        cfg = parse_config(data, bench.root / "gateway.yaml")
        clock = Clock(OPEN)
        gw = window_gateway(cfg, clock, close_at_step="verify")
        try:
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.HELD, out
            assert "the reset that reverts image(s) [0]" in out.detail
            assert "waits for a maintenance window" in out.detail
            e = gw.journal.get(dev.id)
            assert e.outcome is None and (e.tested_hash or "").startswith("revert:")
            assert "MCUboot refused it at boot" in (e.last_error or "")
            assert gw.journal.reports() == []  # nothing decided yet
        finally:
            gw.close()
        assert resets(dev) == 1  # the set's reset only: no revert reset outside the window
        assert active(dev, 0) == ("2.0.0", False, 0)  # still test-running, never confirmed

        gw = window_gateway(cfg, clock)  # restarted, still outside the window
        try:
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.HELD, out
            assert resets(dev) == 1
            assert active(dev, 0) == ("2.0.0", False, 0)
            clock.now = NEXT_OPEN
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.ROLLED_BACK, out
            assert out.result == UpdateResult.UPDATE_FAILED
            assert "image 1 2.0.0: MCUboot refused it at boot" in out.detail
            assert "MCUboot reverted image(s) [0]" in out.detail
            (rep,) = gw.journal.reports()
            assert rep.detail.startswith("rolled-back") and rep.result == 8
            e = gw.journal.get(dev.id)
            assert e.tested_hash == e.target_hash  # the revert intent is closed
        finally:
            gw.close()
        assert resets(dev) == 2
        assert active(dev, 0) == ("1.0.0", True, 0) and active(dev, 1) == ("1.0.0", True, 0)
        assert not any(w["confirm"] and w["slot"] in (0, 1) for w in state_writes(dev))


"""Direct-XIP (with and without revert) and RAM-load devices on the simulator.

The image runs in place, so it is linked for one slot: the gateway sends the build for the slot
the device does *not* run - proven by the signed ROM_FIXED load address against the config's
``slot_offsets``, the artifact's ``slot`` field only cross-checked - and never one linked for
the other slot - the trap of
``shared/firmware/stm32f4_disco-direct-xip-revert/check-output-wrongslot-test-marked.txt``."""

from __future__ import annotations

from pathlib import Path

import pytest
from modes_support import (
    active,
    entry,
    publish_entry,
    reports,
    resets,
    run_pass,
    sign,
    state_writes,
    upload_requests,
)

from gateway.engine import Status
from gateway.images import Refusal
from gateway.sim.simulator import Simulator
from gateway.sources.base import UpdateResult

pytestmark = pytest.mark.timeout(120)

SLOT0, SLOT1 = 0x10000, 0x50000  # the bench's slots (256 KiB each, packed from 0x10000)
OFFS = [SLOT0, SLOT1]  # the device config's slot_offsets (direct-XIP needs them)


def xip(mode: str = "direct-xip-with-revert", **kw: object) -> dict[str, object]:
    return {"mcuboot_mode": mode, "flash_offsets": [SLOT0, SLOT1], **kw}


def builds(bench, version: str) -> tuple[Path, Path]:
    """The release ``version`` linked for each slot (``imgtool sign --rom-fixed``); the payload
    differs per slot, as a build linked for another address does."""
    b0 = sign(bench, f"app-{version}-slot0.bin", version, "--rom-fixed", hex(SLOT0))
    b1 = sign(bench, f"app-{version}-slot1.bin", version, "--rom-fixed", hex(SLOT1))
    return b0, b1


def publish_builds(bench, b0: Path, b1: Path) -> None:
    publish_entry(bench, {"images": [{"file": str(b0), "slot": 0}, {"file": str(b1), "slot": 1}]})


def image_hash(path: Path) -> str:
    from gateway.mcuboot import parse_image

    return parse_image(path.read_bytes()).hash.hex()


async def test_direct_xip_revert_sends_the_build_for_the_inactive_slot(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, device_kw=xip())
    v2 = builds(bench, "2.0.0")
    publish_builds(bench, *v2)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, slot_offsets=OFFS))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert "confirmed by the gateway" in out.detail and "runs in place" in out.detail
        # v1 ran from slot 0: the slot-1 build went to slot 1, booted from there, confirmed
        assert active(dev) == ("2.0.0", True, 1)
        assert entry(dev, 0, 1)["hash"] == image_hash(v2[1])
        assert reports(bench)[-1]["result"] == 1
        # the next release goes to slot 0, as its slot-0 build
        v3 = builds(bench, "3.0.0")
        publish_builds(bench, *v3)
        res = await run_pass(bench.gateway_config(sim, slot_offsets=OFFS))
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes
        assert active(dev) == ("3.0.0", True, 0)
        assert entry(dev, 0, 0)["hash"] == image_hash(v3[0])


async def test_direct_xip_never_uploads_a_build_for_the_running_slot(bench_factory) -> None:
    """Only the slot-0 build, while the device runs slot 0: refused, zero bytes (uploaded and
    test-marked it would block every later upload with rc 9 NO_FREE_SLOT)."""
    bench = bench_factory(udp=1, serial=0, device_kw=xip())
    b0, _ = builds(bench, "2.0.0")
    publish_entry(bench, {"file": str(b0)})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, slot_offsets=OFFS))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert out.detail.startswith(Refusal.WRONG_SLOT.value), out.detail
        assert out.result == UpdateResult.UNSUPPORTED_PACKAGE
        assert upload_requests(dev) == 0 and resets(dev) == 0 and not state_writes(dev)


async def test_direct_xip_refuses_a_build_whose_slot_it_cannot_tell(bench_factory) -> None:
    """A ROM_FIXED build, but no slot_offsets in the config (and no slot in the artifact): the
    refusal names the config key."""
    bench = bench_factory(udp=1, serial=0, device_kw=xip())
    _, b1 = builds(bench, "2.0.0")
    publish_entry(bench, {"file": str(b1)})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert "set slot_offsets" in out.detail and out.detail.startswith(Refusal.WRONG_SLOT.value)
        assert upload_requests(dev) == 0 and resets(dev) == 0


async def test_direct_xip_single_build_by_its_rom_fixed_address(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, device_kw=xip())
    _, b1 = builds(bench, "2.0.0")
    publish_entry(bench, {"file": str(b1)})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, slot_offsets=OFFS))
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes
        assert active(dev) == ("2.0.0", True, 1)


async def test_direct_xip_revert_image_that_crashes_is_erased_and_reported(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, device_kw=xip(crash_on_boot_versions=["2.0.0"],
                                                          crash_after_s=0.2))
    publish_builds(bench, *builds(bench, "2.0.0"))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, health_check_s=2.0, slot_offsets=OFFS))
        out = res.outcomes[dev.id]
        assert out.status == Status.ROLLED_BACK, out
        assert out.result == UpdateResult.UPDATE_FAILED
        assert "erased its slot" in out.detail
        assert active(dev) == ("1.0.0", True, 0)
        assert entry(dev, 0, 1) is None  # MCUboot erased the slot it was not confirmed in
        assert reports(bench)[-1]["result"] == 8


async def test_direct_xip_power_cut_while_the_test_mark_is_written(bench_factory) -> None:
    """The one irreversible write of direct-XIP with revert is the test mark (the slot's
    trailer). Power lost in the middle of it (magic torn): MCUboot finds the slot unmarked,
    erases it and boots the running image. The gateway never confirms anything, reports a
    failure, and the next pass updates the device from scratch."""
    bench = bench_factory(udp=1, serial=0,
                          device_kw=xip(power_cut_during_trailer_write="torn-magic"))
    publish_builds(bench, *builds(bench, "2.0.0"))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, slot_offsets=OFFS))
        out = res.outcomes[dev.id]
        assert any(e.kind == "power-cut" for e in dev.events), [e.kind for e in dev.events]
        assert out.status in (Status.FAILED, Status.ROLLED_BACK), out
        assert out.result != UpdateResult.SUCCESS
        assert active(dev) == ("1.0.0", True, 0)
        assert not any(w["confirm"] for w in state_writes(dev))
        res = await run_pass(bench.gateway_config(sim, slot_offsets=OFFS))
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes
        assert active(dev) == ("2.0.0", True, 1)


async def test_direct_xip_without_revert_installs_at_the_reset(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, device_kw=xip("direct-xip"))
    publish_builds(bench, *builds(bench, "2.0.0"))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, slot_offsets=OFFS))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert "no revert in direct-xip" in out.detail
        assert active(dev) == ("2.0.0", True, 1)
        assert not state_writes(dev)  # nothing to mark: the newest valid image runs
        assert resets(dev) == 1


async def test_ram_load_updates_and_refuses_an_image_not_built_for_ram(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, device_kw={"mcuboot_mode": "ram-load"})
    # MCUboot RAM load boots only images built for RAM: the provisioned 1.0.0 is one too
    v1 = sign(bench, "app-1.0.0-ram.bin", "1.0.0", "--load-addr", "0x20000000")
    bench.sim_cfg.devices[0].initial_image = v1
    plain = sign(bench, "app-2.0.0-flash.bin", "2.0.0")
    publish_entry(bench, {"file": str(plain)})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED and "IMAGE_F_RAM_LOAD" in out.detail, out
        assert upload_requests(dev) == 0
        ram = sign(bench, "app-2.0.0-ram.bin", "2.0.0", "--load-addr", "0x20000000")
        publish_entry(bench, {"file": str(ram)})
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert "no revert in ram-load" in out.detail
        assert active(dev)[:2] == ("2.0.0", True)

"""Which flow a device gets: the mode it reports (bootloader info), ``mcuboot_mode`` in its
config, their conflicts, and the modes the gateway refuses to drive - each refusal before a byte
is sent, with its LwM2M result. Plus swap using move with a power cut in mid-swap."""

from __future__ import annotations

import pytest
from modes_support import active, publish_entry, reports, resets, run_pass, sign, upload_requests

from gateway.bootmodes.modes import Mode, ModeConflict, ModeSource, decide
from gateway.engine import Status
from gateway.images import Refusal
from gateway.sim.simulator import Simulator
from gateway.sources.base import UpdateResult

pytestmark = pytest.mark.timeout(120)


def test_decide_mode_sources() -> None:
    assert decide(None, 3, False).mode == Mode.SWAP_USING_MOVE
    assert decide(None, 3, False).source == ModeSource.DEVICE
    assert decide("overwrite-only", None, False).source == ModeSource.CONFIG
    assert decide("overwrite-only", -1, False).mode == Mode.OVERWRITE_ONLY  # 3.4: mode -1
    assert decide(None, 9, False).mode == Mode.SWAP_USING_OFFSET
    dm = decide(None, None, False)
    assert dm.source == ModeSource.ASSUMED and dm.mode.is_swap
    assert "set mcuboot_mode" in dm.describe()
    with pytest.raises(ModeConflict, match="reports swap-using-scratch"):
        decide("overwrite-only", 1, False)


async def test_swap_using_move_power_cut_in_mid_swap(bench_factory) -> None:
    """Worst moment for a swap: power lost while the sectors are exchanged; MCUboot resumes from
    its status area, the gateway waits for the board and confirms what it then runs."""
    bench = bench_factory(udp=1, serial=0, device_kw={
        "mcuboot_mode": "swap-using-move", "primary_slot_size": 0x41000,
        "power_cut_during_swap": True})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert "confirmed by the gateway" in out.detail
        assert any(e.kind == "power-cut" for e in dev.events)
        assert "resumed swap" in dev.boot_outcomes
        assert active(dev) == ("2.0.0", True, 0)
        assert reports(bench)[-1]["result"] == 1


async def test_config_mode_drives_a_device_that_does_not_report_it(bench_factory) -> None:
    """The stock smp_svr answers bootloader info ENOTSUP: ``mcuboot_mode`` in the config decides."""
    bench = bench_factory(udp=1, serial=0, device_kw={"mcuboot_mode": "overwrite-only",
                                                      "bootloader_info_supported": False})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, mcuboot_mode="overwrite-only"))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert "installed permanently, no revert possible" in out.detail


async def test_unknown_mode_that_installs_without_a_test_boot_is_said(bench_factory) -> None:
    """No report, no config: a swap mode is assumed. An overwrite-only device then shows the image
    confirmed right after the reset: the outcome says no revert was possible."""
    bench = bench_factory(udp=1, serial=0, device_kw={"mcuboot_mode": "overwrite-only",
                                                      "bootloader_info_supported": False})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert "without a test boot" in out.detail and "mcuboot_mode" in out.detail


async def test_config_that_contradicts_the_device_is_refused(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0)  # reports swap using scratch
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, mcuboot_mode="overwrite-only"))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert out.detail.startswith(Refusal.MODE.value)
        assert "reports swap-using-scratch" in out.detail
        assert out.result == UpdateResult.UNSUPPORTED_PROTOCOL
        assert upload_requests(dev) == 0 and resets(dev) == 0
        assert reports(bench)[-1]["result"] == 9


@pytest.mark.parametrize("mode", ["single-app", "firmware-loader"])
async def test_modes_that_overwrite_the_running_image_are_refused(bench_factory, mode) -> None:
    kw: dict[str, object] = {"mcuboot_mode": mode}
    if mode == "single-app":
        kw["serial_recovery"] = {"boot_mode": True}
        kw["os_reset_boot_mode"] = True
    else:
        kw.update({"primary_slot_size": 0x40000, "slot_size": 0x10000})
    bench = bench_factory(udp=0, serial=1, device_kw=kw)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, slot_size=0x40000))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert "no fallback" in out.detail and "recovery" in out.detail
        assert upload_requests(dev) == 0 and resets(dev) == 0
        assert active(dev)[:2] == ("1.0.0", True)


async def test_no_downgrade_reported_by_the_device_wins_over_allow_downgrade(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, device_kw={"bootloader_no_downgrade": True})
    old = sign(bench, "app-0.9.0.bin", "0.9.0")
    publish_entry(bench, {"file": str(old)})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, allow_downgrade=True))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert "refuses downgrades" in out.detail
        assert upload_requests(dev) == 0


async def test_group_member_without_revert_is_refused(bench_factory) -> None:
    bench = bench_factory(udp=2, serial=0, device_kw={"mcuboot_mode": "overwrite-only"})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        res = await run_pass(bench.gateway_config(sim, group="pair"))
        for dev in sim.devices.values():
            out = res.outcomes[dev.id]
            assert out.status != Status.UPDATED, out
            assert upload_requests(dev) == 0 and resets(dev) == 0
            assert active(dev)[:2] == ("1.0.0", True)
        assert any("group" in o.detail and "revert" in o.detail for o in res.outcomes.values())

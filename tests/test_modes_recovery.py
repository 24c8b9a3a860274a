"""Updates through MCUboot itself, on the simulator's serial recovery model: a single
application slot updated through serial recovery when enabled (with the upload cut by a power
loss - the worst moment, the application is already erased), and the last-resort re-flash of a
device whose application no longer answers SMP."""

from __future__ import annotations

import asyncio

import pytest
from modes_support import active, reports, run_pass

from gateway.bootmodes.recovery import last_confirmed_path
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(180)

SINGLE = {"mcuboot_mode": "single-app", "os_reset_boot_mode": True,
          "serial_recovery": {"boot_mode": True, "no_application": True}}
ENABLED = {"recovery": {"enabled": True}, "mcuboot_mode": "single-app"}


def recovery_uploads(dev: object) -> int:
    return sum(1 for e in dev.events if e.kind == "recovery-upload-start")  # type: ignore[attr-defined]


async def test_single_app_through_serial_recovery(bench_factory) -> None:
    bench = bench_factory(udp=0, serial=1, device_kw=SINGLE)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, **ENABLED))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert "installed through MCUboot serial recovery" in out.detail
        assert "no revert possible" in out.detail
        assert recovery_uploads(dev) == 1
        assert any(e.kind == "recovery" and e.detail.get("entered_by") == "boot_mode"
                   for e in dev.events), [(e.kind, e.detail) for e in dev.events]
        assert active(dev)[:2] == ("2.0.0", True)
        assert reports(bench)[-1]["result"] == 1


async def test_single_app_power_cut_mid_upload_is_finished(bench_factory) -> None:
    """Worst moment for a single slot: power lost in the middle of the recovery upload - the old
    application is already erased, the new one incomplete. MCUboot finds no bootable image and
    stays in serial recovery; its upload has no resume, so it asks for offset 0 again, and the
    gateway sends the image again from the start in the same attempt and installs it."""
    bench = bench_factory(udp=0, serial=1, device_kw=SINGLE)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim, **ENABLED, timeouts={"reset_s": 20, "request_s": 1.0})
        task = asyncio.create_task(run_pass(cfg))
        await dev.wait_for(lambda d: d.counters["recovery_requests"] >= 8, timeout_s=60)
        boots = dev.boots
        await dev.power_cycle()
        assert dev.boots == boots + 1 and dev.in_recovery  # no application left
        res = await task
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert recovery_uploads(dev) == 2  # started again from offset 0 after the power cut
        assert active(dev)[:2] == ("2.0.0", True)
        assert reports(bench)[-1]["result"] == 1


async def test_application_that_does_not_answer_is_reflashed_as_a_last_resort(bench_factory) -> None:
    """A swap device updated to 2.0.0 by the gateway; later its primary slot is corrupted: MCUboot
    finds no bootable image and stays in serial recovery (CONFIG_BOOT_SERIAL_NO_APPLICATION). With
    recovery.last_resort the gateway re-flashes the last image it confirmed there; without it,
    nothing is sent."""
    bench = bench_factory(udp=0, serial=1, device_kw={
        "serial_recovery": {"boot_mode": False, "no_application": True}})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        assert res.outcomes[dev.id].status == Status.UPDATED
        # flash corruption in the application's body; power cycle
        dev.flash.write(0, 0x400, b"\x00" * 64, sync=True)
        await dev.power_cycle()
        assert dev.in_recovery

        async def recover(cfg_kw: dict[str, object]) -> object:
            gw = Gateway(bench.gateway_config(sim, **cfg_kw))
            try:
                (d,) = gw.cfg.devices
                found = last_confirmed_path(gw.journal.confirmed(d.id), gw.store.root)
                assert found is not None
                image = gw.store.add_file(found[0], hardware=None)
                async with gw.session(d) as session:
                    return await gw.engine(d, session).recover(image)
            finally:
                gw.close()

        out = await recover({})
        assert out.status == Status.REFUSED and "not enabled" in out.detail, out
        assert recovery_uploads(dev) == 0 and dev.in_recovery
        out = await recover({"recovery": {"enabled": True, "last_resort": True,
                                          "entry": "present"}})
        assert out.status == Status.UPDATED, out
        assert "re-flashed 2.0.0" in out.detail
        assert recovery_uploads(dev) == 1
        assert active(dev) == ("2.0.0", True, 0)


async def test_normal_flow_does_not_run_against_serial_recovery(bench_factory) -> None:
    bench = bench_factory(udp=0, serial=1, device_kw={
        "serial_recovery": {"boot_mode": False, "no_application": True}})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        dev.flash.write(0, 0x400, b"\x00" * 64, sync=True)
        await dev.power_cycle()
        assert dev.in_recovery
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.FAILED and "serial recovery" in out.detail, out
        assert recovery_uploads(dev) == 0


async def test_firmware_loader_update_when_enabled(bench_factory) -> None:
    """Firmware-loader mode: os reset boot_mode=1 boots the loader application (slot 1), whose
    img_mgmt writes the new application into slot 0; a reset boots it."""
    from modes_support import sign

    bench = bench_factory(udp=0, serial=1, device_kw={
        "mcuboot_mode": "firmware-loader", "primary_slot_size": 0x40000, "slot_size": 0x10000,
        "os_reset_boot_mode": True})
    bench.sim_cfg.devices[0].loader_image = sign(bench, "loader-1.0.0.bin", "1.0.0", size=16 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, slot_size=0x40000,
                                                  recovery={"enabled": True},
                                                  mcuboot_mode="firmware-loader"))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert "installed through the firmware-loader application" in out.detail
        assert any(e.kind == "boot" and e.detail.get("outcome") == "firmware loader"
                   for e in dev.events), [(e.kind, e.detail.get("outcome")) for e in dev.events]
        assert active(dev) == ("2.0.0", True, 0)

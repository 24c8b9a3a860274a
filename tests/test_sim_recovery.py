"""MCUboot serial recovery and the firmware loader in the simulator, over a real PTY.

Single application slot devices are updated only through MCUboot's own SMP server
(``boot_serial.c``), entered by ``os reset {"boot_mode": 1}``, the recovery pin, a frame in the
wait-for-DFU window, or when no valid application is left - the last resort for an application
that no longer answers SMP. The firmware-loader mode boots a loader application from slot 1
that writes the new application into slot 0. Driven by smpclient; recovery answers are SMP v1
(``{"rc": N}``) whatever the request's version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sim_support
from sim_support import cfg, client_for, err_rc, read_state, upload
from smpclient import SMPClient
from smpclient.generics import success
from smpclient.requests.image_management import ImageStatesRead, ImageUploadWrite
from smpclient.requests.os_management import EchoWrite, ResetWrite

from gateway.devkit import make_key, sign_image
from gateway.sim import SimDevice

pytestmark = pytest.mark.timeout(90)
sim_factory = sim_support.sim_factory  # the fixture
SLOT = 0x20000


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recovery")
    key = make_key(root / "k.pem")

    def img(name: str, version: str, size: int) -> Path:
        return sign_image(root / f"{name}.bin", version=version, key=key, size=size,
                          slot_size=SLOT)

    return {"key": key, "v1": img("v1", "1.0.0", 10000), "v2": img("v2", "2.0.0", 11000),
            "loader": img("loader", "0.1.0", 5000)}


def single_app(kit: dict[str, Path], **kw: Any) -> Any:
    base: dict[str, Any] = dict(preset="zephyr-single-app-recovery",
                                slot_size=SLOT, key=kit["key"], initial_image=kit["v1"])
    base.update({k: v for k, v in sim_support.FAST.items() if k != "buf_size"})
    base.update(kw)
    return cfg(transport="serial", **base)


async def recovery_reset(c: SMPClient, dev: SimDevice) -> None:
    """Reset in recovery: ``{"rc": 0}`` (an SMP v1 body smpclient reads as an error model)."""
    boots = dev.boots
    r = await c.request(ResetWrite())
    assert getattr(r, "rc", None) == 0, r
    await dev.wait_booted(boots + 1)


async def test_single_app_update_through_serial_recovery_by_boot_mode(
        kit: dict[str, Path], sim_factory: Any) -> None:
    sim = await sim_factory(single_app(kit))
    dev = sim.devices["d1"]
    c = await client_for(dev, serial_buf_size=1024)
    try:
        assert set(await read_state(c)) == {(0, 0)}
        v2 = kit["v2"].read_bytes()
        r = await c.request(ImageUploadWrite(off=0, data=v2[:256], len=len(v2)))
        assert err_rc(r) == 9  # the application has no slot to upload into
        boots = dev.boots
        assert success(await c.request(ResetWrite(boot_mode=1)))
        await dev.wait_booted(boots + 1)
        assert dev.in_recovery and dev.events[-1].detail["entered_by"] == "boot_mode"
        listed = await c.request(ImageStatesRead())
        assert success(listed) and [(s.slot, s.version) for s in listed.images] == [(0, "1.0.0")]
        assert listed.images[0].hash is not None and listed.images[0].active is None
        r = await c.request(EchoWrite(d="x"))
        assert getattr(r, "rc", None) == 8  # CONFIG_BOOT_MGMT_ECHO is off: ENOTSUP, v1 form
        await upload(c, v2)  # straight into slot 0: no test, no confirm
        assert dev.slot_bytes(0)[:len(v2)] == v2
        await recovery_reset(c, dev)
        assert dev.state == "running"
        assert (await read_state(c))[(0, 0)].version == "2.0.0"
    finally:
        await c.disconnect()


async def test_hung_application_is_updated_through_the_recovery_pin(
        kit: dict[str, Path], sim_factory: Any) -> None:
    """v1 hangs (never answers SMP, no watchdog): a power cycle with the recovery button held
    reaches MCUboot's recovery; the fixed image is uploaded and boots once the pin is let go."""
    sim = await sim_factory(single_app(kit, hang_on_boot_versions=["1.0.0"]))
    dev = sim.devices["d1"]
    c = await client_for(dev, serial_buf_size=1024)
    try:
        assert dev.state == "hung"
        with pytest.raises(TimeoutError):
            await c.request(EchoWrite(d="anyone?"), timeout_s=0.5)
        await dev.power_cycle(recovery_pin=True)
        assert dev.in_recovery
        await upload(c, kit["v2"])
        dev.set_recovery_pin(False)
        await recovery_reset(c, dev)
        assert success(await c.request(EchoWrite(d="back")))
    finally:
        await c.disconnect()


async def test_dead_application_caught_in_the_wait_for_dfu_window(
        kit: dict[str, Path], sim_factory: Any) -> None:
    """An application that never answers SMP (``app_smp_dead``); MCUboot listens for
    wait_for_dfu_ms after every reset; a frame sent in that window keeps it in recovery."""
    sim = await sim_factory(single_app(
        kit, app_smp_dead=True, time_scale=1.0,
        serial_recovery={"wait_for_dfu_ms": 2000, "echo": True}))
    dev = sim.devices["d1"]
    c = await client_for(dev, serial_buf_size=1024)
    try:
        assert dev.state == "hung"
        await dev.power_cycle(wait=False)
        await dev.wait_for(lambda d: d.state == "dfu-window", timeout_s=10)
        r = await c.request(EchoWrite(d="stay"))
        assert success(r) and r.r == "stay"
        assert dev.in_recovery
        assert any(e.kind == "recovery" and e.detail["entered_by"] == "wait-for-dfu"
                   for e in dev.events)
    finally:
        await c.disconnect()


async def test_no_bootable_image_enters_recovery(kit: dict[str, Path],
                                                 sim_factory: Any) -> None:
    """A corrupt image written through recovery: MCUboot finds nothing to boot and
    (CONFIG_BOOT_SERIAL_NO_APPLICATION) stays in serial recovery, listing no image."""
    sim = await sim_factory(single_app(kit, recovery_pin=True))
    dev = sim.devices["d1"]
    c = await client_for(dev, serial_buf_size=1024)
    try:
        assert dev.in_recovery
        bad = bytearray(kit["v2"].read_bytes())
        bad[600] ^= 0xFF
        await upload(c, bytes(bad))
        dev.set_recovery_pin(False)
        await recovery_reset(c, dev)
        assert dev.in_recovery
        assert dev.events[-1].detail["entered_by"] == "no-application"
        listed = await c.request(ImageStatesRead())
        assert success(listed) and listed.images == []
    finally:
        await c.disconnect()


async def test_firmware_loader_writes_the_application_slot(kit: dict[str, Path],
                                                           sim_factory: Any) -> None:
    sim = await sim_factory(cfg(
        transport="serial", preset="zephyr-firmware-loader",
        primary_slot_size=SLOT, slot_size=0x10000, key=kit["key"], initial_image=kit["v1"],
        loader_image=kit["loader"],
        **{k: v for k, v in sim_support.FAST.items() if k != "buf_size"}))
    dev = sim.devices["d1"]
    c = await client_for(dev, serial_buf_size=1024)
    try:
        assert dev.running_slot == 0
        boots = dev.boots
        assert success(await c.request(ResetWrite(boot_mode=1)))
        await dev.wait_booted(boots + 1)
        assert dev.last_boot is not None and dev.last_boot.loader and dev.running_slot == 1
        st = await read_state(c)
        assert st[(0, 1)].active and st[(0, 1)].version == "0.1.0" and not st[(0, 0)].active
        await upload(c, kit["v2"])  # the loader's img_mgmt: the other slot is slot 0
        assert dev.image_info(0).version.major == 2  # type: ignore[union-attr]
        boots = dev.boots
        assert success(await c.request(ResetWrite()))
        await dev.wait_booted(boots + 1)
        assert dev.running_slot == 0 and (await read_state(c))[(0, 0)].version == "2.0.0"
    finally:
        await c.disconnect()


async def test_power_cut_mid_recovery_upload_comes_back_to_recovery(
        kit: dict[str, Path], sim_factory: Any) -> None:
    """The worst moment for a single-slot device: the power goes while recovery rewrites the
    only slot. Nothing is bootable, so MCUboot stays in recovery (no-application) and the
    upload can simply be done again."""
    sim = await sim_factory(single_app(kit, recovery_pin=True))
    dev = sim.devices["d1"]
    c = await client_for(dev, serial_buf_size=1024)
    try:
        v2 = kit["v2"].read_bytes()
        r = await c.request(ImageUploadWrite(off=0, data=v2[:512], len=len(v2)))
        assert getattr(r, "off", None) == 512
        await dev.power_cycle(recovery_pin=False)
        assert dev.in_recovery and dev.events[-1].detail["entered_by"] == "no-application"
        await upload(c, v2)
        await recovery_reset(c, dev)
        assert dev.state == "running" and (await read_state(c))[(0, 0)].version == "2.0.0"
    finally:
        await c.disconnect()

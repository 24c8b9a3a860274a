"""Multi-image devices in the simulator: two updatable images, dependency TLVs, an nRF5340-like
network core that is installed without revert.

Behaviour from ``shared/firmware/stm32f4_disco-multi-image`` (README + check-output.txt: upload
with ``image=1`` goes to slot 3, image 1's confirm refused rc 32, test swap reverted, the
secondary marked permanent installs it), MCUboot ``boot_verify_dependencies`` and the nRF5340
image access hooks (see ``gateway/sim/boot.py``). Real UDP sockets, smpclient, imgtool images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sim_support
from sim_support import cfg, client_for, err_rc, mark, read_state, reset, upload
from smpclient.generics import success

from gateway.devkit import make_key, sign_image

pytestmark = pytest.mark.timeout(90)
sim_factory = sim_support.sim_factory  # the fixture
SLOT = 0x20000


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multi")
    key = make_key(root / "k.pem")

    def img(name: str, version: str, size: int, *extra: str) -> Path:
        return sign_image(root / f"{name}.bin", version=version, key=key, size=size,
                          slot_size=SLOT, extra=extra)

    return {
        "key": key,
        "a1": img("a1", "1.0.0", 12000), "a2": img("a2", "2.0.0", 12500),
        "b1": img("b1", "1.0.0", 6000), "b2": img("b2", "2.0.0", 6400),
        # application v2 that needs image 1 at 2.0.0 or later (imgtool sign -d)
        "a2dep": img("a2dep", "2.0.0", 12600, "-d", "(1,2.0.0)"),
    }


def two_images(kit: dict[str, Path], **kw: Any) -> Any:
    return cfg(slot_size=SLOT, key=kit["key"], initial_image=kit["a1"],
               extra_images=[{"slot_size": SLOT, "initial_image": str(kit["b1"])}], **kw)


@pytest.mark.parametrize("confirm_any", [False, True])
async def test_image1_test_swap_confirm_refused_then_permanent(
        kit: dict[str, Path], sim_factory: Any, confirm_any: bool) -> None:
    """Upload with image=1 lands in slot 3; the test swap moves image 1 only; confirming it
    is refused (rc 32) unless ALLOW_CONFIRM_NON_ACTIVE_IMAGE_ANY; unconfirmed it reverts;
    marking its secondary permanent installs it for good."""
    sim = await sim_factory(two_images(kit, allow_confirm_non_active_image_any=confirm_any))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        st = await read_state(c)
        assert set(st) == {(0, 0), (1, 0)} and st[(1, 0)].active  # each primary is "active"
        await upload(c, kit["b2"], image_no=1)
        assert dev.image_info(3).version.major == 2  # type: ignore[union-attr]
        assert success(await mark(c, kit["b2"]))
        st = await read_state(c)
        assert st[(1, 1)].pending and not st[(0, 0)].pending
        await reset(c, dev)
        assert dev.last_boot.performed[0].name == "NONE" and dev.last_boot.performed[1].name == "TEST"
        st = await read_state(c)
        assert st[(0, 0)].version == "1.0.0" and st[(0, 0)].confirmed
        assert st[(1, 0)].version == "2.0.0" and not st[(1, 0)].confirmed and st[(1, 1)].confirmed
        r = await mark(c, kit["b2"], confirm=True)
        if confirm_any:
            assert success(r) and dev.trailer(2).image_ok
            await reset(c, dev)
            assert (await read_state(c))[(1, 0)].version == "2.0.0"  # kept: confirmed
            return
        assert err_rc(r) == 32  # IMAGE_CONFIRMATION_DENIED
        assert success(await mark(c, None, confirm=True))  # confirms image 0 (a no-op here)
        await reset(c, dev)
        assert dev.last_boot.performed[1].name == "REVERT"
        st = await read_state(c)
        assert st[(1, 0)].version == "1.0.0" and st[(1, 0)].confirmed
        r = await mark(c, kit["b2"], confirm=True)  # secondary: allowed (..._SECONDARY=y)
        assert success(r)
        st = await read_state(c)
        assert st[(1, 1)].pending and st[(1, 1)].permanent
        await reset(c, dev)
        assert dev.last_boot.performed[1].name == "PERM"
        st = await read_state(c)
        assert st[(1, 0)].version == "2.0.0" and st[(1, 0)].confirmed
    finally:
        await c.disconnect()


async def test_dependency_tlv_holds_back_the_upgrade_until_it_is_satisfied(
        kit: dict[str, Path], sim_factory: Any) -> None:
    """boot_verify_dependencies: the application v2 needs image 1 >= 2.0.0. Marked alone, no
    image is swapped (it stays pending); with image 1 v2 marked too, both are swapped."""
    sim = await sim_factory(two_images(kit))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, kit["a2dep"])
        assert success(await mark(c, kit["a2dep"]))
        await reset(c, dev)
        assert all(t.name == "NONE" for t in dev.last_boot.performed)
        assert any("depends on image 1 >= 2.0.0" in line for line in dev.last_boot.log)
        st = await read_state(c)
        assert st[(0, 0)].version == "1.0.0" and st[(0, 1)].pending
        await upload(c, kit["b2"], image_no=1)
        assert success(await mark(c, kit["b2"]))
        await reset(c, dev)
        assert [t.name for t in dev.last_boot.performed] == ["TEST", "TEST"]
        st = await read_state(c)
        assert st[(0, 0)].version == "2.0.0" and st[(1, 0)].version == "2.0.0"
    finally:
        await c.disconnect()


async def test_power_cut_mid_swap_of_image1_resumes(kit: dict[str, Path],
                                                    sim_factory: Any) -> None:
    sim = await sim_factory(two_images(kit, power_cut_during_swap=True))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, kit["b2"], image_no=1)
        assert success(await mark(c, kit["b2"]))
        await reset(c, dev)
        assert any(e.kind == "power-cut" for e in dev.events)
        assert dev.boot_outcomes[-1] == "resumed swap"  # image 1's swap finished
        b2 = kit["b2"].read_bytes()
        assert dev.slot_bytes(2)[:len(b2)] == b2
        assert (await read_state(c))[(1, 1)].version == "1.0.0"
    finally:
        await c.disconnect()


def nrf5340(kit: dict[str, Path], **kw: Any) -> Any:
    return cfg(preset="zephyr-nrf5340", udp={"host": sim_support.loopback_ip(), "port": 1337},
               slot_size=SLOT, primary_slot_size=SLOT + 0x1000, key=kit["key"],
               initial_image=kit["a1"],
               extra_images=[{"slot_size": SLOT, "initial_image": str(kit["b1"])}], **kw)


async def test_nrf5340_network_core_is_installed_at_reset_and_never_reverted(
        kit: dict[str, Path], sim_factory: Any) -> None:
    """Image 1 is the network core: its primary is not readable by the application; a test
    mark (accepted by img_mgmt) still installs it for good at the reset (PCD copy), the
    secondary keeps the image bytes but loses its trailer, and nothing is reverted after."""
    c_ = nrf5340(kit)
    assert c_.extra_images[0].update == "netcore" and c_.mcuboot_mode == "swap-using-move"
    sim = await sim_factory(c_)
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        assert set(await read_state(c)) == {(0, 0)}  # no net-core primary in the list
        await upload(c, kit["b2"], image_no=1)
        assert success(await mark(c, kit["b2"]))
        assert (await read_state(c))[(1, 1)].pending
        await reset(c, dev)
        assert dev.last_boot.performed[1].name == "TEST"
        assert dev.image_info(2).version.major == 2  # type: ignore[union-attr]  # net core runs v2
        st = await read_state(c)
        assert set(st) == {(0, 0), (1, 1)} and not st[(1, 1)].pending
        assert dev.trailer(3).magic == "unset"
        await reset(c, dev)  # unconfirmed: still no revert for the network core
        assert all(t.name == "NONE" for t in dev.last_boot.performed)
        assert dev.image_info(2).version.major == 2  # type: ignore[union-attr]
    finally:
        await c.disconnect()


async def test_nrf5340_dependency_on_the_network_core_needs_both_updated(
        kit: dict[str, Path], sim_factory: Any) -> None:
    """The hooked network-core primary reads as version 0.0.0 to MCUboot, so an application
    that depends on image 1 is installed only together with a network-core update."""
    sim = await sim_factory(nrf5340(kit))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, kit["a2dep"])
        assert success(await mark(c, kit["a2dep"]))
        await reset(c, dev)
        assert (await read_state(c))[(0, 0)].version == "1.0.0"
        await upload(c, kit["b2"], image_no=1)
        assert success(await mark(c, kit["b2"], confirm=True))
        await reset(c, dev)
        assert [t.name for t in dev.last_boot.performed] == ["TEST", "PERM"]
        assert (await read_state(c))[(0, 0)].version == "2.0.0"
    finally:
        await c.disconnect()


async def test_nrf5340_power_cut_during_the_network_core_copy_redoes_it(
        kit: dict[str, Path], sim_factory: Any) -> None:
    """The power goes while MCUboot hands the image to the network core: the secondary still
    carries its mark, so the next boot copies it again; it is then installed."""
    sim = await sim_factory(nrf5340(kit, power_cut_during_swap=True))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, kit["b2"], image_no=1)
        assert success(await mark(c, kit["b2"], confirm=True))
        await reset(c, dev)
        cut = [e for e in dev.events if e.kind == "power-cut"]
        assert cut and "network core update of image 1" in cut[0].detail["detail"]
        assert dev.last_boot.performed[1].name == "PERM"
        assert dev.image_info(2).version.major == 2  # type: ignore[union-attr]
        assert dev.trailer(3).magic == "unset"
    finally:
        await c.disconnect()

"""The simulator's single-image MCUboot modes end to end: swap using move, overwrite-only,
direct-XIP with and without revert, RAM load, and bootloader info per mode.

Real UDP sockets and smpclient, keys and images made by imgtool (``gateway.devkit``; direct-XIP
images signed ``--rom-fixed`` for their slot, RAM-load images ``--load-addr``), each mode's
full flow and a power cut at the worst moment for that mode. What is expected comes from the
MCUboot / Zephyr sources named in ``gateway/sim/boot.py`` and ``img_state.py`` and from the
Renode firmware transcripts in ``shared/firmware/*/check-output*.txt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sim_support
from sim_support import cfg, client_for, err_rc, mark, raw_udp, read_state, reset, upload
from smpclient.generics import success
from smpclient.requests.image_management import ImageErase, ImageStatesWrite, ImageUploadWrite

from gateway.devkit import make_key, sign_image
from gateway.mcuboot import parse_image
from gateway.sim.presets import PRESETS

pytestmark = pytest.mark.timeout(90)
sim_factory = sim_support.sim_factory  # the fixture
SLOT = 0x20000
OFFS = [0x40000, 0x80000]  # flash offsets of slot0 / slot1 (direct-XIP: --rom-fixed targets)


class Kit:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = make_key(root / "k.pem")

    def image(self, name: str, version: str, size: int = 9000, *extra: str) -> Path:
        return sign_image(self.root / f"{name}.bin", version=version, key=self.key, size=size,
                          slot_size=SLOT, extra=extra)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    k = Kit(tmp_path_factory.mktemp("modes"))
    k.v1, k.v2, k.v3 = (k.image(f"v{n}", f"{n}.0.0", 9000 + 1000 * n) for n in (1, 2, 3))  # type: ignore[attr-defined]
    for n in (1, 2, 3):
        for slot in (0, 1):
            setattr(k, f"x{n}s{slot}", k.image(f"x{n}s{slot}", f"{n}.0.0", 9000 + n,
                                             "--rom-fixed", hex(OFFS[slot])))
    k.r1 = k.image("r1", "1.0.0", 9000, "--load-addr", "0x20000800")  # type: ignore[attr-defined]
    k.r2 = k.image("r2", "2.0.0", 9100, "--load-addr", "0x20000800")  # type: ignore[attr-defined]
    return k


def data(p: Path) -> bytes:
    return p.read_bytes()


# --- swap using move ---------------------------------------------------------------------
async def test_swap_move_flow_and_power_cut_mid_swap(kit: Any, sim_factory: Any) -> None:
    """Primary one sector larger; the power goes half-way through the move: the next boot
    resumes from the status entries, the new image runs unconfirmed, then stays once confirmed."""
    sim = await sim_factory(cfg(mcuboot_mode="swap-using-move", slot_size=SLOT,
                                primary_slot_size=SLOT + 0x1000, key=kit.key,
                                initial_image=kit.v1, power_cut_during_swap=True))
    dev = sim.devices["d1"]
    assert dev.flash.size(0) == SLOT + 0x1000 and dev.flash.size(1) == SLOT
    c = await client_for(dev)
    try:
        await upload(c, kit.v2)
        assert err_rc(await mark(c, kit.v1)) == 33  # IMAGE_SETTING_TEST_TO_ACTIVE_DENIED
        assert success(await mark(c, kit.v2))
        assert err_rc(await mark(c, None, confirm=True)) == 28  # IMAGE_ALREADY_PENDING
        await reset(c, dev)
        kinds = [e.kind for e in dev.events]
        assert "power-cut" in kinds and dev.boot_outcomes[-1] == "resumed swap"
        st = await read_state(c)
        assert st[(0, 0)].version == "2.0.0" and st[(0, 0)].active and not st[(0, 0)].confirmed
        assert st[(0, 1)].version == "1.0.0" and st[(0, 1)].confirmed
        v2 = data(kit.v2)
        assert dev.slot_bytes(0)[:len(v2)] == v2
        assert success(await mark(c, None, confirm=True))
        await reset(c, dev)
        assert dev.boot_outcomes[-1] == "normal"
        assert (await read_state(c))[(0, 0)].version == "2.0.0"
    finally:
        await c.disconnect()


# --- overwrite-only ---------------------------------------------------------------------
async def test_overwrite_only_flow_no_revert_and_power_cut_mid_copy(kit: Any,
                                                                   sim_factory: Any) -> None:
    """Test mark accepted (pending); the power goes mid-copy: MCUboot copies again from the
    still-marked secondary; the image runs 'active confirmed', slot 1 is gone, confirm is a
    no-op, an unconfirmed reset does not revert."""
    sim = await sim_factory(cfg(mcuboot_mode="overwrite-only", slot_size=SLOT, key=kit.key,
                                initial_image=kit.v1, power_cut_during_swap=True))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, kit.v2)
        assert success(await mark(c, kit.v2))
        assert (await read_state(c))[(0, 1)].pending
        await reset(c, dev)
        cut = [e for e in dev.events if e.kind == "power-cut"]
        assert cut and "copy of image 0" in cut[0].detail["detail"]
        assert dev.boot_outcomes[-1] == "overwrite"
        st = await read_state(c)
        assert list(st) == [(0, 0)]
        assert st[(0, 0)].version == "2.0.0" and st[(0, 0)].active and st[(0, 0)].confirmed
        assert dev.flash.header_magic(1) == 0xFFFFFFFF and dev.trailer(1).magic == "unset"
        assert dev.trailer(0).magic == "good" and not dev.trailer(0).image_ok
        r = await mark(c, None, confirm=True)
        assert success(r) and r.images[0].version == "2.0.0"  # a no-op, rc 0
        await reset(c, dev)
        assert dev.boot_outcomes[-1] == "normal"
        assert (await read_state(c))[(0, 0)].version == "2.0.0"  # nothing to revert to
    finally:
        await c.disconnect()


@pytest.mark.parametrize("prevention", [False, True])
async def test_overwrite_only_downgrade(kit: Any, sim_factory: Any, prevention: bool) -> None:
    """Without CONFIG_BOOT_DOWNGRADE_PREVENTION an older image is installed (as the Renode
    firmware did); with it MCUboot erases it ("insufficient version in secondary slot")."""
    sim = await sim_factory(cfg(mcuboot_mode="overwrite-only", slot_size=SLOT, key=kit.key,
                                initial_image=kit.v3, downgrade_prevention=prevention))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, kit.v2)
        assert success(await mark(c, kit.v2))
        await reset(c, dev)
        st = await read_state(c)
        assert st[(0, 0)].version == ("3.0.0" if prevention else "2.0.0")
        assert (0, 1) not in st and dev.flash.is_erased(1) is prevention
        if prevention:
            assert any("insufficient version" in line for line in dev.last_boot.log)
    finally:
        await c.disconnect()


# --- direct-XIP -------------------------------------------------------------------------
def xip(kit: Any, **kw: Any) -> Any:
    return cfg(mcuboot_mode="direct-xip-with-revert", slot_size=SLOT, flash_offsets=OFFS,
               key=kit.key, initial_image=kit.x1s0, **kw)


async def test_direct_xip_revert_flow(kit: Any, sim_factory: Any) -> None:
    """Upload to the inactive slot, test mark, run in place, a reset without confirm erases
    that whole slot; confirmed, the image keeps running from slot 1 and the next upload goes
    to slot 0."""
    sim = await sim_factory(xip(kit))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, kit.x2s1)
        st = await read_state(c)
        assert st[(0, 1)].version == "2.0.0" and not st[(0, 1)].pending  # no magic yet
        assert success(await mark(c, kit.x2s1))
        assert (await read_state(c))[(0, 1)].pending
        await reset(c, dev)
        assert dev.running_slot == 1
        st = await read_state(c)
        assert st[(0, 1)].active and not st[(0, 1)].confirmed and st[(0, 0)].confirmed
        await reset(c, dev)  # not confirmed: MCUboot erases slot 1
        assert dev.running_slot == 0 and dev.flash.is_erased(1)
        assert list(await read_state(c)) == [(0, 0)]
        await upload(c, kit.x2s1)
        assert success(await mark(c, kit.x2s1))
        await reset(c, dev)
        assert success(await mark(c, None, confirm=True))
        assert dev.trailer(1).image_ok
        await reset(c, dev)
        assert dev.running_slot == 1
        st = await read_state(c)
        assert st[(0, 1)].active and st[(0, 1)].confirmed and not st[(0, 0)].confirmed
        await upload(c, kit.x3s0)  # now slot 0 is the inactive one
        assert dev.image_info(0).version.major == 3  # type: ignore[union-attr]
    finally:
        await c.disconnect()


async def test_direct_xip_revert_erases_a_newer_unmarked_image(kit: Any,
                                                              sim_factory: Any) -> None:
    """``boot_select_or_erase``: the newest image is picked first; without trailer magic it
    is erased and the old one boots (uploading without a test mark loses the upload)."""
    sim = await sim_factory(xip(kit))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, kit.x2s1)
        await reset(c, dev)
        assert dev.running_slot == 0 and dev.flash.is_erased(1)
        assert dev.boot_outcomes[-1] == "erased unmarked image"
    finally:
        await c.disconnect()


@pytest.mark.parametrize("option", ["stock", "reject_direct_xip_mismatched_slot",
                                    "allow_erase_pending"])
async def test_direct_xip_wrong_slot_trap_and_the_options_that_avoid_it(
        kit: Any, sim_factory: Any, option: str) -> None:
    """check-output-wrongslot-test-marked.txt: an image linked for slot 1 uploaded into slot 0
    and test-marked is skipped by MCUboot at every boot; img_mgmt keeps it pending and refuses
    uploads and erases with rc 9. REJECT_DIRECT_XIP_MISMATCHED_SLOT refuses the upload itself
    (rc 25 INVALID_FLASH_ADDRESS); ALLOW_ERASE_PENDING lets the slot be overwritten."""
    extra = {} if option == "stock" else {option: True}
    sim = await sim_factory(xip(kit, **extra))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, kit.x2s1)
        assert success(await mark(c, kit.x2s1))
        await reset(c, dev)
        assert success(await mark(c, None, confirm=True))  # v2 runs from slot 1, confirmed
        wrong = data(kit.x3s1)
        first = ImageUploadWrite(off=0, data=wrong[:512], len=len(wrong))
        r = await c.request(first)
        if option == "reject_direct_xip_mismatched_slot":
            assert err_rc(r) == 25 and dev.image_info(0).version.major == 1  # type: ignore[union-attr]
            return
        await upload(c, kit.x3s1)
        assert dev.image_info(0).version.major == 3  # type: ignore[union-attr]
        assert success(await mark(c, kit.x3s1))
        await reset(c, dev)
        assert dev.running_slot == 1
        assert any("has been built for offset 0x80000, skipping" in line
                   for line in dev.last_boot.log)
        st = await read_state(c)
        assert st[(0, 0)].pending and not st[(0, 0)].active
        right = data(kit.x3s0)
        r = await c.request(ImageUploadWrite(off=0, data=right[:512], len=len(right)))
        e = await c.request(ImageErase(slot=0))
        if option == "stock":
            assert err_rc(r) == 9 and err_rc(e) == 9  # NO_FREE_SLOT both: the trap
            assert err_rc(await mark(c, kit.x3s0)) == 8  # HASH_NOT_FOUND
        else:
            assert success(r) and success(e)
            await upload(c, kit.x3s0)
            assert success(await mark(c, kit.x3s0))
            await reset(c, dev)
            assert dev.running_slot == 0 and (await read_state(c))[(0, 0)].version == "3.0.0"
    finally:
        await c.disconnect()


@pytest.mark.parametrize("cut", ["torn-magic", "after-magic"])
async def test_direct_xip_power_cut_while_the_trailer_is_written(kit: Any, sim_factory: Any,
                                                                cut: str) -> None:
    """The test mark writes the new slot's trailer; the power goes there. A torn magic reads
    as bad: MCUboot erases the slot and v1 keeps running. With the magic complete (swap_info
    not written) the slot is a valid test mark: v2 boots unconfirmed."""
    sim = await sim_factory(xip(kit, power_cut_during_trailer_write=cut))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, kit.x2s1)
        boots = dev.boots
        with pytest.raises(TimeoutError):  # the device dies handling the mark: no answer
            await c.request(ImageStatesWrite(hash=parse_image(data(kit.x2s1)).hash),
                            timeout_s=1.0)
        await dev.wait_booted(boots + 1)
        assert any(e.kind == "power-cut" for e in dev.events)
        if cut == "torn-magic":
            assert dev.running_slot == 0 and dev.flash.is_erased(1)
            assert list(await read_state(c)) == [(0, 0)]
        else:
            assert dev.running_slot == 1
            st = await read_state(c)
            assert st[(0, 1)].active and not st[(0, 1)].confirmed
    finally:
        await c.disconnect()


async def test_direct_xip_without_revert(kit: Any, sim_factory: Any) -> None:
    """CONFIG_MCUBOOT_BOOTLOADER_MODE_DIRECT_XIP: a newer image is the next boot as soon as it
    is uploaded (pending + permanent, no mark), a test mark is refused rc 28, it boots for good."""
    sim = await sim_factory(cfg(mcuboot_mode="direct-xip", slot_size=SLOT, flash_offsets=OFFS,
                                key=kit.key, initial_image=kit.x1s0))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, kit.x2s1)
        st = await read_state(c)
        assert st[(0, 1)].pending and st[(0, 1)].permanent
        assert err_rc(await mark(c, kit.x2s1)) == 28
        await reset(c, dev)
        assert dev.running_slot == 1
        st = await read_state(c)
        assert st[(0, 1)].active and st[(0, 1)].confirmed
        await reset(c, dev)
        assert dev.running_slot == 1  # no revert in this mode
    finally:
        await c.disconnect()


# --- RAM load ---------------------------------------------------------------------------
async def test_ram_load_runs_the_newest_loadable_image(kit: Any, sim_factory: Any) -> None:
    """MCUboot copies the newest image to RAM from either slot; an image without
    IMAGE_F_RAM_LOAD (built for flash) is removed from flash instead of run."""
    sim = await sim_factory(cfg(mcuboot_mode="ram-load", slot_size=SLOT, key=kit.key,
                                initial_image=kit.r1))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, kit.r2)
        await reset(c, dev)
        assert dev.running_slot == 1 and (await read_state(c))[(0, 1)].active
        await upload(c, kit.v3)  # newest, but not a RAM-load image: goes to slot 0
        await reset(c, dev)
        assert dev.running_slot == 1 and dev.flash.is_erased(0)
        assert any("RAM load address" in line for line in dev.last_boot.log)
    finally:
        await c.disconnect()


# --- bootloader info ------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "era", "want"), [
    ("swap-using-scratch", "current", {"mode": 1}),
    ("overwrite-only", "current", {"mode": 2}),
    ("swap-using-move", "current", {"mode": 3}),
    ("direct-xip", "current", {"mode": 4, "no-downgrade": True}),
    ("direct-xip-with-revert", "current", {"mode": 5, "no-downgrade": True}),
    ("ram-load", "current", {"mode": 6, "no-downgrade": True}),
    ("direct-xip-with-revert", "zephyr-3.4", {"mode": 5}),
    ("ram-load", "zephyr-3.4", {"mode": -1}),
])
async def test_bootloader_info_mode_per_mcuboot_mode(kit: Any, sim_factory: Any, mode: str,
                                                    era: str, want: dict[str, Any]) -> None:
    """os_mgmt bootloader info ``query: mode`` as Zephyr answers it for each
    CONFIG_MCUBOOT_BOOTLOADER_MODE_* (with the 3.4-era table and its missing no-downgrade)."""
    image = kit.r1 if mode == "ram-load" else kit.x1s0 if "xip" in mode else kit.v1
    sim = await sim_factory(cfg(mcuboot_mode=mode, slot_size=SLOT, flash_offsets=OFFS,
                                key=kit.key, initial_image=image, bootloader_info_era=era))
    # raw: smp's BootloaderInformationReadResponse cannot parse {"mode": N} (it requires
    # "bootloader"), so smpclient cannot read this answer
    assert await raw_udp(sim.devices["d1"], 0, 0, 8, {"query": "mode"}) == want


def test_renode_presets_are_configured_like_their_firmware_folders() -> None:
    """Layouts from the folders' READMEs (partition tables) and Kconfig."""
    sm = PRESETS["renode-stm32f4-swap-move"]
    assert (sm["primary_slot_size"], sm["slot_size"], sm["flash_offsets"]) == (
        0x60000, 0x40000, [0x40000, 0xA0000])
    mi = PRESETS["renode-stm32f4-multi-image"]
    assert mi["flash_offsets"] == [0x40000, 0x60000, 0x80000, 0xA0000] and mi["buf_size"] == 512
    dx = PRESETS["renode-stm32f4-direct-xip-revert"]
    assert dx["mcuboot_mode"] == "direct-xip-with-revert" and not dx.get("allow_erase_pending")
    assert PRESETS["renode-stm32f4-overwrite-only"]["mcuboot_mode"] == "overwrite-only"


def test_yaml_mode_fields_and_relative_paths(tmp_path: Path) -> None:
    """A multi-image / recovery device from YAML: preset layout kept, files relative to the
    YAML, bad combinations refused with the field named."""
    from gateway.sim import load_sim_config

    (tmp_path / "sim.yaml").write_text(
        "state_dir: st\n"
        "devices:\n"
        "  - id: m1\n"
        "    preset: renode-stm32f4-multi-image\n"
        "    serial: {}\n"
        "    initial_image: img/v1.bin\n"
        "    extra_images: [{initial_image: img/image1-v1.bin}]\n")
    c = load_sim_config(tmp_path / "sim.yaml").devices[0]
    assert c.extra_images[0].initial_image == tmp_path / "img/image1-v1.bin"
    assert c.extra_images[0].slot_size == 0x20000 and c.image_count == 2
    assert c.slot_offsets == [0x40000, 0x60000, 0x80000, 0xA0000]
    with pytest.raises(ValueError, match="serial recovery"):
        cfg(mcuboot_mode="single-app")
    with pytest.raises(ValueError, match="Multi image does not support DirectXIP"):
        cfg(mcuboot_mode="direct-xip", extra_images=[{"slot_size": SLOT}])
    with pytest.raises(ValueError, match="flash_offsets has 1 entries"):
        cfg(flash_offsets=[0x10000])

"""MCUboot's image trailer lives inside the simulated slots, where MCUboot and img_mgmt use it.

Images made by imgtool; uploads over a real UDP socket with smpclient; the trailer bytes are
read back from the slot files at MCUboot's offsets (bootutil_priv.h).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest
from smpclient import SMPClient
from smpclient.generics import success
from smpclient.requests.image_management import (
    ImageStatesRead,
    ImageStatesWrite,
    ImageUploadWrite,
)
from smpclient.requests.os_management import ResetWrite
from smpclient.transport.udp import SMPUDPTransport

from gateway.devkit import make_key, sign_image
from gateway.mcuboot import parse_image
from gateway.sim import SimConfig, SimDeviceConfig, Simulator
from gateway.sim.flash import BOOT_MAGIC, Flash

pytestmark = pytest.mark.timeout(90)
SLOT = 0x20000
FAST: dict[str, Any] = dict(request_processing_s=0.0, flash_write_bps=None,
                            flash_erase_sector_s=0.0, flash_stalls_cpu=False, swap_time_s=0.0,
                            boot_time_s=0.05, reset_delay_s=0.05, buf_size=2475,
                            image_check=True)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kit")
    key = make_key(root / "k.pem")
    return {
        "key": key,
        "v1": sign_image(root / "v1.bin", version="1.0.0", key=key, size=12000, slot_size=SLOT),
        "v2": sign_image(root / "v2.bin", version="2.0.0", key=key, size=14000, slot_size=SLOT),
        # what `imgtool sign --pad --confirm` makes: the whole slot, magic + image_ok set
        "v3pad": sign_image(root / "v3pad.bin", version="3.0.0", key=key, size=9000,
                            slot_size=SLOT, extra=("--pad", "--confirm")),
    }


def ip() -> str:
    r = random.SystemRandom()
    return f"127.{r.randint(1, 254)}.{r.randint(1, 254)}.{r.randint(2, 254)}"


async def upload_raw(c: SMPClient, img: bytes, chunk: int = 1200) -> None:
    sha = hashlib.sha256(img).digest()
    off = 0
    while off < len(img):
        data = img[off:off + chunk]
        r = await c.request(ImageUploadWrite(off=0, data=data, len=len(img), sha=sha)
                            if off == 0 else ImageUploadWrite(off=off, data=data))
        assert success(r) and r.off is not None, (off, r)
        off = r.off


async def test_padded_confirmed_image_uploaded_whole_is_permanent(kit: dict[str, Path],
                                                                tmp_path: Path) -> None:
    addr = ip()
    cfg = SimDeviceConfig(id="d1", udp={"host": addr, "port": 1337}, slot_size=SLOT,
                          key=kit["key"], initial_image=kit["v1"], **FAST)
    padded = kit["v3pad"].read_bytes()
    assert len(padded) == SLOT and padded[-16:] == BOOT_MAGIC and padded[-24] == 0x01
    async with Simulator(SimConfig(state_dir=tmp_path / "st", devices=[cfg])) as sim:
        dev = sim.devices["d1"]
        c = SMPClient(SMPUDPTransport(), addr, 3.0)
        await c.connect()
        try:
            await upload_raw(c, padded)
            # the uploaded trailer is MCUboot's: magic good + image_ok set = a PERM request
            t = dev.trailer(1)
            assert (t.magic, t.image_ok) == ("good", True)
            r = await c.request(ImageStatesRead())
            assert success(r)
            s1 = r.images[1]
            assert (s1.version, s1.pending, s1.permanent) == ("3.0.0", True, True)
            # no state write at all: the next reset installs it for good
            await c.request(ResetWrite())
            await dev.wait_booted(2)
            ev = [e for e in dev.events if e.kind == "boot"][-1]
            assert ev.detail["outcome"] == "swap" and ev.detail["permanent"]
            t0 = dev.trailer(0)
            assert (t0.magic, t0.image_ok, t0.copy_done) == ("good", True, True)
            assert dev.trailer(1).magic == "unset"
            # a further reset keeps it (no revert: it was permanent)
            await c.request(ResetWrite())
            await dev.wait_booted(3)
            assert dev.boot_outcomes[-1] == "normal"
            assert dev.image_info(0).version.smp_str() == "3.0.0"  # type: ignore[union-attr]
        finally:
            await c.disconnect()


async def test_state_write_and_swap_write_trailer_bytes_in_the_slot(kit: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    addr = ip()
    cfg = SimDeviceConfig(id="d1", udp={"host": addr, "port": 1337}, slot_size=SLOT,
                          key=kit["key"], initial_image=kit["v1"], boot_write_align=1,
                          boot_max_img_sectors=16, swap_sector_size=0x4000, **FAST)
    async with Simulator(SimConfig(state_dir=tmp_path / "st", devices=[cfg])) as sim:
        dev = sim.devices["d1"]
        slot1 = tmp_path / "st" / "d1" / "flash" / "slot1.bin"
        slot0 = tmp_path / "st" / "d1" / "flash" / "slot0.bin"
        # provisioned like `imgtool --pad --confirm`: magic + image_ok at the slot's end
        s0 = slot0.read_bytes()
        assert s0[-16:] == BOOT_MAGIC and s0[-24] == 0x01
        c = SMPClient(SMPUDPTransport(), addr, 3.0)
        await c.connect()
        try:
            v2 = kit["v2"].read_bytes()
            await upload_raw(c, v2)
            assert slot1.read_bytes()[-48:] == b"\xff" * 48  # upload erased the old trailer
            r = await c.request(ImageStatesWrite(hash=parse_image(v2).hash))
            assert success(r) and r.images[1].pending and not r.images[1].permanent
            s1 = slot1.read_bytes()
            # boot_set_next: magic, swap_info = BOOT_SWAP_TYPE_TEST (2), image_ok unset
            assert s1[-16:] == BOOT_MAGIC and s1[-40] == 0x02 and s1[-24] == 0xFF
            await c.request(ResetWrite())
            await dev.wait_booted(2)
            s0, s1 = slot0.read_bytes(), slot1.read_bytes()
            assert s0[:len(v2)] == v2 and s0[-16:] == BOOT_MAGIC
            assert s0[-32] == 0x01 and s0[-24] == 0xFF  # copy_done set, not confirmed
            # swap status: 16 sectors x 3 entries of 1 byte before the 48-byte trailer info
            status = s0[-48 - 48:-48]
            assert [status[i * 3 + 2] for i in range(8)] == [1] * 8  # 8 sectors of 16 KiB
            assert s1[-96:] == b"\xff" * 96  # secondary trailer erased
            r = await c.request(ImageStatesWrite(confirm=True))
            assert success(r) and slot0.read_bytes()[-24] == 0x01
        finally:
            await c.disconnect()


def test_old_trailer_json_state_is_migrated_into_the_slots(tmp_path: Path) -> None:
    d = tmp_path / "flash"
    d.mkdir()
    (d / "slot0.bin").write_bytes(b"\xff" * SLOT)
    (d / "slot1.bin").write_bytes(b"\xff" * SLOT)
    (d / "trailer.json").write_text(json.dumps({
        "slot0": {"magic": "good", "image_ok": False, "copy_done": True, "swap_type": None},
        "slot1": {"magic": "good", "image_ok": True, "copy_done": False, "swap_type": "perm"},
    }))
    f = Flash(d, SLOT)
    assert not (d / "trailer.json").exists() and (d / "trailer.json.migrated").exists()
    t0, t1 = f.trailers
    assert (t0.magic, t0.image_ok, t0.copy_done) == ("good", False, True)
    assert (t1.magic, t1.image_ok, t1.swap_type) == ("good", True, "perm")
    # reopening finds the trailers in the slot files alone
    again = Flash(d, SLOT)
    assert again.trailers == [t0, t1]
    (d / "trailer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"trailer\.json of an older simulator"):
        Flash(d, SLOT)

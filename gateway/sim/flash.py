"""Persistent flash of a simulated device: MCUboot slots, each ending in its image trailer.

Owns the bytes of a device's flash. ``state_dir/<id>/flash`` holds ``slot<N>.bin`` for every
slot in MCUboot's order (image 0 primary = slot0, secondary = slot1, image 1 = slot2/slot3,
...), each of its own size (swap using move's primary is one sector larger), erased = 0xFF; a
simulator restart is a power cycle (what was written stays). MCUboot's image trailer lives in
the last bytes of each slot, exactly where MCUboot (mcu-tools/mcuboot at 11ecbf6, 2023-08-25,
the Renode firmware's pin) and img_mgmt (which links MCUboot's ``bootutil_public.c``) read and
write it, so bytes an upload puts there count: an ``imgtool sign --pad --confirm`` image
uploaded whole arrives with magic + image_ok set, i.e. as a *permanent* request.

Layout, from the end of the slot (``boot/bootutil/src/bootutil_priv.h``: ``boot_magic_off``,
``boot_image_ok_off``, ``boot_copy_done_off``, ``boot_swap_info_off``, ``boot_swap_size_off``,
``boot_status_off``; BOOT_MAX_ALIGN = 8, BOOT_MAGIC_SZ = 16, no encryption)::

    size - 16   magic      77 c2 95 f3 60 d2 ef 7f 35 52 50 0f 2c b6 79 80 (boot_img_magic)
    size - 24   image_ok   0x01 = BOOT_FLAG_SET, 0xFF = unset, anything else = bad
    size - 32   copy_done  same encoding
    size - 40   swap_info  (image_num << 4) | swap_type (BOOT_SWAP_TYPE_TEST 2 / PERM 3 / REVERT 4)
    size - 48   swap_size  uint32 LE: bytes the swap moves
    size - 48 - max_img_sectors * 3 * write_align
                swap status: BOOT_STATUS_STATE_COUNT (3) entries per sector, write_align
                bytes each (``boot_status_sz``), 0x01 = done

``boot_trailer_sz`` = the whole block above (96 bytes on the Renode STM32F4: write block 1,
CONFIG_BOOT_MAX_IMG_SECTORS 16, read from mcuboot.elf ``boot_status_off`` and
``flash_stm32_parameters``; 3120 bytes with imgtool's defaults, align 8 and 128 sectors).
Field decoding follows ``bootutil_public.c`` ``boot_read_swap_state`` (erased magic = unset,
other than boot_img_magic = bad; ``boot_flag_decode``; swap_type > REVERT or erased = none).

Older state directories kept the trailer in a ``trailer.json`` beside the slots; opening one
writes those fields into the slots' trailers and renames the file ``trailer.json.migrated``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gateway.mcuboot import IMAGE_MAGIC, ImageFormatError, ImageInfo, parse_image

ERASED = 0xFF
BOOT_MAGIC = bytes.fromhex("77c295f360d2ef7f3552500f2cb67980")
BOOT_MAGIC_SZ = 16
BOOT_MAX_ALIGN = 8
BOOT_FLAG_SET = 0x01
BOOT_STATUS_STATE_COUNT = 3
TRAILER_INFO_SZ = 4 * BOOT_MAX_ALIGN + BOOT_MAGIC_SZ  # swap_size, swap_info, copy_done, image_ok
SWAP_TYPE_NAMES = {2: "test", 3: "perm", 4: "revert"}
Magic = Literal["good", "unset", "bad"]
Flag = Literal["set", "unset", "bad"]


@dataclass(frozen=True)
class Trailer:
    """``struct boot_swap_state`` of one slot as read from its trailer bytes."""

    magic: Magic = "unset"
    image_ok: bool = False
    copy_done: bool = False
    swap_type: str | None = None  # "test" / "perm" / "revert" from swap_info; None = none
    image_ok_flag: Flag = "unset"
    copy_done_flag: Flag = "unset"


def _flag(b: int) -> Flag:
    if b == ERASED:
        return "unset"
    return "set" if b == BOOT_FLAG_SET else "bad"


class Flash:
    """The slots of every image, backed by files (a restart is a power cycle).

    ``slot_sizes``: one size for the classic pair of equal slots, or the size of every slot.
    The trailer offsets of slot N follow its own size (``magic_off_of(N)`` ...); the properties
    without a slot argument describe slot 0's layout.
    """

    def __init__(self, directory: Path, slot_sizes: int | Sequence[int], *, write_align: int = 8,
                 max_img_sectors: int = 128) -> None:
        self.dir = directory
        self.sizes = [slot_sizes, slot_sizes] if isinstance(slot_sizes, int) else list(slot_sizes)
        if not self.sizes:
            raise ValueError("a flash needs at least one slot")
        self.slot_size = self.sizes[0]
        self.write_align = write_align
        self.max_img_sectors = max_img_sectors
        self.trailer_size = TRAILER_INFO_SZ + max_img_sectors * BOOT_STATUS_STATE_COUNT * write_align
        for size in self.sizes:
            if self.trailer_size >= size:
                raise ValueError(f"MCUboot trailer of {self.trailer_size} bytes does not fit a "
                                 f"{size}-byte slot")
        self.dir.mkdir(parents=True, exist_ok=True)
        for slot, size in enumerate(self.sizes):
            p = self._slot_path(slot)
            if not p.exists() or p.stat().st_size != size:
                with open(p, "wb") as f:
                    f.write(bytes([ERASED]) * size)
        # hook called before every trailer write (the fault model cuts power there)
        self.on_trailer_write: Callable[[int, str], None] | None = None
        legacy = self.dir / "trailer.json"
        if legacy.exists():
            self._migrate(legacy)

    @property
    def slots(self) -> int:
        return len(self.sizes)

    def size(self, slot: int) -> int:
        self._check(slot)
        return self.sizes[slot]

    def has_slot(self, slot: int) -> bool:
        return 0 <= slot < len(self.sizes)

    def _check(self, slot: int) -> None:
        if not self.has_slot(slot):
            raise ValueError(f"no slot {slot}")

    # --- offsets (bootutil_priv.h / bootutil_public.c), per slot --------------------------
    def magic_off_of(self, slot: int) -> int:
        return self.size(slot) - BOOT_MAGIC_SZ

    def image_ok_off_of(self, slot: int) -> int:
        return (self.magic_off_of(slot) - BOOT_MAX_ALIGN) // BOOT_MAX_ALIGN * BOOT_MAX_ALIGN

    def copy_done_off_of(self, slot: int) -> int:
        return self.image_ok_off_of(slot) - BOOT_MAX_ALIGN

    def swap_info_off_of(self, slot: int) -> int:
        return self.copy_done_off_of(slot) - BOOT_MAX_ALIGN

    def swap_size_off_of(self, slot: int) -> int:
        return self.swap_info_off_of(slot) - BOOT_MAX_ALIGN

    def status_off_of(self, slot: int) -> int:
        """``boot_status_off``: start of the trailer (the swap status entries)."""
        return self.size(slot) - self.trailer_size

    # slot 0's offsets (the layout of the classic equal pair)
    @property
    def magic_off(self) -> int:
        return self.magic_off_of(0)

    @property
    def image_ok_off(self) -> int:
        return self.image_ok_off_of(0)

    @property
    def copy_done_off(self) -> int:
        return self.copy_done_off_of(0)

    @property
    def swap_info_off(self) -> int:
        return self.swap_info_off_of(0)

    @property
    def swap_size_off(self) -> int:
        return self.swap_size_off_of(0)

    @property
    def status_off(self) -> int:
        return self.status_off_of(0)

    def _slot_path(self, slot: int) -> Path:
        self._check(slot)
        return self.dir / f"slot{slot}.bin"

    def is_blank(self) -> bool:
        """True when every slot is erased (a fresh device)."""
        return all(self.is_erased(s) for s in range(self.slots))

    # --- raw access -----------------------------------------------------------------
    def read(self, slot: int, off: int = 0, length: int | None = None) -> bytes:
        n = self.size(slot) - off if length is None else length
        with open(self._slot_path(slot), "rb") as f:
            f.seek(off)
            return f.read(n)

    def write(self, slot: int, off: int, data: bytes, *, sync: bool = False) -> None:
        if off < 0 or off + len(data) > self.size(slot):
            raise ValueError(f"write of {len(data)} bytes at {off} overruns slot {slot}")
        with open(self._slot_path(slot), "r+b") as f:
            f.seek(off)
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())

    def erase_range(self, slot: int, off: int, length: int) -> None:
        self.write(slot, off, bytes([ERASED]) * length, sync=True)

    def erase(self, slot: int) -> None:
        """Erase the whole slot, trailer included (flash_area_erase of the area)."""
        self.erase_range(slot, 0, self.size(slot))

    def is_erased(self, slot: int) -> bool:
        chunk = 1 << 16
        with open(self._slot_path(slot), "rb") as f:
            while block := f.read(chunk):
                if block.count(ERASED) != len(block):
                    return False
        return True

    # --- trailer (bootutil_public.c) ----------------------------------------------------
    def trailer(self, slot: int) -> Trailer:
        """``boot_read_swap_state`` of ``slot``."""
        base = self.swap_info_off_of(slot)
        raw = self.read(slot, base, self.size(slot) - base)
        magic_b = raw[self.magic_off_of(slot) - base:]
        if magic_b == bytes([ERASED]) * BOOT_MAGIC_SZ:
            magic: Magic = "unset"
        else:
            magic = "good" if magic_b == BOOT_MAGIC else "bad"
        info = raw[0]
        st = info & 0x0F
        swap_type = None if info == ERASED or st > 4 else SWAP_TYPE_NAMES.get(st)
        ok = _flag(raw[self.image_ok_off_of(slot) - base])
        done = _flag(raw[self.copy_done_off_of(slot) - base])
        return Trailer(magic=magic, image_ok=ok == "set", copy_done=done == "set",
                       swap_type=swap_type, image_ok_flag=ok, copy_done_flag=done)

    @property
    def trailers(self) -> list[Trailer]:
        """Image 0's pair (primary, secondary)."""
        return [self.trailer(0), self.trailer(1)]

    def _trailer_write(self, slot: int, what: str) -> None:
        if self.on_trailer_write is not None:
            self.on_trailer_write(slot, what)

    def _write_flag(self, slot: int, off: int) -> None:
        # boot_write_trailer_flag: one byte BOOT_FLAG_SET padded with erased bytes to the
        # write alignment
        buf = bytes([BOOT_FLAG_SET]) + bytes([ERASED]) * (max(1, self.write_align) - 1)
        self.write(slot, off, buf[: BOOT_MAX_ALIGN], sync=True)

    def write_magic(self, slot: int) -> None:
        self._trailer_write(slot, "magic")
        self.write(slot, self.magic_off_of(slot), BOOT_MAGIC, sync=True)

    def write_image_ok(self, slot: int) -> None:
        self._trailer_write(slot, "image_ok")
        self._write_flag(slot, self.image_ok_off_of(slot))

    def write_copy_done(self, slot: int) -> None:
        self._trailer_write(slot, "copy_done")
        self._write_flag(slot, self.copy_done_off_of(slot))

    def write_swap_info(self, slot: int, swap_type: int, image_num: int = 0) -> None:
        self._trailer_write(slot, "swap_info")
        self.write(slot, self.swap_info_off_of(slot), bytes([(image_num << 4) | swap_type]),
                   sync=True)

    def write_swap_size(self, slot: int, size: int) -> None:
        self.write(slot, self.swap_size_off_of(slot), size.to_bytes(4, "little"), sync=True)

    def erase_trailer(self, slot: int) -> None:
        self.erase_range(slot, self.status_off_of(slot), self.trailer_size)

    # --- swap status (boot_write_status / boot_read_status_bytes) ---------------------
    def _status_entry_off(self, slot: int, index: int, state: int) -> int:
        if index >= self.max_img_sectors:
            raise ValueError(f"swap status has room for {self.max_img_sectors} sectors")
        return (self.status_off_of(slot)
                + (index * BOOT_STATUS_STATE_COUNT + state - 1) * self.write_align)

    def write_status(self, index: int, primary: int = 0) -> None:
        """Sector ``index`` of the swap is done (its last state entry, in the primary)."""
        self._write_flag(primary, self._status_entry_off(primary, index, BOOT_STATUS_STATE_COUNT))

    def swap_progress(self, primary: int = 0) -> tuple[int, int] | None:
        """(swap type, sectors done) of a swap in progress in ``primary``'s image, else None.

        ``boot_status_source``: primary magic good and copy_done unset with a status
        entry written = a swap was interrupted; its type is in the primary's swap_info.
        """
        t = self.trailer(primary)
        if t.magic != "good" or t.copy_done_flag != "unset":
            return None
        done = 0
        while done < self.max_img_sectors and self.read(
                primary, self._status_entry_off(primary, done, BOOT_STATUS_STATE_COUNT),
                1)[0] == BOOT_FLAG_SET:
            done += 1
        if done == 0:
            return None
        info = self.read(primary, self.swap_info_off_of(primary), 1)[0] & 0x0F
        return info, done

    # --- image view -----------------------------------------------------------------
    def header_magic(self, slot: int) -> int:
        return int.from_bytes(self.read(slot, 0, 4), "little")

    def image_info(self, slot: int) -> ImageInfo | None:
        """The parsed image in a slot, or None if the slot holds no well-formed image."""
        if self.header_magic(slot) != IMAGE_MAGIC:
            return None
        try:
            return parse_image(self.read(slot))
        except ImageFormatError:
            return None

    def image_bytes(self, slot: int) -> bytes | None:
        info = self.image_info(slot)
        return None if info is None else self.read(slot, 0, info.total_size)

    def provision(self, image: bytes, slot: int = 0, *, confirm: bool = True) -> None:
        """Program ``image`` into ``slot`` (a primary) as a programmer would.

        A file of the slot's size is written as it is (``imgtool --pad [--confirm]`` put its
        trailer there); a shorter one gets magic + image_ok, as ``--pad --confirm`` would
        (unless ``confirm`` is False: a plain image, e.g. a firmware loader).
        """
        if len(image) > self.size(slot):
            raise ValueError(f"image of {len(image)} bytes exceeds slot {slot} "
                             f"({self.size(slot)} bytes)")
        self.erase(slot)
        self.write(slot, 0, image, sync=True)
        if confirm and len(image) <= self.status_off_of(slot):
            self.write_magic(slot)
            self.write_image_ok(slot)

    # --- migration ----------------------------------------------------------------------
    def _migrate(self, legacy: Path) -> None:
        try:
            raw = json.loads(legacy.read_text())
            slots = [raw["slot0"], raw["slot1"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{legacy}: unreadable trailer.json of an older simulator "
                             f"({exc}); delete {self.dir} to start with a blank flash") from exc
        codes = {"test": 2, "perm": 3, "revert": 4}
        for slot, t in enumerate(slots):
            self.erase_trailer(slot)
            if t.get("magic") == "good":
                self.write_magic(slot)
            elif t.get("magic") == "bad":
                self.write(slot, self.magic_off, bytes(BOOT_MAGIC_SZ), sync=True)
            if t.get("image_ok"):
                self.write_image_ok(slot)
            if t.get("copy_done"):
                self.write_copy_done(slot)
            if t.get("swap_type") in codes:
                self.write_swap_info(slot, codes[t["swap_type"]])
        status = raw.get("swap_status")
        if status and int(status.get("sector", 0)) > 0:
            # a swap was under way: the primary trailer is the swap's (boot_status_source)
            self.erase_trailer(0)
            self.write_magic(0)
            self.write_swap_info(0, int(status["type"]))
            for i in range(int(status["sector"])):
                self.write_status(i)
        legacy.rename(legacy.with_name("trailer.json.migrated"))

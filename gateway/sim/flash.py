"""Persistent flash of a simulated device: two MCUboot slots plus their trailer state.

Layout of a device's flash directory::

    slot0.bin     primary slot, raw, slot_size bytes, erased = 0xFF
    slot1.bin     secondary slot, same
    trailer.json  the MCUboot image-trailer fields of both slots (magic, image_ok,
                  copy_done, swap_type), written atomically (tmp + fsync + rename)

The trailer is kept beside the slot files rather than in their last bytes so the slot
files hold exactly what an upload wrote; the fields and their three-valued magic
(good / unset / bad) follow mcuboot ``boot/bootutil/src/bootutil_public.c``
(``struct boot_swap_state``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from gateway.mcuboot import IMAGE_MAGIC, ImageFormatError, ImageInfo, parse_image

ERASED = 0xFF
Magic = Literal["good", "unset", "bad"]


@dataclass
class Trailer:
    """``struct boot_swap_state`` of one slot (flags: True = BOOT_FLAG_SET)."""

    magic: Magic = "unset"
    image_ok: bool = False
    copy_done: bool = False
    swap_type: str | None = None  # "test" / "perm" as written by boot_write_swap_info

    @classmethod
    def erased(cls) -> Trailer:
        return cls()


class Flash:
    """The two slots of one image pair, backed by files (a restart is a power cycle)."""

    def __init__(self, directory: Path, slot_size: int) -> None:
        self.dir = directory
        self.slot_size = slot_size
        self.dir.mkdir(parents=True, exist_ok=True)
        self.trailers: list[Trailer] = [Trailer(), Trailer()]
        # MCUboot's swap status (progress of a swap in flight); None = no swap in progress
        self.swap_status: dict[str, int] | None = None
        for slot in (0, 1):
            p = self._slot_path(slot)
            if not p.exists() or p.stat().st_size != slot_size:
                with open(p, "wb") as f:
                    f.write(bytes([ERASED]) * slot_size)
        tp = self.dir / "trailer.json"
        if tp.exists():
            raw = json.loads(tp.read_text())
            self.trailers = [Trailer(**raw["slot0"]), Trailer(**raw["slot1"])]
            self.swap_status = raw.get("swap_status")

    def _slot_path(self, slot: int) -> Path:
        if slot not in (0, 1):
            raise ValueError(f"no slot {slot}")
        return self.dir / f"slot{slot}.bin"

    def is_blank(self) -> bool:
        """True when both slots are erased (a fresh device)."""
        return all(self.is_erased(s) for s in (0, 1))

    # --- raw access -----------------------------------------------------------------
    def read(self, slot: int, off: int = 0, length: int | None = None) -> bytes:
        n = self.slot_size - off if length is None else length
        with open(self._slot_path(slot), "rb") as f:
            f.seek(off)
            return f.read(n)

    def write(self, slot: int, off: int, data: bytes) -> None:
        if off < 0 or off + len(data) > self.slot_size:
            raise ValueError(f"write of {len(data)} bytes at {off} overruns slot {slot}")
        with open(self._slot_path(slot), "r+b") as f:
            f.seek(off)
            f.write(data)

    def erase(self, slot: int) -> None:
        """Erase the whole slot, trailer included (flash_area_erase of the area)."""
        with open(self._slot_path(slot), "r+b") as f:
            f.write(bytes([ERASED]) * self.slot_size)
            f.flush()
            os.fsync(f.fileno())
        self.trailers[slot] = Trailer.erased()
        self.save_trailers()

    def is_erased(self, slot: int) -> bool:
        chunk = 1 << 16
        with open(self._slot_path(slot), "rb") as f:
            while block := f.read(chunk):
                if block.count(ERASED) != len(block):
                    return False
        return self.trailers[slot].magic == "unset"

    def swap(self) -> None:
        """Exchange the contents of the two slots (the end result of a swap/revert)."""
        a, b = self.read(0), self.read(1)
        self.write(0, 0, b)
        self.write(1, 0, a)
        for slot in (0, 1):
            with open(self._slot_path(slot), "r+b") as f:
                os.fsync(f.fileno())

    def swap_sector(self, index: int, sector_size: int) -> None:
        """Exchange one sector of the two slots (one step of a swap)."""
        off = index * sector_size
        n = min(sector_size, self.slot_size - off)
        a, b = self.read(0, off, n), self.read(1, off, n)
        self.write(0, off, b)
        self.write(1, off, a)
        for slot in (0, 1):
            with open(self._slot_path(slot), "r+b") as f:
                os.fsync(f.fileno())

    def save_trailers(self) -> None:
        tp = self.dir / "trailer.json"
        tmp = tp.with_suffix(".json.tmp")
        data: dict[str, object] = {"slot0": asdict(self.trailers[0]), "slot1": asdict(self.trailers[1])}
        if self.swap_status is not None:
            data["swap_status"] = self.swap_status
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, tp)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

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

    def provision(self, image: bytes) -> None:
        """Program ``image`` into the primary slot as a programmer would (no trailer)."""
        if len(image) > self.slot_size:
            raise ValueError(f"initial image of {len(image)} bytes exceeds the slot")
        self.erase(0)
        self.write(0, 0, image)

"""MCUboot (swap mode) as the simulator models it: swap-type decision, validation, swap.

Rules and where they come from (mcu-tools/mcuboot):

* ``boot_swap_type_multi`` / ``boot_swap_tables`` (boot/bootutil/src/bootutil_public.c):
  secondary magic good + image_ok unset -> TEST; secondary magic good + image_ok set ->
  PERM; primary magic good + image_ok unset + copy_done set and secondary magic unset ->
  REVERT; anything else -> NONE.
* ``boot_set_next`` (bootutil_public.c): the trailer writes done by img_mgmt's state write
  and by ``boot_write_img_confirmed``; a bad magic on the non-active slot erases it.
* ``boot_validated_swap_type`` / ``boot_validate_slot`` (boot/bootutil/src/loader.c): for
  any upgrade type the secondary image is validated first; an erased header means "no
  bootable image" (swap type NONE, nothing erased); an invalid image (hash, signature,
  header) makes MCUboot erase ("scramble") the whole secondary slot and boot the primary.
* ``boot_perform_update`` (loader.c): after the swap, REVERT and PERM set image_ok in the
  primary trailer (``swap_set_image_ok``) and every upgrade sets copy_done; the secondary
  trailer is left erased, which is what makes the next unconfirmed reset a REVERT.
* Swap progress (``boot_status``): the swap runs sector by sector and a status entry is
  written into the primary slot's trailer after each sector (``gateway/sim/flash.py`` has the
  layout); a boot that finds primary magic good, copy_done unset and status entries written
  resumes the swap from there (``boot_status_source`` / ``boot_read_status``,
  ``boot_swap_image`` continues with ``bs->idx``) before anything else, without validating
  again. ``on_swap_step`` lets the fault model cut the power between two sectors.
* MCUBOOT_VALIDATE_PRIMARY_SLOT (Zephyr's default): the primary image is validated before
  it is jumped to; if it is not valid the boot stops ("Unable to find bootable image").
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from gateway.mcuboot import (
    ImageFormatError,
    SignatureError,
    TrustedKey,
    parse_image,
    verify_signature,
)
from gateway.sim.faults import PowerCut
from gateway.sim.flash import Flash


class SwapType(enum.IntEnum):
    """BOOT_SWAP_TYPE_* (bootutil/bootutil_public.h)."""

    NONE = 1
    TEST = 2
    PERM = 3
    REVERT = 4
    FAIL = 5
    PANIC = 0xFF


def swap_type(flash: Flash) -> SwapType:
    """``boot_swap_type_multi``: the ``boot_swap_tables`` lookup over the two trailers
    (a bad image_ok/copy_done byte matches neither SET nor UNSET)."""
    p, s = flash.trailers
    if s.magic == "good" and s.image_ok_flag == "unset":
        return SwapType.TEST
    if s.magic == "good" and s.image_ok_flag == "set":
        return SwapType.PERM
    if (p.magic == "good" and s.magic == "unset" and p.image_ok_flag == "unset"
            and p.copy_done_flag == "set"):
        return SwapType.REVERT
    return SwapType.NONE


class BootError(Exception):
    """``boot_set_next`` failure codes (BOOT_EBADVECT / BOOT_EBADIMAGE)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def set_next(flash: Flash, slot: int, active: bool, confirm: bool) -> None:
    """``boot_set_next`` (bootutil_public.c, swap build)."""
    if active:
        confirm = True
    t = flash.trailer(slot)
    if t.magic == "good":
        # "If non-active then swap already scheduled, else confirm needed."
        if active and t.image_ok_flag == "unset":
            flash.write_image_ok(slot)
    elif t.magic == "unset":
        if not active:
            flash.write_magic(slot)
            if confirm:
                flash.write_image_ok(slot)
            flash.write_swap_info(slot, SwapType.PERM if confirm else SwapType.TEST)
    else:  # bad magic
        if active:
            raise BootError("EBADVECT")
        flash.erase(slot)
        raise BootError("EBADIMAGE")


def write_img_confirmed(flash: Flash) -> None:
    """``boot_write_img_confirmed`` = boot_set_confirmed_multi -> boot_set_next(primary)."""
    set_next(flash, 0, active=True, confirm=True)


@dataclass(frozen=True)
class BootResult:
    """What one pass of the bootloader did."""

    outcome: str  # "normal", "swap", "revert", "refused: <reason>", "halt: <reason>"
    swap_type: SwapType
    booted: bool  # False: no bootable image, the device stays dark
    permanent: bool = False


class Validator:
    """Image validation with a cache (signature checks run imgtool; images repeat)."""

    def __init__(self, keys: list[TrustedKey] | None) -> None:
        self.keys = keys  # None = MCUboot built without signature checking
        self._cache: dict[bytes, str | None] = {}

    def problem(self, slot_bytes: bytes) -> str | None:
        """None if MCUboot would accept the image, else the reason it refuses it."""
        digest = hashlib.sha256(slot_bytes).digest()
        if digest in self._cache:
            return self._cache[digest]
        reason: str | None
        try:
            info = parse_image(slot_bytes)
            if info.hdr_size + info.img_size >= len(slot_bytes):
                reason = "image larger than the slot"
            elif not info.hash_valid:
                reason = "hash mismatch"
            elif self.keys is not None:
                verify_signature(slot_bytes[: info.total_size], self.keys)
                reason = None
            else:
                reason = None
        except (ImageFormatError, SignatureError) as exc:
            reason = str(exc)
        self._cache[digest] = reason
        return reason


def _swap(flash: Flash, st: SwapType, start: int, sector_size: int,
          on_swap_step: Callable[[int, int], bool] | None) -> None:
    """Exchange the slots sector by sector, recording progress in the primary trailer.

    As MCUboot's swap (loader.c ``boot_swap_image``, swap_scratch.c): the primary trailer
    gets magic, swap_info and swap_size before the first sector moves, a status entry after
    each sector, and at the end copy_done (plus image_ok for PERM/REVERT,
    ``swap_set_image_ok``); the secondary trailer ends erased. The image bytes in front of
    the trailers are exchanged; the trailers themselves are written, not exchanged.
    """
    data_end = flash.status_off
    sectors = -(-data_end // sector_size)
    if start == 0:
        flash.erase_trailer(0)
        flash.write_swap_info(0, int(st))
        flash.write_swap_size(0, data_end)
        flash.write_magic(0)
    for i in range(start, sectors):
        if on_swap_step is not None and on_swap_step(i, sectors):
            raise PowerCut(f"power lost before sector {i}/{sectors} of a {st.name} swap")
        off = i * sector_size
        n = min(sector_size, data_end - off)
        a, b = flash.read(0, off, n), flash.read(1, off, n)
        flash.write(0, off, b, sync=True)
        flash.write(1, off, a, sync=True)
        flash.write_status(i)
    flash.erase_trailer(1)
    if st in (SwapType.REVERT, SwapType.PERM):
        flash.write_image_ok(0)
    flash.write_copy_done(0)


def run_bootloader(flash: Flash, validator: Validator,
                   on_swap_step: Callable[[int, int], bool] | None = None,
                   sector_size: int = 0x4000) -> BootResult:
    """One MCUboot pass at reset, swap mode (loader.c ``context_boot_go`` reduced).

    Raises PowerCut when ``on_swap_step`` says the power goes mid-swap; the swap status in
    flash then makes the next pass finish the swap.
    """
    outcome = "normal"
    performed = SwapType.NONE
    resume = flash.swap_progress()
    if resume is not None:
        st = SwapType(resume[0])
        _swap(flash, st, resume[1], sector_size, on_swap_step)
        performed = st
        outcome = "resumed revert" if st == SwapType.REVERT else "resumed swap"
        st = SwapType.NONE
    else:
        st = swap_type(flash)
    if st in (SwapType.TEST, SwapType.PERM, SwapType.REVERT):
        # boot_validated_swap_type -> boot_validate_slot(secondary)
        if flash.header_magic(1) == 0xFFFFFFFF:
            outcome = "normal"  # erased header: FIH_NO_BOOTABLE_IMAGE, no erase
        else:
            problem = validator.problem(flash.read(1))
            if problem is not None:
                flash.erase(1)  # boot_scramble_slot(secondary)
                outcome = f"refused: {problem}"
            else:
                _swap(flash, st, 0, sector_size, on_swap_step)
                performed = st
                outcome = "revert" if st == SwapType.REVERT else "swap"
    # MCUBOOT_VALIDATE_PRIMARY_SLOT
    if flash.header_magic(0) == 0xFFFFFFFF:
        return BootResult("halt: no image in the primary slot", performed, booted=False)
    problem = validator.problem(flash.read(0))
    if problem is not None:
        return BootResult(f"halt: primary image invalid ({problem})", performed, booted=False)
    return BootResult(outcome, performed, booted=True, permanent=performed == SwapType.PERM)

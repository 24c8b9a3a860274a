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
* Swap progress (``boot_status``, kept in the trailer / scratch area by MCUboot): the swap
  runs sector by sector and the progress is written to flash after each sector; a boot that
  finds a swap in progress resumes it from there (``boot_status_source`` says where the
  status is, ``boot_swap_image`` continues with ``bs->idx``) before anything else, without
  validating again. ``on_swap_step`` lets the fault model cut the power between two sectors.
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
from gateway.sim.flash import Flash, Trailer


class SwapType(enum.IntEnum):
    """BOOT_SWAP_TYPE_* (bootutil/bootutil_public.h)."""

    NONE = 1
    TEST = 2
    PERM = 3
    REVERT = 4
    FAIL = 5
    PANIC = 0xFF


def swap_type(flash: Flash) -> SwapType:
    """``boot_swap_type_multi``: the table lookup over the two trailers."""
    p, s = flash.trailers
    if s.magic == "good" and not s.image_ok:
        return SwapType.TEST
    if s.magic == "good" and s.image_ok:
        return SwapType.PERM
    if p.magic == "good" and s.magic == "unset" and not p.image_ok and p.copy_done:
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
    t = flash.trailers[slot]
    if t.magic == "good":
        # "If non-active then swap already scheduled, else confirm needed."
        if active and not t.image_ok:
            t.image_ok = True
            flash.save_trailers()
    elif t.magic == "unset":
        if not active:
            flash.trailers[slot] = Trailer(
                magic="good", image_ok=confirm, copy_done=False,
                swap_type="perm" if confirm else "test",
            )
            flash.save_trailers()
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
    """Exchange the slots sector by sector, persisting the progress (resumable)."""
    sectors = -(-flash.slot_size // sector_size)
    flash.swap_status = {"type": int(st), "sector": start, "sectors": sectors,
                         "sector_size": sector_size}
    flash.save_trailers()
    for i in range(start, sectors):
        if on_swap_step is not None and on_swap_step(i, sectors):
            raise PowerCut(f"power lost before sector {i}/{sectors} of a {st.name} swap")
        flash.swap_sector(i, sector_size)
        flash.swap_status = {**flash.swap_status, "sector": i + 1}
        flash.save_trailers()
    flash.trailers[0] = Trailer(
        magic="good",
        image_ok=st in (SwapType.REVERT, SwapType.PERM),
        copy_done=True,
        swap_type=None,
    )
    flash.trailers[1] = Trailer.erased()
    flash.swap_status = None
    flash.save_trailers()


def run_bootloader(flash: Flash, validator: Validator,
                   on_swap_step: Callable[[int, int], bool] | None = None,
                   sector_size: int = 0x4000) -> BootResult:
    """One MCUboot pass at reset, swap mode (loader.c ``context_boot_go`` reduced).

    Raises PowerCut when ``on_swap_step`` says the power goes mid-swap; the swap status in
    flash then makes the next pass finish the swap.
    """
    outcome = "normal"
    performed = SwapType.NONE
    resume = flash.swap_status
    if resume is not None:
        st = SwapType(resume["type"])
        _swap(flash, st, resume["sector"], resume.get("sector_size", sector_size), on_swap_step)
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

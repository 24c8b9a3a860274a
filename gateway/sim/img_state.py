"""Zephyr img_mgmt's view of the slots: active / next boot / in use / state flags / marks.

Owns the image group's slot logic, copied from Zephyr ``subsys/mgmt/mcumgr/grp/img_mgmt/src/``
(``img_mgmt_state.c`` at 0014f3dc - the 3.4-era file with ``img_mgmt_set_next_boot_slot`` -,
``img_mgmt.c``, ``zephyr_img_mgmt.c``), per bootloader mode the application is built for
(CONFIG_MCUBOOT_BOOTLOADER_MODE_*):

* ``img_mgmt_active_slot(image)``: 2 * image in multi-image builds; else the slot the running
  application is linked for (``FIXED_PARTITION_IS_RUNNING_APP_PARTITION(slot1_partition)``:
  direct-XIP builds for slot 1, a firmware loader in slot 1), or, in RAM-load builds, the
  slot MCUboot reports (``blinfo_lookup(BLINFO_RUNNING_SLOT)``, newer trees) - i.e. the slot
  MCUboot booted. ``img_mgmt_active_image()`` is 0.
* ``img_mgmt_get_next_boot_slot``: swap / overwrite / single builds from
  ``mcuboot_swap_type_multi`` (NONE -> active; PERM -> other, NORMAL; REVERT -> other;
  TEST -> other); DIRECT_XIP_WITH_REVERT from both slots' trailers (``read_directxip_state``:
  magic good + image_ok -> FOREVER, + copy_done -> REVERT, else ONCE; no magic -> UNSET):
  active REVERT -> other slot, REVERT; other UNSET -> active (TEST if active is ONCE); other
  newer and FOREVER -> other, NORMAL; other newer and ONCE -> other, TEST. DIRECT_XIP without
  revert (and, modelled the same way, RAM load): the other slot if it holds a newer
  version. This is what makes the "trap" of ``stm32f4_disco-direct-xip-revert``: a
  test-marked newer image MCUboot keeps skipping (wrong slot) stays "next boot, TEST".
* ``img_mgmt_state_read``: per image, the active slot gets ACTIVE (+ CONFIRMED unless the
  next boot is a REVERT); the other slot PENDING(+PERMANENT) / CONFIRMED per next boot; each
  image's active slot shows ``active`` (so image 1's primary too); slots whose
  ``img_mgmt_read_info`` fails are left out; ``"image"`` first in multi-image builds.
* ``img_mgmt_slot_in_use``: the active slot; unless CONFIG_MCUBOOT_BOOTLOADER_MODE_DIRECT_XIP,
  also the next-boot slot of a REVERT, and (without CONFIG_MCUMGR_GRP_IMG_ALLOW_ERASE_PENDING)
  the next-boot slot of a TEST or any slot when the next boot leaves the active slot.
* ``img_mgmt_set_next_boot_slot``: generic - confirming another image's slot is refused
  (IMAGE_CONFIRMATION_DENIED) unless ALLOW_CONFIRM_NON_ACTIVE_IMAGE_ANY, or
  ..._SECONDARY (default y) and it is not that image's active slot; test on the active slot
  -> IMAGE_SETTING_TEST_TO_ACTIVE_DENIED; a pending TEST allows only re-testing it;
  NORMAL / REVERT rules -> IMAGE_ALREADY_PENDING; then ``boot_set_next``. The
  DIRECT_XIP_WITH_REVERT build only refuses test on the active slot.
* upload slot (``img_mgmt_get_unused_slot_area_id``): single-image builds take the first of
  slots 0 / 1 not in use (direct-XIP: the inactive one), multi-image builds the opposite of
  the requested image's active slot if not in use; none -> NO_FREE_SLOT.
* ``img_mgmt_read_info``: NO_IMAGE for an erased header, INVALID_IMAGE_HEADER_MAGIC,
  NO_TLVS, INVALID_TLV (an erased TLV), TLV_MULTIPLE_HASHES_FOUND, HASH_NOT_FOUND: the hash is
  the unprotected area's TLV of the build's hash type and length (SHA-256 / 32 in Zephyr
  3.4; SHA-384 / SHA-512 with newer trees' CONFIG_MCUBOOT_BOOTLOADER_USES_SHA512 & co.).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from smp.image_management import IMG_MGMT_ERR

from gateway.mcuboot import IMAGE_MAGIC, TLV_INFO_MAGIC, TLV_PROT_INFO_MAGIC, Version
from gateway.sim.boot import SwapType, swap_type
from gateway.sim.image_format import HASH_TLV_BY_NAME

if TYPE_CHECKING:
    from gateway.sim.config import SimDeviceConfig
    from gateway.sim.flash import Flash

GROUP_IMG = 1


class ImgError(Exception):
    """An img_mgmt group error code (IMG_MGMT_ERR)."""

    def __init__(self, rc: int) -> None:
        super().__init__(rc)
        self.rc = rc


class NextBoot(enum.Enum):
    """``enum img_mgmt_next_boot_type``."""

    NORMAL = "normal"
    TEST = "test"
    REVERT = "revert"


class XipState(enum.IntEnum):
    """``read_directxip_state`` (img_mgmt_state.c, DIRECT_XIP_WITH_REVERT)."""

    UNSET = 0
    ONCE = 1
    REVERT = 2
    FOREVER = 3


@dataclass(frozen=True)
class SlotInfo:
    version: Version
    hash: bytes
    flags: int


@dataclass(frozen=True)
class SlotState:
    """One entry of an image state answer."""

    image: int
    slot: int  # absolute slot (2 * image + 0/1)
    info: SlotInfo
    active: bool
    pending: bool
    confirmed: bool
    permanent: bool


class ImgMgmt:
    """img_mgmt of one device. ``running_slot()``: the slot MCUboot booted image 0 from."""

    def __init__(self, cfg: SimDeviceConfig, flash: Flash,
                 running_slot: Callable[[], int]) -> None:
        self.cfg = cfg
        self.flash = flash
        self.running_slot = running_slot
        self.mode = cfg.mcuboot_mode
        self.images = cfg.image_count
        self.netcore = frozenset(i + 1 for i, img in enumerate(cfg.extra_images)
                                 if img.update == "netcore")
        self.hash_tlv, self.hash_len = HASH_TLV_BY_NAME[cfg.hash_algorithm]

    # --- slots --------------------------------------------------------------------------
    @staticmethod
    def slot_to_image(slot: int) -> int:
        return slot // 2

    @staticmethod
    def opposite(slot: int) -> int:
        return slot ^ 1

    def active_image(self) -> int:
        return 0

    def active_slot(self, image: int) -> int:
        if self.images > 1:
            return 2 * image
        return self.running_slot()

    def other_slot(self) -> int:
        """``img_mgmt_get_other_slot``: the erase command's default slot."""
        return 0 if self.active_slot(self.active_image()) == 1 else 1

    def has_area(self, slot: int) -> bool:
        """``img_mgmt_flash_area_id(slot) >= 0``."""
        return self.flash.has_slot(slot)

    # --- img_mgmt_read_info -------------------------------------------------------------
    def read_info(self, slot: int) -> SlotInfo:
        if not self.has_area(slot):
            raise ImgError(IMG_MGMT_ERR.INVALID_SLOT)
        if slot % 2 == 0 and slot // 2 in self.netcore:
            # the network core's flash: no flash area the application can open
            raise ImgError(IMG_MGMT_ERR.FLASH_OPEN_FAILED)
        f = self.flash
        hdr = f.read(slot, 0, 32)
        magic, _load, hdr_size, _prot, img_size, flags = struct.unpack_from("<IIHHII", hdr)
        if magic == 0xFFFFFFFF:
            raise ImgError(IMG_MGMT_ERR.NO_IMAGE)
        if magic != IMAGE_MAGIC:
            raise ImgError(IMG_MGMT_ERR.INVALID_IMAGE_HEADER_MAGIC)
        version = Version(*struct.unpack_from("<BBHI", hdr, 20))
        size = f.size(slot)
        off = hdr_size + img_size

        def info_at(o: int) -> tuple[int, int]:
            if o + 4 > size:
                raise ImgError(IMG_MGMT_ERR.NO_TLVS)
            m, n = struct.unpack_from("<HH", f.read(slot, o, 4))
            return m, n

        m, n = info_at(off)
        if m == TLV_PROT_INFO_MAGIC:
            off += n
            m, n = info_at(off)
        if m != TLV_INFO_MAGIC:
            raise ImgError(IMG_MGMT_ERR.NO_TLVS)
        data_off, data_end = off + 4, off + n
        found: bytes | None = None
        while data_off + 4 <= data_end and data_off + 4 <= size:
            t, _, ln = struct.unpack_from("<BBH", f.read(slot, data_off, 4))
            if t == 0xFF and ln == 0xFFFF:
                raise ImgError(IMG_MGMT_ERR.INVALID_TLV)
            if t != self.hash_tlv or ln != self.hash_len:
                data_off += 4 + ln
                continue
            if found is not None:
                raise ImgError(IMG_MGMT_ERR.TLV_MULTIPLE_HASHES_FOUND)
            data_off += 4
            if data_off + self.hash_len > data_end:
                raise ImgError(IMG_MGMT_ERR.TLV_INVALID_SIZE)
            found = f.read(slot, data_off, self.hash_len)
        if found is None:
            raise ImgError(IMG_MGMT_ERR.HASH_NOT_FOUND)
        return SlotInfo(version, found, flags)

    def info_or_none(self, slot: int) -> SlotInfo | None:
        try:
            return self.read_info(slot)
        except ImgError:
            return None

    def find_by_hash(self, h: bytes) -> int | None:
        for slot in range(2 * self.images):
            info = self.info_or_none(slot)
            if info is not None and info.hash == h:
                return slot
        return None

    # --- next boot ----------------------------------------------------------------------
    def swap_type(self, image: int) -> SwapType:
        return swap_type(self.flash, image, netcore=image in self.netcore)

    def _xip_state(self, slot: int) -> XipState:
        t = self.flash.trailer(slot)
        if t.magic == "good":
            if t.image_ok_flag == "set":
                return XipState.FOREVER
            if t.copy_done_flag == "set":
                return XipState.REVERT
            return XipState.ONCE
        return XipState.UNSET

    def next_boot(self, image: int) -> tuple[int, NextBoot]:
        """``img_mgmt_get_next_boot_slot``."""
        active = self.active_slot(image)
        other = self.opposite(active)
        if self.mode not in ("direct-xip", "direct-xip-with-revert", "ram-load"):
            if not self.has_area(other):
                return active, NextBoot.NORMAL  # single slot: MCUboot boots it
            st = self.swap_type(image)
            if st == SwapType.NONE:
                return active, NextBoot.NORMAL
            if st == SwapType.PERM:
                return other, NextBoot.NORMAL
            if st == SwapType.REVERT:
                return other, NextBoot.REVERT
            return other, NextBoot.TEST
        a_err = o_err = None
        try:
            aver = self.read_info(active).version
        except ImgError as e:
            a_err = e.rc
        try:
            over = self.read_info(other).version
        except ImgError as e:
            o_err = e.rc
        if self.mode != "direct-xip-with-revert":
            if a_err is None and o_err is None and aver.key()[:3] < over.key()[:3]:
                return other, NextBoot.NORMAL
            return active, NextBoot.NORMAL
        if a_err is not None or (o_err is not None and o_err != IMG_MGMT_ERR.NO_IMAGE):
            return active, NextBoot.NORMAL  # "we do not really know what will happen"
        if o_err == IMG_MGMT_ERR.NO_IMAGE:
            return active, NextBoot.NORMAL
        a_state, o_state = self._xip_state(active), self._xip_state(other)
        if a_state == XipState.REVERT:
            return other, NextBoot.REVERT
        if o_state == XipState.UNSET:
            return active, NextBoot.TEST if a_state == XipState.ONCE else NextBoot.NORMAL
        if aver.key()[:3] < over.key()[:3]:
            if o_state == XipState.FOREVER:
                return other, NextBoot.NORMAL
            if o_state == XipState.ONCE:
                return other, NextBoot.TEST
        return active, NextBoot.NORMAL

    # --- state read ---------------------------------------------------------------------
    def states(self) -> list[SlotState]:
        out: list[SlotState] = []
        for image in range(self.images):
            nbs, kind = self.next_boot(image)
            slot_a = self.active_slot(image)
            slot_o = self.opposite(slot_a)
            flags = {slot_a: {"active"}, slot_o: set()}
            if kind != NextBoot.REVERT:
                flags[slot_a].add("confirmed")
            if nbs != slot_a:
                if kind == NextBoot.NORMAL:
                    flags[slot_o] = {"pending", "permanent"}
                elif kind == NextBoot.REVERT:
                    flags[slot_o] = {"confirmed"}
                else:
                    flags[slot_o] = {"pending"}
            for slot in sorted((slot_a, slot_o)):
                info = self.info_or_none(slot)
                if info is None:
                    continue  # img_mgmt_state_encode_slot skips unreadable slots
                f = flags[slot]
                out.append(SlotState(image, slot, info, "active" in f, "pending" in f,
                                     "confirmed" in f, "permanent" in f))
        return out

    # --- in use / state write -----------------------------------------------------------
    def slot_in_use(self, slot: int) -> bool:
        image = self.slot_to_image(slot)
        active = self.active_slot(image)
        if self.mode != "direct-xip":
            nbs, kind = self.next_boot(image)
            if slot == nbs and kind == NextBoot.REVERT:
                return True
            if ((slot == nbs and kind == NextBoot.TEST)
                    or (active != nbs and kind == NextBoot.NORMAL)):
                if not self.cfg.allow_erase_pending:
                    return True
        return active == slot

    def set_next_boot_slot(self, slot: int, confirm: bool) -> tuple[int, bool]:
        """``img_mgmt_set_next_boot_slot`` checks; returns (slot, active) for boot_set_next."""
        if self.mode == "direct-xip-with-revert":
            active = self.active_slot(self.active_image())
            if slot == active and not confirm:
                raise ImgError(IMG_MGMT_ERR.IMAGE_SETTING_TEST_TO_ACTIVE_DENIED)
            return slot, slot == active
        image = self.slot_to_image(slot)
        active = self.active_slot(image)
        nbs, kind = self.next_boot(image)
        c = self.cfg
        if (not c.allow_confirm_non_active_image_any and confirm
                and image != self.active_image()
                and (not c.allow_confirm_non_active_image_secondary or slot == active)):
            raise ImgError(IMG_MGMT_ERR.IMAGE_CONFIRMATION_DENIED)
        if not confirm and slot == active:
            raise ImgError(IMG_MGMT_ERR.IMAGE_SETTING_TEST_TO_ACTIVE_DENIED)
        if kind == NextBoot.TEST:
            if not confirm and slot == nbs:
                return -1, False  # nothing to do
            raise ImgError(IMG_MGMT_ERR.IMAGE_ALREADY_PENDING)
        if kind == NextBoot.NORMAL:
            if confirm and slot == nbs:
                return -1, False
            if (slot == active and active != nbs) or (not confirm and slot != active
                                                      and slot == nbs):
                raise ImgError(IMG_MGMT_ERR.IMAGE_ALREADY_PENDING)
        if kind == NextBoot.REVERT:
            if confirm and slot == nbs:
                return -1, False
            if not confirm:
                raise ImgError(IMG_MGMT_ERR.IMAGE_ALREADY_PENDING)
        return slot, slot == active

    def upload_slot(self, image: int) -> int | None:
        """``img_mgmt_get_unused_slot_area_id``."""
        if self.images == 1:
            for slot in (0, 1):
                if self.has_area(slot) and not self.slot_in_use(slot):
                    return slot
            return None
        if image >= self.images:
            return None
        slot = self.opposite(self.active_slot(image))
        return slot if not self.slot_in_use(slot) and self.has_area(slot) else None

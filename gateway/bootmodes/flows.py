"""One update flow per MCUboot mode: what the engine may do, what it writes, what it expects.

Owns the per-mode rules; the engine (``gateway/engine/``) stays the state machine and the
journal writer and asks a ``ModeFlow``:

* ``refuse``: what this mode cannot do safely with this image on this device (decided before
  a byte is sent);
* ``choose``: which build of an image set to send (direct-XIP: the one linked for the slot
  the upload lands in);
* ``mark``: what to write after the upload - a test mark, nothing (the reset alone installs),
  and ``test_boot``: whether the image then runs unconfirmed and needs the health check and
  confirm;
* ``uploaded_problem``: whether the image landed where this mode needs it (checked from the
  device's own state read, before anything is marked);
* ``installed`` / ``rolled_back``: the wording of the outcome, honest about what can still be
  undone.

What each decision rests on (the trust rule: (a) what the image's signature covers, (b) what
the device reports, (c) the gateway's configuration - never an artifact's manifest alone):
the mode is (b) bootloader info or (c) ``mcuboot_mode`` (``modes.py``); ``refuse`` compares (a)
the signed version, flags and verification result with (b) the running version and
no-downgrade flag and (c) the device config; ``choose`` (direct-XIP) takes the slot a build is
linked for from (a) its ROM_FIXED load address against (c) ``slot_offsets`` - the artifact's
``slot`` label is only cross-checked (a mismatch is logged; the signed address decides), and
without ``slot_offsets`` (the device cannot report them) a direct-XIP build is refused;
``uploaded_problem`` reads (b) the device's state.

Mode by mode (MCUboot ``boot/bootutil/src/loader.c``, Zephyr ``img_mgmt_state.c``, and what the
Renode firmware in ``shared/firmware/stm32f4_disco-*`` answered):

* swap using scratch / move / offset: upload to the secondary, test mark, reset (MCUboot swaps),
  the image runs unconfirmed, health check, confirm; not confirmed -> MCUboot swaps back at the
  next reset.
* overwrite-only: img_mgmt accepts the test mark, but MCUboot copies the secondary over the
  primary and erases the secondary: right after the reset the new image is active *and
  confirmed*, the old one is gone. No revert exists, so the gateway installs only an image
  whose hash and signature it verified itself (not an encrypted or unsigned one) and resets
  only after the device reported the uploaded slot's hash equal to the image's and pending.
* direct-XIP with revert: both slots run in place; the upload goes to the inactive slot, so
  the build linked for *that* slot is sent - proven by its IMAGE_F_ROM_FIXED load address,
  covered by the signature (a), against the device config's ``slot_offsets`` (c); the
  artifact's ``slot`` field is only cross-checked, and a build whose slot cannot be proven is
  refused before a byte is sent; never one linked for the other slot - test-marked,
  MCUboot would skip it forever and img_mgmt would refuse every later upload (rc 9
  NO_FREE_SLOT, ``check-output-wrongslot-test-marked.txt``). Test mark, reset, health check,
  confirm; not confirmed -> MCUboot erases the slot and boots the other.
* direct-XIP without revert, RAM load: MCUboot runs the newest valid image; no mark, the reset
  installs it for good (the previous image stays in the other slot, but nothing makes MCUboot
  boot it again). Only fully verified images; RAM load needs IMAGE_F_RAM_LOAD.
* single application slot, single-slot RAM load, firmware loader: the running image is
  overwritten by the update itself (through MCUboot's serial recovery or the loader
  application); refused unless the device config enables that path (``recovery``), see
  ``gateway/bootmodes/recovery.py``.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING, Protocol

from smp.image_management import ImageState

from gateway.bootmodes.modes import DeviceMode, Mode, ModeSource
from gateway.images import ImageRefused, Refusal, SetMember, VerifiedImage, VerifiedImageSet
from gateway.mcuboot import Version, trailer_size

if TYPE_CHECKING:
    from gateway.config import DeviceConfig

log = logging.getLogger("gateway.bootmodes")

class Mark(enum.StrEnum):
    TEST = "test"  # image state write, confirm=false: MCUboot's TEST swap
    PERMANENT = "permanent"  # image state write by hash, confirm=true on the secondary: PERM
    NONE = "none"  # nothing is written: the reset alone installs (newest image wins)


class SlotView(Protocol):
    """One MCUboot image's slots as the device reports them (``engine.Slots`` is one)."""

    active: ImageState | None
    other: ImageState | None


def _active_slot(view: SlotView) -> int | None:
    return view.active.slot if view.active is not None else None


class ModeFlow:
    """The rules of one MCUboot mode (see the module docstring); one instance per attempt."""

    revertible = True  # MCUboot takes a tested image back when it is not confirmed
    test_boot = True  # after the reset the image runs unconfirmed: health check + confirm
    mark = Mark.TEST
    can_stage = True  # the image may wait in the secondary slot (download-only, windows)

    def __init__(self, dm: DeviceMode, dev: DeviceConfig) -> None:
        self.dm = dm
        self.dev = dev

    @property
    def mode(self) -> Mode:
        return self.dm.mode

    def describe(self) -> str:
        return self.dm.describe()

    # -- before a byte is sent -----------------------------------------------------------
    def trailer(self, image: VerifiedImage) -> int:
        return trailer_size(self.dev.flash_write_align, self.dev.max_img_sectors,
                            encrypted=image.info.is_encrypted)

    def refuse(self, image: VerifiedImage, running: Version | None) -> ImageRefused | None:
        """What this mode cannot do safely with ``image``; None when it may go ahead."""
        if self.dev.group is not None and not self.revertible:
            return ImageRefused(Refusal.MODE, f"{self.mode.value} cannot take an installed image "
                                "back, and a group's all-or-nothing switch needs every member to "
                                "be able to revert: take the device out of its group")
        if self.dm.no_downgrade and running is not None and not image.version > running:
            return ImageRefused(Refusal.NOT_NEWER, f"the device's MCUboot refuses downgrades "
                                f"(bootloader info no-downgrade): {image.version} is not newer than "
                                f"the running {running}")
        return None

    def choose(self, image: VerifiedImage, view: SlotView) -> VerifiedImage:
        """The build to send. A set of slot builds is only meaningful in direct-XIP; elsewhere
        the image runs from the primary slot: its build for slot 0."""
        if isinstance(image, VerifiedImageSet):
            if not image.slot_builds:
                raise ImageRefused(Refusal.BAD_SET, "an image set of several images needs the "
                                   "multi-image flow")  # the engine routes those elsewhere
            primary = next((m for m in image.members if m.slot == 0), None)
            if primary is None:
                raise ImageRefused(Refusal.WRONG_SLOT, f"{self.mode.value} runs images from the "
                                   "primary slot; the artifact has no build for slot 0")
            return primary.verified
        return image

    # -- after the upload ----------------------------------------------------------------
    def uploaded_problem(self, view: SlotView, image: VerifiedImage) -> str | None:
        return None

    # -- outcome wording -----------------------------------------------------------------
    def installed(self, old: str | None, image: VerifiedImage, how: str) -> str:
        return f"{old} -> {image.version}, {how}"

    def refused_at_boot(self, image: VerifiedImage, now: str) -> str:
        return (f"rollback: MCUboot refused {image.version} at boot (signature or validation "
                f"failed on the device; its secondary slot was erased); still running {now}. "
                "Check that the image is signed with the key the device's MCUboot was built "
                "with (the gateway's trusted_keys accept it, the bootloader does not)")

    def reverted(self, image: VerifiedImage, now: str) -> str:
        return (f"rollback: {image.version} booted but was not confirmed before the next reset "
                f"(crash or watchdog); MCUboot reverted to {now}")


class SwapFlow(ModeFlow):
    """Swap using scratch / move / offset: the flow the gateway always drove."""


class OverwriteFlow(ModeFlow):
    revertible = False
    test_boot = False
    mark = Mark.TEST  # img_mgmt accepts it; MCUboot overwrites whatever the mark

    def trailer(self, image: VerifiedImage) -> int:
        return trailer_size(self.dev.flash_write_align, self.dev.max_img_sectors,
                            overwrite_only=True)

    def refuse(self, image: VerifiedImage, running: Version | None) -> ImageRefused | None:
        base = super().refuse(image, running)
        if base is not None:
            return base
        if not image.fully_verified:
            why = image.unverified or "it is unsigned"
            return ImageRefused(Refusal.MODE, "overwrite-only has no revert: the gateway installs "
                                "only images whose hash and signature it verified itself, and "
                                f"this one could not be ({why})")
        return None

    def installed(self, old: str | None, image: VerifiedImage, how: str) -> str:
        return (f"{old} -> {image.version}: installed permanently, no revert possible "
                "(overwrite-only: MCUboot copied it over the previous image and erased the "
                "secondary slot)")

    def refused_at_boot(self, image: VerifiedImage, now: str) -> str:
        return (f"MCUboot refused {image.version} at boot and erased it (signature or validation "
                f"failed on the device); nothing was overwritten, still running {now}")


class DirectXipFlow(ModeFlow):
    """Direct-XIP, with or without revert; RAM load shares the slot choice (see RamLoadFlow)."""

    def __init__(self, dm: DeviceMode, dev: DeviceConfig) -> None:
        super().__init__(dm, dev)
        with_revert = dm.mode == Mode.DIRECT_XIP_WITH_REVERT
        self.revertible = with_revert
        self.test_boot = with_revert
        self.mark = Mark.TEST if with_revert else Mark.NONE
        # an uploaded newer image runs at the device's next reset, whatever causes it
        self.can_stage = with_revert

    def trailer(self, image: VerifiedImage) -> int:
        # no swap status: magic + flags (MCUboot's direct-XIP keeps no swap progress)
        return trailer_size(self.dev.flash_write_align, self.dev.max_img_sectors,
                            overwrite_only=True)

    def refuse(self, image: VerifiedImage, running: Version | None) -> ImageRefused | None:
        base = super().refuse(image, running)
        if base is not None:
            return base
        if running is not None and not image.version > running:
            return ImageRefused(Refusal.NOT_NEWER, f"{self.mode.value} boots the highest version "
                                f"it finds: {image.version} is not newer than the running "
                                f"{running} and would never run (allow_downgrade cannot change that)")
        if image.info.is_encrypted:
            return ImageRefused(Refusal.ENCRYPTED, f"{self.mode.value} runs images in place from "
                                "flash: MCUboot cannot decrypt them there")
        if not self.revertible and not image.fully_verified:
            why = image.unverified or "it is unsigned"
            return ImageRefused(Refusal.MODE, f"{self.mode.value} without revert installs for "
                                "good: the gateway sends only images whose hash and signature it "
                                f"verified, and this one could not be ({why})")
        return None

    def slot_of(self, member: SetMember | None, image: VerifiedImage) -> int:
        """The slot a build is linked for, proven from signed data only: its IMAGE_F_ROM_FIXED
        load address - in the MCUboot header, covered by the signature (a) - against the
        device's ``slot_offsets`` (c). The device cannot report its slot offsets (Zephyr's
        img_mgmt slot info gives sizes, bootloader info the mode), so direct-XIP needs them in
        the config. The artifact's ``slot`` label is unsigned manifest metadata: only
        cross-checked, never decides. ImageRefused when the slot cannot be proven."""
        offs = self.dev.slot_offsets
        if offs is None:
            raise ImageRefused(Refusal.WRONG_SLOT, f"{self.mode.value} runs the image in place, "
                               "so the gateway must prove which slot each build is linked for "
                               "from its signed ROM_FIXED load address: set slot_offsets (the "
                               "flash offsets of slot 0 and slot 1, the imgtool --rom-fixed "
                               "values) in the device config; the device does not report them "
                               "and an artifact's slot label is not signed. Nothing was sent")
        fixed = image.info.rom_fixed
        if fixed is None:
            raise ImageRefused(Refusal.WRONG_SLOT, f"{self.mode.value} runs the image in place: "
                               f"{member.name if member is not None and member.name else image.version}"
                               " is not signed with --rom-fixed, so which slot it is linked for "
                               "cannot be proven (an artifact's slot label is not signed)")
        if fixed not in offs:
            raise ImageRefused(Refusal.WRONG_SLOT, f"{image.version} is linked for flash "
                               f"offset {fixed:#x}, which is neither slot of the device "
                               f"(slot_offsets {[hex(o) for o in offs]})")
        by_addr = offs.index(fixed)
        if member is not None and member.slot is not None and by_addr != member.slot:
            log.warning("device=%s the artifact calls %s the slot %d build, but it is signed for "
                        "%#x = slot %d: the signed address decides", self.dev.id, member.name,
                        member.slot, fixed, by_addr)
        return by_addr

    def choose(self, image: VerifiedImage, view: SlotView) -> VerifiedImage:
        active = _active_slot(view)
        if active is None:
            raise ImageRefused(Refusal.MODE, "the device reports no running image slot")
        target_slot = 1 - active
        members: list[tuple[SetMember | None, VerifiedImage]]
        if isinstance(image, VerifiedImageSet):
            if not image.slot_builds:
                raise ImageRefused(Refusal.BAD_SET, f"{self.mode.value} updates one image; this "
                                   f"set holds {image.describe()}")
            members = [(m, m.verified) for m in image.members]
        else:
            members = [(None, image)]
        ram = self.mode == Mode.RAM_LOAD  # loaded to RAM: not linked for a flash slot
        # a build already on the device (resumed upload, or running) is the one in flight
        on_device = {bytes(s.hash): s.slot for s in (view.active, view.other)
                     if s is not None and s.hash}
        for m, img in members:
            where = on_device.get(img.hash)
            if where is None:
                continue
            if where == active:
                return img  # already running this build
            if ram or self.slot_of(m, img) == where:
                return img  # uploaded (or resumed) into the slot it is linked for
        if ram:
            # any build runs from RAM: the artifact's label only picks among equals
            return next((img for m, img in members if m is not None and m.slot == target_slot),
                        members[0][1])
        linked_slots = [self.slot_of(m, img) for m, img in members]  # proven, or refused
        for (_m, img), linked in zip(members, linked_slots, strict=True):
            if linked == target_slot:
                return img
        raise ImageRefused(Refusal.WRONG_SLOT, f"the upload goes to slot {target_slot} (the device "
                           f"runs slot {active}), but the artifact has only a build for slot "
                           f"{', '.join(str(s) for s in linked_slots)}: never uploaded (MCUboot "
                           "would skip it, and test-marked it would block every later upload)")

    def uploaded_problem(self, view: SlotView, image: VerifiedImage) -> str | None:
        active = _active_slot(view)
        other = view.other
        if active is None or other is None or not other.hash or bytes(other.hash) != image.hash:
            return None  # the generic check reports a missing image
        if other.slot == active:
            return "the image landed in the running slot"
        return None

    def installed(self, old: str | None, image: VerifiedImage, how: str) -> str:
        if self.revertible:
            return f"{old} -> {image.version}, {how} (direct-XIP: runs in place from its slot)"
        return (f"{old} -> {image.version}: installed, no revert in {self.mode.value} (MCUboot "
                f"boots the newest valid image; {old} stays in the other slot until overwritten)")

    def refused_at_boot(self, image: VerifiedImage, now: str) -> str:
        return (f"rollback: MCUboot did not boot {image.version} (validation failed, or it ran "
                f"and was not confirmed before the next reset) and erased its slot; running {now}")

    def reverted(self, image: VerifiedImage, now: str) -> str:
        return (f"rollback: {image.version} booted but was not confirmed before the next reset; "
                f"MCUboot erased its slot and boots {now}")


class RamLoadFlow(DirectXipFlow):
    def refuse(self, image: VerifiedImage, running: Version | None) -> ImageRefused | None:
        if not image.info.ram_load:
            return ImageRefused(Refusal.MODE, "RAM load needs images signed with --load-addr "
                                "(IMAGE_F_RAM_LOAD); MCUboot would remove this one from flash")
        if running is not None and not image.version > running:
            return ImageRefused(Refusal.NOT_NEWER, f"ram-load boots the highest version: "
                                f"{image.version} is not newer than the running {running}")
        if not image.fully_verified:
            return ImageRefused(Refusal.MODE, "ram-load installs for good: the gateway sends only "
                                "images whose hash and signature it verified "
                                f"({image.unverified or 'it is unsigned'})")
        return ModeFlow.refuse(self, image, running)


class RefusingFlow(ModeFlow):
    """A mode whose update overwrites the running image (single slot, firmware loader)."""

    def refuse(self, image: VerifiedImage, running: Version | None) -> ImageRefused | None:
        if self.mode == Mode.FIRMWARE_LOADER:
            how = ("an update goes through the firmware-loader application in slot 1, which "
                   "overwrites the application in slot 0")
        else:
            how = ("a single application slot is updated through MCUboot's serial recovery, "
                   "which erases the running image first")
        return ImageRefused(Refusal.MODE, f"{self.mode.value}: {how}; there is no fallback if "
                            "the new image fails. Enable it per device (recovery: {enabled: true}) "
                            "to let the gateway do it")


def assumed_note(dm: DeviceMode) -> str:
    return "" if dm.source != ModeSource.ASSUMED else " [mcuboot mode assumed: swap]"

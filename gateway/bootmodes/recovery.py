"""Updates through MCUboot itself: serial recovery and the firmware-loader application.

Owns the rules of the modes whose update overwrites the running image, and of the last-resort
re-flash of a device whose application no longer answers SMP. The engine does the I/O
(``UpdateEngine._run_recovery`` / ``UpdateEngine.recover``); nothing here runs unless the device
config enables it (``recovery: {enabled: true}``; ``last_resort: true`` for the re-flash).

What the device side does (mcu-tools/mcuboot ``boot/boot_serial/src/boot_serial.c``,
``boot/zephyr/firmware_loader.c``, ``single_loader.c``; Zephyr os_mgmt with
CONFIG_MCUMGR_GRP_OS_RESET_BOOT_MODE):

* entry: ``os reset`` with ``boot_mode: 1`` (BOOT_MODE_TYPE_BOOTLOADER in the retention area)
  makes MCUboot built with CONFIG_BOOT_SERIAL_BOOT_MODE stay in serial recovery, or boot the
  firmware loader; a recovery pin held at reset, or no bootable application
  (CONFIG_BOOT_SERIAL_NO_APPLICATION), does the same without the application's help
  (``recovery.entry: present``: the gateway only acts when it finds the device there).
* serial recovery speaks SMP *version 1* (every error ``{"rc": N}``), serves one request at a
  time, lists only slots holding an image that passes MCUboot's own validation (hash and
  signature: the check that the upload is exactly the image), has no test/confirm and no
  ``sha`` resume; an upload (image 0) goes straight into the **primary** slot, erasing it at
  the first chunk. So from the first chunk on the device has no application until the upload
  completes - it stays in recovery (no bootable image) and the next attempt uploads again.
* the firmware loader is a small Zephyr application in slot 1 with img_mgmt: the upload goes to
  slot 0 (the application), which it overwrites.

Recognising where the device is, from its image state answer: an application's img_mgmt always
marks the slot it runs ``active``; serial recovery's list has no flags at all; the firmware
loader runs from slot 1.
"""

from __future__ import annotations

import json
from pathlib import Path

from smp.image_management import ImageState

from gateway.bootmodes.flows import Mark, ModeFlow
from gateway.bootmodes.modes import Mode
from gateway.images import ImageRefused, Refusal, VerifiedImage
from gateway.mcuboot import ImageFormatError, Version, parse_image


def in_serial_recovery(states: list[ImageState]) -> bool:
    """MCUboot's serial recovery answered (no slot flagged ``active``, as img_mgmt always does)."""
    return not any(s.active for s in states)


def loader_running(states: list[ImageState]) -> bool:
    """The firmware-loader application (slot 1) runs."""
    return any(s.active and s.slot == 1 and (s.image or 0) == 0 for s in states)


class RecoveryFlow(ModeFlow):
    """Single application slot (serial recovery) and firmware loader, when enabled."""

    revertible = False
    test_boot = False
    mark = Mark.NONE
    can_stage = False  # the upload itself overwrites the running application

    @property
    def via(self) -> str:
        return ("the firmware-loader application" if self.mode == Mode.FIRMWARE_LOADER
                else "MCUboot serial recovery")

    def refuse(self, image: VerifiedImage, running: Version | None) -> ImageRefused | None:
        base = super().refuse(image, running)
        if base is not None:
            return base
        if not image.fully_verified:
            return ImageRefused(Refusal.MODE, f"{self.mode.value}: the update overwrites the "
                                "running image with no fallback; the gateway sends only images "
                                "whose hash and signature it verified "
                                f"({image.unverified or 'it is unsigned'})")
        if image.info.is_encrypted:
            return ImageRefused(Refusal.ENCRYPTED, "serial recovery writes the primary slot "
                                "directly: an encrypted image would never be decrypted")
        return None

    def installed(self, old: str | None, image: VerifiedImage, how: str) -> str:
        return (f"{old} -> {image.version}: installed through {self.via} ({self.mode.value}); no "
                "revert possible")


def last_confirmed_path(confirmed_hash: str | None, store_dir: Path) -> tuple[Path, bytes] | None:
    """The stored image of the last image the device itself reported running *confirmed*, and
    its hash (``Journal.confirmed``: recorded from the device's own state reads - (b)).

    Never the journal row's target, its ``old_hash`` or its ``running_hash`` whatever the
    row's outcome: a canceled, refused or failed update's image, or one that only ran
    unconfirmed, must never be written for good through serial recovery. For an image set,
    image 0's image (serial recovery re-flashes the application). None: no such record, or the
    store holds no file with that hash TLV."""
    if not confirmed_hash:
        return None
    try:
        files = sorted(store_dir.glob("*.bin"))
    except OSError:
        return None
    for p in files:
        try:
            info = parse_image(p.read_bytes())
        except (OSError, ImageFormatError):
            continue
        if info.hash_valid and info.hash.hex() == confirmed_hash:
            return p, info.hash
    return None


def describe_states(states: list[ImageState]) -> str:
    return json.dumps([{"image": s.image or 0, "slot": s.slot, "version": s.version}
                       for s in states])

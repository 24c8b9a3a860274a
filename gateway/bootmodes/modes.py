"""Which MCUboot mode a device runs: reported by the device, overridden by its config.

Owns the decision the engine takes before anything is sent: the device's MCUboot upgrade
strategy. Sources, in order:

1. ``mcuboot_mode:`` in the device config (needed for the stock ``smp_svr``, which answers
   bootloader info with ENOTSUP: CONFIG_MCUMGR_GRP_OS_BOOTLOADER_INFO defaults to n);
2. os_mgmt bootloader info (group 0 command 8, ``{"query": "mode"}``): Zephyr's
   ``os_mgmt.c`` maps CONFIG_MCUBOOT_BOOTLOADER_MODE_* to MCUboot's ``MCUBOOT_MODE_*``
   numbers (``boot/bootutil/include/bootutil/boot_status.h``: 0 single slot, 1 swap using
   scratch, 2 upgrade only, 3 swap using move, 4 direct-XIP, 5 direct-XIP with revert, 6 RAM
   load, 7 firmware loader, 8 single slot RAM load, 9 swap using offset; -1 when the tree does
   not know the mode - the Zephyr 3.4 ``#if`` chain stops at direct-XIP with revert) and
   answers ``"no-downgrade": true`` for CONFIG_MCUBOOT_BOOTLOADER_NO_DOWNGRADE;
3. neither: the mode is *unknown* and the engine assumes a swap mode (what every gateway
   release before this one did), refusing what only makes sense when the mode is known.

A config value that contradicts a reported mode is refused: one of the two is wrong, and
acting on either could brick updates (a direct-XIP image in a swap device, a test mark that
will never be confirmable).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

from gateway.smp.session import SMPSession

log = logging.getLogger("gateway.bootmodes")


class Mode(enum.StrEnum):
    """MCUboot upgrade strategies (names as ``mcuboot_mode:`` takes them)."""

    SWAP_USING_SCRATCH = "swap-using-scratch"
    SWAP_USING_MOVE = "swap-using-move"
    SWAP_USING_OFFSET = "swap-using-offset"
    OVERWRITE_ONLY = "overwrite-only"
    DIRECT_XIP = "direct-xip"
    DIRECT_XIP_WITH_REVERT = "direct-xip-with-revert"
    RAM_LOAD = "ram-load"
    SINGLE_APP = "single-app"
    SINGLE_SLOT_RAM_LOAD = "single-slot-ram-load"
    FIRMWARE_LOADER = "firmware-loader"

    @property
    def is_swap(self) -> bool:
        return self in SWAP_MODES

    @property
    def is_xip(self) -> bool:
        """MCUboot picks the slot to run by version (no copy): direct-XIP, RAM load."""
        return self in (Mode.DIRECT_XIP, Mode.DIRECT_XIP_WITH_REVERT, Mode.RAM_LOAD)


SWAP_MODES = frozenset({Mode.SWAP_USING_SCRATCH, Mode.SWAP_USING_MOVE, Mode.SWAP_USING_OFFSET})

# MCUBOOT_MODE_* numbers (mcuboot boot_status.h) -> Mode
MODE_NUMBERS: dict[int, Mode] = {
    0: Mode.SINGLE_APP,
    1: Mode.SWAP_USING_SCRATCH,
    2: Mode.OVERWRITE_ONLY,
    3: Mode.SWAP_USING_MOVE,
    4: Mode.DIRECT_XIP,
    5: Mode.DIRECT_XIP_WITH_REVERT,
    6: Mode.RAM_LOAD,
    7: Mode.FIRMWARE_LOADER,
    8: Mode.SINGLE_SLOT_RAM_LOAD,
    9: Mode.SWAP_USING_OFFSET,
}
MODE_NAMES = [m.value for m in Mode]


def mode_name(number: int) -> str:
    """The name of a bootloader-info mode number: the one table every module uses (``probe``,
    discovery, the inventory ``status --json`` and the fleet servers get). -1 is what Zephyr's
    os_mgmt.c answers when its ``#if`` chain does not know the mode."""
    if number == -1:
        return "unknown"
    m = MODE_NUMBERS.get(number)
    return m.value if m is not None else f"mode {number}"


class ModeSource(enum.StrEnum):
    CONFIG = "config"  # mcuboot_mode: in the device config
    DEVICE = "device"  # bootloader info
    ASSUMED = "assumed"  # neither: a swap mode is assumed


@dataclass(frozen=True)
class DeviceMode:
    """The mode the engine acts on, where it comes from, and the device's no-downgrade flag."""

    mode: Mode
    source: ModeSource
    no_downgrade: bool = False
    reported: int | None = None  # the number bootloader info answered (None: not answered)

    @property
    def known(self) -> bool:
        return self.source != ModeSource.ASSUMED

    def describe(self) -> str:
        if self.source == ModeSource.ASSUMED:
            why = ("the device does not report its bootloader mode" if self.reported is None
                   else f"the device reports mode {self.reported}, which its firmware cannot name")
            return (f"{self.mode.value} (assumed: {why}; set mcuboot_mode in the device config "
                    "to make it explicit)")
        return f"{self.mode.value} (from the {self.source.value})"


class ModeConflict(ValueError):
    """The device config and the device disagree about the bootloader mode."""


def parse_mode(value: str | int) -> Mode:
    """A mode from its name or its MCUBOOT_MODE_* number; ValueError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value in MODE_NUMBERS:
            return MODE_NUMBERS[value]
        raise ValueError(f"MCUboot mode number {value} is not one MCUboot defines")
    try:
        return Mode(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an MCUboot mode (one of {', '.join(MODE_NAMES)})") from None


def decide(configured: str | None, reported: int | None, no_downgrade: bool) -> DeviceMode:
    """The mode from the config value and what bootloader info answered (pure; see module)."""
    dev_mode = MODE_NUMBERS.get(reported) if reported is not None else None
    if configured is not None:
        mode = parse_mode(configured)
        if dev_mode is not None and dev_mode != mode:
            raise ModeConflict(
                f"the device config says mcuboot_mode {mode.value} but the device reports "
                f"{dev_mode.value} (bootloader info mode {reported}): fix mcuboot_mode (nothing "
                "was sent)")
        return DeviceMode(mode, ModeSource.CONFIG, no_downgrade, reported)
    if dev_mode is not None:
        return DeviceMode(dev_mode, ModeSource.DEVICE, no_downgrade, reported)
    return DeviceMode(Mode.SWAP_USING_SCRATCH, ModeSource.ASSUMED, no_downgrade, reported)


async def detect(session: SMPSession, configured: str | None,
                 timeout_s: float | None = None) -> DeviceMode:
    """Ask the device (bootloader info) and combine with ``configured``; ModeConflict when
    they disagree. A device without the command (ENOTSUP, no answer) reports nothing."""
    info = await session.bootloader_info(timeout_s=timeout_s)
    reported = info.mode if info is not None else None
    nd = bool(info.no_downgrade) if info is not None else False
    dm = decide(configured, reported, nd)
    log.info("device=%s mcuboot_mode=%s source=%s reported=%s no_downgrade=%s", session.device_id,
             dm.mode.value, dm.source.value, reported, nd)
    return dm

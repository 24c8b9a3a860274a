"""Identification: what a device says about itself over SMP (read-only).

Owns the questions asked of a newly found device, and of ``smp-gateway probe``: OS/application
info (group 0 cmd 7: ``n`` node name, ``i`` board[@revision], and where the firmware adds one
through ``CONFIG_MCUMGR_GRP_OS_INFO_CUSTOM_HOOKS``, a hardware id under a format letter of its
own), the image list (group 1 cmd 0), MCUmgr parameters (group 0 cmd 6) and bootloader info
(group 0 cmd 8). Each letter is asked alone: Zephyr joins fields with spaces
(``os_mgmt.c``, ``os_mgmt_info``) and a node name may contain one. A firmware without a command
answers ENOTSUP and the fact is simply unknown: the stock ``smp_svr`` has no os info.

Nothing here writes to the device.

``fingerprint`` hashes what identifies the hardware (USB serial, hardware id, node name, board)
but not what changes with an update (images), so a device keeps its fingerprint across
updates and another board on the same port gets another one.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from smp.image_management import ImageState
from smpclient.requests.os_management import OSApplicationInfoRead

from gateway.bootmodes.modes import mode_name
from gateway.smp.session import BootloaderInfo, McumgrParams, SMPError, SMPSession, SMPTimeout

log = logging.getLogger(__name__)

UNKNOWN_VALUES = {"", "unknown"}  # what os info says when it does not know (os_mgmt.c)


@dataclass
class SlotInfo:
    image: int
    slot: int
    version: str
    hash: str | None
    flags: list[str]

    @classmethod
    def from_state(cls, st: ImageState) -> SlotInfo:
        flags = [f for f in ("active", "confirmed", "pending", "permanent", "bootable")
                 if getattr(st, f, False)]
        return cls(int(st.image or 0), int(st.slot), str(st.version),
                   bytes(st.hash).hex() if st.hash else None, flags)


@dataclass
class DeviceFacts:
    """Everything a read-only conversation learnt about one device."""

    node: str | None = None
    board: str | None = None
    hwid: str | None = None
    slots: list[SlotInfo] = field(default_factory=list)
    params: McumgrParams | None = None
    bootloader: BootloaderInfo | None = None
    errors: dict[str, str] = field(default_factory=dict)  # what could not be read, and why

    @property
    def mcuboot_mode(self) -> str | None:
        if self.bootloader is None:
            return None
        if self.bootloader.mode is None:
            return self.bootloader.name
        return mode_name(self.bootloader.mode)  # the one table (gateway.bootmodes.modes)

    def active(self, image: int = 0) -> SlotInfo | None:
        mine = [s for s in self.slots if s.image == image]
        return next((s for s in mine if "active" in s.flags), None) or next(
            (s for s in mine if s.slot == 0), None)

    def keys(self) -> dict[str, str]:
        """The device-reported keys of id rules (only the ones known)."""
        out = {}
        for k in ("node", "board", "hwid"):
            v = getattr(self, k)
            if v is not None and v.strip().lower() not in UNKNOWN_VALUES:
                out[k] = v.strip()
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mcuboot_mode"] = self.mcuboot_mode
        return d


def fingerprint(facts: DeviceFacts, attrs: dict[str, str]) -> str:
    """A stable digest of what identifies the hardware ('' when nothing does)."""
    parts = {k: v for k, v in facts.keys().items()}
    for k in ("usb_serial", "ble_public_address"):
        if attrs.get(k):
            parts[k] = attrs[k]
    if not parts:
        return ""
    text = "\n".join(f"{k}={parts[k]}" for k in sorted(parts))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


async def os_info(session: SMPSession, fmt: str, timeout_s: float, retries: int = 1) -> str | None:
    """One os info field; None when the firmware has no os info or not that letter."""
    try:
        rsp = await session.request(lambda s: OSApplicationInfoRead(format=fmt, sequence=s),
                                    timeout_s=timeout_s, retries=retries)
    except SMPError as exc:
        log.debug("device=%s os info %r: %s", session.device_id, fmt, exc)
        return None
    out = getattr(rsp, "output", None)
    return out if isinstance(out, str) else None


async def identify(session: SMPSession, *, timeout_s: float = 3.0, os_info_enabled: bool = True,
                   hwid_format: str | None = None) -> DeviceFacts:
    """Read the device's identity and state (never writes). SMPTimeout if it does not answer."""
    facts = DeviceFacts()
    # the image list first: a device that does not answer it is not an SMP device (or is off)
    try:
        facts.slots = [SlotInfo.from_state(st) for st in
                       await session.image_state(timeout_s=timeout_s, retries=1)]
    except SMPError as exc:
        facts.errors["image_state"] = str(exc)
    facts.params = await session.mcumgr_params(timeout_s=timeout_s)
    if not facts.params.reported:
        facts.errors["mcumgr_params"] = "not supported by the firmware (defaults in use)"
    try:
        facts.bootloader = await session.bootloader_info(timeout_s=timeout_s)
    except SMPTimeout:
        facts.bootloader = None
    if facts.bootloader is None:
        facts.errors["bootloader_info"] = "not supported by the firmware"
    return await read_identity(session, facts, timeout_s=timeout_s,
                               os_info_enabled=os_info_enabled, hwid_format=hwid_format)


async def read_identity(session: SMPSession, facts: DeviceFacts | None = None, *,
                        timeout_s: float = 3.0, os_info_enabled: bool = True,
                        hwid_format: str | None = None, retries: int = 1) -> DeviceFacts:
    """Only what ``fingerprint`` hashes (node, board, hardware id): discovery's questions, and
    the gateway's identity check at the start of every session (``gateway.discovery.guard``).
    SMPTimeout if the device does not answer; a field the firmware lacks stays None."""
    facts = facts if facts is not None else DeviceFacts()
    if os_info_enabled:
        facts.node = await os_info(session, "n", timeout_s, retries)
        if facts.node is None:
            facts.errors["os_info"] = "not supported by the firmware (CONFIG_MCUMGR_GRP_OS_INFO)"
        else:
            facts.board = await os_info(session, "i", timeout_s, retries)
    if hwid_format:
        facts.hwid = await os_info(session, hwid_format, timeout_s, retries)
        if facts.hwid is None:
            facts.errors["hwid"] = f"os info format {hwid_format!r} not answered"
    return facts

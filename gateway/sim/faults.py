"""Fault injection for the device simulator: what breaks, when, and how often.

Owns the decisions behind the simulator's fault knobs (``SimDeviceConfig``), so that the
device model (``device.py``, ``boot.py``) only asks "does a fault fire here?":

* ``power_cut_during_swap`` - power is lost once, half-way through MCUboot's swap. The swap
  progress is persisted in flash (status entries in the primary slot's trailer, as MCUboot's
  swap-status area; ``Flash.swap_progress``), so the next boot *resumes* the interrupted swap
  instead of jumping into a half-copied primary slot (``boot_status_source`` / ``boot_swap_image`` resume in
  mcuboot ``loader.c``). Power comes back after ``boot_time_s``.
* ``dead_after_reset: N`` - the Nth reset (reset command, watchdog, crash) leaves the device
  off: no link, no answers, until :meth:`SimDevice.power_cycle`.
* ``hang_watchdog_s`` - an image in ``hang_on_boot_versions`` boots, never serves SMP, and is
  reset by its watchdog after that long (real firmware feeds a watchdog from its main loop;
  a hang starves it). MCUboot then reverts the unconfirmed image. Without it the device hangs
  until power-cycled.
* ``unplug_during_upload_at`` - serial only: when an upload passes that offset the PTY master
  is closed (the gateway sees EIO/EOF, as with a pulled USB cable), the ``link`` symlink is
  removed, and ``unplug_for_s`` later a new PTY appears at the same symlink path. The device
  itself keeps running (and keeps its upload context in RAM).
* ``response_faults`` - every Nth response is broken: ``malformed-cbor`` (valid frame, body
  not CBOR), ``truncated`` (header length larger than the body), ``wrong-seq`` (sequence
  number of another request), ``wrong-group`` (group id of another group), ``oversized``
  (a padded body larger than the device's own buffer).
* ``img_mgmt_supported: false`` - the image group is not compiled in (ENOTSUP).
* ``power_cut_during_trailer_write`` - the power goes once while img_mgmt writes a slot's
  trailer for a state write (``boot_set_next``): ``torn-magic`` leaves half of the 16 magic
  bytes written (MCUboot reads a *bad* magic), ``after-magic`` lets the magic through and cuts
  before the next field (swap_info / image_ok). No answer is sent; the device boots again.
  The cut covers both ``power_cut_during_swap``-style MCUboot steps (overwrite copy, network
  core update) and this application-side write.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import cbor2

from gateway.sim.flash import BOOT_MAGIC

if TYPE_CHECKING:
    from gateway.sim.config import ResponseFaultConfig, SimDeviceConfig
    from gateway.sim.flash import Flash

HDR = struct.Struct("!BBHHBB")


class PowerCut(Exception):
    """Raised inside the bootloader model when the power goes mid-swap."""


class Faults:
    """Per-device fault state (what already fired)."""

    def __init__(self, cfg: SimDeviceConfig) -> None:
        self.cfg = cfg
        self.power_cut_done = False
        self.trailer_cut_done = False
        self.dead_done = False
        self.unplug_done = False
        self._rsp_seen: list[int] = [0] * len(cfg.response_faults)
        self._rsp_fired: list[int] = [0] * len(cfg.response_faults)
        self.fired: dict[str, int] = {}

    def _fire(self, kind: str) -> None:
        self.fired[kind] = self.fired.get(kind, 0) + 1

    # --- boot / power ---------------------------------------------------------------
    def swap_step(self, sector: int, sectors: int) -> bool:
        """Called before each sector of a swap is exchanged; True = power goes now."""
        if self.cfg.power_cut_during_swap and not self.power_cut_done and sector >= sectors // 2:
            self.power_cut_done = True
            self._fire("power-cut-during-swap")
            return True
        return False

    def trailer_write(self, flash: Flash, slot: int, what: str) -> None:
        """Called before img_mgmt writes trailer field ``what`` of ``slot``; raises PowerCut
        when ``power_cut_during_trailer_write`` fires."""
        mode = self.cfg.power_cut_during_trailer_write
        if mode is None or self.trailer_cut_done:
            return
        if mode == "torn-magic" and what == "magic":
            flash.write(slot, flash.magic_off_of(slot), BOOT_MAGIC[:8], sync=True)
        elif not (mode == "after-magic" and what in ("swap_info", "image_ok")):
            return
        self.trailer_cut_done = True
        self._fire("power-cut-during-trailer-write")
        raise PowerCut(f"power lost writing the {what} of slot {slot}'s trailer ({mode})")

    def dead_after(self, resets: int) -> bool:
        """True if this reset (the ``resets``-th) leaves the device off."""
        n = self.cfg.dead_after_reset
        if n is not None and not self.dead_done and resets >= n:
            self.dead_done = True
            self._fire("dead-after-reset")
            return True
        return False

    # --- link -----------------------------------------------------------------------
    def unplug_at(self, old: int, new: int) -> bool:
        at = self.cfg.unplug_during_upload_at
        if at is not None and not self.unplug_done and old <= at < new:
            self.unplug_done = True
            self._fire("unplug")
            return True
        return False

    # --- responses ------------------------------------------------------------------
    def mutate(self, rsp: bytes) -> bytes:
        """The response as the faulty device sends it (usually unchanged)."""
        if len(rsp) < HDR.size:
            return rsp
        for i, f in enumerate(self.cfg.response_faults):
            group = HDR.unpack_from(rsp)[3]
            if f.group is not None and f.group != group:
                continue
            self._rsp_seen[i] += 1
            if self._rsp_seen[i] % f.every:
                continue
            if f.count and self._rsp_fired[i] >= f.count:
                continue
            self._rsp_fired[i] += 1
            self._fire(f"response-{f.kind}")
            return _break(rsp, f)
        return rsp


def _break(rsp: bytes, f: ResponseFaultConfig) -> bytes:
    ver_op, flags, length, group, seq, cmd = HDR.unpack_from(rsp)
    body = rsp[HDR.size:]
    if f.kind == "malformed-cbor":
        bad = b"\xbf\x61a\xff\x1c" + body[5:]  # indefinite map, then a reserved CBOR byte
        return HDR.pack(ver_op, flags, len(bad), group, seq, cmd) + bad
    if f.kind == "truncated":
        return HDR.pack(ver_op, flags, length + 64, group, seq, cmd) + body
    if f.kind == "wrong-seq":
        return HDR.pack(ver_op, flags, length, group, (seq + 1) & 0xFF, cmd) + body
    if f.kind == "wrong-group":
        return HDR.pack(ver_op, flags, length, group ^ 0x40, seq, cmd) + body
    # oversized: the same map plus a large padding entry (a frame larger than any buffer)
    try:
        obj = cbor2.loads(body)
    except Exception:
        return rsp
    if isinstance(obj, dict):
        obj["pad"] = b"\0" * f.size
    big = cbor2.dumps(obj)
    return HDR.pack(ver_op, flags, len(big) & 0xFFFF, group, seq, cmd) + big

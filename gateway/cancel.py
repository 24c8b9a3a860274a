"""Cancellation: take back an update the fleet server (or the operator) called off.

Owns what a cancel does to the device, by how far the update got (the journal's step and the
device's image state decide, read fresh):

* before the upload: nothing was sent - nothing to do;
* during (or after) the upload, not marked: the upload is stopped and the secondary slot is
  erased (img_mgmt erase, group 1 cmd 5), so no half image stays behind;
* marked for test (pending), not reset: img_mgmt cannot take a test mark back (a ``test``
  slot refuses any other state change: ``IMAGE_ALREADY_PENDING``, ``img_mgmt_state.c``
  ``img_mgmt_set_next_boot_slot``), so MCUboot is left to revert it: a reset test-boots the
  image, a second reset (no confirmation in between) makes MCUboot swap back; then slot 1 is
  erased;
* booted, unconfirmed (test-running): one reset, MCUboot reverts; slot 1 erased;
* confirmed: too late - the cancel is refused (hawkBit: ``rejected``).

Resets happen only where the caller says they may (maintenance windows): otherwise the undo
is *deferred* (journal step ``cancel-pending``) and done at the device's next session inside a
window; meanwhile the gateway never confirms the image (its journal row is closed as
``canceled``, so ``tested_hash`` no longer matches an open update).

The cancel itself is an *intent*, journalled (``Journal.put_intent``) by ``gateway.fleetops``
before ``undo`` runs and closed only once ``undo`` finished it, so a take-back cut short (the
device silent while it swaps into the test boot, the gateway stopped or killed) is finished at
the device's next session, also by a restarted gateway. ``undo`` reads the device *through* a
reboot in progress (bounded by ``timeouts.reset_s``): the cancel may arrive just after the
engine's reset into the test boot. What it does rests only on the device's own image state (b),
read fresh, and the intent's hash - never on the server's word about the device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from smp.image_management import ImageState

from gateway.config import DeviceConfig
from gateway.engine import Slots, Step
from gateway.journal import Entry, Journal
from gateway.smp.reboot import reset_and_wait
from gateway.smp.session import SMPError, SMPSession, SMPTimeout
from gateway.smp.transport import TransportError

log = logging.getLogger("gateway.cancel")

CANCEL_PENDING = "cancel-pending"  # journal step: a revert that waits for a maintenance window
CANCELED = "canceled"  # journal step and outcome of a canceled update

# the canceled image still pending after a take-back's reset: a device slow to act on it (the
# next session goes on), or a bootloader that keeps the mark. After this many sessions ended so
# (``fleetops.finish_cancel`` counts them by ``STUCK``, a label of the gateway's own before the
# detail - never by the detail, which starts with the cancel's reason: outside input) the
# cancel is closed as not taken back (``not_taken_back``) rather than reset again for ever.
STILL_PENDING = "the canceled image is still pending"
STUCK, NOT_YET = "stuck: ", "not yet: "  # the intent's progress labels (``finish_cancel``)
TAKE_BACK_RESETS = 3

_MARKED_STEPS = {Step.MARK_TEST.value, Step.RESET.value, Step.WAIT_BOOT.value, Step.VERIFY.value,
                 Step.CONFIRM.value, Step.WAIT_APP.value, CANCEL_PENDING}


@dataclass
class CancelResult:
    phase: str  # before-upload | upload | marked | booted | confirmed | nothing
    done: bool  # the device is back on its previous image with nothing of the update left
    detail: str
    deferred: bool = False  # needs a reset outside the allowed time: done later
    stuck: bool = False  # STILL_PENDING after the take-back's reset
    gave_up: bool = False  # closed as not taken back (``not_taken_back``)
    running: str | None = None  # version running after the undo


async def read_through_reboot(session: SMPSession, dev: DeviceConfig) -> list[ImageState]:
    """The device's image state, waiting (bounded: ``timeouts.reset_s``) for a device that is
    rebooting - swapping into a test boot the engine reset it into, or reverting."""
    deadline = time.monotonic() + dev.timeouts.reset_s
    while True:
        try:
            return await session.image_state(timeout_s=dev.timeouts.request_s, retries=0)
        except (SMPTimeout, TransportError) as exc:
            if time.monotonic() >= deadline:
                raise SMPTimeout(f"{dev.id}: no image state within {dev.timeouts.reset_s:g}s "
                                 f"(rebooting?): {exc}") from exc
            if isinstance(exc, TransportError):
                try:
                    await session.close()
                    await session.open()
                except TransportError:
                    pass
            await asyncio.sleep(0.2)


async def _reset(session: SMPSession, dev: DeviceConfig, why: str) -> None:
    log.info("device=%s cancel: reset (%s)", dev.id, why)
    await reset_and_wait(session, dev.timeouts.reset_s)


async def _erase_secondary(session: SMPSession, dev: DeviceConfig, empty: bool = False) -> str:
    try:
        await session.image_erase(slot=1)
    except SMPError as exc:  # nothing to erase: the device lists no image there (b)
        return "secondary slot already empty" if empty else f"secondary slot not erased: {exc}"
    return "secondary slot erased"


def _fresh(entry: Entry, slots: Slots) -> Entry:
    """The journal row with what the device reports running now (b) (``status`` shows it)."""
    return entry.with_(running_version=slots.running,
                       running_hash=slots.active_hash.hex() if slots.active_hash else None)


async def undo(session: SMPSession, dev: DeviceConfig, journal: Journal, target_hash: bytes,
               reason: str, *, reset_allowed: bool,
               members: frozenset[bytes] = frozenset()) -> CancelResult:
    """Take the update of ``target_hash`` back on an open session; journal the result.

    The caller journalled the cancel intent before calling this; ``undo`` may be cut short (it
    raises on a device that does not answer within its bounds) and is called again for the
    same intent until it returns ``done`` (or ``confirmed``: too late). Every state read goes
    through a reboot in progress; it never confirms anything.

    ``target_hash`` of an image set is the set's id, no image's hash: ``members`` are then the
    hashes of the set's images for ``dev.image`` (signed, from the store), and an image of
    them test-running or pending is the canceled update's, taken back the same way."""
    slots = Slots.parse(await read_through_reboot(session, dev), dev.image)
    running = slots.running
    entry = _fresh(journal.get(dev.id), slots)
    th = target_hash.hex()
    ours = {target_hash} | members
    res: CancelResult
    if slots.active_hash in ours and slots.active and slots.active.confirmed:
        res = CancelResult("confirmed", False, f"{reason}: too late, {running} is installed and "
                           "confirmed", running=running)
        log.warning("device=%s cancel refused: %s", dev.id, res.detail)
        return res
    needs_reset = slots.active_hash in ours or (
        slots.other_hash in ours and slots.other is not None and slots.other.pending)
    if needs_reset and not reset_allowed:
        journal.put(entry.with_(step=CANCEL_PENDING, outcome=CANCELED, last_error=reason),
                    f"cancel: revert waits for a maintenance window ({reason})")
        return CancelResult("booted" if slots.active_hash in ours else "marked", False,
                            f"{reason}: the revert needs a reset, which waits for a maintenance "
                            "window (the image is never confirmed meanwhile)", deferred=True,
                            running=running)
    if slots.active_hash in ours:
        phase = "booted"
        await _reset(session, dev, "revert the unconfirmed image")
    elif slots.other_hash in ours and slots.other is not None and slots.other.pending:
        phase = "marked"
        await _reset(session, dev, "test-boot the pending image (img_mgmt cannot un-mark it)")
        after = Slots.parse(await read_through_reboot(session, dev), dev.image)
        if after.active_hash in ours and after.active and not after.active.confirmed:
            await _reset(session, dev, "revert the unconfirmed image")
    elif entry.step in (Step.UPLOAD.value, *_MARKED_STEPS) or slots.other_hash in ours:
        phase = "upload"
    else:
        phase = "before-upload"
    slots = Slots.parse(await read_through_reboot(session, dev), dev.image)
    running = slots.running
    entry = _fresh(entry, slots)  # what runs after the revert, never the canceled image's
    if slots.active_hash in ours or (phase in ("booted", "marked") and not (
            slots.active and slots.active.confirmed)):  # (b): back only on a confirmed image
        detail = f"{reason}: the device still runs the canceled image after the reset"
        journal.put(entry.with_(step=Step.FAILED.value, outcome="failed", last_error=detail), detail)
        return CancelResult(phase, False, detail, running=running)
    if slots.other_hash in ours and slots.other is not None and slots.other.pending:
        # (b) still marked: the next reset (anyone's) would test-boot it - not taken back; the
        # intent stays open and the next session goes on (a device slow to act on the reset)
        detail = f"{reason}: {STILL_PENDING} in the secondary slot after the reset"
        journal.put(entry.with_(last_error=detail + " (the take-back goes on at the next "
                                "session)"), detail)
        return CancelResult(phase, False, detail, running=running, stuck=True)
    erased = ""
    if phase != "before-upload" and slots.other is not None and not slots.other.pending:
        erased = await _erase_secondary(session, dev)
    elif phase == "upload":
        erased = await _erase_secondary(session, dev,  # a partial upload lists no image
                                        empty=slots.other is None)
    if erased.startswith("secondary slot not erased"):
        # (b) the device refused the erase: read again - an image of the update still listed
        # there (e.g. pending after all: a state read that lagged behind, fault schedule seed
        # 2070) is not taken back; the intent stays open and the next session goes on
        after = Slots.parse(await read_through_reboot(session, dev), dev.image)
        if after.other_hash in ours:
            detail = (f"{reason}: {erased}; the canceled image is still in the secondary slot "
                      "(the take-back goes on at the next session)")
            journal.put(entry.with_(last_error=detail), detail)
            return CancelResult(phase, False, detail, running=running)
    detail = f"{reason}: canceled in phase {phase}; running {running}" + (f"; {erased}" if erased else "")
    journal.put(entry.with_(step=CANCELED, outcome=CANCELED, last_error=reason,
                            tested_hash=None if th in (entry.tested_hash or "") else entry.tested_hash,
                            upload_offset=0),
                detail)
    log.info("device=%s %s", dev.id, detail)
    return CancelResult(phase, True, detail, running=running)


def not_taken_back(journal: Journal, device_id: str, target_hash: bytes, detail: str) -> str:
    """Close the journal row of a cancel whose image the device kept pending through
    ``TAKE_BACK_RESETS`` sessions' resets: ``failed``, not taken back - never ``canceled``
    (something of the update is left). The row's test-boot claim (``tested_hash``) is dropped:
    should a later reset boot the image after all, this gateway never confirms it (an image it
    did not test, reverted by the next reset)."""
    e = journal.get(device_id)
    th = target_hash.hex()
    msg = (f"not taken back: {detail}; {TAKE_BACK_RESETS} sessions' resets left it pending (a "
           "bootloader that keeps the mark?) - never confirmed by this gateway; the next update's "
           "upload overwrites it, or `smp-gateway device -c CONFIG ID image erase`")
    journal.put(e.with_(step=Step.FAILED.value, outcome="failed", last_error=msg,
                        tested_hash=None if th in (e.tested_hash or "") else e.tested_hash), msg)
    log.warning("device=%s cancel: %s", device_id, msg)
    return msg

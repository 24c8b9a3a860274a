"""The state one update attempt shares between its steps, and the journal writer.

Owns ``EngineState``: the one place that lists what every step reads and writes on the engine
(the device config ``dev``, the SMP session ``s``, the ``journal`` and its current row
``entry``, ``upload``, ``until``, ``flow``, ``seen_running``, ``_reset_here``, and the
``reset_gate``/``confirm_gate`` hooks), ``_step`` (the only writer of the journal's ``step``:
journalled before the step runs), ``_finish`` (writes the final ``Step.DONE``, ``REFUSED``,
``ROLLED_BACK`` or ``FAILED`` with the outcome), the stops short of an outcome (``_gate``,
``_hold``, ``_checked``), the device's state read (``read_slots``; ``_permanent_window`` for
an image no one can take back any more) and the link's waits (``_wait_reboot``,
``_reconnect``, ``_reopen``) every step uses.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from smp.image_management import ImageState

from gateway.bootmodes.flows import ModeFlow
from gateway.config import DeviceConfig
from gateway.engine.model import (
    CONFIRM_SENT,
    Outcome,
    ProgressFn,
    Slots,
    Stage,
    Status,
    Step,
    _Finish,
)
from gateway.images import (
    VerifiedImage,
)
from gateway.journal import Entry, Journal
from gateway.smp.reboot import reopen, reset_and_wait, wait_reboot
from gateway.smp.session import SMPProtocolError, SMPSession, SMPTimeout
from gateway.smp.transport import TransportError
from gateway.sources.base import UpdateResult

log = logging.getLogger("gateway.engine")


# a permanent image's health window (``_permanent_window``): what counts as not answering
PERMANENT_MISSES_IN_A_ROW = 4
PERMANENT_MISS_SHARE = 0.4
PERMANENT_MIN_MISSES = 3  # ... and at least this many, for the share to count
PERMANENT_ANSWERS = 3  # answers a window with a miss needs before its verdict


def confirm_sent_since_mark(journal: Journal, device_id: str) -> bool:
    """Whether this gateway sent a confirm (``CONFIRM_SENT``, journalled before it is sent)
    since its last test mark of the device: without one, an image found confirmed was made
    permanent by something else (no test boot, the application, a torn trailer)."""
    return journal.event_since(device_id, Step.MARK_TEST.value, Step.CONFIRM.value, CONFIRM_SENT)


class Unanswered(Exception):
    """A permanent image's health window saw the device stop answering (``_permanent_window``)."""


class EngineState:
    """What one attempt's steps share (see the module docstring); the steps are the mixins
    built on it (``gateway.engine.core.UpdateEngine`` composes them)."""

    # the daemon's check before every mark-and-reset and reset (maintenance windows,
    # ``FleetOps.reset_gate``): None = allowed now, else why not; no gate = always allowed
    reset_gate: Callable[[], str | None] | None = None
    # the last gate before a confirm (``FleetOps.confirm_gate``): asks the fleet source, bounded
    # in time, whether the update is still wanted; a "no" comes back journalled as a cancel
    # intent (its reason returned here) and the image is not confirmed. None: no source to ask
    confirm_gate: Callable[[], Awaitable[str | None]] | None = None

    def __init__(
        self,
        device: DeviceConfig,
        session: SMPSession,
        journal: Journal,
        *,
        on_progress: ProgressFn | None = None,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.dev = device
        self.s = session
        self.journal = journal
        self.on_progress = on_progress
        self.poll = poll_interval_s
        self.entry = journal.get(device.id)
        self.upload: tuple[int, float, int] = (0, 0.0, 0)  # bytes sent, seconds, resumed from
        self.until = Stage.CONFIRMED
        self.flow: ModeFlow | None = None  # the device's MCUboot mode flow (set by run)
        self.seen_running = False  # the target was seen test-running in this attempt
        self._reset_here = False  # this attempt sent the reset that booted the target

    def _step(self, step: Step, detail: str = "", **changes: object) -> None:
        self.entry = self.entry.with_(step=step.value, **changes)
        self.journal.put(self.entry, detail)
        log.info("device=%s step=%s %s", self.dev.id, step.value, detail)
        if self.on_progress:
            self.on_progress(self.dev.id, step, self.entry.upload_offset, self.entry.upload_total)

    def _finish(self, status: Status, result: UpdateResult, detail: str, image: VerifiedImage | None,
                old: str | None = None) -> _Finish:
        step = {Status.UPDATED: Step.DONE, Status.UP_TO_DATE: Step.DONE, Status.REFUSED: Step.REFUSED,
                Status.ROLLED_BACK: Step.ROLLED_BACK, Status.FAILED: Step.FAILED}[status]
        # installed after all (a rollback verdict the device proved wrong): no longer blocked
        unblock: dict[str, object] = (
            {"blocked_hash": None, "blocked_artifact": None}
            if status == Status.UPDATED and self.entry.blocked_hash is not None
            and self.entry.blocked_hash == self.entry.target_hash else {})
        self._step(step, detail, outcome=status.value, **unblock,
                   last_error=None if status in (Status.UPDATED, Status.UP_TO_DATE) else detail,
                   unreported=json.dumps({"result": int(result),
                                          "detail": f"{status.value}: {detail}"}))
        sent, secs, resumed = self.upload
        return _Finish(Outcome(self.dev.id, status, result, detail, old_version=old,
                               new_version=str(image.version) if image else None,
                               bytes_uploaded=sent, upload_seconds=secs, resumed_from=resumed,
                               image_bytes=image.size if image and sent else 0))

    def _gate(self, what: str, image: VerifiedImage | None, old: str | None) -> None:
        """Stop HELD before ``what`` (a mark-and-reset or a reset) if ``reset_gate`` says no
        (the window closed during the upload or a wait). No outcome is journaled: the row
        stays open at its step, so the next attempt - or a restarted gateway - resumes from
        the device's state once a window is open."""
        why = self.reset_gate() if self.reset_gate is not None else None
        if why is not None:
            log.warning("device=%s %s waits for a maintenance window: %s", self.dev.id, what, why)
            raise _Finish(Outcome(self.dev.id, Status.HELD, UpdateResult.INITIAL,
                                  f"{what} waits for a maintenance window ({why})",
                                  old_version=old,
                                  new_version=str(image.version) if image else None))

    def _hold(self, stage: Stage, image: VerifiedImage, old: str | None) -> None:
        """Stop here if the caller asked to go only this far (no outcome is journaled)."""
        if self.until <= stage:
            log.info("device=%s held stage=%s", self.dev.id, stage.name.lower())
            sent, secs, resumed = self.upload
            raise _Finish(Outcome(self.dev.id, Status.HELD, UpdateResult.INITIAL, stage.name.lower(),
                                  old_version=old, new_version=str(image.version),
                                  bytes_uploaded=sent, upload_seconds=secs, resumed_from=resumed))

    def _checked(self, prev: Entry, image: VerifiedImage, old: str | None) -> None:
        """Stop after the pre-flight if the caller asked only for it (``Stage.CHECKED``):
        nothing was sent, so the journal row goes back to what it was before this attempt -
        no later attempt (nor a restart) resumes an update nobody asked to install."""
        if self.until <= Stage.CHECKED:
            self.entry = prev
            self.journal.put(prev, f"pre-flight of {image.version} passed; nothing sent")
            self._hold(Stage.CHECKED, image, old)

    async def read_slots(self, timeout_s: float | None = None) -> Slots:
        images = await self.s.image_state(timeout_s=timeout_s)
        self._note_confirmed(images)
        slots = Slots.parse(images, self.dev.image)
        self.entry = self.entry.with_(
            running_version=slots.running,
            running_hash=slots.active_hash.hex() if slots.active_hash else None,
        )
        return slots

    def _note_confirmed(self, states: list[ImageState]) -> None:
        """(b) the device itself reports image 0's running image confirmed: journalled as the
        only image ``recovery.last_resort`` may re-flash (``Journal.put_confirmed``)."""
        s = next((s for s in states if (s.image or 0) == 0 and s.active and s.confirmed), None)
        if s is not None and s.hash and 16 <= len(s.hash) <= 64:
            self.journal.put_confirmed(self.dev.id, bytes(s.hash).hex(), str(s.version)[:64])

    async def _permanent_window(self) -> AsyncIterator[list[ImageState]]:
        """The health window of an image that is permanent already (no revert can follow):
        the device's state (b) every ``poll`` until ``health_check_s`` has passed.

        A permanent image that crashes boots straight back into itself: its state reads the
        same after the reboot, so the reboot itself is the sign - a read that goes unanswered
        within the device's request timeout (no re-send: a re-send would hide a short reboot;
        the request a rebooting device drops is never answered). A lossy link loses some
        reads too, so ``Unanswered`` is raised only for what loss does not explain:
        ``PERMANENT_MISSES_IN_A_ROW`` unanswered reads in a row (the device is gone), or at
        the end of the window at least ``PERMANENT_MIN_MISSES`` unanswered and
        ``PERMANENT_MISS_SHARE`` of all (a crash loop: down most of the time), or no answer at
        all. A window that saw a miss
        goes on until ``PERMANENT_ANSWERS`` answers (at most ``hard_end``), so that one lost
        read in a short window is not the whole verdict. A reboot shorter than the
        gap between two reads is not seen: Zephyr's SMP has no boot counter to ask."""
        end = time.monotonic() + self.dev.health_check_s
        hard_end = end + max(2 * self.dev.health_check_s,
                             PERMANENT_ANSWERS * self.dev.timeouts.request_s)
        answered = missed = in_a_row = 0
        last: BaseException | None = None
        while True:
            try:
                states = await self.s.image_state(retries=0)
            except (SMPTimeout, SMPProtocolError, TransportError) as exc:
                missed += 1
                in_a_row += 1
                last = exc
                if in_a_row >= PERMANENT_MISSES_IN_A_ROW:
                    raise Unanswered(
                        f"it stopped answering during its health window ({in_a_row} reads in a "
                        "row unanswered: a crash or watchdog reset, or the link dropped): "
                        f"{type(exc).__name__}: {exc}") from None
                if isinstance(exc, TransportError):
                    await self._reopen()
                if time.monotonic() >= hard_end:
                    break
                await asyncio.sleep(self.poll)
                continue
            answered += 1
            in_a_row = 0
            self._note_confirmed(states)
            yield states
            now = time.monotonic()
            # a window with a miss goes on until PERMANENT_ANSWERS answers (bounded by
            # hard_end): one lost read is then one of several, not the whole verdict
            if now >= hard_end or (now >= end and (missed == 0 or answered >= PERMANENT_ANSWERS)):
                break
            await asyncio.sleep(min(self.poll, max(0.0, end - now)) if now < end else self.poll)
        if answered == 0 or (missed >= PERMANENT_MIN_MISSES
                             and missed >= PERMANENT_MISS_SHARE * (missed + answered)):
            raise Unanswered(
                f"it kept dropping out during its health window ({missed} of {missed + answered} "
                "reads unanswered: a crash loop - it reboots straight back into itself - or a "
                f"failing link): {type(last).__name__}: {last}")

    async def _read_slots_through_reboot(self) -> Slots:
        """Read the state; if the device vanished (crash, watchdog), wait for it to come back."""
        try:
            return await self.read_slots(timeout_s=1.0)
        except SMPTimeout:
            await self._wait_reboot()
            return await self.read_slots()

    async def _reset(self, wait_detail: str | None = "reset acknowledged") -> bool:
        """Send ``os reset`` and wait for the device to come back from it; whether it was
        acknowledged. Every reset of an update goes through here, after its caller passed the
        reset gate and journalled ``Step.RESET``; ``Step.WAIT_BOOT`` (``wait_detail``) is
        journalled once the answer is in. The image state read just before the reset is what
        ``gateway.smp.reboot.reset_and_wait`` holds the device's answers against (b)."""
        def answered(acked: bool) -> None:
            if wait_detail is not None:
                self._step(Step.WAIT_BOOT, f"{wait_detail}={acked}")
        try:
            return await reset_and_wait(self.s, self.dev.timeouts.reset_s, self.poll, answered)
        except SMPTimeout:
            raise self._not_back() from None

    async def _wait_reboot(self) -> None:
        """A device that vanished (crash, watchdog): ``gateway.smp.reboot.wait_reboot`` on the
        link alone (no reset of ours, no state before it), bounded by ``timeouts.reset_s``; a
        device that does not come back is FAILED, connection lost (``_not_back``)."""
        try:
            await wait_reboot(self.s, self.dev.timeouts.reset_s, poll_s=self.poll)
        except SMPTimeout:
            raise self._not_back() from None

    def _not_back(self) -> _Finish:
        return _Finish(Outcome(self.dev.id, Status.FAILED, UpdateResult.CONNECTION_LOST,
                               f"device did not come back within {self.dev.timeouts.reset_s:g}s "
                               "after reset"))

    async def _reconnect(self, deadline: float) -> None:
        """Re-open the link until the device answers an echo, or raise TransportError."""
        last: Exception | None = None
        while time.monotonic() < deadline:
            await self._reopen()
            try:
                await self.s.echo("link?", timeout_s=1.0)
                return
            except (TransportError, SMPTimeout) as exc:
                last = exc
                await asyncio.sleep(self.poll)
        raise TransportError(f"link to {self.dev.id} did not come back: {last}")

    async def _reopen(self) -> None:
        await reopen(self.s)

"""Per-device update engine: the MCUboot A/B flow as an explicit state machine.

Owns one device's update from "what is on it" to a final outcome::

    READ_STATE -> UPLOAD -> MARK_TEST -> RESET -> WAIT_BOOT -> VERIFY -> CONFIRM | WAIT_APP -> DONE
                                                                      \\-> ROLLED_BACK
    (any) -> REFUSED (before a byte is sent) | FAILED

Every transition is logged with the device id and written to the journal before the step
runs, so a restarted gateway resumes: an upload continues from the device's offset (the
``sha`` resume of img_mgmt), a device that was reset is re-checked, and an image is confirmed
only if the journal says this gateway marked exactly that hash for test.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from smp.image_management import ImageState
from smpclient.requests.os_management import ResetWrite

from gateway.bootmodes import imageset
from gateway.bootmodes.choose import flow_for
from gateway.bootmodes.flows import Mark, ModeFlow
from gateway.bootmodes.modes import DeviceMode, ModeConflict, detect
from gateway.bootmodes.recovery import RecoveryFlow, in_serial_recovery, loader_running
from gateway.config import DeviceConfig
from gateway.healthhook import run_hook
from gateway.images import (
    ImageRefused,
    Refusal,
    SetMember,
    VerifiedImage,
    VerifiedImageSet,
    known_security_counter,
    preflight,
)
from gateway.journal import STAGED, Entry, Journal
from gateway.mcuboot import Version
from gateway.smp.session import SMPError, SMPProtocolError, SMPSession, SMPTimeout, UploadError
from gateway.smp.transport import TransportError
from gateway.smp.upload import upload_deadline_s
from gateway.sources.base import UpdateResult

log = logging.getLogger("gateway.engine")


class Step(enum.StrEnum):
    READ_STATE = "read-state"
    UPLOAD = "upload"
    MARK_TEST = "mark-test"
    RESET = "reset"
    WAIT_BOOT = "wait-boot"
    VERIFY = "verify"
    CONFIRM = "confirm"
    WAIT_APP = "wait-app-confirm"
    DONE = "done"
    ROLLED_BACK = "rolled-back"
    REFUSED = "refused"
    FAILED = "failed"


# the journal's event (step confirm) written just before this gateway sends its confirm
CONFIRM_SENT = "confirm sent"


class Status(enum.StrEnum):
    UPDATED = "updated"
    UP_TO_DATE = "up-to-date"
    REFUSED = "refused"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"
    HELD = "held"  # stopped at the stage the caller asked for (group phases); not an outcome


class Stage(enum.IntEnum):
    """How far ``UpdateEngine.run`` goes (groups run their members phase by phase)."""

    CHECKED = 0  # every pre-flight check passed, nothing sent (the LwM2M source's Downloaded)
    UPLOADED = 1  # the image is complete in the secondary slot, not marked
    MARKED = 2  # marked for test (pending), not reset
    BOOTED = 3  # reset, booted, health-checked: running unconfirmed
    CONFIRMED = 4  # the whole flow


@dataclass
class Outcome:
    device_id: str
    status: Status
    result: UpdateResult
    detail: str = ""
    old_version: str | None = None
    new_version: str | None = None
    bytes_uploaded: int = 0  # on the wire: retransmissions included
    upload_seconds: float = 0.0
    resumed_from: int = 0
    image_bytes: int = 0  # the image's own size (0: nothing was uploaded)
    group: str | None = None  # set when this outcome is part of a group's (failed) update

    @property
    def ok(self) -> bool:
        return self.status in (Status.UPDATED, Status.UP_TO_DATE)


class _Finish(Exception):
    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


@dataclass
class Slots:
    """The device's image state for one MCUboot image number."""

    active: ImageState | None
    other: ImageState | None

    @classmethod
    def parse(cls, images: list[ImageState], image_num: int) -> Slots:
        mine = [i for i in images if (i.image or 0) == image_num]
        active = next((i for i in mine if i.active), None)
        if active is None:
            active = next((i for i in mine if i.slot == 0), None)
        other = next((i for i in mine if i is not active), None)
        return cls(active, other)

    @property
    def active_hash(self) -> bytes | None:
        return bytes(self.active.hash) if self.active and self.active.hash else None

    @property
    def other_hash(self) -> bytes | None:
        return bytes(self.other.hash) if self.other and self.other.hash else None

    @property
    def running(self) -> str | None:
        """The running image's version as the device reports it."""
        return self.active.version if self.active else None

    @property
    def active_version(self) -> Version | None:
        if self.active is None:
            return None
        try:
            return Version.parse(self.active.version)
        except ValueError:
            return None


ProgressFn = Callable[[str, Step, int, int], None]


def _revert_mark(set_id: str) -> str:
    """``tested_hash`` prefix of a failed set whose revert reset is due (``_set_revert``)."""
    return f"revert:{set_id}:"


def set_revert_open(entry: Entry) -> bool:
    """The journal row holds a failed set's revert intent not yet finished (``_set_revert``)."""
    return bool(entry.target_hash and entry.tested_hash
                and entry.tested_hash.startswith(_revert_mark(entry.target_hash)))


class UpdateEngine:
    """Drives one device through one update. Create one per (device, image) attempt."""

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

    # -- bookkeeping -------------------------------------------------------------------------
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

    # -- the flow ----------------------------------------------------------------------------
    async def run(self, image: VerifiedImage, slots: Slots | None = None,
                  artifact_id: str | None = None, source: str | None = None,
                  until: Stage = Stage.CONFIRMED) -> Outcome:
        """The flow up to ``until``; short of CONFIRMED it returns Status.HELD at that stage
        (the journal row stays open, so a restart resumes it)."""
        self.until = until
        # (c) the gateway's own configuration bounds the attempt in time: a device that keeps
        # answering without getting anywhere cannot hold its lock and a max_concurrent slot
        limit = self._attempt_s(image)
        bound = asyncio.timeout(limit)
        try:
            async with bound:
                return await self._run(image, slots, artifact_id, source)
        except _Finish as f:
            return f.outcome
        except (SMPTimeout, TransportError, UploadError, SMPError) as exc:
            result = (UpdateResult.CONNECTION_LOST if isinstance(exc, SMPTimeout | TransportError)
                      else UpdateResult.UPDATE_FAILED)
            return self._finish(Status.FAILED, result, f"{type(exc).__name__}: {exc}", image).outcome
        except TimeoutError as exc:
            if not bound.expired():
                return self._crashed("update", exc, image, None)
            return self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                f"attempt not finished within {limit:.0f}s (timeouts.attempt_s) "
                                f"at step {self.entry.step}: given up", image).outcome
        except Exception as exc:
            return self._crashed("update", exc, image, None)

    async def confirm(self, image: VerifiedImage) -> Outcome:
        """Group phase: confirm the image the device test-runs - only if this gateway tested it."""
        self.until = Stage.CONFIRMED
        old_v = self.entry.old_version
        try:
            slots = await self.read_slots()
            if slots.active_hash == image.hash:
                if slots.active and slots.active.confirmed:
                    raise self._finish(Status.UPDATED, UpdateResult.SUCCESS,
                                       f"running {image.version}, confirmed", image, old_v)
                self._step(Step.CONFIRM, "group decision: confirm")
                return await self._confirm(image, old_v)
            return self._rolled_back(image, slots, old_v, True)
        except _Finish as f:
            return f.outcome
        except (SMPTimeout, TransportError, SMPError) as exc:
            return self._finish(Status.FAILED, UpdateResult.CONNECTION_LOST,
                                f"confirm: {type(exc).__name__}: {exc}", image, old_v).outcome
        except Exception as exc:
            return self._crashed("confirm", exc, image, old_v)

    async def revert(self, image: VerifiedImage, reason: str) -> Outcome:
        """Group phase: take the device back to its previous image.

        A device test-running ``image`` (booted, unconfirmed) is reset: MCUboot reverts it. A
        device that was never reset is not touched: if the image is still pending there, img_mgmt
        cannot un-pend it (no erase of a pending slot), so the group flow marks nobody before
        every member holds its image. A confirmed image cannot be reverted (reported FAILED).
        """
        self.until = Stage.CONFIRMED
        old_v = self.entry.old_version
        try:
            slots = await self.read_slots()
            if slots.active_hash == image.hash:
                if slots.active and slots.active.confirmed:
                    raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                       f"{reason}; {image.version} is already confirmed here and "
                                       "cannot be reverted", image, old_v)
                now = await self._reset_to_revert(image, old_v, reason, "the reset that reverts it",
                                                  f"group revert: {reason}")
                raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED,
                                   f"{reason}; reset, MCUboot reverted to {now}", image, old_v)
            now = slots.running or "?"
            if slots.other_hash == image.hash and slots.other and slots.other.pending:
                # FAILED, not rolled back: the journal keeps tested_hash for the next attempt
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   f"{reason}; not reset, still on {now} ({image.version} stays "
                                   "pending: img_mgmt cannot un-pend it; it will test-boot at the "
                                   "next reset and be reverted at the one after)", image, old_v)
            raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED,
                               f"{reason}; not reset, still on {now}", image, old_v)
        except _Finish as f:
            return f.outcome
        except (SMPTimeout, TransportError, SMPError) as exc:
            return self._finish(Status.FAILED, UpdateResult.CONNECTION_LOST,
                                f"revert: {type(exc).__name__}: {exc}", image, old_v).outcome
        except Exception as exc:
            return self._crashed("revert", exc, image, old_v)

    def _crashed(self, what: str, exc: Exception, image: VerifiedImage,
                 old_v: str | None) -> Outcome:
        """An unexpected exception (a bug, a store problem): this device's attempt fails -
        journaled with the outcome, logged with the traceback - and nothing else is affected.
        The journal keeps what was done (tested_hash...), so the next attempt resumes as after
        any other failure. The gateway's own disk failing (OSError, SQLite) goes up to the
        daemon, which names the state directory to fix."""
        if isinstance(exc, OSError | sqlite3.Error):
            raise exc
        log.error("device=%s %s failed with an unexpected error: %s: %s", self.dev.id, what,
                  type(exc).__name__, exc, exc_info=exc)
        result = exc.reason.lwm2m if isinstance(exc, ImageRefused) else UpdateResult.UPDATE_FAILED
        return self._finish(Status.FAILED, result,
                            f"{what}: internal error {type(exc).__name__}: {exc}", image,
                            old_v).outcome

    async def _mode(self) -> ModeFlow:
        """The device's MCUboot mode (config override, else bootloader info) and its flow."""
        dm: DeviceMode = await detect(self.s, self.dev.mcuboot_mode,
                                      timeout_s=min(2.0, self.dev.timeouts.request_s))
        flow = flow_for(dm, self.dev)
        self.flow = flow
        return flow

    def _refuse_early(self, image: VerifiedImage, exc: ImageRefused, slots: Slots,
                      artifact_id: str | None, source: str | None) -> _Finish:
        """A refusal decided before the journal row of this attempt exists (mode, build)."""
        prev = self.entry
        old_v = slots.running
        self.entry = Entry(device_id=self.dev.id, target_hash=image.hash.hex(),
                           target_version=str(image.version), artifact_id=artifact_id,
                           source=source, image_path=str(image.path),
                           old_hash=slots.active_hash.hex() if slots.active_hash else None,
                           old_version=old_v, attempts=prev.attempts + 1,
                           running_version=prev.running_version, running_hash=prev.running_hash,
                           blocked_hash=prev.blocked_hash, blocked_artifact=prev.blocked_artifact)
        return self._finish(Status.REFUSED, exc.reason.lwm2m, str(exc), image, old_v)

    async def _run(self, image: VerifiedImage, slots: Slots | None, artifact_id: str | None,
                   source: str | None) -> Outcome:
        if slots is None:
            slots = await self.read_slots()
        try:
            flow = await self._mode()
        except ModeConflict as exc:
            raise self._refuse_early(image, ImageRefused(Refusal.MODE, str(exc)), slots,
                                     artifact_id, source) from None
        if isinstance(image, VerifiedImageSet) and not image.slot_builds:
            return await self._run_set(image, artifact_id, source)
        if isinstance(flow, RecoveryFlow):
            return await self._run_recovery(image, slots, artifact_id, source)
        if slots.active is None or not slots.active.active:
            # no slot flagged active: MCUboot's serial recovery (or no application) answers -
            # the normal flows assume an application's img_mgmt (test marks, the secondary slot)
            raise _Finish(Outcome(
                self.dev.id, Status.FAILED, UpdateResult.UPDATE_FAILED,
                "the device answers from MCUboot serial recovery, not from its application: not "
                "updated through the normal flow (see recovery: last_resort in the device config)",
                new_version=str(image.version)))
        stored = image  # what the journal names: the artifact (a set of slot builds) as stored
        try:
            image = flow.choose(image, slots)
        except ImageRefused as exc:
            raise self._refuse_early(image, exc, slots, artifact_id, source) from None
        if image is not stored:
            log.info("device=%s build for the upload: %s (hash %s) of %s", self.dev.id,
                     image.version, image.hash.hex()[:16], stored.path.name)
        target = image.hash
        th = target.hex()
        old_v = slots.running
        prev = self.entry
        resuming = prev.target_hash == th and prev.outcome is None
        if resuming and prev.old_version:
            old_v = prev.old_version  # the image this update replaces, not the one now running
        # where the previous run stopped: a reset may have been sent from RESET on
        was_reset = resuming and prev.step in (Step.RESET, Step.WAIT_BOOT, Step.VERIFY, Step.CONFIRM,
                                               Step.WAIT_APP)
        if not resuming:
            # A new attempt at the same image after a failure (e.g. the device did not come back
            # in time after the reset) keeps what this gateway did to it: the hash it marked for
            # test (else it could never confirm it) and the image it replaced.
            same = prev.target_hash == th and (
                prev.outcome == Status.FAILED.value
                # a rollback verdict, yet the device runs the image this gateway marked
                or (prev.outcome == Status.ROLLED_BACK.value and slots.active_hash == target))
            staged = prev.target_hash == th and prev.outcome == STAGED
            self.entry = Entry(device_id=self.dev.id, target_hash=th,
                               target_version=str(image.version), artifact_id=artifact_id,
                               source=source, image_path=str(stored.path),
                               old_hash=prev.old_hash if same else (
                                   slots.active_hash.hex() if slots.active_hash else None),
                               old_version=prev.old_version if same else old_v,
                               tested_hash=prev.tested_hash if same else None,
                               # the proof that the device holds all of this image's bytes
                               # (a failed attempt, or a download-only update staged it)
                               upload_offset=prev.upload_offset if same or staged else 0,
                               upload_total=prev.upload_total if same or staged else 0,
                               attempts=prev.attempts + 1,
                               running_version=prev.running_version,
                               running_hash=prev.running_hash,
                               blocked_hash=prev.blocked_hash,
                               blocked_artifact=prev.blocked_artifact)
            if same and prev.old_version:
                old_v = prev.old_version
        self._step(Step.READ_STATE, f"running={old_v} target={image.version} resume={resuming} "
                   f"mode={flow.mode.value} ({flow.dm.source.value})")

        # 1. is the target already running?
        if slots.active_hash == target:
            if slots.active and slots.active.confirmed:
                # this gateway's own update (its confirm landed, though the attempt failed or
                # was cut short), or someone else's
                mine = resuming or self.entry.tested_hash == th
                st = Status.UPDATED if mine else Status.UP_TO_DATE
                detail = f"running {image.version}, confirmed"
                if (self.entry.tested_hash == th and flow.test_boot and self.dev.confirm != "app"
                        and not self.journal.event_since(self.dev.id, Step.MARK_TEST.value,
                                                         Step.CONFIRM.value, CONFIRM_SENT)):
                    # (b) says confirmed, the journal says this gateway never sent its confirm:
                    # made permanent by someone else - the health check did not decide it
                    detail += (" outside the gateway (it never sent its confirm); health check "
                               "not run")
                    log.warning("device=%s %s", self.dev.id, detail)
                raise self._finish(st, UpdateResult.SUCCESS, detail, image, old_v)
            if self.entry.tested_hash == th:
                self._hold(Stage.MARKED, image, old_v)
                return await self._after_boot(image, old_v)
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               "device runs the target image unconfirmed, but this gateway did not "
                               "test it: refusing to confirm", image, old_v)
        # A slot listing the target's hash is no proof that its bytes are all there: img_mgmt
        # reads the hash from the slot's TLV area (img_mgmt_read_info) and checks nothing else,
        # so an upload cut after the hash TLV (gateway killed, link lost) lists the full hash of
        # an image MCUboot then refuses at boot. Only the journal proves it - the device
        # acknowledged the last byte of this gateway's upload of this image; otherwise it is
        # uploaded again (a device that still holds the upload resumes it, one built with
        # CONFIG_IMG_ENABLE_IMAGE_CHECK answers that the slot already matches).
        in_other = slots.other_hash == target and slots.other is not None
        complete = in_other and self._uploaded_here(th, image.size)
        staged_by_mode = flow.mark == Mark.NONE and in_other
        if was_reset and self.entry.tested_hash == th and not (
                slots.other_hash == target and slots.other and slots.other.pending):
            # The journal says this gateway marked the image and reset the device; it does not
            # run it and it is no longer pending: it booted and was reverted (crash, watchdog,
            # reset before confirmation), or MCUboot refused it - while the gateway was down.
            # Report the rollback; never mark it again.
            return self._rolled_back(image, slots, old_v, True)
        if slots.active is not None and not slots.active.confirmed:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               f"device is test-running an unconfirmed image ({slots.active.version}) "
                               "that is not the target; leaving it alone", image, old_v)

        # 2. pre-flight: refuse before a single byte is sent
        try:
            preflight(image, device_id=self.dev.id, hardware=self.dev.hardware,
                      slot_size=self.dev.slot_size, running=slots.active_version,
                      running_hash=slots.active_hash, allow_downgrade=self.dev.allow_downgrade,
                      running_security_counter=known_security_counter(image.path.parent,
                                                                      slots.active_hash),
                      trailer=flow.trailer(image))
            refusal = flow.refuse(image, slots.active_version)
            if refusal is not None:
                raise refusal
        except ImageRefused as exc:
            raise self._finish(Status.REFUSED, exc.reason.lwm2m, str(exc), image, old_v) from None
        self._checked(prev, image, old_v)
        if image.unverified:
            log.warning("device=%s image %s partly verified: %s", self.dev.id, image.version,
                        image.unverified)

        # 3. what does slot 1 hold?
        other = slots.other
        if other is not None and other.pending and slots.other_hash != target:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               f"another image ({other.version}) is already pending in the secondary "
                               "slot; clear it before updating", image, old_v)
        if not flow.can_stage and self.until < Stage.CONFIRMED:
            # e.g. direct-XIP without revert: an uploaded newer image runs at the device's next
            # reset, whatever causes it - so nothing is uploaded until it may be installed
            log.info("device=%s held before the upload: %s cannot stage an image", self.dev.id,
                     flow.mode.value)
            raise _Finish(Outcome(self.dev.id, Status.HELD, UpdateResult.INITIAL,
                                  f"{flow.mode.value}: an uploaded image would be installed by any "
                                  "reset; not uploaded until it may be installed",
                                  old_version=old_v, new_version=str(image.version)))
        if staged_by_mode:
            pass  # no mark in this mode: a newer image in the other slot is "pending" by itself
            # (uploaded again below unless the journal proves it complete)
        elif other is not None and slots.other_hash == target and other.pending:
            if self.entry.tested_hash != th:
                # Pending, but not marked by this gateway (the journal is written before every
                # mark): someone else owns this test. Never boot-and-confirm it.
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   "the target image is already pending on the device, but this "
                                   "gateway did not mark it: refusing to reset and confirm it",
                                   image, old_v)
            self._hold(Stage.MARKED, image, old_v)
            return await self._reset_and_verify(image, old_v)
        if complete:
            self._step(Step.UPLOAD, "target already complete in the secondary slot (uploaded "
                       "and acknowledged to the last byte before): no upload",
                       upload_offset=image.size, upload_total=image.size)
            self.upload = (0, 0.0, image.size)
        else:
            self.upload = await self._upload(image)
        self._hold(Stage.UPLOADED, image, old_v)
        self._gate("the mark and the reset into the test boot", image, old_v)

        # 4. mark (journal first: from here on this gateway owns the test / the install)
        if flow.mark == Mark.NONE:
            # nothing to write: the reset installs it (the newest valid image runs)
            self._step(Step.MARK_TEST, f"hash={th[:16]} {flow.mode.value}: no mark, the reset "
                       "installs it", tested_hash=th)
            post = await self.read_slots()
            if not (post.other_hash == target and post.other is not None):
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   "before the reset the device no longer reports the uploaded "
                                   "image: not reset", image, old_v)
        else:
            self._step(Step.MARK_TEST, f"hash={th[:16]}", tested_hash=th)
            states = await self.s.image_test(target)
            post = Slots.parse(states, self.dev.image)
            if not (post.other_hash == target and post.other and post.other.pending):
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   "device did not mark the image pending", image, old_v)
        self._hold(Stage.MARKED, image, old_v)
        return await self._reset_and_verify(image, old_v)

    def _uploaded_here(self, th: str, size: int) -> bool:
        """The journal says the device acknowledged the last byte of this gateway's upload of
        the image ``th`` (``_send`` zeroes the offset before its first chunk, so an upload
        started again and cut short proves nothing)."""
        e = self.entry
        return e.target_hash == th and e.upload_total == size and e.upload_offset == size

    async def _upload(self, image: VerifiedImage) -> tuple[int, float, int]:
        sent, secs, start = await self._send(image, self.dev.image)
        # the device must now hold exactly our image in the secondary slot
        slots = await self.read_slots()
        if slots.other_hash != image.hash:
            raise UploadError("after the upload the secondary slot does not hold the image "
                              f"(slot hash {slots.other_hash.hex()[:16] if slots.other_hash else None})")
        problem = self.flow.uploaded_problem(slots, image) if self.flow is not None else None
        if problem is not None:
            raise UploadError(f"after the upload: {problem}; nothing marked")
        return sent, secs, start

    def _upload_s(self, size: int) -> float:
        """(c) how long an upload of ``size`` bytes may take (``upload.upload_deadline_s``)."""
        t = self.dev.timeouts
        return upload_deadline_s(size, first_timeout_s=t.upload_first_chunk_s,
                                 min_rate_bps=t.upload_min_rate_bps)

    def _attempt_s(self, image: VerifiedImage) -> float:
        """(c) how long one attempt may take: ``timeouts.attempt_s``, else the upload's bound
        (every image of a set) plus the resets, waits and checks that follow."""
        t = self.dev.timeouts
        if t.attempt_s is not None:
            return t.attempt_s
        members = image.members if isinstance(image, VerifiedImageSet) else ()
        upload = (sum(self._upload_s(m.verified.size) for m in members) if members
                  else self._upload_s(image.size))
        return upload + 3 * t.reset_s + t.app_confirm_s + self.dev.health_check_s + 300.0

    async def _send(self, image: VerifiedImage, image_num: int, label: str = "",
                    window: int | None = None) -> tuple[int, float, int]:
        """Upload ``image`` as MCUboot image ``image_num``; (bytes sent, seconds, resumed from)."""
        data = image.read()
        self._step(Step.UPLOAD, f"{label}{len(data)} bytes", upload_offset=0,
                   upload_total=len(data))
        last_saved = [time.monotonic()]

        def progress(off: int, total: int) -> None:
            self.entry = self.entry.with_(upload_offset=off, upload_total=total)
            now = time.monotonic()
            if now - last_saved[0] > 1.0 or off == total:  # checkpoint at most once a second
                last_saved[0] = now
                self.journal.put(self.entry, "upload-progress")
            if self.on_progress:
                self.on_progress(self.dev.id, Step.UPLOAD, off, total)

        # a link lost mid-upload (cable pulled, USB re-enumeration) is re-opened and the upload
        # resumes from the device's offset, within the reset timeout and a few attempts
        deadline = time.monotonic() + self.dev.timeouts.reset_s
        upload_end = time.monotonic() + self._upload_s(len(data))  # reconnects included
        sent = 0
        for attempt in range(1, 6):
            try:
                stats = await self.s.upload(
                    data, image_num=image_num, window=window or self.dev.window,
                    chunk_cap=self.dev.chunk_size,
                    first_timeout_s=self.dev.timeouts.upload_first_chunk_s, progress=progress,
                    store=self.journal,  # packet size / window learned for this device
                    deadline_s=max(0.0, upload_end - time.monotonic()),
                )
                break
            except TransportError as exc:
                self.journal.put(self.entry, "upload-interrupted")
                if attempt == 5 or time.monotonic() >= deadline:
                    raise
                log.warning("device=%s link lost during upload at %d/%d (%s); reconnecting",
                            self.dev.id, self.entry.upload_offset, len(data), exc)
                sent += self.entry.upload_offset
                await self._reconnect(deadline)
            except BaseException:  # cancelled (shutdown) or failed: checkpoint the acked offset
                self.journal.put(self.entry, "upload-interrupted")
                raise
        stats.sent_bytes += sent
        log.info("device=%s upload done image_bytes=%d resumed_from=%d wire_bytes=%d window=%d "
                 "chunk=%d seconds=%.2f retransmits=%d rewinds=%d", self.dev.id, stats.total,
                 stats.start_offset, stats.sent_bytes, stats.window, stats.chunk_size,
                 stats.seconds, stats.retransmits, stats.rewinds)
        return stats.sent_bytes, stats.seconds, stats.start_offset

    async def _reset_and_verify(self, image: VerifiedImage, old_v: str | None) -> Outcome:
        """Reset into the test boot. A reset whose answer never came may never have reached the
        device: if it still runs the old image with ``image`` pending (so nothing booted), it is
        sent again - safe, as the state was read just before: a pending image test-boots at a
        reset, nothing can be reverted. An acknowledged reset is never repeated."""
        self._gate("the reset into the test boot", image, old_v)
        for attempt in range(1, 4):
            self._step(Step.RESET, f"attempt {attempt}" if attempt > 1 else "")
            acked = await self.s.reset()
            self._reset_here = True
            self._step(Step.WAIT_BOOT, f"reset acknowledged={acked}")
            await self._wait_reboot()
            if acked or attempt == 3:
                break
            slots = await self.read_slots()
            if not (slots.active_hash != image.hash and slots.other_hash == image.hash
                    and slots.other is not None and slots.other.pending):
                break
            log.warning("device=%s reset unanswered and %s still pending: the reset did not reach "
                        "the device; resetting again", self.dev.id, image.version)
        return await self._after_boot(image, old_v, reset_acked=acked)

    async def _wait_reboot(self) -> None:
        """After a reset: wait for the link to go away (bounded), then for the device to answer."""
        t = self.dev.timeouts
        # Zephyr answers the reset, then reboots CONFIG_MCUMGR_GRP_OS_RESET_MS (250 ms) later;
        # probe until an echo goes unanswered, at most 5 s (a fast boot may hide the gap).
        gone_deadline = time.monotonic() + 5.0
        while time.monotonic() < gone_deadline:
            try:
                await self.s.echo("boot?", timeout_s=0.3)
            except SMPTimeout:
                break
            except TransportError:
                await self._reopen()
                break
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + t.reset_s
        while time.monotonic() < deadline:
            try:
                await self.s.echo("boot?", timeout_s=min(1.0, max(0.2, deadline - time.monotonic())))
                return
            except SMPTimeout:
                continue
            except TransportError:
                await self._reopen()
                await asyncio.sleep(self.poll)
        raise _Finish(Outcome(self.dev.id, Status.FAILED, UpdateResult.CONNECTION_LOST,
                              f"device did not come back within {t.reset_s:g}s after reset"))

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
        """A serial device that re-enumerates (USB CDC) or a closed socket: open again."""
        try:
            await self.s.close()
            await self.s.open()
        except TransportError as exc:
            log.debug("device=%s reopen failed: %s", self.dev.id, exc)

    async def _after_boot(self, image: VerifiedImage, old_v: str | None,
                          reset_acked: bool = True) -> Outcome:
        target = image.hash
        self._step(Step.VERIFY)
        slots = await self.read_slots()
        if slots.active_hash != target:
            return self._rolled_back(image, slots, old_v, reset_acked)
        self.seen_running = True
        flow = self.flow
        if flow is not None and not flow.test_boot and slots.active is not None \
                and slots.active.confirmed:
            return await self._after_install(image, old_v)
        if slots.active and slots.active.confirmed and self.entry.step == Step.VERIFY.value and \
                self._reset_here and slots.other is None and self.dev.confirm != "app":
            # a test boot was expected, yet right after the reset the image is confirmed and the
            # secondary slot is empty (a swap leaves the previous image there): MCUboot copied
            # it over the old one without a test boot (overwrite-only behaviour) - say so
            raise self._finish(Status.UPDATED, UpdateResult.SUCCESS,
                               f"{old_v} -> {image.version}: confirmed right after the reset, the "
                               "device installed it without a test boot (no revert possible; its "
                               f"MCUboot mode is {self.flow.describe() if self.flow else '?'}: set "
                               "mcuboot_mode in the device config)", image, old_v)
        if self.dev.confirm == "app":
            return await self._wait_app_confirm(image, old_v)
        if slots.active and slots.active.confirmed:
            raise self._finish(Status.UPDATED, UpdateResult.SUCCESS,
                               f"running {image.version}, already confirmed", image, old_v)
        # health window: the new image must keep answering before it is made permanent
        self._step(Step.CONFIRM, f"health check {self.dev.health_check_s:g}s")
        end = time.monotonic() + self.dev.health_check_s
        while True:
            slots = await self._read_slots_through_reboot()
            if slots.active_hash != target:
                return self._rolled_back(image, slots, old_v, True)
            if time.monotonic() >= end:
                break
            await asyncio.sleep(min(self.poll, max(0.0, end - time.monotonic())))
        await self._user_health_check(image, old_v)  # health_check: hook; failing = reverted
        self._hold(Stage.BOOTED, image, old_v)
        return await self._confirm(image, old_v)

    async def _user_health_check(self, image: VerifiedImage, old_v: str | None) -> None:
        """The device's ``health_check:`` hook (``gateway.healthhook``: a command or an SMP
        request, bounded in time and output) must pass before the confirm. Which check is (c),
        its verdict is what the user's check or the device answers (b); anything but a pass
        means not healthy: never confirmed - the reset that reverts it is journalled first and
        goes through the reset gate, MCUboot reverts, and the outcome is rolled-back with the
        hook's output."""
        res = await run_hook(self.dev, self.s, str(image.version), old_v, image.hash.hex())
        if res is None:
            return
        if res.ok:
            self._step(Step.CONFIRM, res.detail)
            return
        log.warning("device=%s %s: not confirming %s", self.dev.id, res.detail, image.version)
        now = await self._reset_to_revert(image, old_v, res.detail,
                                          f"{res.detail}; the reset that reverts it",
                                          f"{res.detail}: not confirmed; reset so MCUboot reverts")
        raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED,
                           f"{res.detail}; not confirmed: reset, MCUboot reverted to {now}",
                           image, old_v)

    async def _reset_to_revert(self, image: VerifiedImage, old_v: str | None, reason: str,
                               gate_what: str, step_detail: str) -> str:
        """Reset a device test-running ``image`` so MCUboot reverts it: through the reset gate
        (c), journalled first; the version it runs afterwards, or FAILED when the device (b)
        still runs ``image`` after the reset."""
        self._gate(gate_what, image, old_v)
        self._step(Step.RESET, step_detail)
        acked = await self.s.reset()
        self._step(Step.WAIT_BOOT, f"revert reset acknowledged={acked}")
        await self._wait_reboot()
        slots = await self.read_slots()
        if slots.active_hash == image.hash:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               f"{reason}; reset to revert, but the device still runs "
                               f"{image.version} unconfirmed", image, old_v)
        return slots.running or "?"

    async def _after_install(self, image: VerifiedImage, old_v: str | None) -> Outcome:
        """A mode without a test boot (overwrite-only, direct-XIP without revert, RAM load):
        the image runs and is confirmed by MCUboot's own rules; nothing can take it back. The
        health window still runs - its failure is reported, never hidden - but no confirm is
        sent and no rollback is promised."""
        assert self.flow is not None
        target = image.hash
        self._step(Step.CONFIRM, f"installed ({self.flow.mode.value}); health check "
                   f"{self.dev.health_check_s:g}s")
        end = time.monotonic() + self.dev.health_check_s
        while True:
            try:
                slots = await self._read_slots_through_reboot()
            except _Finish as f:
                f.outcome.detail = (f"{image.version} is installed for good ({self.flow.mode.value}, "
                                    f"no revert possible) but the device stopped answering: "
                                    f"{f.outcome.detail}")
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED, f.outcome.detail,
                                   image, old_v) from None
            if slots.active_hash != target:
                now = slots.running or "?"
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   f"{image.version} was installed ({self.flow.mode.value}, no "
                                   f"revert) but the device now runs {now}", image, old_v)
            if time.monotonic() >= end:
                break
            await asyncio.sleep(min(self.poll, max(0.0, end - time.monotonic())))
        how = "confirmed by the bootloader"
        detail = self.flow.installed(old_v, image, how)
        if image.unverified:
            detail += f"; {image.unverified}"
        raise self._finish(Status.UPDATED, UpdateResult.SUCCESS, detail, image, old_v)

    async def _confirm(self, image: VerifiedImage, old_v: str | None) -> Outcome:
        """Confirm the image the device runs - only if it is ``image`` and this gateway tested it.

        Zephyr's img_mgmt (``img_mgmt_state_write`` -> ``img_mgmt_set_next_boot_slot``,
        img_mgmt_state.c) confirms *by hash* whichever slot holds that hash: for the secondary
        slot that is ``boot_set_next(active=false, confirm=true)``, i.e. "install this image
        permanently at the next boot" (MCUboot's PERM swap). A confirm-by-hash that lands after
        the image crashed and MCUboot reverted would make the crashed image permanent. So:

        * image 0 is confirmed *without* a hash: img_mgmt then confirms the running slot
          (``img_mgmt_active_slot(img_mgmt_active_image())``), which can never schedule a swap;
        * the state is read immediately before (the target must be active) and after (active
          and confirmed) the write;
        * a confirm that goes unanswered is never re-sent blindly: the state is read again (the
          device may have rebooted) and only a still-running, unconfirmed target gets another.

        Another MCUboot image number (``image: N``, e.g. a network core) cannot be confirmed
        without a hash (that would confirm image 0); it is confirmed by hash, still only after a
        read showing the hash active, and an answer that shows it scheduled in the secondary
        slot is reported as the failure it is.
        """
        target = image.hash
        if self.entry.tested_hash != target.hex():  # the invariant, checked at the last moment
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               "refusing to confirm an image this gateway did not test", image, old_v)
        called_off = await self.confirm_gate() if self.confirm_gate is not None else None
        if called_off is not None or any(i.kind == "cancel" and i.target_hash == target.hex()
                                         for i in self.journal.open_intents(self.dev.id)):
            # a cancel journalled for this image (fleet server or operator): never confirmed;
            # the intent's take-back (gateway.fleetops) reverts it - the row stays open for it
            raise _Finish(Outcome(self.dev.id, Status.HELD, UpdateResult.INITIAL,
                                  f"{image.version} was canceled: not confirmed (the cancel is "
                                  "being taken back)", old_version=old_v,
                                  new_version=str(image.version)))
        by_hash = target if self.dev.image != 0 else None
        attempts = 3
        for attempt in range(1, attempts + 1):
            before = await self._read_slots_through_reboot()
            if before.active_hash != target:
                return self._rolled_back(image, before, old_v, True)
            if before.active is not None and before.active.confirmed:
                # an earlier confirm landed (its answer was lost), or the application confirmed
                raise self._finish(Status.UPDATED, UpdateResult.SUCCESS,
                                   f"{old_v} -> {image.version}, confirmed" + (
                                       "" if attempt > 1 else " before the gateway's confirm "
                                       "(by the device or someone else)"), image, old_v)
            # journalled before it is sent: a later pass tells its own confirm from another's
            self._step(Step.CONFIRM, f"{CONFIRM_SENT} {target.hex()[:16]} ({attempt}/{attempts})")
            try:
                states = await self.s.image_confirm(by_hash, retries=0)
            except (SMPTimeout, SMPProtocolError) as exc:
                log.warning("device=%s confirm attempt=%d/%d unanswered (%s); reading the state "
                            "instead of re-sending", self.dev.id, attempt, attempts, exc)
                continue
            post = Slots.parse(states, self.dev.image)
            if by_hash is not None and post.other_hash == target and post.other is not None and (
                    post.other.pending or post.other.permanent):
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   f"the device scheduled {image.version} in its secondary slot "
                                   "instead of confirming the running image; it will be "
                                   "installed at the next reset", image, old_v)
            after = await self._read_slots_through_reboot()
            if after.active_hash != target:
                return self._rolled_back(image, after, old_v, True)
            if after.active is not None and after.active.confirmed:
                detail = (self.flow.installed(old_v, image, "confirmed by the gateway")
                          if self.flow is not None else
                          f"{old_v} -> {image.version}, confirmed by the gateway")
                if image.unverified:
                    detail += f"; {image.unverified}"
                raise self._finish(Status.UPDATED, UpdateResult.SUCCESS, detail, image, old_v)
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               "device accepted the confirm but does not report the image "
                               "confirmed", image, old_v)
        raise self._finish(Status.FAILED, UpdateResult.CONNECTION_LOST,
                           f"the confirm went unanswered {attempts} times; {image.version} still "
                           "runs unconfirmed (MCUboot reverts it at the next reset unless a later "
                           "attempt confirms it)", image, old_v)

    async def _read_slots_through_reboot(self) -> Slots:
        """Read the state; if the device vanished (crash, watchdog), wait for it to come back."""
        try:
            return await self.read_slots(timeout_s=1.0)
        except SMPTimeout:
            await self._wait_reboot()
            return await self.read_slots()

    async def _wait_app_confirm(self, image: VerifiedImage, old_v: str | None) -> Outcome:
        target = image.hash
        self._step(Step.WAIT_APP, f"waiting up to {self.dev.timeouts.app_confirm_s:g}s")
        deadline = time.monotonic() + self.dev.timeouts.app_confirm_s
        while time.monotonic() < deadline:
            slots = await self._read_slots_through_reboot()
            if slots.active_hash != target:
                return self._rolled_back(image, slots, old_v, True)
            if slots.active and slots.active.confirmed:
                raise self._finish(Status.UPDATED, UpdateResult.SUCCESS,
                                   f"{old_v} -> {image.version}, confirmed by the application",
                                   image, old_v)
            await asyncio.sleep(self.poll)
        # the application never confirmed: reset so MCUboot reverts, and report it
        self._gate(f"application did not confirm {image.version} within "
                   f"{self.dev.timeouts.app_confirm_s:g}s; the reset that reverts it", image, old_v)
        await self.s.reset()
        await self._wait_reboot()
        slots = await self.read_slots()
        detail = (f"application did not confirm {image.version} within "
                  f"{self.dev.timeouts.app_confirm_s:g}s; reset to revert")
        if slots.active_hash == target:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               detail + ", but the device still runs it", image, old_v)
        now = slots.running or "?"
        raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED,
                           detail + f"; MCUboot reverted to {now} (with confirm: app the "
                           "application must confirm itself, boot_write_img_confirmed(); "
                           "confirm: gateway lets the gateway confirm after its health check)",
                           image, old_v)

    def _rolled_back(self, image: VerifiedImage, slots: Slots, old_v: str | None,
                     reset_acked: bool) -> Outcome:
        target = image.hash
        other = slots.other
        if slots.other_hash == target and other is not None and other.pending:
            if reset_acked:
                # The link worked and the device acknowledged the reset: the bootloader did not
                # take the pending image (LwM2M 8, update failed), the link is not to blame.
                detail = ("the device acknowledged the reset but its bootloader did not take the "
                          f"image: {image.version} is still pending in the secondary slot and "
                          f"{slots.running or '?'} runs (the bootloader "
                          "may not be in a swap mode, or the device did not actually reset)")
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED, detail, image, old_v)
            detail = ("the reset request went unanswered and the device still runs "
                      f"{slots.running or '?'} with {image.version} "
                      "pending: the reset probably never reached it")
            raise self._finish(Status.FAILED, UpdateResult.CONNECTION_LOST, detail, image, old_v)
        flow = self.flow
        now = slots.running or "?"
        if slots.other_hash == target:
            detail = (flow.reverted(image, now) if flow is not None else
                      f"rollback: {image.version} booted but was not confirmed before the next "
                      f"reset (crash or watchdog); MCUboot reverted to {now}")
        elif self.seen_running and flow is not None:
            detail = flow.reverted(image, now)
        else:
            detail = (flow.refused_at_boot(image, now) if flow is not None else
                      f"rollback: MCUboot refused {image.version} at boot; still running {now}")
        raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED, detail, image, old_v)

    # -- multi-image: several MCUboot images updated as one set ------------------------------
    # The rules (which image gets which mark, why in this order, what "installed" means for a
    # network core) are gateway/bootmodes/imageset.py's; here is the I/O and the journal.
    _RESET_STEPS = (Step.RESET.value, Step.WAIT_BOOT.value, Step.VERIFY.value, Step.CONFIRM.value,
                    Step.WAIT_APP.value)

    async def _states(self, timeout_s: float | None = None) -> list[ImageState]:
        states = await self.s.image_state(timeout_s=timeout_s)
        self._note_confirmed(states)
        s0 = imageset.ImageSlots.of(states, 0)
        self.entry = self.entry.with_(
            running_version=s0.primary.version if s0.primary else None,
            running_hash=s0.primary_hash.hex() if s0.primary_hash else None)
        return states

    async def _states_through_reboot(self) -> list[ImageState]:
        try:
            return await self._states(timeout_s=1.0)
        except SMPTimeout:
            await self._wait_reboot()
            return await self._states()

    async def _run_set(self, iset: VerifiedImageSet, artifact_id: str | None,
                       source: str | None) -> Outcome:
        assert self.flow is not None
        flow = self.flow
        sid = iset.hash.hex()
        marking = f"marking:{sid}"  # tested_hash while the marks are being written
        states = await self._states()
        s0 = imageset.ImageSlots.of(states, 0)
        old_v = s0.primary.version if s0.primary else None
        prev = self.entry
        resuming = prev.target_hash == sid and prev.outcome is None
        same = prev.target_hash == sid and prev.outcome == Status.FAILED.value
        if (resuming or same) and prev.old_version:
            old_v = prev.old_version
        if not resuming:
            self.entry = Entry(device_id=self.dev.id, target_hash=sid,
                               target_version=str(iset.version), artifact_id=artifact_id,
                               source=source, image_path=str(iset.path),
                               old_hash=prev.old_hash if same else (
                                   s0.primary_hash.hex() if s0.primary_hash else None),
                               old_version=old_v, tested_hash=prev.tested_hash if same else None,
                               attempts=prev.attempts + 1, running_version=prev.running_version,
                               running_hash=prev.running_hash, blocked_hash=prev.blocked_hash,
                               blocked_artifact=prev.blocked_artifact)
        self._step(Step.READ_STATE, f"image set {iset.describe()} running={old_v} "
                   f"mode={flow.mode.value} ({flow.dm.source.value}) resume={resuming}")

        def refuse(reason: Refusal, msg: str) -> _Finish:
            return self._finish(Status.REFUSED, reason.lwm2m, str(ImageRefused(reason, msg)),
                                iset, old_v)

        if not (flow.mode.is_swap or flow.mode.value == "overwrite-only"):
            raise refuse(Refusal.MODE, f"an image set of several images needs a swap or "
                         f"overwrite-only MCUboot; this device is {flow.describe()} (Zephyr's "
                         "img_mgmt: multi-image is not supported with direct-XIP)")
        if self.dev.group is not None:
            raise refuse(Refusal.MODE, "image sets of several images are not updated in device "
                         "groups (some images cannot be taken back once installed)")
        try:
            rls = imageset.rules(self.dev, iset, flow.mode)
        except ImageRefused as exc:
            raise refuse(exc.reason, exc.message) from None
        # images the device lists (b) or the config describes (c) - a network core's flash the
        # application cannot read is not listed until something is uploaded; never what the
        # artifact's manifest claims
        listed = {s.image or 0 for s in states} | set(self.dev.images)
        for m in iset.members:
            if m.image not in listed:
                raise refuse(Refusal.BAD_SET, f"the set has image {m.image}, but the device lists "
                             f"images {sorted(listed)} only; give the device's images: rules in the "
                             "config if it has one the application cannot read (a network core)")
        tested = self.entry.tested_hash
        if (resuming or same) and tested is not None and tested.startswith(_revert_mark(sid)):
            # the set failed and its revert reset was journalled but not done (a closed
            # maintenance window, a crash, a lost link): finish that intent - never judge,
            # re-mark or confirm this set again
            return await self._set_revert_resumed(iset, states, tested, old_v,
                                                  self.entry.last_error or prev.last_error)
        all_marked = tested == sid
        marks_started = tested in (sid, marking)
        # this set was installed here before (a network core's image stays in its secondary)
        done_before = prev.target_hash == sid and prev.outcome in (Status.UPDATED.value,
                                                                    Status.UP_TO_DATE.value)
        view = {m.image: imageset.ImageSlots.of(states, m.image) for m in iset.members}
        where = {m.image: imageset.where(view[m.image], m.hash, rls[m.image],
                                         all_marked or done_before)
                 for m in iset.members}
        log.info("device=%s image set state: %s", self.dev.id,
                 " ".join(f"image{i}={w.value}" for i, w in where.items()))
        W = imageset.Where
        if all(w == W.INSTALLED for w in where.values()):
            st = Status.UPDATED if (resuming or marks_started) else Status.UP_TO_DATE
            raise self._finish(st, UpdateResult.SUCCESS, f"runs the image set {iset.describe()}",
                               iset, old_v)
        marked = {i for i, w in where.items() if w != W.INSTALLED}
        if any(w == W.TESTING for w in where.values()):
            if not all_marked:
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   "the device test-runs an image of this set that this gateway "
                                   "did not test: refusing to confirm it", iset, old_v)
            return await self._set_after_boot(iset, rls, marked, old_v)
        if s0.primary is not None and not s0.primary.confirmed:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               f"device is test-running an unconfirmed image "
                               f"({s0.primary.version}) that is not the target; leaving it alone",
                               iset, old_v)
        if all_marked and (prev.step in self._RESET_STEPS or same) and not any(
                w == W.PENDING for w in where.values()):
            # marked and reset while the gateway was away: judge what MCUboot did, never re-mark
            return await self._set_after_boot(iset, rls, marked, old_v)

        # pre-flight, every member, before a byte is sent
        running = {i: v.running_version for i, v in view.items()}
        for m in iset.members:
            if where[m.image] == W.INSTALLED:
                continue
            # every member, network core or not: (a) its signed version against (b) what the
            # device reports running for that image (None when it cannot read it)
            rv = running.get(m.image)
            try:
                preflight(m.verified, device_id=self.dev.id, hardware=self.dev.hardware,
                          slot_size=imageset.member_slot_size(self.dev, m), running=rv,
                          running_hash=view[m.image].primary_hash,
                          allow_downgrade=self.dev.allow_downgrade,
                          running_security_counter=known_security_counter(
                              m.verified.path.parent, view[m.image].primary_hash)
                          if m.image == 0 else None,
                          trailer=flow.trailer(m.verified))
                refusal = flow.refuse(m.verified, rv)
                if refusal is not None:
                    raise refusal
            except ImageRefused as exc:
                raise refuse(exc.reason, f"{m.label()}: {exc.message}") from None
        dep = imageset.dependency_problem(iset, running)
        if dep is not None:
            raise refuse(Refusal.BAD_SET, dep)
        self._checked(prev, iset, old_v)
        for m in iset.members:
            sec = view[m.image].secondary
            if sec is not None and (sec.pending or sec.permanent) and \
                    view[m.image].secondary_hash != m.hash:
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   f"another image ({sec.version}) is already pending in image "
                                   f"{m.image}'s secondary slot; clear it before updating",
                                   iset, old_v)
            if where[m.image] == W.PENDING and not marks_started:
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   f"image {m.image} of the set is already pending on the device, "
                                   "but this gateway did not mark it: refusing to reset",
                                   iset, old_v)

        # uploads: what is on no slot of its image yet - and what a secondary slot lists
        # without proof that all its bytes are there (its hash TLV is all img_mgmt reads; the
        # journal's marks, or a download-only update staged, come only after every upload was
        # acknowledged to its last byte)
        uploads_proven = marks_started or (prev.target_hash == sid and prev.outcome == STAGED)
        sent_total, secs_total, resumed_total = 0, 0.0, 0
        for m in iset.members:
            if not (where[m.image] == W.ABSENT or (where[m.image] == W.STAGED
                                                   and not uploads_proven)):
                continue
            sent, secs, start = await self._send(m.verified, m.image, f"{m.label()}: ")
            sent_total += sent
            secs_total += secs
            resumed_total += start
            self.upload = (sent_total, secs_total, resumed_total)
            got = imageset.ImageSlots.of(await self._states(), m.image)
            if got.secondary_hash != m.hash:
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   f"after the upload image {m.image}'s secondary slot does not hold "
                                   f"{m.verified.version} (slot hash "
                                   f"{got.secondary_hash.hex()[:16] if got.secondary_hash else None});"
                                   " nothing marked", iset, old_v)
            where[m.image] = W.STAGED
        self.upload = (sent_total, secs_total, resumed_total)
        self._hold(Stage.UPLOADED, iset, old_v)
        self._gate("the marks and the reset of the image set", iset, old_v)

        # marks: test first (revertible), permanent last (see imageset.py)
        todo = [m for m in iset.members if where[m.image] == W.STAGED]
        todo.sort(key=lambda m: (rls[m.image].mark != Mark.TEST, m.image))
        if todo:
            self._step(Step.MARK_TEST, "marking " + ", ".join(
                f"image {m.image} {rls[m.image].mark.value}" for m in todo), tested_hash=marking)
            for m in todo:
                rule = rls[m.image]
                if rule.mark == Mark.TEST:
                    post = await self.s.image_test(m.hash)
                else:
                    post = await self.s.image_confirm(m.hash)
                got = imageset.ImageSlots.of(post, m.image)
                sec = got.secondary
                ok = (got.secondary_hash == m.hash and sec is not None and bool(sec.pending)
                      and (rule.mark == Mark.TEST or bool(sec.permanent)))
                if not ok:
                    done = [x.image for x in todo[: todo.index(m)]]
                    raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                       f"device did not mark image {m.image} {rule.mark.value}; "
                                       f"already marked: {done or 'none'} (a test-marked image "
                                       "test-boots at the next reset and is reverted at the one "
                                       "after)", iset, old_v)
        self._step(Step.MARK_TEST, "image set marked", tested_hash=sid)
        self._hold(Stage.MARKED, iset, old_v)
        await self._set_reset(iset, marked, old_v)
        return await self._set_after_boot(iset, rls, marked, old_v)

    async def _set_reset(self, iset: VerifiedImageSet, marked: set[int], old_v: str | None) -> None:
        """The one reset of a set; re-sent only if unanswered and every mark is still pending.
        Through the reset gate like every reset (the marks were gated too; a window closing in
        between leaves them pending, journalled, and the reset waits)."""
        self._gate("the reset of the image set", iset, old_v)
        for attempt in range(1, 4):
            self._step(Step.RESET, f"image set: images {sorted(marked)}"
                       + (f", attempt {attempt}" if attempt > 1 else ""))
            acked = await self.s.reset()
            self._step(Step.WAIT_BOOT, f"reset acknowledged={acked}")
            await self._wait_reboot()
            if acked or attempt == 3:
                return
            states = await self._states()
            still = True
            for m in iset.members:
                if m.image in marked:
                    sl = imageset.ImageSlots.of(states, m.image)
                    sec = sl.secondary
                    still = still and sl.secondary_hash == m.hash and sec is not None and bool(
                        sec.pending or sec.permanent)
            if not still:
                return
            log.warning("device=%s reset unanswered and the set still pending: resetting again",
                        self.dev.id)

    async def _set_after_boot(self, iset: VerifiedImageSet, rls: dict[int, imageset.Rule],
                              marked: set[int], old_v: str | None) -> Outcome:
        sid = iset.hash.hex()
        self._step(Step.VERIFY, f"image set: checking images {sorted(marked)}")
        states = await self._states()
        verdict = imageset.after_boot(states, iset, rls, marked)
        if not verdict.all_ok:
            return await self._set_failed(iset, verdict, old_v)
        if verdict.testing:
            self._step(Step.CONFIRM, f"image set health check {self.dev.health_check_s:g}s")
            end = time.monotonic() + self.dev.health_check_s
            while True:
                states = await self._states_through_reboot()
                verdict = imageset.after_boot(states, iset, rls, marked)
                if not verdict.all_ok:
                    return await self._set_failed(iset, verdict, old_v)
                if time.monotonic() >= end:
                    break
                await asyncio.sleep(min(self.poll, max(0.0, end - time.monotonic())))
            hook = await run_hook(self.dev, self.s, str(iset.version), old_v, sid)
            if hook is not None and not hook.ok:  # health_check: hook failed - reverted
                return await self._set_revert(iset, hook.detail, verdict.testing,
                                              verdict.permanent, old_v)
            # confirm: the other test-marked images (by hash) first, the running one last
            if self.entry.tested_hash != sid:  # the invariant, at the last moment
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   "refusing to confirm an image set this gateway did not test",
                                   iset, old_v)
            called_off = await self.confirm_gate() if self.confirm_gate is not None else None
            if called_off is not None or any(i.kind == "cancel" and i.target_hash == sid
                                             for i in self.journal.open_intents(self.dev.id)):
                # as ``_confirm``: canceled, never confirmed; the intent's take-back reverts it
                raise _Finish(Outcome(self.dev.id, Status.HELD, UpdateResult.INITIAL,
                                      f"image set {iset.version} was canceled: not confirmed "
                                      "(the cancel is being taken back)", old_version=old_v,
                                      new_version=str(iset.version)))
            order = sorted(verdict.testing, key=lambda i: (i == 0, i))
            for i in order:
                m = next(x for x in iset.members if x.image == i)
                await self._confirm_member(iset, m, old_v)
        states = await self._states()
        final = imageset.after_boot(states, iset, rls, marked)
        if final.testing or not final.all_ok:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               "the device accepted the confirms but does not report every image "
                               "of the set confirmed: " + "; ".join(
                                   list(final.failed.values()) + [f"image {i} unconfirmed"
                                                                  for i in final.testing]),
                               iset, old_v)
        parts = []
        for m in iset.members:
            if m.image not in marked:
                parts.append(f"image {m.image} {m.verified.version}: already there")
            elif m.image in verdict.testing:
                parts.append(f"image {m.image} {m.verified.version}: confirmed by the gateway")
            else:
                parts.append(final.ok.get(m.image, f"image {m.image}: installed")
                             + (" (no revert)" if m.image in final.permanent else ""))
        detail = f"{old_v} -> image set {iset.version}: " + "; ".join(parts)
        if iset.unverified:
            detail += f"; {iset.unverified}"
        raise self._finish(Status.UPDATED, UpdateResult.SUCCESS, detail, iset, old_v)

    async def _confirm_member(self, iset: VerifiedImageSet, m: SetMember, old_v: str | None) -> None:
        """Confirm one test-booted image of the set: read before (running unconfirmed), write
        (image 0 without a hash: img_mgmt confirms the running slot; another image by its hash),
        read after; an unanswered confirm is never re-sent blindly (as ``_confirm``)."""
        by_hash = m.hash if m.image != 0 else None
        for attempt in range(1, 4):
            before = imageset.ImageSlots.of(await self._states_through_reboot(), m.image)
            if before.primary_hash != m.hash:
                raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED,
                                   f"image {m.image} {m.verified.version} no longer runs before its "
                                   "confirm: it reset and MCUboot reverted it", iset, old_v)
            if before.primary is not None and before.primary.confirmed:
                return
            # journalled before it is sent, as ``_confirm`` does: a later pass (after a power cut
            # or a kill) tells this gateway's confirm from someone else's
            self._step(Step.CONFIRM, f"{CONFIRM_SENT} {m.hash.hex()[:16]} image {m.image} "
                       f"({attempt}/3)")
            try:
                await self.s.image_confirm(by_hash, retries=0)
            except (SMPTimeout, SMPProtocolError) as exc:
                log.warning("device=%s confirm of image %d attempt=%d unanswered (%s); reading the "
                            "state instead of re-sending", self.dev.id, m.image, attempt, exc)
                continue
            after = imageset.ImageSlots.of(await self._states_through_reboot(), m.image)
            if after.primary_hash == m.hash and after.primary is not None and after.primary.confirmed:
                return
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               f"the device accepted the confirm of image {m.image} but does not "
                               "report it confirmed", iset, old_v)
        raise self._finish(Status.FAILED, UpdateResult.CONNECTION_LOST,
                           f"the confirm of image {m.image} went unanswered 3 times; it still runs "
                           "unconfirmed (MCUboot reverts it at the next reset)", iset, old_v)

    async def _set_failed(self, iset: VerifiedImageSet, v: imageset.Verdict,
                          old_v: str | None) -> Outcome:
        """One image failed: the set failed. Test-booted images are reset back (MCUboot reverts
        them); permanently installed ones stay, and the outcome says so."""
        return await self._set_revert(iset, "; ".join(v.failed.values()), v.testing,
                                      v.permanent, old_v)

    async def _set_revert_resumed(self, iset: VerifiedImageSet, states: list[ImageState],
                                  mark: str, old_v: str | None, failures: str | None) -> Outcome:
        """The journal holds the intent to revert this failed set (``_set_revert``): what still
        test-runs (b: the device's state) is reset back now, if the reset gate allows."""
        permanent = [int(x) for x in mark.removeprefix(_revert_mark(iset.hash.hex())).split(",")
                     if x.isdigit()]
        testing = []
        for m in iset.members:
            sl = imageset.ImageSlots.of(states, m.image)
            if sl.primary_hash == m.hash and sl.primary is not None and not sl.primary.confirmed:
                testing.append(m.image)
        log.info("device=%s resuming the revert of the failed image set: images %s still test-"
                 "run", self.dev.id, testing)
        return await self._set_revert(iset, failures or "an image of the set failed", testing,
                                      permanent, old_v)

    async def _set_revert(self, iset: VerifiedImageSet, failures: str, testing: list[int],
                          permanent: list[int], old_v: str | None) -> Outcome:
        """Reset the failed set's test-booted images back. The reset is an intent like any
        other: journalled first (``tested_hash`` = ``revert:<set id>:<permanent images>``, the
        failures in ``last_error``; from then on nothing of this set is judged or confirmed
        again), then sent only through the one reset gate (maintenance windows, ``_gate``).
        Outside a window the attempt stops HELD with the row open; the next attempt - or a
        restarted gateway - finds the intent (``_run_set``) and finishes it."""
        sid = iset.hash.hex()
        detail = "image set failed: " + failures
        still: list[int] = []
        if testing:
            mark = _revert_mark(sid) + ",".join(str(i) for i in sorted(permanent))
            if self.entry.tested_hash != mark:
                self._step(Step.VERIFY, f"{detail}; intent: reset so MCUboot reverts images "
                           f"{sorted(testing)}", tested_hash=mark, last_error=failures)
            self._gate(f"the reset that reverts image(s) {sorted(testing)} of the failed image "
                       "set", iset, old_v)
            unconfirmed: list[int] = []
            for attempt in range(1, 4):
                self._step(Step.RESET, "image set failed: reset so MCUboot reverts images "
                           f"{sorted(testing)}" + (f", attempt {attempt}" if attempt > 1 else ""))
                acked = await self.s.reset()
                self._step(Step.WAIT_BOOT, f"revert reset acknowledged={acked}")
                await self._wait_reboot()
                # (b) the device's own state decides whether the revert happened
                states = await self._states()
                still, unconfirmed = [], []
                for i in testing:
                    m = next(x for x in iset.members if x.image == i)
                    sl = imageset.ImageSlots.of(states, i)
                    if sl.primary_hash == m.hash:
                        still.append(i)
                        if sl.primary is None or not sl.primary.confirmed:
                            unconfirmed.append(i)
                # an unanswered reset may never have reached the device: while a member still
                # test-runs unconfirmed, a reset can only revert it - send it again (bounded)
                if acked or not unconfirmed:
                    break
                log.warning("device=%s revert reset unanswered and image(s) %s still test-run: "
                            "the reset did not reach the device; resetting again", self.dev.id,
                            unconfirmed)
            back = [i for i in testing if i not in still]
            if back:
                detail += f"; reset: MCUboot reverted image(s) {back}"
            if unconfirmed:
                # the intent stays open (tested_hash keeps the revert mark): the next attempt,
                # whatever is offered then (daemon._target), finishes it before anything else
                detail += (f"; image(s) {unconfirmed} still test-run the failed set after the "
                           "reset: the revert is retried at the next attempt")
                fin = self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED, detail, iset, old_v)
                self.entry = self.entry.with_(last_error=failures)  # for the resumed revert
                self.journal.put(self.entry, "revert intent stays open")
                raise fin
            if still:
                detail += (f"; image(s) {still} still run the new version after the reset, "
                           "confirmed (it cannot be reverted any more)")
        if (self.entry.tested_hash or "").startswith(_revert_mark(sid)):
            self.entry = self.entry.with_(tested_hash=sid)  # the intent is done
        if permanent:
            detail += (f"; image(s) {sorted(permanent)} were installed permanently and cannot "
                       "be taken back")
        status = Status.ROLLED_BACK if not (permanent or still) else Status.FAILED
        raise self._finish(status, UpdateResult.UPDATE_FAILED, detail, iset, old_v)

    # -- updates through MCUboot itself (gateway/bootmodes/recovery.py) ----------------------
    async def _poll_states(self, want: Callable[[list[ImageState]], bool], what: str,
                           timeout_s: float) -> list[ImageState]:
        """Poll the image state until ``want`` holds (the device may be rebooting; serial
        recovery answers no echo, so the state read is the probe)."""
        deadline = time.monotonic() + timeout_s
        last: list[ImageState] | None = None
        while time.monotonic() < deadline:
            try:
                last = await self.s.image_state(timeout_s=1.0, retries=0)
                if want(last):
                    return last
            except SMPTimeout:
                pass
            except TransportError:
                await self._reopen()
            await asyncio.sleep(self.poll)
        seen = "no answer" if last is None else (
            "serial recovery" if in_serial_recovery(last) else "its application")
        raise TransportError(f"{what} within {timeout_s:g}s (the device answered as: {seen})")

    async def _boot_mode_reset(self) -> bool:
        """``os reset`` with ``boot_mode: 1``: MCUboot's serial recovery / the firmware loader
        at the next boot (Zephyr CONFIG_MCUMGR_GRP_OS_RESET_BOOT_MODE). Never retried."""
        try:
            await self.s.request(lambda q: ResetWrite(boot_mode=1, sequence=q), timeout_s=2.0)
            return True
        except (SMPTimeout, SMPProtocolError):
            return False

    async def _run_recovery(self, image: VerifiedImage, slots: Slots, artifact_id: str | None,
                            source: str | None) -> Outcome:
        """Single application slot (serial recovery) or firmware loader, enabled per device."""
        assert isinstance(self.flow, RecoveryFlow)
        flow = self.flow
        rec = self.dev.recovery
        assert rec is not None
        target, th = image.hash, image.hash.hex()
        old_v = slots.running
        prev = self.entry
        resuming = prev.target_hash == th and prev.outcome is None
        if resuming and prev.old_version:
            old_v = prev.old_version
        if not resuming:
            self.entry = Entry(device_id=self.dev.id, target_hash=th,
                               target_version=str(image.version), artifact_id=artifact_id,
                               source=source, image_path=str(image.path),
                               old_hash=slots.active_hash.hex() if slots.active_hash else None,
                               old_version=old_v, attempts=prev.attempts + 1,
                               running_version=prev.running_version,
                               running_hash=prev.running_hash, blocked_hash=prev.blocked_hash,
                               blocked_artifact=prev.blocked_artifact)
        self._step(Step.READ_STATE, f"running={old_v} target={image.version} mode="
                   f"{flow.mode.value} via {flow.via} resume={resuming}")
        states = await self.s.image_state()
        app_runs = not in_serial_recovery(states) and not loader_running(states)
        if app_runs and slots.active_hash == target:
            st = Status.UPDATED if resuming else Status.UP_TO_DATE
            raise self._finish(st, UpdateResult.SUCCESS, f"running {image.version}", image, old_v)
        try:
            preflight(image, device_id=self.dev.id, hardware=self.dev.hardware,
                      slot_size=self.dev.slot_size,
                      running=slots.active_version if app_runs else None,
                      running_hash=slots.active_hash if app_runs else None,
                      allow_downgrade=self.dev.allow_downgrade, trailer=flow.trailer(image))
            refusal = flow.refuse(image, slots.active_version if app_runs else None)
            if refusal is not None:
                raise refusal
        except ImageRefused as exc:
            raise self._finish(Status.REFUSED, exc.reason.lwm2m, str(exc), image, old_v) from None
        self._checked(prev, image, old_v)
        if self.until < Stage.CONFIRMED:
            raise _Finish(Outcome(self.dev.id, Status.HELD, UpdateResult.INITIAL,
                                  f"{flow.mode.value}: the upload overwrites the running image; "
                                  "not started until it may run to the end",
                                  old_version=old_v, new_version=str(image.version)))
        if app_runs:
            if rec.entry != "boot_mode":
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   f"the device runs its application; recovery.entry is "
                                   f"{rec.entry!r}: waiting for it to be in {flow.via}",
                                   image, old_v)
            # the whole recovery update is one disruption that starts with this reset: only
            # inside a maintenance window (the reset that leaves recovery afterwards ends it)
            self._gate(f"reset into {flow.via}", image, old_v)
            # journal first: from here on the device leaves its application
            self._step(Step.MARK_TEST, f"entering {flow.via} (os reset boot_mode=1)",
                       tested_hash=th)
            acked = await self._boot_mode_reset()
            self._step(Step.WAIT_BOOT, f"boot-mode reset acknowledged={acked}")
            await asyncio.sleep(0.5)  # CONFIG_MCUMGR_GRP_OS_RESET_MS: the answer precedes the reboot
            want = loader_running if flow.mode.value == "firmware-loader" else in_serial_recovery
            try:
                states = await self._poll_states(want, f"the device did not enter {flow.via}",
                                                 self.dev.timeouts.reset_s)
            except TransportError as exc:
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   f"{exc}; the application needs CONFIG_MCUMGR_GRP_OS_RESET_"
                                   "BOOT_MODE and MCUboot CONFIG_BOOT_SERIAL_BOOT_MODE (or the "
                                   "firmware loader's entry)", image, old_v) from None
        return await self._flash_from_bootloader(image, old_v, flow.via,
                                                 lambda d: flow.installed(old_v, image, d))

    async def _flash_from_bootloader(self, image: VerifiedImage, old_v: str | None, via: str,
                                     success: Callable[[str], str]) -> Outcome:
        """The device answers from serial recovery or the firmware loader: upload image 0,
        check the device lists exactly it, reset, check the application runs it."""
        target, th = image.hash, image.hash.hex()
        self.entry = self.entry.with_(tested_hash=th)
        # serial recovery serves one request at a time: no pipelining there
        self.upload = await self._send(image, 0, f"via {via}: ", window=1)
        after = await self.s.image_state()
        slot0 = next((s for s in after if (s.image or 0) == 0 and s.slot == 0), None)
        if slot0 is None or not slot0.hash or bytes(slot0.hash) != target:
            raise self._finish(Status.FAILED, UpdateResult.INTEGRITY_FAILURE,
                               f"after the upload through {via} the device does not list "
                               f"{image.version} in slot 0 (it lists only images it validated); "
                               "not reset - the next attempt uploads again", image, old_v)
        self._step(Step.RESET, f"leaving {via}")
        acked = await self.s.reset()
        self._step(Step.WAIT_BOOT, f"reset acknowledged={acked}")
        await asyncio.sleep(0.5)
        try:
            states = await self._poll_states(
                lambda st: not in_serial_recovery(st) and not loader_running(st),
                "the application did not come back", self.dev.timeouts.reset_s)
        except TransportError as exc:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               f"{image.version} was written through {via}, but {exc}",
                               image, old_v) from None
        self._step(Step.VERIFY)
        run = Slots.parse(states, 0)
        if run.active_hash != target:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               f"{image.version} was written through {via}, but the device runs "
                               f"{run.running or '?'}", image, old_v)
        detail = success("")
        if image.unverified:
            detail += f"; {image.unverified}"
        raise self._finish(Status.UPDATED, UpdateResult.SUCCESS, detail, image, old_v)

    async def recover(self, image: VerifiedImage) -> Outcome:
        """Last resort for a device whose application no longer answers SMP: if MCUboot's
        serial recovery answers (recovery pin held, or no bootable application left), re-flash
        ``image`` - the last image this gateway knew confirmed there
        (``bootmodes.recovery.last_confirmed_path``). Only with ``recovery.last_resort``."""
        rec = self.dev.recovery
        old_v = self.entry.running_version
        if rec is None or not rec.enabled or not rec.last_resort:
            return Outcome(self.dev.id, Status.REFUSED, UpdateResult.UNSUPPORTED_PROTOCOL,
                           "serial recovery is not enabled for this device (recovery: {enabled: "
                           "true, last_resort: true})")
        try:
            states = await self.s.image_state(timeout_s=self.dev.timeouts.request_s, retries=1)
        except (SMPTimeout, TransportError) as exc:
            return Outcome(self.dev.id, Status.FAILED, UpdateResult.CONNECTION_LOST,
                           f"neither the application nor MCUboot's serial recovery answers: {exc}")
        except SMPError as exc:
            return Outcome(self.dev.id, Status.FAILED, UpdateResult.UPDATE_FAILED,
                           f"the device answered the state read with an error: {exc}")
        if not in_serial_recovery(states):
            return Outcome(self.dev.id, Status.UP_TO_DATE, UpdateResult.INITIAL,
                           "the application answers: nothing to recover")
        prev = self.entry
        self.entry = Entry(device_id=self.dev.id, target_hash=image.hash.hex(),
                           target_version=str(image.version), source="recovery",
                           image_path=str(image.path), old_hash=prev.old_hash,
                           old_version=prev.old_version, attempts=prev.attempts + 1,
                           running_version=prev.running_version, running_hash=prev.running_hash,
                           blocked_hash=prev.blocked_hash, blocked_artifact=prev.blocked_artifact)
        self._step(Step.READ_STATE, "the application does not answer; MCUboot serial recovery "
                   f"does: re-flashing {image.version} (last confirmed here)")
        try:
            return await self._flash_from_bootloader(
                image, old_v, "MCUboot serial recovery",
                lambda _: f"re-flashed {image.version} (the last image confirmed here) through "
                          "MCUboot serial recovery; the application answers again")
        except _Finish as f:
            return f.outcome
        except (SMPTimeout, TransportError, UploadError, SMPError) as exc:
            return self._finish(Status.FAILED, UpdateResult.CONNECTION_LOST,
                                f"recovery: {type(exc).__name__}: {exc}", image, old_v).outcome

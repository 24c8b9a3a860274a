"""Plan step: from what the device runs and what the journal holds to the next step.

Owns ``PlanStep._run``: the device's MCUboot mode (``_mode``; a mode conflict is refused before
the attempt's row exists, ``_refuse_early``), resume or start a journal row, the target already
running or reverted, the pre-flight before a byte is sent, what the secondary slot holds (only
the journal proves a slot complete, ``_uploaded_here``), then hands on to the upload, the mark
and reset, the verify and confirm, or to the image-set and recovery flows. Writes
``Step.READ_STATE`` and, when the slot already holds the proven-complete target, ``Step.UPLOAD``
(no upload); refusals and failures through ``_finish``.
"""
from __future__ import annotations

import logging

from gateway.bootmodes.choose import flow_for
from gateway.bootmodes.flows import Mark, ModeFlow
from gateway.bootmodes.modes import DeviceMode, ModeConflict, detect
from gateway.bootmodes.recovery import RecoveryFlow
from gateway.engine.image_set import ImageSetStep
from gateway.engine.mark_reset import MarkResetStep
from gateway.engine.model import (
    Outcome,
    Slots,
    Stage,
    Status,
    Step,
    _Finish,
)
from gateway.engine.recovery import RecoveryStep
from gateway.engine.state import confirm_sent_since_mark
from gateway.images import (
    ImageRefused,
    Refusal,
    VerifiedImage,
    VerifiedImageSet,
    known_security_counter,
    preflight,
)
from gateway.journal import STAGED, Entry
from gateway.sources.base import UpdateResult

log = logging.getLogger("gateway.engine")


class PlanStep(MarkResetStep, ImageSetStep, RecoveryStep):
    """The plan step (see the module docstring)."""

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
                if (self.entry.tested_hash == th
                        and (self.dev.confirm != "app" or not flow.test_boot)
                        and not confirm_sent_since_mark(self.journal, self.dev.id)):
                    # (b) says confirmed, the journal says this gateway marked it and never sent
                    # its confirm: made permanent by the application, a torn trailer or a mode
                    # without a test boot - its health check (again, after a failed one or a
                    # restart) still decides whether that is a success
                    if not flow.test_boot:
                        return await self._after_install(image, old_v)
                    log.warning("device=%s %s", self.dev.id, self.confirmed_elsewhere(image))
                    return await self._check_permanent(image, old_v,
                                                       self.confirmed_elsewhere(image))
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
        return await self._mark_and_reset(image, old_v)

    def _uploaded_here(self, th: str, size: int) -> bool:
        """The journal says the device acknowledged the last byte of this gateway's upload of
        the image ``th`` (``_send`` zeroes the offset before its first chunk, so an upload
        started again and cut short proves nothing)."""
        e = self.entry
        return e.target_hash == th and e.upload_total == size and e.upload_offset == size

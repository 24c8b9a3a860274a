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
from collections.abc import Callable
from dataclasses import dataclass

from smp.image_management import ImageState

from gateway.config import DeviceConfig
from gateway.images import ImageRefused, VerifiedImage, known_security_counter, preflight
from gateway.journal import Entry, Journal
from gateway.mcuboot import Version, trailer_size
from gateway.smp.session import SMPError, SMPProtocolError, SMPSession, SMPTimeout, UploadError
from gateway.smp.transport import TransportError
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


class Status(enum.StrEnum):
    UPDATED = "updated"
    UP_TO_DATE = "up-to-date"
    REFUSED = "refused"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"
    HELD = "held"  # stopped at the stage the caller asked for (group phases); not an outcome


class Stage(enum.IntEnum):
    """How far ``UpdateEngine.run`` goes (groups run their members phase by phase)."""

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
    bytes_uploaded: int = 0
    upload_seconds: float = 0.0
    resumed_from: int = 0
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
    def active_version(self) -> Version | None:
        if self.active is None:
            return None
        try:
            return Version.parse(self.active.version)
        except ValueError:
            return None


ProgressFn = Callable[[str, Step, int, int], None]


class UpdateEngine:
    """Drives one device through one update. Create one per (device, image) attempt."""

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
        self._step(step, detail, outcome=status.value,
                   last_error=None if status in (Status.UPDATED, Status.UP_TO_DATE) else detail,
                   unreported=json.dumps({"result": int(result),
                                          "detail": f"{status.value}: {detail}"}))
        sent, secs, resumed = self.upload
        return _Finish(Outcome(self.dev.id, status, result, detail, old_version=old,
                               new_version=str(image.version) if image else None,
                               bytes_uploaded=sent, upload_seconds=secs, resumed_from=resumed))

    def _hold(self, stage: Stage, image: VerifiedImage, old: str | None) -> None:
        """Stop here if the caller asked to go only this far (no outcome is journaled)."""
        if self.until <= stage:
            log.info("device=%s held stage=%s", self.dev.id, stage.name.lower())
            sent, secs, resumed = self.upload
            raise _Finish(Outcome(self.dev.id, Status.HELD, UpdateResult.INITIAL, stage.name.lower(),
                                  old_version=old, new_version=str(image.version),
                                  bytes_uploaded=sent, upload_seconds=secs, resumed_from=resumed))

    async def read_slots(self, timeout_s: float | None = None) -> Slots:
        images = await self.s.image_state(timeout_s=timeout_s)
        slots = Slots.parse(images, self.dev.image)
        self.entry = self.entry.with_(
            running_version=slots.active.version if slots.active else None,
            running_hash=slots.active_hash.hex() if slots.active_hash else None,
        )
        return slots

    # -- the flow ----------------------------------------------------------------------------
    async def run(self, image: VerifiedImage, slots: Slots | None = None,
                  artifact_id: str | None = None, source: str | None = None,
                  until: Stage = Stage.CONFIRMED) -> Outcome:
        """The flow up to ``until``; short of CONFIRMED it returns Status.HELD at that stage
        (the journal row stays open, so a restart resumes it)."""
        self.until = until
        try:
            return await self._run(image, slots, artifact_id, source)
        except _Finish as f:
            return f.outcome
        except (SMPTimeout, TransportError, UploadError, SMPError) as exc:
            result = (UpdateResult.CONNECTION_LOST if isinstance(exc, SMPTimeout | TransportError)
                      else UpdateResult.UPDATE_FAILED)
            return self._finish(Status.FAILED, result, f"{type(exc).__name__}: {exc}", image).outcome
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
                self._step(Step.RESET, f"group revert: {reason}")
                acked = await self.s.reset()
                self._step(Step.WAIT_BOOT, f"revert reset acknowledged={acked}")
                await self._wait_reboot()
                slots = await self.read_slots()
                if slots.active_hash == image.hash:
                    raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                       f"{reason}; reset to revert, but the device still runs "
                                       f"{image.version}", image, old_v)
                now = slots.active.version if slots.active else "?"
                raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED,
                                   f"{reason}; reset, MCUboot reverted to {now}", image, old_v)
            now = slots.active.version if slots.active else "?"
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

    async def _run(self, image: VerifiedImage, slots: Slots | None, artifact_id: str | None,
                   source: str | None) -> Outcome:
        target = image.hash
        th = target.hex()
        if slots is None:
            slots = await self.read_slots()
        old_v = slots.active.version if slots.active else None
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
            same = prev.target_hash == th and prev.outcome == Status.FAILED.value
            self.entry = Entry(device_id=self.dev.id, target_hash=th,
                               target_version=str(image.version), artifact_id=artifact_id,
                               source=source, image_path=str(image.path),
                               old_hash=prev.old_hash if same else (
                                   slots.active_hash.hex() if slots.active_hash else None),
                               old_version=prev.old_version if same else old_v,
                               tested_hash=prev.tested_hash if same else None,
                               attempts=prev.attempts + 1,
                               running_version=prev.running_version,
                               running_hash=prev.running_hash,
                               blocked_hash=prev.blocked_hash,
                               blocked_artifact=prev.blocked_artifact)
            if same and prev.old_version:
                old_v = prev.old_version
        self._step(Step.READ_STATE, f"running={old_v} target={image.version} resume={resuming}")

        # 1. is the target already running?
        if slots.active_hash == target:
            if slots.active and slots.active.confirmed:
                # this gateway's own update (its confirm landed, though the attempt failed or
                # was cut short), or someone else's
                mine = resuming or self.entry.tested_hash == th
                st = Status.UPDATED if mine else Status.UP_TO_DATE
                raise self._finish(st, UpdateResult.SUCCESS, f"running {image.version}, confirmed",
                                   image, old_v)
            if self.entry.tested_hash == th:
                self._hold(Stage.MARKED, image, old_v)
                return await self._after_boot(image, old_v)
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               "device runs the target image unconfirmed, but this gateway did not "
                               "test it: refusing to confirm", image, old_v)
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
                      trailer=trailer_size(self.dev.flash_write_align, self.dev.max_img_sectors))
        except ImageRefused as exc:
            raise self._finish(Status.REFUSED, exc.reason.lwm2m, str(exc), image, old_v) from None

        # 3. what does slot 1 hold?
        other = slots.other
        if other is not None and other.pending and slots.other_hash != target:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               f"another image ({other.version}) is already pending in the secondary "
                               "slot; clear it before updating", image, old_v)
        if other is not None and slots.other_hash == target and other.pending:
            if self.entry.tested_hash != th:
                # Pending, but not marked by this gateway (the journal is written before every
                # mark): someone else owns this test. Never boot-and-confirm it.
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   "the target image is already pending on the device, but this "
                                   "gateway did not mark it: refusing to reset and confirm it",
                                   image, old_v)
            self._hold(Stage.MARKED, image, old_v)
            return await self._reset_and_verify(image, old_v)
        if other is not None and slots.other_hash == target:
            self._step(Step.UPLOAD, "target already complete in the secondary slot: no upload",
                       upload_offset=image.size, upload_total=image.size)
            self.upload = (0, 0.0, image.size)
        else:
            self.upload = await self._upload(image)
        self._hold(Stage.UPLOADED, image, old_v)

        # 4. mark for test (journal first: from here on this gateway owns the test)
        self._step(Step.MARK_TEST, f"hash={th[:16]}", tested_hash=th)
        states = await self.s.image_test(target)
        post = Slots.parse(states, self.dev.image)
        if not (post.other_hash == target and post.other and post.other.pending):
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               "device did not mark the image pending", image, old_v)
        self._hold(Stage.MARKED, image, old_v)
        return await self._reset_and_verify(image, old_v)

    async def _upload(self, image: VerifiedImage) -> tuple[int, float, int]:
        data = image.read()
        self._step(Step.UPLOAD, f"{len(data)} bytes", upload_total=len(data))
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
        sent = 0
        for attempt in range(1, 6):
            try:
                stats = await self.s.upload(
                    data, image_num=self.dev.image, window=self.dev.window,
                    chunk_cap=self.dev.chunk_size,
                    first_timeout_s=self.dev.timeouts.upload_first_chunk_s, progress=progress,
                    store=self.journal,  # packet size / window learned for this device
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
        log.info("device=%s upload done bytes=%d resumed_from=%d window=%d chunk=%d seconds=%.2f "
                 "retransmits=%d rewinds=%d", self.dev.id, stats.total, stats.start_offset,
                 stats.window, stats.chunk_size, stats.seconds, stats.retransmits, stats.rewinds)
        # the device must now hold exactly our image in the secondary slot
        slots = await self.read_slots()
        if slots.other_hash != image.hash:
            raise UploadError("after the upload the secondary slot does not hold the image "
                              f"(slot hash {slots.other_hash.hex()[:16] if slots.other_hash else None})")
        return stats.sent_bytes, stats.seconds, stats.start_offset

    async def _reset_and_verify(self, image: VerifiedImage, old_v: str | None) -> Outcome:
        """Reset into the test boot. A reset whose answer never came may never have reached the
        device: if it still runs the old image with ``image`` pending (so nothing booted), it is
        sent again - safe, as the state was read just before: a pending image test-boots at a
        reset, nothing can be reverted. An acknowledged reset is never repeated."""
        for attempt in range(1, 4):
            self._step(Step.RESET, f"attempt {attempt}" if attempt > 1 else "")
            acked = await self.s.reset()
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
        self._hold(Stage.BOOTED, image, old_v)
        return await self._confirm(image, old_v)

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
        by_hash = target if self.dev.image != 0 else None
        attempts = 3
        for attempt in range(1, attempts + 1):
            before = await self._read_slots_through_reboot()
            if before.active_hash != target:
                return self._rolled_back(image, before, old_v, True)
            if before.active is not None and before.active.confirmed:
                # an earlier confirm landed (its answer was lost), or the application confirmed
                raise self._finish(Status.UPDATED, UpdateResult.SUCCESS,
                                   f"{old_v} -> {image.version}, confirmed", image, old_v)
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
                raise self._finish(Status.UPDATED, UpdateResult.SUCCESS,
                                   f"{old_v} -> {image.version}, confirmed by the gateway",
                                   image, old_v)
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
        await self.s.reset()
        await self._wait_reboot()
        slots = await self.read_slots()
        detail = (f"application did not confirm {image.version} within "
                  f"{self.dev.timeouts.app_confirm_s:g}s; reset to revert")
        if slots.active_hash == target:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               detail + ", but the device still runs it", image, old_v)
        raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED, detail + " (reverted)",
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
                          f"{slots.active.version if slots.active else '?'} runs (the bootloader "
                          "may not be in a swap mode, or the device did not actually reset)")
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED, detail, image, old_v)
            detail = ("the reset request went unanswered and the device still runs "
                      f"{slots.active.version if slots.active else '?'} with {image.version} "
                      "pending: the reset probably never reached it")
            raise self._finish(Status.FAILED, UpdateResult.CONNECTION_LOST, detail, image, old_v)
        if slots.other_hash == target:
            now = slots.active.version if slots.active else "?"
            detail = (f"rollback: {image.version} booted but was not confirmed before the next reset "
                      f"(crash or watchdog); MCUboot reverted to {now}")
        else:
            detail = (f"rollback: MCUboot refused {image.version} at boot (signature or validation "
                      f"failed on the device; its secondary slot was erased); still running "
                      f"{slots.active.version if slots.active else '?'}. Check that the image is "
                      "signed with the key the device's MCUboot was built with (the gateway's "
                      "trusted_keys accept it, the bootloader does not)")
        raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED, detail, image, old_v)

"""One device, one attempt: from the fleet source's offer to a plan, the engine, an outcome.

Owns ``DeviceStep``: ``update_device`` (the attempt: journalled intents first, the last-resort
recovery, ``plan``, the admission (``FleetOps.admit``: pause, rollout, window), the engine under
the reset and confirm gates, blocking what rolled back or was refused), ``plan`` (read the
device (b), find the target - the journal's unfinished update wins over the source (``_target``,
``_runs_set_member``) - fetch it, verify it against the trusted keys (a)), the source's backoff
as seen by one device (``SourceBackingOff``, ``_source_wait``: waiting, not failing), blocking
(``block``, ``_blocked``, ``_refusal``: a rolled-back or refused artifact is not retried until
the source offers another), and the outcomes decided before the engine runs (``fail``,
``_offer_outcome``), with ``_progress_cb`` (steps for status, upload progress to the source).
Writes the journal row's read state ("read"), ``Step.DONE`` for an up-to-date device,
``Step.REFUSED`` / ``Step.FAILED`` for an offer refused or failed before the engine ran,
``last_error``, the block (``blocked_hash``/``blocked_artifact``) and the offer's report
handle (``set_report_handle``) before the update starts; the engine's steps through
``gateway.engine``, the final reports through ``reports``.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from gateway import inventory
from gateway.config import DeviceConfig
from gateway.download import sha256_file
from gateway.engine import Outcome, Slots, Stage, Status, Step, marking_mark, set_revert_open
from gateway.engine.state import confirm_sent_since_mark
from gateway.images import ImageRefused, VerifiedImageSet
from gateway.journal import STAGED, Entry
from gateway.maintenance import both_gates
from gateway.mcuboot import IMAGE_MAGIC, read_version
from gateway.plan import Plan, Stopping
from gateway.run.reports import ReportsStep
from gateway.smp.session import SMPError, SMPSession, SMPTimeout, UploadError
from gateway.smp.transport import TransportError
from gateway.sources.base import (
    DeviceView,
    FetchError,
    NotYetAccepted,
    Offer,
    Report,
    ServerCanceled,
    UpdateResult,
    UpdateState,
)

log = logging.getLogger("gateway")


class SourceBackingOff(Exception):
    """The fleet server is being backed off: this device's check is not sent now."""


def _server_side(exc: BaseException) -> bool:
    """A check failure that is the fleet server's (unreachable, timeout, 5xx/unusable answer
    reported as a lost connection), not the device's."""
    if isinstance(exc, FetchError):
        return exc.result == UpdateResult.CONNECTION_LOST
    return isinstance(exc, OSError | TimeoutError)


def _file_sha256(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _claimed_version(path: Path) -> str | None:
    """The version an (unusable) image's header claims: for naming it to the operator only."""
    try:
        with path.open("rb") as f:
            head = f.read(32)
        if len(head) >= 28 and int.from_bytes(head[:4], "little") == IMAGE_MAGIC:
            return str(read_version(head))
    except (OSError, ValueError):
        pass
    return None



class DeviceStep(ReportsStep):
    """One device's attempt (see the module docstring)."""

    # -- one device, one attempt -------------------------------------------------------------
    async def update_device(self, dev: DeviceConfig) -> Outcome:
        """One device, one attempt. Never raises (but for cancellation): problems are Outcomes."""
        offer: Offer | None = None
        await self.flush_unreported(dev)
        try:
            async with self.session(dev) as session:
                # journalled intents (a cancel) are finished first, paused or not
                pending = await self.fleet.finish_intents(dev, session)
                if pending is not None:
                    return pending
                recovered = await self.fleet.last_resort(dev, session)  # recovery.last_resort
                if recovered is not None:
                    return self._count(recovered)
                plan = await self.plan(dev, session)
                if isinstance(plan, Outcome):
                    return plan
                offer = plan.offer
                adm = await self.fleet.admit(f"device:{dev.id}", dev, offer)  # pause/rollout/window
                if not adm.go:
                    return adm.held(dev)
                await self._report(offer, Report(UpdateState.UPDATING, progress=0.0))
                self.metrics.inc("updates_started_total")
                eng = self.engine(dev, session)
                eng.on_progress = self._progress_cb(dev, offer)  # upload progress upstream
                src_gate = getattr(self.source, "install_gate", None)  # e.g. hawkBit's window
                if src_gate is not None:
                    eng.reset_gate = both_gates(src_gate(offer), eng.reset_gate)
                if adm.ignore_window:
                    eng.reset_gate = None
                # the source asked (bounded) right before the confirm: still wanted?
                eng.confirm_gate = self.fleet.confirm_gate(dev, offer, plan.image.hash.hex())
                out = await self.fleet.run_engine(  # watches for a cancel; undoes as far as it got
                    dev, offer, plan.image.hash, session,
                    lambda: eng.run(plan.image, None, artifact_id=offer.artifact_id,
                                    source=offer.source, until=adm.until))
                if out.status == Status.HELD and adm.until != Stage.CONFIRMED:
                    self.fleet.after_hold(dev, offer)
                    return await self.staged(dev, offer, out, adm.reason)
                if out.status in (Status.ROLLED_BACK, Status.REFUSED):
                    self.block(dev.id, plan.image.hash.hex(), offer.artifact_id)
                return await self.final(offer, out)
        except Stopping:
            return Outcome(dev.id, Status.FAILED, UpdateResult.INITIAL, "gateway stopping")
        except (SMPTimeout, TransportError) as exc:
            out = self._fail(dev, UpdateResult.CONNECTION_LOST, f"{type(exc).__name__}: {exc}")
        except (SMPError, UploadError) as exc:
            out = self._fail(dev, UpdateResult.UPDATE_FAILED, str(exc))
        except (OSError, sqlite3.Error) as exc:  # the gateway's own disk (ENOSPC, EROFS, EACCES)
            out = self._fail(dev, UpdateResult.UPDATE_FAILED,
                             f"gateway state directory {self.cfg.state_dir}: {exc}; free space or "
                             "fix permissions there (the update stopped before its next step)")
        except Exception as exc:  # a bug costs this device this attempt, never the daemon
            log.error("device=%s attempt failed with an unexpected error: %s: %s", dev.id,
                      type(exc).__name__, exc, exc_info=exc)
            out = self._fail(dev, UpdateResult.UPDATE_FAILED,
                             f"internal error {type(exc).__name__}: {exc}")
        return await self.final(offer, out) if offer else self._count(out)

    async def plan(self, dev: DeviceConfig, session: SMPSession) -> Plan | Outcome:
        """Read the device, find its target (journal first), fetch and verify the image.

        An Outcome when there is nothing to do (up to date, blocked) or it cannot be done; an
        outcome about an offer (refused, blocked, download failed) is a final report like any
        other (journaled, then delivered). The offer's report handle is journaled before the
        update starts, so its reports can be sent by a restarted gateway.
        """
        engine = self.engine(dev, session)
        slots = await engine.read_slots()
        self.journal.put(engine.entry, "read")  # running version/hash for `status`
        await self.fleet.note_session(dev, session)  # for the inventory the source gets
        try:
            offer, resume_path = await self._target(dev, slots)
        except SourceBackingOff as exc:
            return self._source_wait(dev, str(exc))
        except ServerCanceled as exc:  # journalled as an intent, taken back, acknowledged
            return await self.fleet.server_cancel(dev, session, exc)
        except NotYetAccepted as exc:  # waits for the server's administrator: held, not ok
            return Outcome(dev.id, Status.HELD, UpdateResult.INITIAL, str(exc),
                           old_version=slots.running, new_version=slots.running)
        except Exception as exc:
            self.metrics.inc("source_errors_total", source=self.source.name, op="check")
            hint = getattr(exc, "hint", None) or "check the source's url in the config and the network"
            detail = (f"source check ({self.source.name}): {exc}; {hint} "
                      "(the device was not touched)")
            if _server_side(exc):  # the server's outage, not the device's failure
                return self._source_wait(dev, detail)
            # e.g. a local manifest that does not validate: its own result, not a lost link
            result = exc.result if isinstance(exc, FetchError) else UpdateResult.CONNECTION_LOST
            return self._fail(dev, result, detail)
        if offer is None and slots.active is not None and not slots.active.confirmed:
            # e.g. someone else's test boot: it is not settled, and not ours to confirm
            return self._fail(dev, UpdateResult.UPDATE_FAILED,
                              f"device is test-running unconfirmed {slots.active.version}, which "
                              "this gateway did not test; refusing to confirm it")
        if offer is None:
            entry = engine.entry.with_(step=Step.DONE.value)
            if ((entry.outcome is None and entry.target_hash is not None)
                    or entry.outcome == Status.FAILED.value):
                entry = entry.with_(outcome=Status.UP_TO_DATE.value)
            if entry.outcome not in (Status.ROLLED_BACK.value, Status.REFUSED.value):
                entry = entry.with_(last_error=None)  # a success: an earlier error is stale now
            self.journal.put(entry, "up to date")
            self.steps[dev.id] = Step.DONE.value
            v = slots.running
            log.info("device=%s up-to-date version=%s", dev.id, v)
            return self._count(Outcome(dev.id, Status.UP_TO_DATE, UpdateResult.SUCCESS,
                                       f"running {v}", old_version=v, new_version=v))
        entry = self.journal.get(dev.id)
        if resume_path is None and entry.blocked_artifact == offer.artifact_id:
            return await self._refusal(offer, self._blocked(dev, entry.blocked_artifact))
        path = resume_path
        if path is None:
            await self._report(offer, Report(UpdateState.DOWNLOADING))
            try:
                path = await self.source.fetch(offer, dev.slot_size)
            except ServerCanceled as exc:  # canceled during the download: as in check()
                return await self.fleet.server_cancel(dev, session, exc)
            except FetchError as exc:
                self.metrics.inc("source_errors_total", source=self.source.name, op="fetch")
                if exc.permanent:
                    # the server's own bytes (its checksum matched) cannot be used: refused and
                    # blocked by the artifact id (derived from that checksum), reported once
                    detail = f"download: {exc}"
                    log.warning("device=%s refused artifact=%s %s", dev.id, offer.artifact_id,
                                detail)
                    self._offer_outcome(engine.entry, offer, Status.REFUSED, detail,
                                        blocked_hash=offer.sha256 or offer.artifact_id)
                    return await self.final(offer, Outcome(
                        dev.id, Status.REFUSED, exc.result, detail, old_version=slots.running,
                        new_version=str(offer.version) if offer.version else None))
                out = self._fail(dev, exc.result, f"download: {exc}")
                self._offer_outcome(engine.entry, offer, Status.FAILED, out.detail)
                return await self.final(offer, out)
            await self._report(offer, Report(UpdateState.DOWNLOADED))
        try:
            # off the event loop: a hostile artifact costs a worker thread, not every device
            image = await self.store.add_file_async(
                path, hardware=offer.hardware, allow_unsigned=dev.allow_unsigned,
                max_image_size=dev.slot_size and max(
                    [dev.slot_size, *(r.slot_size or 0 for r in dev.images.values())]))
        except ImageRefused as exc:
            out = Outcome(dev.id, Status.REFUSED, exc.reason.lwm2m, str(exc),
                          old_version=slots.running,
                          new_version=str(offer.version) if offer.version else None)
            log.warning("device=%s refused reason=%s %s", dev.id, exc.reason.value, exc.message)
            # blocked by the artifact id and named by the refused bytes' sha256 (never executed:
            # the header's version is for the operator's eyes only)
            self._offer_outcome(engine.entry, offer, Status.REFUSED, str(exc),
                                blocked_hash=_file_sha256(path), version=_claimed_version(path))
            return await self.final(offer, out)
        if resume_path is None and entry.blocked_hash == image.hash.hex():
            return await self._refusal(offer, self._blocked(dev, offer.artifact_id))
        if resume_path is None:
            self.journal.set_report_handle(dev.id, offer.report_handle())
        return Plan(dev, offer, image, resumed=resume_path is not None)

    async def _target(self, dev: DeviceConfig, slots: Slots) -> tuple[Offer | None, Path | None]:
        """The journal's unfinished update wins over the source (resume after a crash).

        Unfinished also means: an attempt failed (e.g. the link dropped during the health
        check, or the confirm's answer was lost) while the device runs the image this gateway
        marked (``tested_hash``): the next attempt health-checks and confirms it - or finds it
        confirmed and reports the update done - rather than leaving it unconfirmed, or the
        server believing the failure (the source may not offer the version the device runs).
        The same after a rollback verdict: a device that runs the image this gateway marked
        booted it after all, and a test boot this gateway started is finished by it."""
        entry = self.journal.get(dev.id)
        # (b) the device runs it confirmed, and the journal has no confirm of this gateway's
        # since its mark: permanent by itself (a mode without a test boot, an application
        # that confirms itself, a torn trailer). Its health check failed or was cut and that
        # was reported; nothing is left to finish - the source decides what comes next (its
        # fix, or the same image again: then the plan checks it again)
        permanent_by_itself = (slots.active is not None and bool(slots.active.confirmed)
                               and not confirm_sent_since_mark(self.journal, dev.id))
        runs_tested = (entry.outcome in (Status.FAILED.value, Status.ROLLED_BACK.value)
                       and entry.tested_hash is not None
                       and slots.active_hash is not None
                       and entry.tested_hash == slots.active_hash.hex())
        tested_running = runs_tested and not permanent_by_itself
        if entry.outcome in (Status.FAILED.value, Status.ROLLED_BACK.value) and not tested_running:
            # an image set's test boot this gateway started is finished by it too, whatever is
            # offered: its revert intent still open, or (b) the device test-runs (unconfirmed)
            # a member of the set this gateway marked (a hash of its (a) signed images)
            tested_running = set_revert_open(entry) or (
                entry.tested_hash is not None and entry.target_hash is not None
                and entry.tested_hash in (entry.target_hash, marking_mark(entry.target_hash))
                and slots.active is not None and not slots.active.confirmed
                and await self._runs_set_member(dev, entry, slots))
        if ((entry.outcome is None or tested_running) and entry.target_hash and entry.image_path
                and Path(entry.image_path).is_file()):
            log.info("device=%s resuming step=%s target=%s", dev.id, entry.step, entry.target_version)
            return self.offer_from_journal(dev), Path(entry.image_path)
        view = DeviceView(id=dev.id, hardware=dev.hardware, running_version=slots.active_version,
                          running_hash=slots.active_hash, group=dev.group,
                          inventory=self.fleet.inventory_for(dev, slots))
        health = self.source_health
        if not health.may_contact():
            raise SourceBackingOff(f"waiting for {self.source.name} (backing off after "
                                   f"{health.failures} failed check(s): {health.last_error})")
        try:
            offer = await self.source.check(view)
        except NotYetAccepted:  # an answer: the server is up
            if health.succeeded():
                for d in list(self.source_waiting):
                    self.fleet.wake(d)
            raise
        except Exception as exc:
            if _server_side(exc):
                health.failed(str(exc))
            else:
                health.release()
            raise
        except BaseException:
            health.release()
            raise
        if health.succeeded():  # the outage is over: the devices that waited for it go now
            for d in list(self.source_waiting):
                self.fleet.wake(d)
        if (runs_tested and permanent_by_itself and entry.tested_hash == entry.target_hash
                and entry.image_path and Path(entry.image_path).is_file()
                and (offer is None or offer.artifact_id == entry.artifact_id)):
            # the source offers nothing else (it takes the device for current, or offers the
            # same artifact): the failed check of the permanent image - the journal's own
            # target, not a previous image a group take-back re-installed - runs again; never
            # an "up to date" over a failed check
            log.info("device=%s checking the permanent %s again", dev.id, entry.target_version)
            return self.offer_from_journal(dev), Path(entry.image_path)
        return offer, None

    async def _runs_set_member(self, dev: DeviceConfig, entry: Entry, slots: Slots) -> bool:
        """The journal's target is an image set (from the store, where it was verified) and the
        device's active image is one of its members."""
        if not entry.image_path or not Path(entry.image_path).is_file():
            return False
        try:
            iset = await self.store.add_file_async(Path(entry.image_path), hardware=None,
                                                   allow_unsigned=dev.allow_unsigned)
        except (ImageRefused, OSError) as exc:
            log.warning("device=%s journalled image set %s unreadable: %s", dev.id,
                        entry.image_path, exc)
            return False
        return isinstance(iset, VerifiedImageSet) and any(
            m.image == dev.image and m.hash == slots.active_hash for m in iset.members)

    def _source_wait(self, dev: DeviceConfig, detail: str) -> Outcome:
        """The source is backed off: not the device's failure (not journaled, not counted; the
        supervisor waits for the source). One log line per source state change, not per poll."""
        self.source_waiting.add(dev.id)
        log.debug("device=%s waits for the source: %s", dev.id, detail)
        return Outcome(dev.id, Status.FAILED, UpdateResult.CONNECTION_LOST, detail)

    def _offer_outcome(self, prev: Entry, offer: Offer, status: Status, detail: str, *,
                       blocked_hash: str | None = None, version: str | None = None) -> None:
        """Journal an outcome decided about ``offer`` before the engine ran (download failed,
        refused), so that ``status`` shows this attempt's target and outcome, not the previous
        update's. A row of an unfinished update (or one whose test boot this gateway must
        still finish, or a staged download) keeps its update fields; only the error and the
        block are added to it."""
        dev_id = prev.device_id
        block: dict[str, object] = ({"blocked_hash": blocked_hash,
                                     "blocked_artifact": offer.artifact_id}
                                    if blocked_hash is not None else {})
        tested_running = (prev.tested_hash is not None and prev.tested_hash == prev.running_hash
                          and prev.outcome in (Status.FAILED.value, Status.ROLLED_BACK.value))
        if ((prev.outcome is None and prev.target_hash is not None) or tested_running
                or prev.outcome == STAGED):
            entry = prev.with_(last_error=detail, **block)
        else:
            step = Step.REFUSED if status == Status.REFUSED else Step.FAILED
            entry = Entry(device_id=dev_id, step=step.value, outcome=status.value,
                          target_version=version or (str(offer.version) if offer.version else None),
                          artifact_id=offer.artifact_id, source=offer.source,
                          old_hash=prev.running_hash, old_version=prev.running_version,
                          attempts=prev.attempts, last_error=detail,
                          running_version=prev.running_version, running_hash=prev.running_hash,
                          blocked_hash=prev.blocked_hash, blocked_artifact=prev.blocked_artifact,
                          updated_at=time.time()).with_(**block)
            self.steps[dev_id] = step.value
        self.journal.put(entry, detail)

    # -- blocking: never retry a rolled-back or refused image endlessly ----------------------
    def block(self, device_id: str, image_hash: str | None, artifact_id: str | None) -> None:
        entry = self.journal.get(device_id)
        self.journal.put(entry.with_(blocked_hash=image_hash, blocked_artifact=artifact_id),
                         f"blocked until the source offers another artifact than {artifact_id}")

    def _blocked(self, dev: DeviceConfig, artifact: str | None) -> Outcome:
        entry = self.journal.get(dev.id)
        try:
            status = Status(entry.outcome or "failed")
        except ValueError:
            status = Status.FAILED
        if status not in (Status.ROLLED_BACK, Status.REFUSED):
            status = Status.ROLLED_BACK
        # name the blocked image (its version when the journal knows it, and its hash), never
        # the journal's current target: that may be the version the device runs now
        b = inventory.blocked_of(entry) or {}
        name = " ".join(str(x) for x in (b.get("version") or "version unknown",
                                         (b.get("hash") or "")[:16]) if x) or str(artifact)
        detail = (f"not re-attempting {name} (artifact {artifact}): it {status.value} before "
                  f"({entry.last_error or '-'}); waiting for a different artifact")
        if self._blocked_logged.get(dev.id) != artifact:
            self._blocked_logged[dev.id] = artifact or ""
            log.warning("device=%s blocked artifact=%s %s", dev.id, artifact, detail)
        return Outcome(dev.id, status, UpdateResult.UPDATE_FAILED, detail,
                       old_version=entry.running_version, new_version=entry.target_version,
                       group=dev.group)

    async def _refusal(self, offer: Offer, out: Outcome) -> Outcome:
        """A refusal decided before the device is touched (blocked artifact): reported once.

        The same offer (same report handle) refused again at every poll is not re-reported."""
        if self.journal.has_report(out.device_id, offer.report_handle()):
            return out
        return await self.final(offer, out)

    # -- outcomes, reports, metrics ----------------------------------------------------------
    def fail(self, dev: DeviceConfig, result: UpdateResult, detail: str) -> Outcome:
        """A FAILED outcome, logged and written to the journal's ``last_error``."""
        log.error("device=%s failed result=%s detail=%r", dev.id, result.name, detail)
        try:
            entry = self.journal.get(dev.id)
            self.journal.put(entry.with_(last_error=detail), detail)
        except sqlite3.Error as exc:  # a full disk must not hide the outcome
            log.error("device=%s journal not written: %s", dev.id, exc)
        return Outcome(dev.id, Status.FAILED, result, detail)

    _fail = fail

    def _progress_cb(self, dev: DeviceConfig,
                     offer: Offer | None = None) -> Callable[[str, Step, int, int], None]:
        """With ``offer``: upload progress goes to the source too (one report in flight at a
        time; the source bounds the rate it sends upstream)."""
        inflight: list[asyncio.Task[bool]] = []
        steps: list[asyncio.Task[bool]] = []

        def cb(device_id: str, step: Step, off: int, total: int) -> None:
            self.steps[device_id] = step.value
            if self.on_progress:
                self.on_progress(device_id, step.value, off, total)
            if offer is not None and step == Step.UPLOAD and total and not (
                    inflight and not inflight[0].done()):
                inflight[:] = [asyncio.ensure_future(self._report(
                    offer, Report(UpdateState.UPDATING, progress=off / total)))]
            elif offer is not None and step != Step.UPLOAD and getattr(
                    self.source, "reports_steps", False):  # AWS OTA: self_test ready / active
                steps[:] = [t for t in steps if not t.done()] + [asyncio.ensure_future(
                    self._report(offer, Report(UpdateState.UPDATING, detail=f"step:{step.value}")))]
        return cb

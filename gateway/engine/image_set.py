"""Image-set step: several MCUboot images updated as one set, with one reset.

The rules (which image gets which mark, why in this order, what "installed" means for a network
core) are ``gateway/bootmodes/imageset.py``'s; here are the I/O and the journal: ``ImageSetStep
._run_set`` (plan, pre-flight of every member, uploads, marks), ``_set_reset``,
``_set_after_boot`` (health window, hook, confirm gate), ``_confirm_member``, and the failed
set's revert intent (``_set_failed``, ``_set_revert``, ``_set_revert_resumed``). Writes
``Step.READ_STATE``, ``Step.UPLOAD`` (through ``_send``), ``Step.MARK_TEST``, ``Step.RESET``,
``Step.WAIT_BOOT``, ``Step.VERIFY`` and ``Step.CONFIRM``.
"""
from __future__ import annotations

import asyncio
import logging
import time

from smp.image_management import ImageState

from gateway.bootmodes import imageset
from gateway.bootmodes.flows import Mark
from gateway.engine.model import (
    CONFIRM_SENT,
    CONFIRMED_ELSEWHERE,
    Outcome,
    Stage,
    Status,
    Step,
    _Finish,
    _revert_mark,
    marking_mark,
)
from gateway.engine.state import Unanswered, confirm_sent_since_mark
from gateway.engine.upload import UploadStep
from gateway.healthhook import run_hook
from gateway.images import (
    ImageRefused,
    Refusal,
    SetMember,
    VerifiedImageSet,
    known_security_counter,
    preflight,
)
from gateway.journal import STAGED, Entry
from gateway.smp.session import SMPProtocolError, SMPTimeout
from gateway.sources.base import UpdateResult

log = logging.getLogger("gateway.engine")


def _marks_pending(states: list[ImageState], members: list[SetMember]) -> bool:
    """(b) every one of ``members`` is marked in its secondary slot (pending, or permanent)."""
    for m in members:
        sl = imageset.ImageSlots.of(states, m.image)
        sec = sl.secondary
        if sl.secondary_hash != m.hash or sec is None or not (sec.pending or sec.permanent):
            return False
    return True


# the revert intent's flag (``revert:<set>:<permanent>:retry``): the set's marks were cut short
# (``_set_marks_cut``) - once reverted, the update is tried again rather than blocked
_RETRY = "retry"


class ImageSetStep(UploadStep):
    """The image-set step (see the module docstring)."""

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
        marking = marking_mark(sid)  # tested_hash while the marks are being written
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
            if marks_started and not confirm_sent_since_mark(self.journal, self.dev.id):
                # marked here, permanent without the gateway's confirm (a restart or a failed
                # check since, a torn trailer, a mode without a test boot): checked again
                return await self._set_after_boot(iset, rls, {m.image for m in iset.members},
                                                  old_v)
            st = Status.UPDATED if (resuming or marks_started) else Status.UP_TO_DATE
            raise self._finish(st, UpdateResult.SUCCESS, f"runs the image set {iset.describe()}",
                               iset, old_v)
        marked = {i for i, w in where.items() if w != W.INSTALLED}
        if any(w == W.TESTING for w in where.values()):
            if not all_marked and tested == marking:
                # this gateway's own marks were cut short, and the device booted since
                return await self._set_marks_cut(iset, rls, where, old_v)
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
            # marks already on the device (an earlier attempt's) and the ones written here
            landed = [m for m in iset.members if where[m.image] == W.PENDING]
            for m in todo:
                rule = rls[m.image]
                if landed:
                    # the marks before this one must still be pending: a device that rebooted
                    # since (a power cut) booted what had landed - this mark written now would
                    # be acted on alone at the next reset (a split set made permanent)
                    if not _marks_pending(await self._states_through_reboot(), landed):
                        return await self._set_marks_interrupted(iset, rls, old_v)
                post = await self._write_mark(m, rule, landed)
                if post is None or not _marks_pending(post, landed):
                    return await self._set_marks_interrupted(iset, rls, old_v)
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
                landed.append(m)
        self._step(Step.MARK_TEST, "image set marked", tested_hash=sid)
        self._hold(Stage.MARKED, iset, old_v)
        await self._set_reset(iset, marked, old_v)
        return await self._set_after_boot(iset, rls, marked, old_v)

    async def _write_mark(self, m: SetMember, rule: imageset.Rule,
                          landed: list[SetMember]) -> list[ImageState] | None:
        """One member's mark, never re-sent blindly (as the confirm): unanswered, the device's
        state decides - the mark is there (its answer was lost), or the device rebooted and
        the marks before it are gone (None: ``_set_marks_interrupted``), or it is sent again
        (3 times at most)."""
        for attempt in range(1, 4):
            try:
                if rule.mark == Mark.TEST:
                    return await self.s.image_test(m.hash, retries=0)
                return await self.s.image_confirm(m.hash, retries=0)
            except SMPTimeout as exc:
                if attempt == 3:
                    raise
                log.warning("device=%s mark of image %d unanswered (%s); reading the state "
                            "before sending it again", self.dev.id, m.image, exc)
            states = await self._states_through_reboot()
            if not _marks_pending(states, landed) or \
                    imageset.ImageSlots.of(states, m.image).primary_hash == m.hash:
                return None  # the device rebooted: what landed was booted (or is gone)
            if _marks_pending(states, [m]):
                return states
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _set_marks_interrupted(self, iset: VerifiedImageSet,
                                     rls: dict[int, imageset.Rule], old_v: str | None) -> Outcome:
        """The device rebooted between this gateway's marks (a power cut while the gateway
        kept going): judged as after a cut between them (``_set_marks_cut``)."""
        states = await self._states()
        where = {m.image: imageset.where(imageset.ImageSlots.of(states, m.image), m.hash,
                                         rls[m.image], False) for m in iset.members}
        log.warning("device=%s rebooted between the marks of the set: %s", self.dev.id,
                    " ".join(f"image{i}={w.value}" for i, w in where.items()))
        return await self._set_marks_cut(iset, rls, where, old_v)

    async def _set_marks_cut(self, iset: VerifiedImageSet, rls: dict[int, imageset.Rule],
                             where: dict[int, imageset.Where], old_v: str | None) -> Outcome:
        """The marks of this set were being written by this gateway (``tested_hash`` =
        ``marking:<set>``, journalled before the first mark) when it stopped - a power cut, a
        kill, a lost link - and the device has booted since: a member test-runs.

        (b) the device's state decides. Every member runs the set (test-booted or installed):
        every mark landed before the journal's "marked" - this gateway's test boot, judged and
        confirmed like any other. Else the set is split - a member test-runs beside one whose
        mark never landed (power-cut campaign, multi-image, a cut in image 1's trailer): no
        mark can finish it (the test boot is spent; a reset reverts the tested member and would
        boot the other alone), so the test-run members are reset back through the revert intent
        (journalled, gated) and the update is tried again from its uploads - a cut is not the
        image's fault, so nothing is blocked."""
        W = imageset.Where
        # booted as marked: a test mark test-runs (or came back permanent: a torn trailer - the
        # set's health window still decides); a permanent mark is installed. A permanent-marked
        # member that test-runs had its mark torn after the magic (image-ok never written):
        # the next reset reverts it, so the set is split
        if all(w == W.INSTALLED or (w == W.TESTING and rls[i].mark == Mark.TEST
                                    and not rls[i].netcore)
               for i, w in where.items()):
            self._step(Step.MARK_TEST, "image set marked (the device booted every member after "
                       "the gateway stopped while marking)", tested_hash=iset.hash.hex())
            return await self._set_after_boot(iset, rls, set(where), old_v)
        testing = sorted(i for i, w in where.items() if w == W.TESTING)
        # a permanent mark that landed after the device rebooted is acted on by the reset that
        # reverts the others: named, never hidden (MCUboot has no way to take it back)
        permanent = sorted(i for i, w in where.items() if rls[i].mark == Mark.PERMANENT
                           and (w == W.INSTALLED or (w == W.PENDING and testing)))
        cut = ", ".join(f"image {i} {w.value}" for i, w in sorted(where.items()))
        # a network core's image that MCUboot handed over stays in its secondary, unmarked:
        # img_mgmt cannot tell it from a mark that never landed. Reverting the application is
        # the side that cannot report a false success (confirming it beside an old network
        # core could); the retry installs both again
        unsure = sorted(i for i, w in where.items() if w == W.STAGED and rls[i].netcore)
        if unsure:
            cut += (f"; network core image(s) {unsure} may already run the set's build (img_mgmt "
                    "cannot read them): installed again by the retry")
        return await self._set_revert(iset, f"the marks of the set were cut short ({cut})",
                                      testing, permanent, old_v, retry=True)

    async def _set_reset(self, iset: VerifiedImageSet, marked: set[int], old_v: str | None) -> None:
        """The one reset of a set; re-sent only if unanswered and every mark is still pending.
        Through the reset gate like every reset (the marks were gated too; a window closing in
        between leaves them pending, journalled, and the reset waits)."""
        self._gate("the reset of the image set", iset, old_v)
        for attempt in range(1, 4):
            self._step(Step.RESET, f"image set: images {sorted(marked)}"
                       + (f", attempt {attempt}" if attempt > 1 else ""))
            acked = await self._reset()
            if acked or attempt == 3:
                return
            if not _marks_pending(await self._states(),
                                  [m for m in iset.members if m.image in marked]):
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
        else:
            # nothing left to confirm: every marked image is already permanent (overwrite-only,
            # a network core, an application that confirmed itself, a trailer torn by a power
            # cut) - the health window and the hook still decide, as for one image
            # (``VerifyConfirmStep._check_permanent``); a failure is reported, never reverted
            failed = await self._set_check_permanent(iset, rls, marked, old_v)
            if failed is not None:
                return failed
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
        if not verdict.testing:
            detail += "; health check passed"
        if iset.unverified:
            detail += f"; {iset.unverified}"
        raise self._finish(Status.UPDATED, UpdateResult.SUCCESS, detail, iset, old_v)

    async def _set_check_permanent(self, iset: VerifiedImageSet, rls: dict[int, imageset.Rule],
                                   marked: set[int], old_v: str | None) -> Outcome | None:
        """The health window and the ``health_check:`` hook of a set whose marked images are all
        permanent already (no confirm to send): None when both pass; else the failed set's
        outcome (``_set_failed`` / ``_set_revert``: permanent images are reported, not reverted).
        A device that stops answering in the window fails it (``_permanent_window``: a crash or
        watchdog reset boots a permanent image straight back into itself)."""
        self._step(Step.CONFIRM, f"{CONFIRMED_ELSEWHERE}: image set {iset.version} installed; "
                   f"health check {self.dev.health_check_s:g}s")
        verdict = imageset.Verdict()
        try:
            async for states in self._permanent_window():
                verdict = imageset.after_boot(states, iset, rls, marked)
                if not verdict.all_ok:
                    return await self._set_failed(iset, verdict, old_v)
        except Unanswered as exc:
            return await self._set_revert(iset, str(exc), [], sorted(marked), old_v)
        hook = await run_hook(self.dev, self.s, str(iset.version), old_v, iset.hash.hex())
        if hook is not None and not hook.ok:
            return await self._set_revert(iset, f"its health check failed: {hook.detail}",
                                          verdict.testing, verdict.permanent or sorted(marked),
                                          old_v)
        if hook is not None:
            self._step(Step.CONFIRM, hook.detail)
        return None

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
        perm, _, flag = mark.removeprefix(_revert_mark(iset.hash.hex())).partition(":")
        permanent = [int(x) for x in perm.split(",") if x.isdigit()]
        testing = []
        for m in iset.members:
            sl = imageset.ImageSlots.of(states, m.image)
            if sl.primary_hash == m.hash and sl.primary is not None and not sl.primary.confirmed:
                testing.append(m.image)
        log.info("device=%s resuming the revert of the failed image set: images %s still test-"
                 "run", self.dev.id, testing)
        return await self._set_revert(iset, failures or "an image of the set failed", testing,
                                      permanent, old_v, retry=flag == _RETRY)

    async def _set_revert(self, iset: VerifiedImageSet, failures: str, testing: list[int],
                          permanent: list[int], old_v: str | None, *,
                          retry: bool = False) -> Outcome:
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
            mark = _revert_mark(sid) + ",".join(str(i) for i in sorted(permanent)) + (
                f":{_RETRY}" if retry else "")
            if self.entry.tested_hash != mark:
                self._step(Step.VERIFY, f"{detail}; intent: reset so MCUboot reverts images "
                           f"{sorted(testing)}", tested_hash=mark, last_error=failures)
            self._gate(f"the reset that reverts image(s) {sorted(testing)} of the failed image "
                       "set", iset, old_v)
            unconfirmed: list[int] = []
            for attempt in range(1, 4):
                self._step(Step.RESET, "image set failed: reset so MCUboot reverts images "
                           f"{sorted(testing)}" + (f", attempt {attempt}" if attempt > 1 else ""))
                acked = await self._reset("revert reset acknowledged")
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
        if retry:
            # the set's marks were cut short (``_set_marks_cut``), not judged: the revert is
            # done, and the journal never claims every mark landed - the next attempt starts
            # from its uploads (never from the old marks), and nothing is blocked (a member
            # that stayed - its application confirmed itself - counts as installed then, and
            # the set's health window and hook still decide)
            self.entry = self.entry.with_(tested_hash=None)
            detail += "; the update is tried again"
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED, detail, iset, old_v)
        if (self.entry.tested_hash or "").startswith(_revert_mark(sid)):
            self.entry = self.entry.with_(tested_hash=sid)  # the intent is done
        if permanent:
            detail += (f"; image(s) {sorted(permanent)} were installed permanently and cannot "
                       "be taken back")
        status = Status.ROLLED_BACK if not (permanent or still) else Status.FAILED
        raise self._finish(status, UpdateResult.UPDATE_FAILED, detail, iset, old_v)

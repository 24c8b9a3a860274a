"""Group updates: MCUs that must change version together (``DeviceConfig.group``).

Owns the all-or-nothing switch of a group: it ends with **every member on the new image,
confirmed, or every member back on its previous image, confirmed**. The phases, each journaled
(``groups`` table) before it starts, so that after a restart every member follows the same
decision::

    upload  every member: image complete in its secondary slot (not marked)
    mark    every member: marked for test (pending)           - only once ALL are uploaded
    boot    every member: reset, booted, health-checked, still unconfirmed
    confirm first every member is read again (running its target, unconfirmed, its previous
            image in the secondary slot); then one member at a time: read again, confirm,
            read back confirmed                                - only once ALL booted fine
    revert  (a member failed after the first mark, before every member was confirmed)
            every member taken back to its previous image, confirmed; a take-back cut short
            by a link error or a reset that waits for a maintenance window leaves the group in
            this phase, and the next attempt resumes it (nothing is reported or blocked yet)
    done / failed                                            - failed: every member is back, or
            cannot be taken back at all (reported)

Why this order: img_mgmt cannot take back a pending image (``img_mgmt_set_next_boot_slot`` in
Zephyr's img_mgmt_state.c refuses any change while a test is pending, and a pending slot is
"in use", so it cannot be erased or overwritten); only a reset clears it, by test-booting it.
So nobody is marked until every member holds its image, and nobody is reset until every member
is marked. A failure in the upload phase leaves every member untouched (the image just sits,
unmarked, in slot 1) and is retried later like a single device's.

Taking a member back (``MemberEngine.take_back``) is driven by what the device reports, so it
is idempotent and resumes after a restart; MCUboot's swap rules make every step safe:

- new image test-running (unconfirmed): reset - MCUboot's REVERT swap restores the previous
  image, confirmed (``boot_swap_type``: primary unconfirmed + copy_done -> REVERT);
- new image pending, never booted: reset (it test-boots), then reset again (MCUboot reverts);
- new image already confirmed (another member failed after this one was confirmed): after a
  swap the previous image sits in the secondary slot, so it is marked *for test* by its hash
  (``boot_set_next(secondary, active=false, confirm=false)``, which img_mgmt allows on a
  confirmed device) and the device is reset. MCUboot validates it and swaps it in to run
  unconfirmed; if it did not come up, MCUboot's next boot would revert to the (confirmed, good)
  new image - the device is never left without a bootable, confirmed image. After a health
  window the previous image is confirmed (the running slot, no hash). A permanent mark
  (``confirm=true``) would skip that safety net and is never used. If the secondary slot no
  longer holds the previous image, the member cannot be taken back: that is reported.

A cancel of any member (the fleet server's, for any member's offer, or the operator's) is
journalled as an intent before it is acted on and takes the WHOLE group back the same way
(``GroupRunner._canceled``), never confirms; it is finished before the group resumes anything
(also after a restart), and acknowledged to the server only once every member is back.

A group that had to be taken back blocks the group's images on every member: they are not
pushed again until the source offers a different artifact. Every member's Outcome of a failed
group carries ``group`` and says which member failed and why.

The group runner does not import the daemon: it gets what it needs through ``GroupHost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.config import DeviceConfig
from gateway.engine import Outcome, Slots, Stage, Status, Step, UpdateEngine, _Finish
from gateway.fleetops import WATCH_STOP_S
from gateway.images import ImageRefused, ImageStore, VerifiedImage
from gateway.journal import GroupRecord, Intent, Journal
from gateway.maintenance import both_gates
from gateway.metrics import Metrics
from gateway.plan import Plan, Stopping
from gateway.smp.session import SMPError, SMPSession, SMPTimeout, UploadError
from gateway.smp.transport import TransportError
from gateway.sources.base import Offer, UpdateResult

log = logging.getLogger("gateway.groups")

_PHASE_STAGE = {"upload": Stage.UPLOADED, "mark": Stage.MARKED, "boot": Stage.BOOTED}
_OPEN_PHASES = ("mark", "boot", "confirm", "revert")  # past the point of no return
_CLOSED_PHASES = ("done", "failed", "staged")  # staged: download-only, every member in slot 1


class GroupAdmission(Protocol):
    """The staged rollout's gate for a planned group, and the members' cancels
    (``gateway.fleetops.FleetOps``)."""

    async def admit_group(self, key: str, members: list[tuple[DeviceConfig, Offer]],
                          resumed: bool = False) -> str | None: ...

    def group_cancels(self, devs: list[DeviceConfig]) -> list[Intent]: ...

    async def probe_cancel(self, dev: DeviceConfig, offer: Offer, target: str) -> Intent | None: ...

    def install_gate(self, offer: Offer) -> Callable[[], str | None] | None: ...

    def install_stage(self, members: list[tuple[DeviceConfig, Offer]]) -> tuple[Stage, str]: ...

    def after_hold(self, dev: DeviceConfig, offer: Offer) -> None: ...

    async def watch_group_cancel(self, name: str,
                                 members: list[tuple[DeviceConfig, Offer, str]],
                                 stop: asyncio.Event | None = None) -> Intent: ...

    async def finish_group_cancel(self, dev: DeviceConfig, intent: Intent,
                                  verdict: str | None) -> None: ...


class _GroupCanceled(Exception):
    """A member's cancel arrived (journalled): the group run stops and takes the group back."""


class GroupHost(Protocol):
    """What a group run needs from the gateway (``gateway.daemon.Gateway`` implements it)."""

    @property
    def fleet(self) -> GroupAdmission: ...  # read-only here: the gateway's is a FleetOps
    journal: Journal
    store: ImageStore
    stop: asyncio.Event
    metrics: Metrics
    steps: dict[str, str]

    def session(self, dev: DeviceConfig) -> AbstractAsyncContextManager[SMPSession]: ...

    def engine(self, dev: DeviceConfig, session: SMPSession) -> UpdateEngine: ...

    async def plan(self, dev: DeviceConfig, session: SMPSession) -> Plan | Outcome: ...

    async def final(self, offer: Offer | None, out: Outcome) -> Outcome: ...

    async def staged(self, dev: DeviceConfig, offer: Offer, out: Outcome, reason: str) -> Outcome: ...

    async def flush_unreported(self, dev: DeviceConfig) -> None: ...

    def block(self, device_id: str, image_hash: str | None, artifact_id: str | None) -> None: ...

    def fail(self, dev: DeviceConfig, result: UpdateResult, detail: str) -> Outcome: ...

    def offer_from_journal(self, dev: DeviceConfig) -> Offer: ...


@dataclass
class _Back:
    """A member taken back from the journal alone - its stored image is gone or no longer
    verifies: reverting sends no image bytes, so the canceled image's hash as this gateway
    journalled it (c) and what the device reports (b) are all ``MemberEngine.take_back``
    needs. Never installed or confirmed from here."""

    dev: DeviceConfig
    offer: Offer
    target: bytes
    version: str


def _target(p: Plan | _Back) -> tuple[bytes, str]:
    """The hash and version of the image a member (its plan, or its journal) is about."""
    if isinstance(p, _Back):
        return p.target, p.version
    return p.image.hash, str(p.image.version)


def _settled(s: Slots) -> tuple[object, ...]:
    """What a take-back's verdict rests on: which image runs, confirmed or not, and what the
    secondary slot holds, pending or not."""
    a, o = s.active, s.other
    return (s.active_hash, a.confirmed if a else None, s.other_hash, o.pending if o else None)


class MemberEngine(UpdateEngine):
    """The engine of one group member, with the steps only a group needs."""

    @classmethod
    def of(cls, eng: UpdateEngine) -> MemberEngine:
        m = cls(eng.dev, eng.s, eng.journal, on_progress=eng.on_progress,
                poll_interval_s=eng.poll)
        m.reset_gate = eng.reset_gate  # the daemon's maintenance-window check
        return m

    async def recheck(self, image: VerifiedImage) -> Outcome | None:
        """Read the member again just before a confirm: None if it may be confirmed.

        It must answer, run ``image`` unconfirmed (a crash or reset since its health check
        would have made MCUboot revert it), have nothing else pending, and hold its previous
        image in the secondary slot (so that it can still be taken back after the confirm)."""
        old_v = self.entry.old_version
        try:
            slots = await self.read_slots()
        except (SMPTimeout, TransportError, SMPError) as exc:
            return Outcome(self.dev.id, Status.FAILED, UpdateResult.CONNECTION_LOST,
                           f"re-check before confirm: {type(exc).__name__}: {exc}",
                           old_version=old_v, new_version=str(image.version))
        now = slots.running or "?"
        problem: str | None = None
        status = Status.FAILED
        if slots.active_hash != image.hash:
            status = Status.ROLLED_BACK
            problem = (f"no longer runs {image.version} (runs {now}): it reset after its health "
                       "check and MCUboot reverted it")
        elif slots.active is not None and slots.active.confirmed:
            problem = f"{image.version} is already confirmed, but not by this group's decision"
        elif slots.other is not None and slots.other.pending:
            problem = "another image is pending in its secondary slot"
        elif not self.entry.old_hash or slots.other_hash != bytes.fromhex(self.entry.old_hash):
            problem = ("its previous image is not in the secondary slot: once confirmed it could "
                       "not be taken back")
        if problem is None:
            return None
        log.warning("device=%s re-check before confirm failed: %s", self.dev.id, problem)
        return Outcome(self.dev.id, status, UpdateResult.UPDATE_FAILED,
                       f"re-check before confirm: {problem}", old_version=old_v,
                       new_version=str(image.version))

    async def confirm_checked(self, image: VerifiedImage) -> Outcome:
        """Re-check, then confirm (``UpdateEngine.confirm``: state read before and after)."""
        bad = await self.recheck(image)
        return bad if bad is not None else await self.confirm(image)

    async def take_back(self, target: bytes, version: str, reason: str) -> Outcome:
        """Bring the member back to its previous image, confirmed (see the module docstring).

        Decided from the device's state at each step, at most a few resets; ROLLED_BACK when
        the previous image runs confirmed with nothing pending, FAILED otherwise. ``target``:
        the canceled image's hash from the journal (c), never the stored file - which may be
        gone - and no image bytes: reverting sends none."""
        self.until = Stage.CONFIRMED
        old_v = self.entry.old_version
        old = bytes.fromhex(self.entry.old_hash) if self.entry.old_hash else None
        did: list[str] = []
        try:
            for _ in range(6):
                slots = await self._read_slots_through_reboot()
                active, other = slots.active, slots.other
                if slots.active_hash == target and active is not None and not active.confirmed:
                    did.append(f"reset the test-running {version} (MCUboot reverted it)")
                    await self._reset_step(f"group take-back: {reason}")
                    continue
                if slots.active_hash == target:  # confirmed: re-install the previous image
                    if old is None or slots.other_hash != old or other is None:
                        raise self._finish(
                            Status.FAILED, UpdateResult.UPDATE_FAILED,
                            f"{reason}; {version} is confirmed here and its previous image is "
                            "no longer in the secondary slot: it cannot be taken back", None, old_v)
                    if not other.pending:
                        # the mark belongs with its reset: both only inside a maintenance window
                        self._gate("group take-back: the mark and reset of the previous image",
                                   None, old_v)
                        self._step(Step.MARK_TEST, f"group take-back: test-boot the previous image "
                                   f"{other.version}", tested_hash=old.hex())
                        post = Slots.parse(await self.s.image_test(old), self.dev.image)
                        if not (post.other_hash == old and post.other and post.other.pending):
                            raise self._finish(
                                Status.FAILED, UpdateResult.UPDATE_FAILED,
                                f"{reason}; the device did not mark the previous image "
                                f"{other.version} for test", None, old_v)
                    did.append(f"re-installed {other.version} from the secondary slot (test swap)")
                    await self._reset_step(f"group take-back: boot the previous image {other.version}")
                    continue
                if old is not None and slots.active_hash == old:
                    if slots.other_hash == target and other is not None and other.pending:
                        # marked, never booted: only a reset clears it (it test-boots, then reverts)
                        did.append(f"test-booted the pending {version} to clear it")
                        await self._reset_step(f"group take-back: clear the pending {version}")
                        continue
                    if active is not None and not active.confirmed:
                        await self._confirm_previous(old)
                        continue
                    if not await self._state_holds(slots):
                        continue  # two reads disagree: decide again from a fresh read
                    now = active.version if active else "?"
                    raise self._finish(
                        Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED,
                        f"{reason}; {'; '.join(did) or 'nothing to undo'}; back on {now}, confirmed",
                        None, old_v)
                now = active.version if active else "?"
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   f"{reason}; the device runs {now}, neither {version} nor "
                                   "its previous image: not touched", None, old_v)
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               f"{reason}; taking it back did not settle ({'; '.join(did)})",
                               None, old_v)
        except _Finish as f:
            f.outcome.new_version = f.outcome.new_version or version
            return f.outcome
        except (SMPTimeout, TransportError, SMPError) as exc:
            out = self._finish(Status.FAILED, UpdateResult.CONNECTION_LOST,
                               f"{reason}; take-back: {type(exc).__name__}: {exc}", None,
                               old_v).outcome
            out.new_version = version
            return out

    async def _state_holds(self, seen: Slots) -> bool:
        """Read the slots once more before a take-back is called done: True when the device
        (b) says the same again. One stale or contradicting answer (a late duplicate, a
        device repeating an earlier read) must not end a take-back with an image still
        pending - the loop decides again from the fresh read, within its bound."""
        again = await self.read_slots()
        return _settled(again) == _settled(seen)

    async def _reset_step(self, detail: str) -> None:
        """Every take-back reset: only when ``reset_gate`` allows it (else HELD; the group
        stays in its revert phase and resumes when a window opens)."""
        self._gate(f"{detail}: the reset", None, self.entry.old_version)
        self._step(Step.RESET, detail)
        await self._reset()

    async def _confirm_previous(self, old: bytes) -> None:
        """The previous image test-runs after a re-install: health window, then confirm it."""
        if self.entry.tested_hash != old.hex():
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               "the previous image runs unconfirmed, but this gateway did not "
                               "test it: refusing to confirm", None, self.entry.old_version)
        self._step(Step.CONFIRM, f"group take-back: health check {self.dev.health_check_s:g}s "
                   "of the previous image")
        end = time.monotonic() + self.dev.health_check_s
        while time.monotonic() < end:
            slots = await self._read_slots_through_reboot()
            if slots.active_hash != old:
                return  # it went away (MCUboot reverted it): the caller reads and decides again
            await asyncio.sleep(min(self.poll, max(0.0, end - time.monotonic())))
        slots = await self.read_slots()
        if slots.active_hash != old or slots.active is None or slots.active.confirmed:
            return
        try:  # image 0: no hash = the running slot (never schedules a swap)
            await self.s.image_confirm(old if self.dev.image != 0 else None, retries=0)
        except (SMPTimeout, SMPError) as exc:
            log.warning("device=%s confirm of the previous image unanswered (%s); reading again",
                        self.dev.id, exc)



def _resumable(o: Outcome) -> bool:
    """A take-back that may finish later: a link error, or a reset waiting for a window."""
    return o.status == Status.HELD or (o.status == Status.FAILED
                                       and o.result == UpdateResult.CONNECTION_LOST)


class GroupRunner:
    def __init__(self, host: GroupHost) -> None:
        self.host = host

    # -- one member, one phase, one session --------------------------------------------------
    async def _member(self, plan: Plan | _Back, phase: str, reason: str = "",
                      until: Stage | None = None) -> Outcome:
        h, dev = self.host, plan.dev
        try:
            async with h.session(dev) as s:
                eng = MemberEngine.of(h.engine(dev, s))
                if phase == "revert":  # the gateway's windows only: a take-back is not an install
                    return await eng.take_back(*_target(plan), reason)
                assert isinstance(plan, Plan)  # forward phases: the verified image, always
                src_gate = h.fleet.install_gate(plan.offer)  # e.g. hawkBit's window: withholds only
                if src_gate is not None:
                    eng.reset_gate = both_gates(src_gate, eng.reset_gate)
                if phase == "confirm":
                    return await eng.confirm_checked(plan.image)
                if phase == "recheck":
                    return await eng.recheck(plan.image) or Outcome(
                        dev.id, Status.HELD, UpdateResult.INITIAL, "re-checked")
                return await eng.run(plan.image, None, artifact_id=plan.offer.artifact_id,
                                     source=plan.offer.source, until=until or _PHASE_STAGE[phase])
        except Stopping:
            return Outcome(dev.id, Status.FAILED, UpdateResult.INITIAL, "gateway stopping")
        except (SMPTimeout, TransportError) as exc:
            return Outcome(dev.id, Status.FAILED, UpdateResult.CONNECTION_LOST,
                           f"{phase}: {type(exc).__name__}: {exc}")
        except (SMPError, UploadError) as exc:
            return Outcome(dev.id, Status.FAILED, UpdateResult.UPDATE_FAILED, f"{phase}: {exc}")

    async def _plan(self, dev: DeviceConfig) -> Plan | Outcome:
        h = self.host
        try:
            async with h.session(dev) as s:
                return await h.plan(dev, s)
        except Stopping:
            return Outcome(dev.id, Status.FAILED, UpdateResult.INITIAL, "gateway stopping")
        except (SMPTimeout, TransportError) as exc:
            return h.fail(dev, UpdateResult.CONNECTION_LOST, f"{type(exc).__name__}: {exc}")
        except (SMPError, UploadError) as exc:
            return h.fail(dev, UpdateResult.UPDATE_FAILED, str(exc))

    def _resume_plan(self, dev: DeviceConfig, target_hash: str) -> tuple[Plan, Outcome | None] | None:
        """A member of a group interrupted past the upload phase, from the journal.

        None: the member's journal row is not about this group update (nothing to do for it).
        Else its plan and, when the member already has one, its journaled outcome.
        """
        h = self.host
        e = h.journal.get(dev.id)
        if e.target_hash != target_hash or not e.image_path or not Path(e.image_path).is_file():
            return None
        try:
            image = h.store.add_file(Path(e.image_path), hardware=None,
                                     allow_unsigned=dev.allow_unsigned)
        except ImageRefused as exc:
            log.error("device=%s group member's journaled image unusable: %s", dev.id, exc)
            return None
        plan = Plan(dev, h.offer_from_journal(dev), image, resumed=True)
        if e.outcome is None:
            return plan, None
        try:
            st = Status(e.outcome)
        except ValueError:
            st = Status.FAILED
        res = UpdateResult.SUCCESS if st == Status.UPDATED else UpdateResult.UPDATE_FAILED
        return plan, Outcome(dev.id, st, res, e.last_error or e.step, old_version=e.old_version,
                             new_version=e.target_version)

    def _back(self, dev: DeviceConfig, target_hash: str) -> _Back:
        """A member to take back whose stored image cannot be used (gone, or it no longer
        verifies): from the group's journalled target hash (c) - the device's own report (b)
        decides each step of ``MemberEngine.take_back``; no image is needed to revert."""
        e = self.host.journal.get(dev.id)
        version = e.target_version if e.target_hash == target_hash and e.target_version else "?"
        return _Back(dev, self.host.offer_from_journal(dev), bytes.fromhex(target_hash),
                     f"{version} ({target_hash[:12]})" if version == "?" else version)

    # -- the group ---------------------------------------------------------------------------
    async def run(self, name: str, members: list[DeviceConfig]) -> list[Outcome]:
        h, j = self.host, self.host.journal
        for dev in members:  # reports of earlier runs need the server, not the devices
            await h.flush_unreported(dev)
        if h.fleet.group_cancels(members):
            # a journalled cancel of any member (also of an earlier run, before a restart) is
            # finished first: nothing of the group is resumed or confirmed before it
            return await self._canceled(name, members)
        rec = j.group(name)
        plans: dict[str, Plan] = {}
        outs: dict[str, Outcome] = {}  # the latest outcome of each member
        confirmed: set[str] = set()
        failure: tuple[str, Outcome] | None = None
        phase = "upload"
        stop_at, stop_why = Stage.CONFIRMED, ""
        if rec is not None and rec.phase in _OPEN_PHASES:
            # interrupted after the point of no return for some member: follow the journal
            phase = rec.phase
            log.info("group=%s resuming phase=%s members=%s", name, phase, ",".join(rec.members))
            backs: dict[str, _Back] = {}
            for dev in members:
                if dev.id not in rec.members:
                    continue
                resumed = self._resume_plan(dev, rec.members[dev.id])
                if resumed is None:
                    if h.journal.get(dev.id).target_hash == rec.members[dev.id]:
                        backs[dev.id] = self._back(dev, rec.members[dev.id])
                    continue
                plans[dev.id], journaled = resumed
                if journaled is None:
                    continue
                outs[dev.id] = journaled
                if journaled.status == Status.UPDATED:
                    confirmed.add(dev.id)
                elif failure is None:
                    failure = (dev.id, journaled)
            members_map = dict(rec.members)
            await h.fleet.admit_group(f"group:{name}", [(p.dev, p.offer) for p in plans.values()],
                                      resumed=True)  # past the point of no return: accounted only
            if backs:
                # past the point of no return, a member's stored image is gone or no longer
                # verifies: the group cannot go forward (nothing more is confirmed); every
                # member goes back, that one from the journal's hash (``_Back``)
                bid = next(iter(backs))
                lost = (f"group {name}: member {bid}'s stored image is gone or no longer "
                        "verifies: the group cannot be finished; taking every member back")
                return await self._close(name, {**plans, **backs}, outs,
                                         (bid, Outcome(bid, Status.FAILED,
                                                       UpdateResult.UPDATE_FAILED, lost)),
                                         revert=True, why=lost)
        else:
            planned = await asyncio.gather(*(self._plan(d) for d in members))
            done: dict[str, Outcome] = {}
            for dev, pl in zip(members, planned, strict=True):
                if isinstance(pl, Outcome):
                    done[dev.id] = pl
                else:
                    plans[dev.id] = pl
            bad = {i: o for i, o in done.items() if o.status != Status.UP_TO_DATE}
            if bad:
                return await self._not_started(name, plans, done, bad)
            if not plans:
                return list(done.values())
            # the staged rollout counts the group as one unit: admitted here, or every member
            # waits untouched (its image fetched and verified on the gateway only)
            why = await h.fleet.admit_group(f"group:{name}",
                                            [(p.dev, p.offer) for p in plans.values()])
            if why is not None:
                return [Outcome(i, Status.HELD, UpdateResult.INITIAL, why, group=name)
                        for i in plans] + list(done.values())
            outs.update(done)
            # download-only / check-only offers stop the whole group before the mark, as
            # ``FleetOps.admit`` stops a single device
            stop_at, stop_why = h.fleet.install_stage([(p.dev, p.offer) for p in plans.values()])
            members_map = {i: p.image.hash.hex() for i, p in plans.items()}
            j.put_group(GroupRecord(name, "upload", members_map, "members: " + ",".join(plans)))
            h.metrics.inc("updates_started_total", len(plans))
        # a cancel of any member's offer (the server's) or of any member (the operator's) is
        # watched for the whole run, journalled as an intent before it is acted on
        stop = asyncio.Event()
        watch = asyncio.ensure_future(h.fleet.watch_group_cancel(
            name, [(p.dev, p.offer, members_map.get(i, p.image.hash.hex()))
                   for i, p in plans.items()], stop))
        try:
            result = await self._drive(name, plans, outs, confirmed, failure, phase, members_map,
                                       rec, watch, (stop_at, stop_why))
        except _GroupCanceled:
            result = None
        finally:
            # never wait on the watcher unbounded (Python 3.11's wait_for can swallow a
            # cancellation): ``stop`` ends it at its next turn
            stop.set()
            watch.cancel()
            await asyncio.wait({watch}, timeout=WATCH_STOP_S)
            if watch.done() and not watch.cancelled():
                watch.exception()  # retrieved: an error of the watcher is not the run's
        if result is None or (h.fleet.group_cancels(members) and not h.stop.is_set()):
            # taken back now; or it came as the group ended: answered (too late / nothing left)
            canceled = await self._canceled(name, members)
            result = canceled if result is None else result
        return result

    async def _drive(self, name: str, plans: dict[str, Plan], outs: dict[str, Outcome],
                     confirmed: set[str], failure: tuple[str, Outcome] | None, phase: str,
                     members_map: dict[str, str], rec: GroupRecord | None,
                     watch: asyncio.Future[Intent],
                     stage: tuple[Stage, str] = (Stage.CONFIRMED, "")) -> list[Outcome]:
        """The group's phases from ``phase`` on; raises ``_GroupCanceled`` when a member's
        cancel arrives (the members' steps in flight are stopped; nothing more is confirmed).
        ``stage``: how far the members' offers let the group go (``FleetOps.install_stage``)."""
        h, j = self.host, self.host.journal
        stop_at, stop_why = stage

        # -- upload, mark, boot: every member together ---------------------------------------
        order = list(_PHASE_STAGE)
        for ph in order:
            if failure is not None or phase in ("confirm", "revert"):
                break
            if order.index(ph) < order.index(phase):
                continue
            self._check_cancel(watch, plans)
            if ph == "mark" and phase == "upload":  # nobody is marked yet
                held = await self._before_mark(name, plans, outs, stop_at, stop_why)
                if held is not None:
                    return held
            until = min(_PHASE_STAGE[ph], stop_at)
            j.put_group(GroupRecord(name, ph, members_map))
            results = await self._unless_canceled(watch, [self._member(p, ph, until=until)
                                                          for p in plans.values()])
            if h.stop.is_set():
                return self._stopping(plans, outs)  # the journaled phase resumes at the next start
            waits = [o for o in results if o.status == Status.HELD
                     and o.detail != until.name.lower()]
            if waits and all(o.status == Status.HELD for o in results):
                # a mark/reset the maintenance window no longer allows (it closed during the
                # upload or the boots): the journaled phase resumes when a window opens
                log.info("group=%s phase=%s waits: %s", name, ph, waits[0].detail)
                return [Outcome(i, Status.HELD, UpdateResult.INITIAL, waits[0].detail, group=name)
                        for i in plans] + [o for i, o in outs.items() if i not in plans]
            for p, o in zip(plans.values(), results, strict=True):
                if o.status != Status.HELD:
                    outs[p.dev.id] = o
                    if failure is None or o.status in (Status.ROLLED_BACK, Status.REFUSED):
                        failure = (p.dev.id, o)
            if failure is not None and ph == "upload":
                # nobody is marked: nothing to take back; the images just sit in slot 1
                j.put_group(GroupRecord(name, "failed", members_map, f"upload: {failure[0]}"))
                return await self._close(name, plans, outs, failure, revert=False)
            phase = ph

        # -- confirm: re-check everybody, then one at a time ---------------------------------
        if failure is None and phase != "revert":
            if phase != "confirm":
                j.put_group(GroupRecord(name, "confirm", members_map, "every member booted its image"))
            failure = await self._confirm_all(name, plans, outs, confirmed, watch)
            if failure is None and not h.stop.is_set():
                j.put_group(GroupRecord(name, "done", members_map))
                return [await h.final(plans[i].offer if i in plans else None, o)
                        for i, o in outs.items()]
            if failure is None:
                return self._stopping(plans, outs)
        if failure is None:  # resumed in "revert": the recorded reason stands
            failure = ("?", Outcome("?", Status.FAILED, UpdateResult.UPDATE_FAILED,
                                    rec.detail if rec else "group reverted"))
        return await self._close(name, plans, outs, failure, revert=True)

    async def _before_mark(self, name: str, plans: dict[str, Plan], outs: dict[str, Outcome],
                           stop_at: Stage, stop_why: str) -> list[Outcome] | None:
        """Every member holds its image, unmarked; None: the group may mark them now.

        As ``FleetOps.admit`` for one device: a download-only (or check-only) offer stops the
        group here - each member's row closed as staged (``after_hold``) and DOWNLOADED
        reported per member; the group's record "staged" (nothing to take back: slot 1 only).
        Else the source's own hold (``install_gate``, e.g. hawkBit's maintenance window of an
        action) is asked for every member before anyone is marked: server metadata may only
        withhold the mark and reset, never allow them (that is the gateway's windows, (c))."""
        h, j = self.host, self.host.journal
        others = [o for i, o in outs.items() if i not in plans]
        if stop_at < Stage.MARKED:
            result = []
            for p in plans.values():
                h.fleet.after_hold(p.dev, p.offer)
                o = Outcome(p.dev.id, Status.HELD, UpdateResult.INITIAL, stop_why,
                            new_version=str(p.image.version), group=name)
                result.append(await h.staged(p.dev, p.offer, o, stop_why))
            j.put_group(GroupRecord(name, "staged", {i: p.image.hash.hex() for i, p in plans.items()},
                                    stop_why))
            log.info("group=%s staged: %s", name, stop_why)
            return result + others
        for p in plans.values():
            gate = h.fleet.install_gate(p.offer)
            why = gate() if gate is not None else None
            if why is not None:
                detail = f"group {name} waits: {p.dev.id}: {why} (images staged, nothing marked)"
                log.info("group=%s %s", name, detail)
                return [Outcome(i, Status.HELD, UpdateResult.INITIAL, detail, group=name)
                        for i in plans] + others
        return None

    async def _confirm_all(self, name: str, plans: dict[str, Plan], outs: dict[str, Outcome],
                           confirmed: set[str], watch: asyncio.Future[Intent],
                           ) -> tuple[str, Outcome] | None:
        """Re-check every unconfirmed member, then confirm them one by one (re-checked again).
        A cancel of any member, journalled, stops it before the next confirm (``_GroupCanceled``).

        Returns the first failure, None when every member is confirmed (or the gateway stops)."""
        h = self.host
        todo = [p for i, p in plans.items() if i not in confirmed]
        self._check_cancel(watch, plans)
        checks = await self._unless_canceled(watch, [self._member(p, "recheck") for p in todo])
        for p, o in zip(todo, checks, strict=True):
            if o.status != Status.HELD:
                outs[p.dev.id] = o
                return (p.dev.id, o)
        # the last gate before the first confirm: the source is asked for every member's offer
        # (each bounded, ``FleetOps.probe_cancel``); a "canceled" is journalled as an intent and
        # takes the whole group back, an unanswered probe does not hold the confirm
        await self._unless_canceled(watch, [self._probe(p) for p in todo])
        self._check_cancel(watch, plans)
        log.info("group=%s decision=confirm members=%s", name, ",".join(plans))
        for p in todo:
            if h.stop.is_set():
                return None
            self._check_cancel(watch, plans)  # the journal's word, read just before the confirm
            (o,) = await self._unless_canceled(watch, [self._member(p, "confirm")])
            outs[p.dev.id] = o
            if o.status != Status.UPDATED:
                return (p.dev.id, o)
            confirmed.add(p.dev.id)
        return None

    async def _probe(self, p: Plan) -> Outcome:
        await self.host.fleet.probe_cancel(p.dev, p.offer, p.image.hash.hex())
        return Outcome(p.dev.id, Status.HELD, UpdateResult.INITIAL, "probed")

    # -- cancel: a member's cancel takes the whole group back --------------------------------
    def _check_cancel(self, watch: asyncio.Future[Intent], plans: dict[str, Plan]) -> None:
        """Raise ``_GroupCanceled`` when a cancel of any member is journalled (or the watcher
        returned one)."""
        seen = watch.done() and not watch.cancelled() and watch.exception() is None
        if seen or self.host.fleet.group_cancels([p.dev for p in plans.values()]):
            raise _GroupCanceled()

    @staticmethod
    async def _unless_canceled(watch: asyncio.Future[Intent],
                               steps: list[Awaitable[Outcome]]) -> list[Outcome]:
        """The members' steps, together - unless a member's cancel arrives first: then they
        are stopped where they are (``_GroupCanceled``; the take-back reads each device)."""
        task = asyncio.ensure_future(asyncio.gather(*steps))
        both: set[asyncio.Future[Any]] = {task, watch}
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not task.done() and watch.exception() is None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise _GroupCanceled()
        return list(await task)

    async def _canceled(self, name: str, members: list[DeviceConfig]) -> list[Outcome]:
        """Finish the journalled cancels of the group's members: a cancel of ANY member takes
        the WHOLE group back (a group is all-or-nothing), never confirms; its resets go through
        the maintenance-window gate. Only once the group is back, each cancel is finished
        (``finish_group_cancel``: a server's is acknowledged now). A take-back left unfinished
        (link error, a reset waiting for a window) keeps the intents pending: the next
        attempt - also after a restart - resumes it here, before anything else. What is taken
        back, and how, is read from each device (b) and the group's journalled phase; a member
        whose stored image is gone (or no longer verifies) is taken back all the same, from
        the hash the group journalled for it (c) (``_Back``: reverting needs no image). The
        cancel is "taken back" only once every member's take-back ended ROLLED_BACK (its
        previous image runs, confirmed, nothing of the canceled one pending); any other end
        keeps the group in "revert" and the intents pending (visible, resumed next time)."""
        h, j = self.host, self.host.journal
        intents = h.fleet.group_cancels(members)
        first = intents[0]
        why = f"group {name} canceled: {first.reason} (member {first.device_id}, by the {first.actor})"
        canceled = {i.device_id for i in intents}
        rec = j.group(name)
        verdict: str | None = None
        result: list[Outcome] = []
        if any(i.state == "pending" for i in intents):
            plans: dict[str, Plan | _Back] = {}
            if rec is not None and rec.phase not in _CLOSED_PHASES:
                for dev in members:
                    if dev.id in rec.members:
                        got = self._resume_plan(dev, rec.members[dev.id])
                        if got is not None:
                            plans[dev.id] = got[0]
                        elif j.get(dev.id).target_hash == rec.members[dev.id]:
                            plans[dev.id] = self._back(dev, rec.members[dev.id])
            if rec is not None and rec.phase == "done":
                verdict = f"too late: group {name} is installed, every member confirmed"
            elif not plans:
                verdict = f"taken back: nothing of group {name} is left to take back"
                if rec is not None and rec.phase not in _CLOSED_PHASES:
                    j.put_group(GroupRecord(name, "failed", rec.members, why))
            else:
                assert rec is not None
                failure = (first.device_id, Outcome(first.device_id, Status.FAILED,
                                                    UpdateResult.UPDATE_FAILED, why))
                revert = rec.phase != "upload"  # upload: nobody is marked, nothing to revert
                if not revert:
                    j.put_group(GroupRecord(name, "failed", rec.members, why))
                log.warning("group=%s %s: taking every member back", name, why)
                result = await self._close(name, plans, {}, failure, revert=revert, why=why,
                                           block=False, canceled=canceled, all_back=True)
                after = j.group(name)
                if after is None or after.phase != "failed":  # unfinished: resumed next time
                    for i in intents:
                        if i.state == "pending":
                            j.intent_progress(i.id, "pending", "the group's take-back is "
                                              "unfinished; resumed at the next attempt")
                    return result
                verdict = f"taken back: every member of group {name} is back on its previous image"
        by_id = {d.id: d for d in members}
        for i in intents:
            await h.fleet.finish_group_cancel(by_id[i.device_id], i, verdict)
        if not result:
            result = [Outcome(d.id, Status.HELD, UpdateResult.INITIAL,
                              f"canceled: {verdict or why}", group=name) for d in members]
        return result

    @staticmethod
    def _stopping(plans: Mapping[str, Plan | _Back], outs: dict[str, Outcome]) -> list[Outcome]:
        """Shutting down mid-group: no decision now, no report (the journal resumes it)."""
        return [Outcome(i, Status.FAILED, UpdateResult.INITIAL, "gateway stopping") for i in plans] + [
            o for i, o in outs.items() if i not in plans]

    async def _not_started(self, name: str, plans: dict[str, Plan], done: dict[str, Outcome],
                           bad: dict[str, Outcome]) -> list[Outcome]:
        """A member cannot take part (unreachable, refused, blocked): nobody starts.

        A refused or rolled-back member blocks the group's images on every member and each
        member's offer gets its final report; otherwise the others are simply retried later
        (their offers stay open: nothing happened to them)."""
        h = self.host
        blocked = any(o.status in (Status.ROLLED_BACK, Status.REFUSED) for o in bad.values())
        first_id, first = next(iter(bad.items()))
        why = f"group {name} not started: member {first_id} {first.status.value}: {first.detail}"
        result = [self._tag(name, o, why) for o in done.values()]
        for p in plans.values():
            o = self._tag(name, Outcome(p.dev.id, Status.ROLLED_BACK if blocked else Status.FAILED,
                                        UpdateResult.UPDATE_FAILED, why), why)
            if blocked:
                h.block(p.dev.id, p.image.hash.hex(), p.offer.artifact_id)
                o = await h.final(p.offer, o)
            result.append(o)
        return result

    async def _close(self, name: str, plans: Mapping[str, Plan | _Back], outs: dict[str, Outcome],
                     failure: tuple[str, Outcome], revert: bool, *, why: str | None = None,
                     block: bool = True, canceled: set[str] | None = None,
                     all_back: bool = False) -> list[Outcome]:
        """``canceled``: members whose update was canceled (taken back with the group, their
        rows closed ``canceled``; no final report - the cancel's acknowledgement answers it);
        ``block`` False: the group's images are not blocked (a cancel is not a failure of the
        image); ``all_back`` (a cancel): the group closes only once EVERY member is back
        (ROLLED_BACK), else it stays in "revert" (``_revert_open``)."""
        h, j = self.host, self.host.journal
        fid, fout = failure
        why = why or f"group {name} failed: member {fid} {fout.status.value}: {fout.detail}"
        rec = j.group(name)
        members_map = rec.members if rec else {i: _target(p)[0].hex() for i, p in plans.items()}
        if revert:
            if rec is None or rec.phase != "revert":
                j.put_group(GroupRecord(name, "revert", members_map, why))
            else:  # resumed: the reason journaled with the decision stands
                why = rec.detail or why
            log.warning("group=%s decision=revert %s", name, why)
            todo = list(plans.values())
            results = await asyncio.gather(*(self._member(p, "revert", why) for p in todo))
            if h.stop.is_set():
                return self._stopping(plans, outs)  # the take-back resumes at the next start
            for p, o in zip(todo, results, strict=True):
                outs[p.dev.id] = o
            not_back = [p.dev.id for p, o in zip(todo, results, strict=True)
                        if o.status != Status.ROLLED_BACK]
            unfinished = [i for i in not_back if all_back or _resumable(outs[i])]
            if unfinished:
                # the link failed (or a reset waits for a window) half-way: the group stays in
                # "revert" and the next attempt resumes taking every member back; closing now
                # would leave a member test-running its old image, unconfirmed, and the next
                # reset would bring the new one back (a mixed group)
                return self._revert_open(name, plans, outs, unfinished, why)
            if not_back:
                log.error("group=%s members not back on their previous image: %s", name,
                          ", ".join(f"{i} ({outs[i].detail})" for i in not_back))
            # taken back: the group's images are not pushed again until the source offers others
            for p in plans.values() if block else ():
                h.block(p.dev.id, _target(p)[0].hex(), p.offer.artifact_id)
            j.put_group(GroupRecord(name, "failed", members_map, why))
        else:
            # upload phase: nobody is marked; close the held members' journal rows so that the
            # next attempt plans the whole group afresh (never a mix of old and new targets)
            for i in plans:
                if i not in outs or outs[i].status == Status.HELD:
                    e = j.get(i)
                    if e.outcome is None:
                        j.put(e.with_(step="failed", outcome=Status.FAILED.value, last_error=why), why)
                        h.steps[i] = "failed"
        h.metrics.inc("group_failures_total", group=name)
        result = []
        for i, p in plans.items():
            if i in (canceled or ()):
                e = j.get(i)  # no final report: the cancel's acknowledgement answers the server
                j.put(e.with_(step="canceled", outcome="canceled", unreported=None,
                              last_error=why), why)
                result.append(Outcome(i, Status.HELD, UpdateResult.INITIAL, f"canceled: {why}",
                                      old_version=(outs.get(i) or fout).old_version, group=name))
                continue
            o = outs.get(i) or Outcome(i, Status.FAILED, UpdateResult.UPDATE_FAILED, why)
            if o.status == Status.HELD:
                o = Outcome(i, Status.FAILED, UpdateResult.UPDATE_FAILED, why,
                            old_version=o.old_version, new_version=o.new_version)
            result.append(await h.final(p.offer, self._tag(name, o, why)))
        result += [self._tag(name, o, why) for i, o in outs.items() if i not in plans]
        return result

    def _revert_open(self, name: str, plans: Mapping[str, Plan | _Back], outs: dict[str, Outcome],
                     unfinished: list[str], why: str) -> list[Outcome]:
        """The take-back did not finish: no decision is reported yet (the journaled phase stays
        "revert", each member's outcome stays with its journal row until the group closes).

        Every member is HELD when the take-back waits for a maintenance window (the scheduler
        wakes the group when it opens), else FAILED (retried with the usual backoff)."""
        held = any(outs[i].status == Status.HELD for i in unfinished)
        now = "; ".join(f"{i}: {outs[i].detail}" for i in unfinished)
        log.warning("group=%s take-back unfinished (%s); the group stays in revert and the next "
                    "attempt resumes it", name, now)
        detail = (f"{why} | taking the group back is unfinished ({now}); it resumes at the next "
                  "attempt")
        status = Status.HELD if held else Status.FAILED
        result = UpdateResult.INITIAL if held else UpdateResult.CONNECTION_LOST
        return [Outcome(i, status, result, detail, group=name) for i in plans] + [
            o for i, o in outs.items() if i not in plans]

    @staticmethod
    def _tag(name: str, o: Outcome, why: str) -> Outcome:
        o.group = name
        if why not in o.detail:
            o.detail = f"{why} | this member: {o.detail}" if o.detail else why
        return o

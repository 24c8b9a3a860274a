"""Group updates: MCUs that must change version together (``DeviceConfig.group``).

Owns the all-or-nothing switch of a group. The phases, each journaled (``groups`` table) before
it starts, so that after a restart every member follows the same decision::

    upload  every member: image complete in its secondary slot (not marked)
    mark    every member: marked for test (pending)           - only once ALL are uploaded
    boot    every member: reset, booted, health-checked, still unconfirmed
    confirm every member confirmed                              - only once ALL booted fine
    revert  (any member failed in mark/boot) every member back to its previous image
    done / failed

Why this order: img_mgmt cannot take back a pending image (a pending slot cannot be erased or
overwritten; only a reset clears it, by test-booting it). So nobody is marked until every
member holds its image, and nobody is reset until every member is marked. A failure in the
upload phase therefore leaves every member untouched (the image just sits, unmarked, in
slot 1). In ``revert``, members test-running the new image are reset (MCUboot reverts an
unconfirmed image at the next boot); members never reset are left on their old image - a
member whose mark succeeded while another's failed keeps its image pending (it test-boots at
its next reset and MCUboot reverts it at the one after; the journal keeps it out of any
confirmation). Group members must use ``confirm: gateway``.

A group failure caused by a rollback or refusal blocks the group's images on every member
(not re-attempted until the source offers a different artifact); a failure caused by the
link (timeouts) is retried with backoff like a single device. Every member's Outcome of a
failed group carries ``group`` and says which member failed and why.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import DeviceConfig
from gateway.engine import Outcome, Stage, Status
from gateway.images import ImageRefused
from gateway.journal import GroupRecord
from gateway.smp.session import SMPError, SMPTimeout, UploadError
from gateway.smp.transport import TransportError
from gateway.sources.base import UpdateResult

if TYPE_CHECKING:
    from gateway.daemon import Gateway, Plan

log = logging.getLogger("gateway.groups")

_PHASE_STAGE = {"upload": Stage.UPLOADED, "mark": Stage.MARKED, "boot": Stage.BOOTED}


class GroupRunner:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    # -- one member, one phase, one session --------------------------------------------------
    async def _member(self, plan: Plan, phase: str, reason: str = "") -> Outcome:
        from gateway.daemon import Stopping

        dev = plan.dev
        try:
            async with self.gw.session(dev) as s:
                eng = self.gw.engine(dev, s)
                if phase == "confirm":
                    return await eng.confirm(plan.image)
                if phase == "revert":
                    return await eng.revert(plan.image, reason)
                return await eng.run(plan.image, None, artifact_id=plan.offer.artifact_id,
                                     source=plan.offer.source, until=_PHASE_STAGE[phase])
        except Stopping:
            return Outcome(dev.id, Status.FAILED, UpdateResult.INITIAL, "gateway stopping")
        except (SMPTimeout, TransportError) as exc:
            return Outcome(dev.id, Status.FAILED, UpdateResult.CONNECTION_LOST,
                           f"{phase}: {type(exc).__name__}: {exc}")
        except (SMPError, UploadError) as exc:
            return Outcome(dev.id, Status.FAILED, UpdateResult.UPDATE_FAILED, f"{phase}: {exc}")

    async def _plan(self, dev: DeviceConfig) -> Plan | Outcome:
        from gateway.daemon import Stopping

        try:
            async with self.gw.session(dev) as s:
                return await self.gw.plan(dev, s)
        except Stopping:
            return Outcome(dev.id, Status.FAILED, UpdateResult.INITIAL, "gateway stopping")
        except (SMPTimeout, TransportError) as exc:
            return self.gw._fail(dev, UpdateResult.CONNECTION_LOST, f"{type(exc).__name__}: {exc}")
        except (SMPError, UploadError) as exc:
            return self.gw._fail(dev, UpdateResult.UPDATE_FAILED, str(exc))

    def _resume_plan(self, dev: DeviceConfig, target_hash: str) -> Plan | Outcome | None:
        """A member of a group interrupted in mark/boot/confirm/revert, from the journal.

        None: the member's journal row is not about this group update (nothing to do for it).
        An Outcome: the member already finished this update (its journaled outcome).
        """
        from gateway.daemon import Plan

        e = self.gw.journal.get(dev.id)
        if e.target_hash != target_hash or not e.image_path or not Path(e.image_path).is_file():
            return None
        try:
            image = self.gw.store.add_file(Path(e.image_path), hardware=None,
                                           allow_unsigned=dev.allow_unsigned)
        except ImageRefused as exc:
            return Outcome(dev.id, Status.FAILED, UpdateResult.UPDATE_FAILED, f"journal image: {exc}")
        plan = Plan(dev, self.gw.offer_from_journal(dev), image, resumed=True)
        if e.outcome is not None:
            try:
                st = Status(e.outcome)
            except ValueError:
                st = Status.FAILED
            res = UpdateResult.SUCCESS if st == Status.UPDATED else UpdateResult.UPDATE_FAILED
            return Outcome(dev.id, st, res, e.last_error or e.step, old_version=e.old_version,
                           new_version=e.target_version)
        return plan

    # -- the group ---------------------------------------------------------------------------
    async def run(self, name: str, members: list[DeviceConfig]) -> list[Outcome]:
        gw, j = self.gw, self.gw.journal
        rec = j.group(name)
        plans: dict[str, Plan] = {}
        done: dict[str, Outcome] = {}  # members that need nothing more in this update
        phase = "upload"
        if rec is not None and rec.phase in ("mark", "boot", "confirm", "revert"):
            # interrupted after the point of no return for some member: follow the journal
            phase = rec.phase
            log.info("group=%s resuming phase=%s members=%s", name, phase, ",".join(rec.members))
            for dev in members:
                if dev.id not in rec.members:
                    continue
                r = self._resume_plan(dev, rec.members[dev.id])
                if r is None:
                    continue
                if isinstance(r, Outcome):
                    done[dev.id] = r
                else:
                    plans[dev.id] = r
        else:
            planned = await asyncio.gather(*(self._plan(d) for d in members))
            for dev, r in zip(members, planned, strict=True):
                if isinstance(r, Outcome):
                    done[dev.id] = r
                else:
                    plans[dev.id] = r
            bad = {i: o for i, o in done.items() if o.status != Status.UP_TO_DATE}
            if bad:
                # a member cannot take part (unreachable, refused, blocked): nobody starts
                blocked = any(o.status in (Status.ROLLED_BACK, Status.REFUSED) for o in bad.values())
                first_id, first = next(iter(bad.items()))
                why = f"group {name} not started: member {first_id} {first.status.value}: {first.detail}"
                result = [self._tag(name, o, why) for o in done.values()]
                for p in plans.values():
                    if blocked:
                        gw.block(p.dev.id, p.image.hash.hex(), p.offer.artifact_id)
                    o = Outcome(p.dev.id, Status.ROLLED_BACK if blocked else Status.FAILED,
                                UpdateResult.UPDATE_FAILED, why)
                    result.append(self._tag(name, o, why))
                return result
            if not plans:
                return list(done.values())
            j.put_group(GroupRecord(name, "upload", {i: p.image.hash.hex() for i, p in plans.items()},
                                    "members: " + ",".join(plans)))
            gw.metrics.inc("updates_started_total", len(plans))

        members_map = {i: p.image.hash.hex() for i, p in plans.items()}
        if rec is not None and phase != "upload":
            members_map = {**rec.members}
        failure: tuple[str, Outcome] | None = None
        for i, o in done.items():
            if o.status not in (Status.UP_TO_DATE, Status.UPDATED) and phase in ("mark", "boot"):
                failure = (i, o)
        outs: dict[str, Outcome] = dict(done)

        for ph in ("upload", "mark", "boot"):
            if failure is not None or phase in ("confirm", "revert"):
                break
            if list(_PHASE_STAGE).index(ph) < list(_PHASE_STAGE).index(phase):
                continue
            j.put_group(GroupRecord(name, ph, members_map))
            results = await asyncio.gather(*(self._member(p, ph) for p in plans.values()))
            if self.gw.stop.is_set():
                # shutting down: no decision now; the journaled phase resumes at the next start
                return [outs.get(i) or Outcome(i, Status.FAILED, UpdateResult.INITIAL,
                                               "gateway stopping") for i in plans]
            for p, o in zip(plans.values(), results, strict=True):
                if o.status != Status.HELD:
                    outs[p.dev.id] = o
                    if failure is None or o.status in (Status.ROLLED_BACK, Status.REFUSED):
                        failure = (p.dev.id, o)
            if failure is not None and ph == "upload":
                # nobody is marked: nothing to revert; the images just sit in slot 1
                j.put_group(GroupRecord(name, "failed", members_map, f"upload: {failure[0]}"))
                return await self._close(name, plans, outs, failure, revert=False)
            phase = ph

        if failure is None and phase != "revert":
            j.put_group(GroupRecord(name, "confirm", members_map, "every member booted its image"))
            log.info("group=%s decision=confirm members=%s", name, ",".join(plans))
            results = await asyncio.gather(*(self._member(p, "confirm") for p in plans.values()))
            for p, o in zip(plans.values(), results, strict=True):
                outs[p.dev.id] = o
            ok = all(o.status == Status.UPDATED for o in results)
            j.put_group(GroupRecord(name, "done" if ok else "failed", members_map))
            return [await gw.final(plans[i].offer if i in plans else None, o)
                    for i, o in outs.items()]
        if failure is None:  # resumed in "revert": the recorded reason stands
            failure = ("?", Outcome("?", Status.FAILED, UpdateResult.UPDATE_FAILED,
                                    rec.detail if rec else "group reverted"))
        return await self._close(name, plans, outs, failure, revert=True)

    async def _close(self, name: str, plans: dict[str, Plan], outs: dict[str, Outcome],
                     failure: tuple[str, Outcome], revert: bool) -> list[Outcome]:
        gw, j = self.gw, self.gw.journal
        fid, fout = failure
        why = f"group {name} failed: member {fid} {fout.status.value}: {fout.detail}"
        # a rollback or refusal blocks the images; a link failure is retried later
        blocking = fout.status in (Status.ROLLED_BACK, Status.REFUSED)
        rec = j.group(name)
        members_map = rec.members if rec else {i: p.image.hash.hex() for i, p in plans.items()}
        if revert:
            if rec is None or rec.phase != "revert":
                j.put_group(GroupRecord(name, "revert", members_map, why))
            else:  # resumed: the reason journaled with the decision stands
                why = rec.detail or why
                blocking = any(f" {s.value}: " in why for s in (Status.ROLLED_BACK, Status.REFUSED))
            log.warning("group=%s decision=revert %s", name, why)
            todo = [p for i, p in plans.items()
                    if i not in outs or outs[i].status in (Status.FAILED, Status.HELD)]
            results = await asyncio.gather(*(self._member(p, "revert", why) for p in todo))
            for p, o in zip(todo, results, strict=True):
                outs[p.dev.id] = o
        else:
            # upload phase: nobody is marked; close the held members' journal rows so that the
            # next attempt plans the whole group afresh (never a mix of old and new targets)
            for i in plans:
                if i not in outs or outs[i].status == Status.HELD:
                    e = j.get(i)
                    if e.outcome is None:
                        j.put(e.with_(step="failed", outcome=Status.FAILED.value, last_error=why), why)
                        gw.steps[i] = "failed"
        gw.metrics.inc("group_failures_total", group=name)
        if blocking:
            for p in plans.values():
                gw.block(p.dev.id, p.image.hash.hex(), p.offer.artifact_id)
        if revert:
            j.put_group(GroupRecord(name, "failed", members_map, why))
        result = []
        for i, p in plans.items():
            o = outs.get(i) or Outcome(i, Status.FAILED, UpdateResult.UPDATE_FAILED, why)
            result.append(await gw.final(p.offer, self._tag(name, o, why)))
        result += [self._tag(name, o, why) for i, o in outs.items() if i not in plans]
        return result

    @staticmethod
    def _tag(name: str, o: Outcome, why: str) -> Outcome:
        o.group = name
        if why not in o.detail:
            o.detail = f"{why} | this member: {o.detail}" if o.detail else why
        return o

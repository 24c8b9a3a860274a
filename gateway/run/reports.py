"""Final reports: an outcome about an offer journalled, delivered, retried.

Owns ``ReportsStep``: ``_count`` (every outcome counted: history and metrics through
``FleetOps.note_outcome``), ``final`` (an outcome about an offer is journalled as a pending
final report, ``Journal.queue_report``, then delivered oldest first), ``staged`` (an update
held at the admission's stage: DOWNLOADED reported, no final report), ``flush_unreported``
(pending reports whose retry time has come, and ``_adopt_unreported``: an outcome the engine
journalled (``Entry.unreported``) that a killed gateway never turned into a report),
``_deliver`` (one try: ``report_offered`` before sending, then ``report_delivered``,
``report_refused`` (for good) or ``report_failed`` with a ``backoff_delay`` retry), progress
reports (``_report``, best effort, not journalled) and ``offer_from_journal`` (an update's
offer rebuilt from its journalled report handle, for a resumed update and its reports). A report
goes only to the source it was journalled for (c). Writes the journal's final-report records
and ``unreported`` (cleared when unreadable); no ``Step``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3

from gateway.config import DeviceConfig
from gateway.engine import Outcome, Status
from gateway.journal import FinalReport
from gateway.mcuboot import Version
from gateway.run.state import GatewayState
from gateway.sources.base import (
    Offer,
    Report,
    ReportNotDelivered,
    ReportRefused,
    UpdateResult,
    UpdateState,
)

log = logging.getLogger("gateway")


def backoff_delay(failures: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """``min(max_s, base_s * 2**(failures-1))`` with +-50 % jitter (de-synchronises a fleet)."""
    return min(max_s, base_s * 2 ** max(0, failures - 1)) * rng.uniform(0.5, 1.5)


class ReportsStep(GatewayState):
    """The final reports (see the module docstring)."""

    def _count(self, out: Outcome) -> Outcome:
        self.fleet.note_outcome(out)  # history (journal attempts), per-device metrics
        if out.status not in (Status.UP_TO_DATE, Status.HELD):
            self.metrics.inc("updates_finished_total", status=out.status.value,
                             reason=out.result.name.lower())
        if out.bytes_uploaded:
            self.metrics.inc("upload_bytes_total", out.bytes_uploaded)
            self.metrics.inc("upload_seconds_total", out.upload_seconds)
            if out.upload_seconds > 0:
                self.metrics.set("upload_throughput_bytes_per_second",
                                 out.bytes_uploaded / out.upload_seconds, device=out.device_id)
        return out

    def offer_from_journal(self, dev: DeviceConfig) -> Offer:
        """The offer of the device's journaled update, with its journaled report handle."""
        entry = self.journal.get(dev.id)
        source = entry.source or self.source.name
        artifact = entry.artifact_id or entry.target_hash or "?"
        handle = self.journal.report_handle(dev.id) or {}
        report_to: dict[str, object] = {}
        install = "forced"
        if handle.get("artifact_id") == artifact and handle.get("source") == source:
            report_to = dict(handle.get("report_to") or {})
            install = str(handle.get("install") or "forced")
        else:
            log.warning("device=%s no report handle journaled for artifact=%s: %s may not accept "
                        "the reports of this update", dev.id, artifact, source)
        return Offer(device_id=dev.id, source=source, artifact_id=artifact,
                     version=Version.parse(entry.target_version) if entry.target_version else None,
                     hardware=None, report_to=report_to, install=install)

    async def _report(self, offer: Offer, report: Report) -> bool:
        """A progress report: best effort (a report that fails must not fail the update)."""
        try:
            await self.source.report(offer, report)
            return True
        except Exception as exc:
            self.metrics.inc("source_errors_total", source=self.source.name, op="report")
            log.warning("device=%s progress report to %s not delivered: %s", offer.device_id,
                        self.source.name, exc)
            return False

    async def staged(self, dev: DeviceConfig, offer: Offer, out: Outcome, reason: str) -> Outcome:
        """The engine stopped where the admission allowed (download-only, outside a window):
        the image sits in the secondary slot; DOWNLOADED is reported, no final report."""
        out.detail = reason
        await self._report(offer, Report(UpdateState.DOWNLOADED, detail=reason))
        return await self.final(offer, out)

    async def final(self, offer: Offer | None, out: Outcome) -> Outcome:
        """Count the outcome; about an offer, journal its final report, then deliver it.

        The report stays pending in the journal until the source took it (``flush_unreported``
        retries it with backoff, also after a restart)."""
        self._count(out)
        if offer is None or out.status == Status.HELD:
            return out
        if out.result == UpdateResult.INITIAL and out.status != Status.UP_TO_DATE:
            # a final report always carries a result: INITIAL (0) reads as "nothing happened"
            log.error("device=%s %s outcome without a result code: reported as UPDATE_FAILED",
                      out.device_id, out.status.value)
            out.result = UpdateResult.UPDATE_FAILED
        detail = f"{out.status.value}: {out.detail}"
        try:
            rep = self.journal.queue_report(out.device_id, offer.report_handle(), int(out.result),
                                            detail)
        except sqlite3.Error as exc:  # a full disk: send it once anyway, it cannot be kept
            log.error("device=%s final report not journaled (%s): sending it once, unjournaled",
                      out.device_id, exc)
            await self._report(offer, Report(UpdateState.IDLE, out.result,
                                             1.0 if out.result == UpdateResult.SUCCESS else None,
                                             detail))
            return out
        try:
            # oldest first (an earlier report of the device still pending - e.g. taken by the
            # server without an answer - goes before this one, so the server's last word is
            # this outcome); tried now, whatever its backoff: a new outcome is to be sent now
            for r in self.journal.unreported(out.device_id):
                if r.id > rep.id or await self._deliver(r) == "failed":
                    break
        except sqlite3.Error as exc:  # the report stays pending; flush_unreported retries it
            log.error("device=%s final report=%d: journal not writable: %s", out.device_id, rep.id,
                      exc)
        return out

    async def flush_unreported(self, dev: DeviceConfig) -> None:
        """Deliver the device's pending final reports (oldest first) whose retry time has come.

        First queues an outcome the engine journaled that was never turned into a report (the
        gateway was killed in between). Needs the fleet server only, not the device. A report
        that does not get through waits ``backoff_delay`` (``retry``) before the next try in
        this process; a restarted gateway tries at once. While the source is backed off
        (``SourceHealth``) they wait for it to answer a check again.
        """
        try:
            self._adopt_unreported(dev)
            if self.source_health.down:
                return  # the server is backed off: sent once a check gets an answer again
            now = self.clock()
            for rep in self.journal.unreported(dev.id):
                if self._report_due.get(rep.id, 0.0) > now:
                    break  # in order: a later report never overtakes an earlier one
                if await self._deliver(rep) == "failed":
                    break
        except sqlite3.Error as exc:  # the gateway's own disk: the reports stay where they are
            log.error("device=%s pending final reports: journal error: %s", dev.id, exc)

    def _adopt_unreported(self, dev: DeviceConfig) -> None:
        entry = self.journal.get(dev.id)
        if entry.unreported is None or entry.outcome is None:
            return
        if dev.group is not None:
            rec = self.journal.group(dev.group)
            if rec is not None and dev.id in rec.members and rec.phase not in ("done", "failed",
                                                                              "staged"):
                return  # the group's decision is still open: its run reports every member
        try:
            data = json.loads(entry.unreported)
            result, detail = int(data["result"]), str(data["detail"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("device=%s journaled outcome unreadable (%s): %r dropped", dev.id, exc,
                      entry.unreported)
            self.journal.put(entry.with_(unreported=None), f"unreadable outcome dropped: {exc}")
            return
        handle = self.journal.report_handle(dev.id)
        if handle is None or handle.get("artifact_id") != entry.artifact_id:
            handle = self.offer_from_journal(dev).report_handle()
        log.info("device=%s queueing the final report of an earlier run: %s", dev.id, detail)
        self.journal.queue_report(dev.id, handle, result, detail)

    async def _deliver(self, rep: FinalReport) -> str:
        """One try at one journaled final report: ``delivered``, ``refused`` or ``failed``."""
        lock = self._report_locks.setdefault(rep.device_id, asyncio.Lock())
        async with lock:
            cur = self.journal.report(rep.id)
            if cur is None or cur.state != "pending":  # delivered meanwhile
                return cur.state if cur is not None else "refused"
            try:
                offer = Offer.from_handle(cur.handle)
                result = UpdateResult(cur.result)
                if offer.source != self.source.name:
                    raise ReportRefused(f"journaled for source {offer.source!r}; the gateway now "
                                        f"reports to {self.source.name!r}")
                self.journal.report_offered(cur.id)  # the server may hold it from here on
                await self.source.report(offer, Report(
                    UpdateState.IDLE, result, 1.0 if result == UpdateResult.SUCCESS else None,
                    cur.detail, report_id=f"{self.cfg.gateway_id}:{cur.id}"))
            except (ReportRefused, ValueError) as exc:
                self.journal.report_refused(cur.id, str(exc))
                self._report_due.pop(cur.id, None)
                self.metrics.inc("source_errors_total", source=self.source.name, op="final-report")
                log.warning("device=%s final report=%d refused for good: %s (kept in the journal, "
                            "not retried)", cur.device_id, cur.id, exc)
                return "refused"
            except Exception as exc:  # ReportNotDelivered, or a backend bug: keep it, retry later
                after = self.journal.report_failed(cur.id, f"{type(exc).__name__}: {exc}")
                n = after.attempts if after is not None else cur.attempts + 1
                delay = backoff_delay(n, self.cfg.retry.base_s, self.cfg.retry.max_s,
                                      self._report_rng)
                self._report_due[cur.id] = self.clock() + delay
                self.metrics.inc("source_errors_total", source=self.source.name, op="final-report")
                log.log(logging.WARNING if isinstance(exc, ReportNotDelivered) else logging.ERROR,
                        "device=%s final report=%d result=%s not delivered (try %d): %s; retrying "
                        "in %.0fs", cur.device_id, cur.id, cur.result, n, exc, delay,
                        exc_info=not isinstance(exc, ReportNotDelivered))
                return "failed"
            self.journal.report_delivered(cur.id)
            self._report_due.pop(cur.id, None)
            log.info("device=%s final report=%d delivered to %s result=%s", cur.device_id, cur.id,
                     self.source.name, result.name)
            return "delivered"

"""Crash-safe update journal: what the gateway is doing to each device, on disk.

Owns ``<state_dir>/journal.sqlite`` (SQLite in WAL mode, ``synchronous=FULL``): one row per
device with the update in progress — target hash/version, artifact, step, upload offset,
attempts, last error — and, crucially, ``tested_hash``: the image this gateway marked for test.
The engine writes a row *before* each irreversible step, so after SIGKILL or power loss the
next start knows where each device was. It never confirms an image whose hash is not the
row's ``tested_hash``.

Final reports (what the fleet server must learn of each update) have their own table: a report
is *queued* (``queue_report``) when an outcome is decided, in the same transaction that clears
the engine's hand-off (``Entry.unreported``), and leaves the ``pending`` state only when the
source took it (``report_delivered``) or said it never will (``report_refused``, kept with the
reason). ``unreported()`` lists what the server has not got yet.

*Intents* (``put_intent``: a cancel, by the fleet server or the operator) have their own table
too: each is journalled *before* it is acted on, stays open (``pending``: to take back;
``ack``: taken back, the server's acknowledgement to send) until it is finished, and a
restarted gateway finishes it first (``gateway.fleetops.finish_intents``). The table is new:
a journal of an older gateway opens as it is. Each report keeps the
serializable *report handle* of its offer (``Offer.report_handle()``), journaled per device
with ``set_report_handle`` when the gateway adopts an offer, so a restarted gateway can deliver
it.

A report is *offered* (``report_offered``, committed before the request leaves) from its first
delivery try on: from then on the server may hold it even if no answer came back (answer lost,
gateway killed mid-request), so its row is never rewritten - it is sent again as it is, under
its id, until the server answers. A later outcome of the same action replaces only a pending
report that was never offered (the server never saw it; it only needs the action's last word);
otherwise it is queued under a new id, behind the earlier one (reports of a device are delivered
oldest first, so the server's last word is the latest outcome). Every final outcome thus
reaches the server once per report id - or is still pending here, or was refused for good with
the server's reason.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from gateway.statedb import open_state_db

# the outcome of a download-only update: uploaded (the device acknowledged its last byte) and
# left in the secondary slot until the server says install
STAGED = "staged"
# the event of a device's state read each pass; the newest KEEP_READ_EVENTS per device are kept
READ_EVENT = "read"
KEEP_READ_EVENTS = 50


@dataclass(frozen=True)
class Entry:
    device_id: str
    step: str = "idle"
    target_hash: str | None = None
    target_version: str | None = None
    artifact_id: str | None = None
    source: str | None = None
    image_path: str | None = None
    old_hash: str | None = None
    old_version: str | None = None
    tested_hash: str | None = None  # set just before the reset that boots it
    upload_offset: int = 0
    upload_total: int = 0
    attempts: int = 0
    outcome: str | None = None  # updated / rolled-back / refused / failed / up-to-date
    last_error: str | None = None
    running_version: str | None = None
    running_hash: str | None = None
    # an image (hash) and artifact that rolled back or was refused: not re-attempted until the
    # source offers a different artifact
    blocked_hash: str | None = None
    blocked_artifact: str | None = None
    # the engine's outcome (JSON {"result", "detail"}), journaled with it, until the daemon turns
    # it into a queued final report (``Journal.queue_report`` clears it in the same transaction);
    # a gateway killed in between queues it at the next start (``adopt_unreported``)
    unreported: str | None = None
    updated_at: float = 0.0

    def with_(self, **changes: object) -> Entry:
        return replace(self, updated_at=time.time(), **changes)  # type: ignore[arg-type]


_COLUMNS = [f.name for f in fields(Entry)]


class Journal:
    """SQLite-backed journal; safe to use from one process (the daemon) plus readers (status)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_state_db(path)
        self._lock = threading.Lock()
        cols = ", ".join(
            f"{c} {'TEXT PRIMARY KEY' if c == 'device_id' else ''}" for c in _COLUMNS
        )
        self._db.execute(f"CREATE TABLE IF NOT EXISTS devices ({cols})")
        have = {r[1] for r in self._db.execute("PRAGMA table_info(devices)")}
        for c in _COLUMNS:  # journals written by an older gateway: add the new columns
            if c not in have:
                self._db.execute(f"ALTER TABLE devices ADD COLUMN {c}")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, phase TEXT, members TEXT, "
            "detail TEXT, updated_at REAL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events (t REAL, device_id TEXT, step TEXT, detail TEXT)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS events_device ON events (device_id)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS report_handles (device_id TEXT PRIMARY KEY, handle TEXT, "
            "updated_at REAL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS reports (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "device_id TEXT, handle TEXT, result INTEGER, detail TEXT, state TEXT, "
            "attempts INTEGER DEFAULT 0, last_error TEXT, created_at REAL, done_at REAL, "
            "offered INTEGER DEFAULT 0)"
        )
        if "offered" not in {r[1] for r in self._db.execute("PRAGMA table_info(reports)")}:
            # a journal of an older gateway: a report it tried to send counts as offered
            self._db.execute("ALTER TABLE reports ADD COLUMN offered INTEGER DEFAULT 0")
            self._db.execute("UPDATE reports SET offered=1 WHERE attempts>0")
        # intents (a cancel to finish): a new table, so a journal of an older gateway is read
        # as it is (it has none; its ``cancel-pending`` rows are adopted by ``gateway.fleetops``)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS intents (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "device_id TEXT, kind TEXT, target_hash TEXT, actor TEXT, reason TEXT, handle TEXT, "
            "state TEXT, detail TEXT, attempts INTEGER DEFAULT 0, created_at REAL, done_at REAL)"
        )

        # attempts (``smp-gateway history``): one row per finished attempt, a new table (a
        # journal of an older gateway has none: its history is its events)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS attempts (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "device_id TEXT, started_at REAL, finished_at REAL, status TEXT, result INTEGER, "
            "detail TEXT, old_version TEXT, new_version TEXT, target_hash TEXT, artifact_id TEXT, "
            "source TEXT, bytes INTEGER, upload_seconds REAL, resumed_from INTEGER, actor TEXT, "
            "grp TEXT)")

    def close(self) -> None:
        self._db.close()

    # -- attempts: what ``history`` shows ------------------------------------------------------
    def put_attempt(self, rec: dict[str, Any]) -> None:
        """One finished attempt (keys: the ``attempts`` columns but ``id``); ``started_at``
        defaults to the device's last state read before now (the attempt's start)."""
        now = time.time()
        with self._lock:
            if not rec.get("started_at"):
                row = self._db.execute(
                    "SELECT max(t) FROM events WHERE device_id=? AND (step='read-state' OR "
                    "detail='read')", (rec["device_id"],)).fetchone()
                rec = {**rec, "started_at": row[0] if row and row[0] else now}
            rec = {**rec, "finished_at": rec.get("finished_at") or now}
            cols = [c for c in ATTEMPT_COLS if c != "id"]
            self._db.execute(f"INSERT INTO attempts ({', '.join(cols)}) VALUES "
                             f"({', '.join('?' for _ in cols)})", [rec.get(c) for c in cols])

    def attempts(self, device_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Finished attempts, oldest first (the last ``limit``)."""
        q, args = f"SELECT {', '.join(ATTEMPT_COLS)} FROM attempts", list[Any]()
        if device_id is not None:
            q, args = q + " WHERE device_id=?", [device_id]
        with self._lock:
            rows = self._db.execute(q + " ORDER BY id DESC LIMIT ?", [*args, int(limit)]).fetchall()
        return [dict(zip(ATTEMPT_COLS, r, strict=True)) for r in reversed(rows)]

    def get(self, device_id: str) -> Entry:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM devices WHERE device_id=?", (device_id,)
            ).fetchone()
        if row is None:
            return Entry(device_id=device_id)
        return Entry(**dict(zip(_COLUMNS, row, strict=True)))

    def all(self) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM devices ORDER BY device_id"
            ).fetchall()
        return [Entry(**dict(zip(_COLUMNS, r, strict=True))) for r in rows]

    def put(self, entry: Entry, detail: str = "") -> None:
        d = asdict(entry)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                f"INSERT OR REPLACE INTO devices ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
                [d[c] for c in _COLUMNS],
            )
            self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?)",
                             (time.time(), entry.device_id, entry.step, detail))
            if detail == READ_EVENT:
                # one per device and pass (``Gateway``): only the newest are kept, so the table
                # does not grow with uptime (``put_attempt`` needs the last one)
                self._db.execute(
                    "DELETE FROM events WHERE device_id=? AND detail=? AND rowid < (SELECT rowid "
                    "FROM events WHERE device_id=? AND detail=? ORDER BY rowid DESC LIMIT 1 "
                    "OFFSET ?)", (entry.device_id, READ_EVENT, entry.device_id, READ_EVENT,
                                  KEEP_READ_EVENTS - 1))
            self._db.execute("COMMIT")

    def events(self, device_id: str | None = None, *, limit: int | None = None,
               detail_prefix: str | None = None, steps: tuple[str, ...] | None = None,
               ) -> list[tuple[float, str, str, str]]:
        """Events, oldest first; with ``limit`` only the newest ``limit`` (selected in SQL, so
        memory is bounded by it), optionally only those whose detail starts with
        ``detail_prefix`` or whose step is one of ``steps``."""
        where, args = [], list[Any]()
        if device_id is not None:
            where.append("device_id=?")
            args.append(device_id)
        if detail_prefix is not None:
            where.append("substr(detail, 1, ?)=?")
            args += [len(detail_prefix), detail_prefix]
        if steps is not None:
            where.append(f"step IN ({', '.join('?' for _ in steps)})")
            args += list(steps)
        q = "SELECT * FROM events" + (" WHERE " + " AND ".join(where) if where else "")
        with self._lock:
            if limit is None:
                return list(self._db.execute(q + " ORDER BY rowid", args))
            rows = list(self._db.execute(q + " ORDER BY rowid DESC LIMIT ?", [*args, int(limit)]))
        return rows[::-1]

    def event_since(self, device_id: str, since_step: str, step: str, detail_prefix: str) -> bool:
        """Whether the device has an event ``step`` whose detail starts with ``detail_prefix``
        after its last ``since_step`` event (e.g. a confirm sent since the mark)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM events WHERE device_id=? AND step=? AND substr(detail, 1, ?)=? AND "
                "rowid > coalesce((SELECT max(rowid) FROM events WHERE device_id=? AND step=?), 0) "
                "LIMIT 1", (device_id, step, len(detail_prefix), detail_prefix, device_id,
                            since_step)).fetchone()
        return row is not None

    # -- link tuning: what uploads learned about a device's link (gateway/smp/tuning.py) -----
    # a TuningStore: opaque JSON per device, in its own table (created on first use)
    def _link_table(self) -> None:
        if not getattr(self, "_link_ready", False):
            self._db.execute("CREATE TABLE IF NOT EXISTS link_tuning (device_id TEXT PRIMARY KEY, "
                             "data TEXT, updated_at REAL)")
            self._link_ready = True

    def link_tuning(self, device_id: str) -> dict[str, object] | None:
        with self._lock:
            self._link_table()
            row = self._db.execute("SELECT data FROM link_tuning WHERE device_id=?",
                                   (device_id,)).fetchone()
        try:
            data = json.loads(row[0]) if row else None
        except (TypeError, ValueError):
            return None  # unreadable: the upload probes again
        return data if isinstance(data, dict) else None

    def put_link_tuning(self, device_id: str, data: dict[str, object]) -> None:
        with self._lock:
            self._link_table()
            self._db.execute("INSERT OR REPLACE INTO link_tuning VALUES (?, ?, ?)",
                             (device_id, json.dumps(data, sort_keys=True), time.time()))

    # -- groups: the group's phase is the decision every member follows after a restart ----
    def group(self, name: str) -> GroupRecord | None:
        with self._lock:
            row = self._db.execute("SELECT phase, members, detail, updated_at FROM groups WHERE name=?",
                                   (name,)).fetchone()
        if row is None:
            return None
        return GroupRecord(name, row[0], json.loads(row[1] or "{}"), row[2] or "", row[3] or 0.0)

    def put_group(self, rec: GroupRecord) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR REPLACE INTO groups VALUES (?, ?, ?, ?, ?)",
                             (rec.name, rec.phase, json.dumps(rec.members, sort_keys=True),
                              rec.detail, time.time()))
            self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?)",
                             (time.time(), f"group:{rec.name}", rec.phase, rec.detail))
            self._db.execute("COMMIT")


    # -- the last image the device reported running confirmed: what a last resort may flash --
    def _confirmed_table(self) -> None:
        if not getattr(self, "_confirmed_ready", False):
            self._db.execute("CREATE TABLE IF NOT EXISTS confirmed_images (device_id TEXT PRIMARY "
                             "KEY, hash TEXT, version TEXT, updated_at REAL)")
            self._confirmed_ready = True

    def put_confirmed(self, device_id: str, image_hash: str, version: str | None) -> None:
        """Record that the device itself reported ``image_hash`` (image 0) running and
        confirmed (b). The only image ``recovery.last_resort`` may ever re-flash: never an
        image the journal only targeted, tested, canceled or saw running unconfirmed."""
        with self._lock:
            self._confirmed_table()
            row = self._db.execute("SELECT hash FROM confirmed_images WHERE device_id=?",
                                   (device_id,)).fetchone()
            if row is not None and row[0] == image_hash:
                return
            now = time.time()
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR REPLACE INTO confirmed_images VALUES (?, ?, ?, ?)",
                             (device_id, image_hash, version, now))
            self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?)",
                             (now, device_id, "confirmed-seen",
                              f"the device reports {version} ({image_hash[:16]}) confirmed"))
            self._db.execute("COMMIT")

    def confirmed(self, device_id: str) -> str | None:
        """The hash (hex) of the last image the device reported running confirmed, if any."""
        with self._lock:
            self._confirmed_table()
            row = self._db.execute("SELECT hash FROM confirmed_images WHERE device_id=?",
                                   (device_id,)).fetchone()
        return str(row[0]) if row and row[0] else None

    # -- intents: journalled before they are acted on, open until finished ------------------
    def put_intent(self, device_id: str, kind: str, target_hash: str | None, actor: str,
                   reason: str, handle: dict[str, Any] | None = None) -> Intent:
        """Journal an intent (``cancel``: take the update of ``target_hash`` back) as
        ``pending``, before anything is done for it. An open intent of the same kind for the
        same device and hash is returned as it is (a cancel seen twice is one cancel)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                f"SELECT {_INTENT_COLS} FROM intents WHERE device_id=? AND kind=? AND "
                "target_hash IS ? AND state IN ('pending', 'ack') ORDER BY id",
                (device_id, kind, target_hash)).fetchone()
            if row is None:
                cur = self._db.execute(
                    "INSERT INTO intents (device_id, kind, target_hash, actor, reason, handle, "
                    "state, detail, attempts, created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', "
                    "'', 0, ?)",
                    (device_id, kind, target_hash, actor, reason,
                     _dumps(handle) if handle is not None else None, now))
                self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?)",
                                 (now, device_id, f"intent-{kind}",
                                  f"intent={cur.lastrowid} by {actor}: {reason}"))
                row = self._db.execute(f"SELECT {_INTENT_COLS} FROM intents WHERE id=?",
                                       (cur.lastrowid,)).fetchone()
            self._db.execute("COMMIT")
        return Intent.from_row(row)

    def open_intents(self, device_id: str | None = None) -> list[Intent]:
        """Intents not finished yet (``pending``: to act on; ``ack``: done on the device, the
        server's acknowledgement still to send), oldest first."""
        q = f"SELECT {_INTENT_COLS} FROM intents WHERE state IN ('pending', 'ack')"
        args: tuple[str, ...] = ()
        if device_id is not None:
            q, args = q + " AND device_id=?", (device_id,)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY id", args).fetchall()
        return [Intent.from_row(r) for r in rows]

    def intent_progress(self, intent_id: int, state: str, detail: str) -> None:
        """Move an intent on: ``pending`` (tried, not finished: counted), ``ack`` (finished on
        the device; the acknowledgement to the server is what is left), ``done``."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT device_id, kind FROM intents WHERE id=?",
                                   (intent_id,)).fetchone()
            self._db.execute(
                "UPDATE intents SET state=?, detail=?, attempts=attempts+1, done_at=? WHERE id=? "
                "AND state IN ('pending', 'ack')",
                (state, detail, now if state == "done" else None, intent_id))
            if row is not None:
                self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?)",
                                 (now, row[0], f"intent-{row[1]}-{state}",
                                  f"intent={intent_id}: {detail}"))
            self._db.execute("COMMIT")

    # -- final reports: queued with the outcome, pending until the server has them -----------
    def set_report_handle(self, device_id: str, handle: dict[str, Any]) -> None:
        """The report handle of the offer the device's update now follows."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO report_handles VALUES (?, ?, ?)",
                             (device_id, _dumps(handle), time.time()))

    def report_handle(self, device_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT handle FROM report_handles WHERE device_id=?",
                                   (device_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def queue_report(self, device_id: str, handle: dict[str, Any], result: int,
                     detail: str) -> FinalReport:
        """Journal a final report as pending (and clear the engine's ``unreported`` hand-off).

        The latest pending report of the same device and handle is replaced (same action, later
        word) only if it was never offered to the server; else this one gets a new id."""
        h = _dumps(handle)
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT id, offered, attempts FROM reports WHERE device_id=? AND handle=? AND "
                "state='pending' ORDER BY id DESC", (device_id, h)).fetchone()
            if row is not None and not row[1] and not row[2]:
                rid = int(row[0])
                self._db.execute("UPDATE reports SET result=?, detail=?, created_at=? WHERE id=?",
                                 (int(result), detail, now, rid))
            else:
                cur = self._db.execute(
                    "INSERT INTO reports (device_id, handle, result, detail, state, attempts, "
                    "created_at) VALUES (?, ?, ?, ?, 'pending', 0, ?)",
                    (device_id, h, int(result), detail, now))
                rid = int(cur.lastrowid or 0)
            self._db.execute("UPDATE devices SET unreported=NULL WHERE device_id=?", (device_id,))
            self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?)",
                             (now, device_id, "report-queued", f"report={rid} result={int(result)}"))
            self._db.execute("COMMIT")
        rep = self.report(rid)
        assert rep is not None
        return rep

    def report(self, report_id: int) -> FinalReport | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_REPORT_COLS} FROM reports WHERE id=?",
                                   (report_id,)).fetchone()
        return FinalReport.from_row(row) if row else None

    def reports(self, device_id: str | None = None, state: str | None = None) -> list[FinalReport]:
        """Final reports, oldest first; ``state``: pending / delivered / refused."""
        q, args = f"SELECT {_REPORT_COLS} FROM reports WHERE 1=1", list[str]()
        if device_id is not None:
            q, args = q + " AND device_id=?", [*args, device_id]
        if state is not None:
            q, args = q + " AND state=?", [*args, state]
        with self._lock:
            rows = self._db.execute(q + " ORDER BY id", args).fetchall()
        return [FinalReport.from_row(r) for r in rows]

    def unreported(self, device_id: str | None = None) -> list[FinalReport]:
        """Final reports the fleet server has not got yet (pending), oldest first."""
        return self.reports(device_id, "pending")

    def has_report(self, device_id: str, handle: dict[str, Any]) -> bool:
        """Whether a final report for this device and handle was queued (in any state)."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM reports WHERE device_id=? AND handle=?",
                                   (device_id, _dumps(handle))).fetchone()
        return row is not None

    def report_offered(self, report_id: int) -> None:
        """The report is about to be sent: from now on the server may hold it (never rewritten)."""
        with self._lock:
            self._db.execute("UPDATE reports SET offered=1 WHERE id=? AND offered=0", (report_id,))

    def report_delivered(self, report_id: int) -> None:
        self._report_done(report_id, "delivered", None)

    def report_refused(self, report_id: int, reason: str) -> None:
        self._report_done(report_id, "refused", reason)

    def report_failed(self, report_id: int, reason: str) -> FinalReport | None:
        """One delivery attempt failed: count it, keep the report pending."""
        with self._lock:
            self._db.execute("UPDATE reports SET attempts=attempts+1, last_error=? WHERE id=? "
                             "AND state='pending'", (reason, report_id))
        return self.report(report_id)

    def _report_done(self, report_id: int, state: str, reason: str | None) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT device_id FROM reports WHERE id=?", (report_id,)).fetchone()
            self._db.execute("UPDATE reports SET state=?, done_at=?, attempts=attempts+1, "
                             "last_error=COALESCE(?, last_error) WHERE id=? AND state='pending'",
                             (state, now, reason, report_id))
            if row is not None:
                self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?)",
                                 (now, row[0], f"report-{state}",
                                  f"report={report_id}" + (f": {reason}" if reason else "")))
            self._db.execute("COMMIT")


ATTEMPT_COLS = ("id", "device_id", "started_at", "finished_at", "status", "result", "detail",
                "old_version", "new_version", "target_hash", "artifact_id", "source", "bytes",
                "upload_seconds", "resumed_from", "actor", "grp")


def _dumps(handle: dict[str, Any]) -> str:
    return json.dumps(handle, sort_keys=True, separators=(",", ":"))


_REPORT_COLS = ("id, device_id, handle, result, detail, state, attempts, last_error, created_at, "
                "done_at, offered")


@dataclass(frozen=True)
class FinalReport:
    """One final report: an outcome the fleet server must learn (LwM2M result + detail)."""

    id: int
    device_id: str
    handle: dict[str, Any]  # Offer.report_handle(): device, source, artifact, version, report_to
    result: int  # LwM2M /5 Update Result
    detail: str
    state: str  # pending / delivered / refused
    attempts: int = 0
    last_error: str | None = None
    created_at: float = 0.0
    done_at: float | None = None
    offered: bool = False  # sent at least once: the server may hold it, never rewritten

    @classmethod
    def from_row(cls, row: Any) -> FinalReport:
        try:
            handle = json.loads(row[2]) if row[2] else {}
        except ValueError:
            handle = {}
        return cls(int(row[0]), row[1], handle if isinstance(handle, dict) else {}, int(row[3]),
                   row[4] or "", row[5], int(row[6] or 0), row[7], float(row[8] or 0.0), row[9],
                   bool(row[10]))


_INTENT_COLS = ("id, device_id, kind, target_hash, actor, reason, handle, state, detail, attempts, "
                "created_at")


@dataclass(frozen=True)
class Intent:
    """One journalled intent: written before it is acted on, open until it is finished (a
    restarted gateway finishes it first). ``kind`` ``cancel``: take the update of
    ``target_hash`` back (never confirm it); ``actor`` ``server`` (acknowledged to the server
    once taken back, with ``handle``: the offer's report handle) or ``operator``."""

    id: int
    device_id: str
    kind: str
    target_hash: str | None
    actor: str
    reason: str
    handle: dict[str, Any] | None
    state: str  # pending / ack / done
    detail: str = ""
    attempts: int = 0
    created_at: float = 0.0

    @classmethod
    def from_row(cls, row: Any) -> Intent:
        try:
            handle = json.loads(row[6]) if row[6] else None
        except ValueError:
            handle = None
        return cls(int(row[0]), row[1], row[2], row[3], row[4] or "", row[5] or "",
                   handle if isinstance(handle, dict) else None, row[7], row[8] or "",
                   int(row[9] or 0), float(row[10] or 0.0))

    def describe(self) -> str:
        what = {"pending": "to take back", "ack": "taken back, acknowledgement to send"}.get(
            self.state, self.state)
        return f"{self.kind} by {self.actor} ({what}): {self.reason}"


@dataclass(frozen=True)
class GroupRecord:
    """One group update: ``members`` maps device id -> target hash (hex)."""

    name: str
    phase: str  # upload / mark / boot / confirm / revert / done / failed
    members: dict[str, str]
    detail: str = ""
    updated_at: float = 0.0

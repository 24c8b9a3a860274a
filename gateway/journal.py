"""Crash-safe update journal: what the gateway is doing to each device, on disk.

Owns ``<state_dir>/journal.sqlite`` (SQLite in WAL mode, ``synchronous=FULL``): one row per
device with the update in progress — target hash/version, artifact, step, upload offset,
attempts, last error — and, crucially, ``tested_hash``: the image this gateway marked for test.
The engine writes a row *before* each irreversible step, so after SIGKILL or power loss the
next start knows where each device was. It never confirms an image whose hash is not the
row's ``tested_hash``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path


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
    # the final report (JSON {"result", "detail"}) journaled with the outcome and cleared once
    # the source has it: a gateway killed in between sends it after the restart (none lost)
    unreported: str | None = None
    updated_at: float = 0.0

    def with_(self, **changes: object) -> Entry:
        return replace(self, updated_at=time.time(), **changes)  # type: ignore[arg-type]


_COLUMNS = [f.name for f in fields(Entry)]


class Journal:
    """SQLite-backed journal; safe to use from one process (the daemon) plus readers (status)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        new = not path.exists()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        if new:
            os.chmod(path, 0o600)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
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

    def close(self) -> None:
        self._db.close()

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
            self._db.execute("COMMIT")

    def events(self, device_id: str | None = None) -> list[tuple[float, str, str, str]]:
        with self._lock:
            if device_id is None:
                return list(self._db.execute("SELECT * FROM events ORDER BY rowid"))
            return list(self._db.execute("SELECT * FROM events WHERE device_id=? ORDER BY rowid",
                                         (device_id,)))

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


@dataclass(frozen=True)
class GroupRecord:
    """One group update: ``members`` maps device id -> target hash (hex)."""

    name: str
    phase: str  # upload / mark / boot / confirm / revert / done / failed
    members: dict[str, str]
    detail: str = ""
    updated_at: float = 0.0

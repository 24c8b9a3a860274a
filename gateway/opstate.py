"""Fleet-operations state on disk: ``<state_dir>/fleet.sqlite``.

Owns what the operations layer must remember across restarts and what ``status``/``ctl`` read
from another process: devices found by discovery (their settings and identity fingerprint),
the last inventory of each device, staged-rollout waves, operator pauses, the operator's
audit log, and the daemon's scheduling state for ``status``: each device's failures in a row
and whether it is parked (until when), and each fleet source's backoff. The update journal
(``gateway.journal``) stays the single record of what was done *to a device*; this file holds
the decisions *about* devices. SQLite in WAL mode, ``synchronous=FULL``, one writer (the
daemon) plus readers.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.statedb import open_state_db


@dataclass(frozen=True)
class KnownDevice:
    """A device discovery found: its id, settings (a ``devices:`` entry) and identity."""

    device_id: str
    fingerprint: str  # what the device reported about itself, hashed (see discovery.identity)
    config: dict[str, Any]
    template: str
    address: str
    first_seen: float
    last_seen: float
    present: bool


class OpState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_state_db(path)
        self._lock = threading.Lock()
        for ddl in (
            "CREATE TABLE IF NOT EXISTS discovered (device_id TEXT PRIMARY KEY, fingerprint TEXT, "
            "config TEXT, template TEXT, address TEXT, first_seen REAL, last_seen REAL, present INTEGER)",
            "CREATE TABLE IF NOT EXISTS inventory (device_id TEXT PRIMARY KEY, data TEXT, updated_at REAL)",
            "CREATE TABLE IF NOT EXISTS rollouts (artifact TEXT PRIMARY KEY, data TEXT, updated_at REAL)",
            "CREATE TABLE IF NOT EXISTS paused (target TEXT PRIMARY KEY, reason TEXT, at REAL)",
            "CREATE TABLE IF NOT EXISTS audit (t REAL, actor TEXT, action TEXT, target TEXT, detail TEXT)",
            # gateway.discovery.guard: the identity each device id was first seen with, and the
            # devices no update may touch now (an identity at two addresses, another board)
            "CREATE TABLE IF NOT EXISTS identity (device_id TEXT PRIMARY KEY, fingerprint TEXT, "
            "keys TEXT, at REAL)",
            "CREATE TABLE IF NOT EXISTS quarantine (device_id TEXT PRIMARY KEY, reason TEXT, at REAL)",
            "CREATE TABLE IF NOT EXISTS retry_state (device_id TEXT PRIMARY KEY, data TEXT, updated_at REAL)",
            "CREATE TABLE IF NOT EXISTS source_state (name TEXT PRIMARY KEY, data TEXT, updated_at REAL)",
        ):
            self._db.execute(ddl)

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # -- discovered devices ----------------------------------------------------------------
    def put_known(self, d: KnownDevice) -> None:
        self._write("INSERT OR REPLACE INTO discovered VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (d.device_id, d.fingerprint, json.dumps(d.config, sort_keys=True), d.template,
                     d.address, d.first_seen, d.last_seen, int(d.present)))

    def known(self) -> dict[str, KnownDevice]:
        rows = self._rows("SELECT device_id, fingerprint, config, template, address, first_seen, "
                          "last_seen, present FROM discovered ORDER BY device_id")
        return {r[0]: KnownDevice(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6], bool(r[7]))
                for r in rows}

    def forget(self, device_id: str) -> None:
        self._write("DELETE FROM discovered WHERE device_id=?", (device_id,))

    # -- inventory -------------------------------------------------------------------------
    def put_inventory(self, device_id: str, data: dict[str, Any]) -> None:
        self._write("INSERT OR REPLACE INTO inventory VALUES (?, ?, ?)",
                    (device_id, json.dumps(data, sort_keys=True), time.time()))

    def inventory(self) -> dict[str, dict[str, Any]]:
        return {r[0]: {**json.loads(r[1]), "inventory_at": r[2]}
                for r in self._rows("SELECT device_id, data, updated_at FROM inventory")}

    # -- rollouts --------------------------------------------------------------------------
    def put_rollout(self, artifact: str, data: dict[str, Any]) -> None:
        self._write("INSERT OR REPLACE INTO rollouts VALUES (?, ?, ?)",
                    (artifact, json.dumps(data, sort_keys=True), time.time()))

    def rollouts(self) -> dict[str, dict[str, Any]]:
        return {r[0]: json.loads(r[1]) for r in self._rows("SELECT artifact, data FROM rollouts")}

    # -- operator pauses -------------------------------------------------------------------
    def pause(self, target: str, reason: str) -> None:
        self._write("INSERT OR REPLACE INTO paused VALUES (?, ?, ?)", (target, reason, time.time()))

    def resume(self, target: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM paused WHERE target=?", (target,))
            return cur.rowcount > 0

    def paused(self) -> dict[str, str]:
        """target (a device id, or ``*`` for every device) -> reason."""
        return {r[0]: r[1] for r in self._rows("SELECT target, reason FROM paused")}

    def is_paused(self, device_id: str) -> str | None:
        p = self.paused()
        return p.get(device_id) or p.get("*")

    # -- identities and quarantine (gateway.discovery.guard) --------------------------------
    def put_identity(self, device_id: str, fingerprint: str, keys: dict[str, str]) -> None:
        self._write("INSERT OR REPLACE INTO identity VALUES (?, ?, ?, ?)",
                    (device_id, fingerprint, json.dumps(keys, sort_keys=True), time.time()))

    def identity(self, device_id: str) -> tuple[str, dict[str, str]] | None:
        rows = self._rows("SELECT fingerprint, keys FROM identity WHERE device_id=?", (device_id,))
        return (str(rows[0][0]), json.loads(rows[0][1])) if rows else None

    def quarantine(self, device_id: str, reason: str) -> None:
        self._write("INSERT OR REPLACE INTO quarantine VALUES (?, ?, ?)", (device_id, reason, time.time()))

    def release(self, device_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM quarantine WHERE device_id=?", (device_id,)).rowcount > 0

    def quarantined(self) -> dict[str, str]:
        """device id -> why no update may touch it now."""
        return {r[0]: r[1] for r in self._rows("SELECT device_id, reason FROM quarantine")}

    # -- scheduling state (written by the daemon, for status / ctl list) -------------------
    def put_retry(self, device_id: str, data: dict[str, Any] | None) -> None:
        """A device's device-side failures in a row / park; None: nothing to show (it succeeded)."""
        if data is None:
            self._write("DELETE FROM retry_state WHERE device_id=?", (device_id,))
        else:
            self._write("INSERT OR REPLACE INTO retry_state VALUES (?, ?, ?)",
                        (device_id, json.dumps(data, sort_keys=True), time.time()))

    def clear_retry(self) -> None:
        """A (re)started daemon: no device is parked nor counted as failing yet."""
        self._write("DELETE FROM retry_state", ())

    def retry_states(self) -> dict[str, dict[str, Any]]:
        return {r[0]: json.loads(r[1]) for r in self._rows("SELECT device_id, data FROM retry_state")}

    def put_source(self, name: str, data: dict[str, Any]) -> None:
        self._write("INSERT OR REPLACE INTO source_state VALUES (?, ?, ?)",
                    (name, json.dumps(data, sort_keys=True), time.time()))

    def sources(self) -> dict[str, dict[str, Any]]:
        return {r[0]: {**json.loads(r[1]), "updated_at": r[2]}
                for r in self._rows("SELECT name, data, updated_at FROM source_state")}

    # -- audit -----------------------------------------------------------------------------
    def audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        self._write("INSERT INTO audit VALUES (?, ?, ?, ?, ?)", (time.time(), actor, action, target, detail))

    def audit_log(self, limit: int = 100) -> list[tuple[float, str, str, str, str]]:
        rows = self._rows("SELECT t, actor, action, target, detail FROM audit ORDER BY t DESC LIMIT ?",
                          (limit,))
        return [(float(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows]


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t))) if t else "?"


def retry_label(r: dict[str, Any] | None) -> str:
    """``parked until <when> (N failures: reason)`` / ``retry N at <when>`` ('' when none)."""
    if not r:
        return ""
    if r.get("parked"):
        return f"parked until {_when(r.get('until'))} ({r.get('failures')} failures: {r.get('reason')})"
    return f"retry {r.get('failures')} at {_when(r.get('until'))}"


def source_label(src: dict[str, Any]) -> str:
    name = src.get("source")
    if src.get("state") != "backing-off":
        return f"source {name}: ok (as of {_when(src.get('updated_at'))})"
    return (f"source {name}: unreachable since {_when(src.get('since'))}, backing off: "
            f"{src.get('failures')} failed probe(s), next try at {_when(src.get('next_try_at'))}: "
            f"{src.get('last_error')}")

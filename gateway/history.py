"""``smp-gateway history [ID]``: each update attempt from the journal, and the operator's acts.

Owns reading the journal's ``attempts`` table (``Journal.put_attempt``, written by
``FleetOps.note_outcome`` for every finished attempt: outcome, LwM2M /5 Update Result, bytes
sent, upload time, duration, who asked - the fleet server or an operator's ``ctl update``)
and the operator's device commands and control actions from its events, oldest first. A
journal of a gateway that had no ``attempts`` table yet shows its outcome events instead.
Read-only; nothing here contacts a device or a server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gateway.journal import Journal

OUTCOME_STEPS = ("done", "failed", "rolled-back", "refused")


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t))) if t else "-"


def collect(journal_path: Path, device_id: str | None, limit: int = 200) -> dict[str, Any]:
    if not journal_path.exists():
        return {"attempts": [], "operator": []}
    j = Journal(journal_path)
    try:
        attempts = j.attempts(device_id, limit)
        for a in attempts:
            a["duration_s"] = (round(a["finished_at"] - a["started_at"], 3)
                               if a.get("finished_at") and a.get("started_at") else None)
        # selected and limited in SQL: memory is bounded by ``limit``, not the journal's size
        events = j.events(device_id, detail_prefix="operator ", limit=limit)
        outcomes = [] if attempts else j.events(device_id, steps=OUTCOME_STEPS, limit=limit)
    finally:
        j.close()
    operator = [{"t": t, "device": d, "detail": detail} for t, d, _step, detail in events]
    if not attempts:  # an older journal: its outcome events
        attempts = [{"device_id": d, "finished_at": t, "status": step, "detail": detail,
                     "actor": None} for t, d, step, detail in outcomes
                    if detail and detail != "up to date"]
    return {"attempts": attempts, "operator": operator}


def render(data: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(data, indent=2, default=str)
    lines = []
    for a in data["attempts"]:
        dur = f"{a['duration_s']:.1f}s" if a.get("duration_s") is not None else "-"
        lines.append(
            f"{_when(a.get('finished_at'))} {a['device_id']} {a.get('status')} "
            f"lwm2m={a.get('result', '-')} {a.get('old_version') or '?'} -> "
            f"{a.get('new_version') or '?'} bytes={a.get('bytes') or 0} duration={dur} "
            f"by={a.get('actor') or '-'}: {a.get('detail') or ''}")
    for o in data["operator"]:
        lines.append(f"{_when(o['t'])} {o['device']} {o['detail']}")
    return "\n".join(lines) if lines else "no attempts in the journal"

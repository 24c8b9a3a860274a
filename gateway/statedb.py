"""Opening the gateway's SQLite state files the one way they must be opened.

Owns the durability settings shared by the journal (``journal.py``) and the operations state
(``opstate.py``): the file and its directory private to the service user (0600 / 0700),
autocommit (each statement is its own transaction, callers group with BEGIN where needed),
write-ahead logging so that ``smp-gateway status`` can read while the daemon writes, and
``synchronous=FULL`` so that a step written before it happens survives a power cut.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path


def open_state_db(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    new = not path.exists()
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    if new:
        os.chmod(path, 0o600)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db

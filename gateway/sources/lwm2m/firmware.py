"""The Firmware Update object (/5) state of one endpoint, persisted in the state directory.

State (/5/0/3) and Update Result (/5/0/5) follow OMA LwM2M 1.0/1.1 object 5:

* write of a Package URI or the first Package block: State 1 Downloading (Result 0);
* the engine's pre-flight passed (signature, hardware, size, version, mode - every check the
  engine makes before a byte goes to the device): State 2 Downloaded; a refusal: State 0 with
  the refusal's Result (5 integrity, 6 unsupported package / wrong hardware, 2 too large)
  and nothing sent to the device;
* Update (/5/0/2) executed in State 2 only (4.05 otherwise): State 3 Updating while the engine
  uploads, marks, resets, health-checks and confirms;
* the engine's outcome: success -> State 0, Result 1; rollback -> State 0, Result 8; link
  lost -> Result 4;
* an empty Package URI or Package, in any state: State 0, Result 0 (cancel; an update the
  engine runs is stopped through the source's ``canceled()``).

``phase`` says what the gateway has to do next for the endpoint's device: ``fetch`` (PULL:
download the URI), ``check`` (pre-flight of the package), ``wait`` (Downloaded: wait for the
server's Update), ``install`` (the engine's whole flow), ``idle``. ``gen`` numbers each
package the server gave: an offer carries it, and reports of an older package change nothing.
The record is written (atomically) on every change, so a restarted gateway answers with the
same State/Result and knows the package it was given.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

log = logging.getLogger("gateway.sources.lwm2m")

IDLE, DOWNLOADING, DOWNLOADED, UPDATING = 0, 1, 2, 3


@dataclass
class FwRecord:
    state: int = IDLE
    result: int = 0
    detail: str = ""
    uri: str = ""
    package: str | None = None  # file holding the package (PUSH, or PULL once downloaded)
    pkg_name: str = ""
    pkg_version: str = ""
    phase: str = "idle"  # idle | fetch | check | wait | install
    gen: int = 0
    canceled: str | None = None  # why the package of ``gen`` was called off (for canceled())
    # a cancel of a package the engine was installing: its [PkgName, PkgVersion], for a
    # cancel found too late (the image confirmed: the device's word, (b))
    canceled_pkg: list[str] | None = None
    running_version: str = ""  # what the device reported running (/3/0/3)

    @classmethod
    def load(cls, path: Path) -> FwRecord:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            log.warning("LwM2M state %s unreadable (%s): starting from Idle", path, exc)
            return cls()
        names = {f.name for f in fields(cls)}
        rec = cls(**{k: v for k, v in raw.items() if k in names}) if isinstance(raw, dict) else cls()
        if rec.state == DOWNLOADING and rec.phase != "fetch":
            # a PUSH cut by the restart: its blocks are gone; the server sees the download fail
            rec.state, rec.result, rec.phase = IDLE, 4, "idle"
            rec.detail = "the gateway restarted during the package transfer"
        return rec

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fw-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(self), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def snapshot(self) -> dict[str, Any]:
        return asdict(self)

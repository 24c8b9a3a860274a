"""The fleet-source interface every update backend implements.

Owns the boundary between a fleet server (or a local directory) and the gateway: *what is the
target for this device*, *fetch that artifact*, and *report progress and outcome*. Outcomes are
expressed in the LwM2M Firmware Update object (/5) vocabulary; each backend maps them onto its
server's own statuses. Sources hand over raw MCUboot image files; checking the signature and
the device policy is the image store's and the engine's job, never a source's.

Reports must survive a restart: each Offer carries ``report_to``, a small JSON-serializable
*report handle* with everything the backend needs to deliver a report later without the
in-memory state of the process that got the offer (hawkBit: controller, action id, feedback
link; MQTT jobs: thing, job id, execution number; RDFM: the device identity its log API
authenticates; latest-release/local: the release they log). The gateway journals it with the
update (``Journal.set_report_handle``) and rebuilds the Offer from it after a restart
(``Offer.from_handle``). ``report()`` must work from ``offer.report_to`` alone, and must raise
``ReportNotDelivered`` when a report did not reach the server (``ReportRefused`` when the
server says it never will): the gateway keeps every final report journaled until one
``report()`` call returned normally.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from gateway.mcuboot import Version


class UpdateState(IntEnum):
    """LwM2M /5/0/3 State."""

    IDLE = 0
    DOWNLOADING = 1
    DOWNLOADED = 2
    UPDATING = 3


class UpdateResult(IntEnum):
    """LwM2M /5/0/5 Update Result."""

    INITIAL = 0
    SUCCESS = 1
    NOT_ENOUGH_FLASH = 2
    OUT_OF_RAM = 3
    CONNECTION_LOST = 4
    INTEGRITY_FAILURE = 5
    UNSUPPORTED_PACKAGE = 6
    INVALID_URI = 7
    UPDATE_FAILED = 8
    UNSUPPORTED_PROTOCOL = 9


@dataclass(frozen=True)
class DeviceView:
    """What a source may know of a device when asked for its target."""

    id: str
    hardware: str
    running_version: Version | None = None
    running_hash: bytes | None = None
    group: str | None = None
    # the gateway.inventory record (slots, bootloader mode, params, last outcome...): each
    # backend reports what it can of it upstream
    inventory: dict[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Offer:
    """A target for one device: the artifact the source wants it to run."""

    device_id: str
    source: str  # backend name, e.g. "local", "rdfm"
    artifact_id: str  # stable id of the artifact (cache key, journal key)
    version: Version | None = None  # when the server says which version it is
    sha256: str | None = None  # hex digest of the downloadable file, when the server gives it
    size: int | None = None
    hardware: str | None = None  # hardware type the artifact targets, when the source knows
    handle: Any = field(default=None, compare=False, repr=False)  # backend-private, in memory
    # JSON-serializable: what report() needs, also in another process after a restart
    report_to: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # how far the server wants it taken: forced | soft | download-only (stage it in the
    # secondary slot, report DOWNLOADED and wait for an install) - see gateway.fleetops
    install: str = field(default="forced", compare=False)

    def report_handle(self) -> dict[str, Any]:
        """The serializable report handle: this offer's identity plus ``report_to``."""
        h: dict[str, Any] = {"device_id": self.device_id, "source": self.source,
                             "artifact_id": self.artifact_id,
                             "version": str(self.version) if self.version is not None else None,
                             "report_to": dict(self.report_to)}
        if self.install != "forced":
            # how far the server wants it taken survives a restart: a download-only update
            # resumed from the journal is staged, never installed (the server did not ask)
            h["install"] = self.install
        return h

    @classmethod
    def from_handle(cls, handle: dict[str, Any]) -> Offer:
        """The Offer ``report()`` needs, rebuilt from ``report_handle()`` (no backend state).

        Raises ValueError when the handle is not one (unreadable journal row)."""
        try:
            version = Version.parse(handle["version"]) if handle.get("version") else None
            report_to = handle.get("report_to") or {}
            if not isinstance(report_to, dict):
                raise TypeError("report_to is not an object")
            return cls(device_id=str(handle["device_id"]), source=str(handle["source"]),
                       artifact_id=str(handle["artifact_id"]), version=version,
                       report_to=dict(report_to), install=str(handle.get("install") or "forced"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a report handle: {exc}") from exc


@dataclass(frozen=True)
class Report:
    """Progress or outcome of one device's update, in LwM2M terms."""

    state: UpdateState
    result: UpdateResult = UpdateResult.INITIAL
    progress: float | None = None  # 0..1 of the upload, when uploading
    detail: str = ""
    report_id: str | None = None  # a final report's journal id: lets a reader drop a duplicate

    @property
    def finished(self) -> bool:
        return self.result != UpdateResult.INITIAL


class FleetSource(abc.ABC):
    """One update backend. Implementations must be safe to call for many devices concurrently."""

    name: str = "source"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections (MQTT session, HTTP pool...)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abc.abstractmethod
    async def check(self, device: DeviceView) -> Offer | None:
        """The target for this device, or None when it is up to date / nothing is assigned."""

    @abc.abstractmethod
    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        """Download (or locate) the artifact; return the path of a raw MCUboot image file.

        Must check whatever integrity data the server gives (sha256, artifact checksums) and
        refuse a file larger than ``max_size`` before using it; raise FetchError otherwise.
        """

    @abc.abstractmethod
    async def report(self, offer: Offer, report: Report) -> None:
        """Tell the server how the update of ``offer.device_id`` is going / went.

        Works from ``offer.report_to`` alone (the offer may be rebuilt from the journal in
        another process). Returns only once the server has the report; raises
        ``ReportNotDelivered`` otherwise (``ReportRefused`` when it can never be delivered).
        """

    def poll_interval(self) -> float:
        """Seconds until the next check, as the server asks (hawkBit polling.sleep...)."""
        return 10.0

    async def canceled(self, offer: Offer) -> str | None:
        """Polled while ``offer`` is being installed: the reason when the server called it off
        (hawkBit cancelAction, a canceled/removed job, an RDFM target that changed), else None."""
        return None

    async def acknowledge_cancel(self, offer: Offer, done: bool, detail: str) -> None:  # noqa: B027
        """Answer a cancel the way the server expects; ``done``: the update was taken back (or
        its revert is scheduled), False: too late (installed and confirmed)."""


class FetchError(Exception):
    """The artifact could not be obtained or failed an integrity check."""

    def __init__(self, message: str, result: UpdateResult = UpdateResult.CONNECTION_LOST) -> None:
        super().__init__(message)
        self.result = result


class ReportNotDelivered(Exception):
    """A report did not reach the server (down, timeout, rejected for now): try again later."""


class ReportRefused(ReportNotDelivered):
    """The server will never take this report (action/job closed or gone, unusable handle).

    A final report refused this way is not retried; the gateway keeps it in the journal with
    the reason (``Journal.reports(state="refused")``) and logs it as an error."""

"""The engine's vocabulary: journal steps, outcomes, stages and the device's slots.

Owns the names every other engine module and the rest of the gateway share: ``Step`` (the
journal's ``step`` column, one value per state of the flow), ``CONFIRM_SENT`` (the event written
just before a confirm is sent), ``Status``/``Outcome`` (how an attempt ended), ``Stage`` (how far
a caller lets ``UpdateEngine.run`` go), ``Slots`` (one MCUboot image's slots as the device
reports them) and ``set_revert_open`` (a failed image set's revert intent still open). No I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from smp.image_management import ImageState

from gateway.journal import Entry
from gateway.mcuboot import Version
from gateway.sources.base import UpdateResult


class Step(enum.StrEnum):
    READ_STATE = "read-state"
    UPLOAD = "upload"
    MARK_TEST = "mark-test"
    RESET = "reset"
    WAIT_BOOT = "wait-boot"
    VERIFY = "verify"
    CONFIRM = "confirm"
    WAIT_APP = "wait-app-confirm"
    DONE = "done"
    ROLLED_BACK = "rolled-back"
    REFUSED = "refused"
    FAILED = "failed"


# the journal's event (step confirm) written just before this gateway sends its confirm
CONFIRM_SENT = "confirm sent"
# the health check of an image that runs permanent without this gateway's confirm (an app that
# confirms itself, a trailer torn by a power cut, a mode without a test boot): the event's prefix
CONFIRMED_ELSEWHERE = "confirmed without the gateway"


class Status(enum.StrEnum):
    UPDATED = "updated"
    UP_TO_DATE = "up-to-date"
    REFUSED = "refused"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"
    HELD = "held"  # stopped at the stage the caller asked for (group phases); not an outcome


class Stage(enum.IntEnum):
    """How far ``UpdateEngine.run`` goes (groups run their members phase by phase)."""

    CHECKED = 0  # every pre-flight check passed, nothing sent (the LwM2M source's Downloaded)
    UPLOADED = 1  # the image is complete in the secondary slot, not marked
    MARKED = 2  # marked for test (pending), not reset
    BOOTED = 3  # reset, booted, health-checked: running unconfirmed
    CONFIRMED = 4  # the whole flow


@dataclass
class Outcome:
    device_id: str
    status: Status
    result: UpdateResult
    detail: str = ""
    old_version: str | None = None
    new_version: str | None = None
    bytes_uploaded: int = 0  # on the wire: retransmissions included
    upload_seconds: float = 0.0
    resumed_from: int = 0
    image_bytes: int = 0  # the image's own size (0: nothing was uploaded)
    group: str | None = None  # set when this outcome is part of a group's (failed) update

    @property
    def ok(self) -> bool:
        return self.status in (Status.UPDATED, Status.UP_TO_DATE)


class _Finish(Exception):
    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


@dataclass
class Slots:
    """The device's image state for one MCUboot image number."""

    active: ImageState | None
    other: ImageState | None

    @classmethod
    def parse(cls, images: list[ImageState], image_num: int) -> Slots:
        mine = [i for i in images if (i.image or 0) == image_num]
        active = next((i for i in mine if i.active), None)
        if active is None:
            active = next((i for i in mine if i.slot == 0), None)
        other = next((i for i in mine if i is not active), None)
        return cls(active, other)

    @property
    def active_hash(self) -> bytes | None:
        return bytes(self.active.hash) if self.active and self.active.hash else None

    @property
    def other_hash(self) -> bytes | None:
        return bytes(self.other.hash) if self.other and self.other.hash else None

    @property
    def running(self) -> str | None:
        """The running image's version as the device reports it."""
        return self.active.version if self.active else None

    @property
    def active_version(self) -> Version | None:
        if self.active is None:
            return None
        try:
            return Version.parse(self.active.version)
        except ValueError:
            return None


ProgressFn = Callable[[str, Step, int, int], None]


def marking_mark(set_id: str) -> str:
    """``tested_hash`` of an image set while this gateway writes its marks (journalled before
    the first): a member that test-runs then was test-booted by this gateway."""
    return f"marking:{set_id}"


def _revert_mark(set_id: str) -> str:
    """``tested_hash`` prefix of a failed set whose revert reset is due (``_set_revert``)."""
    return f"revert:{set_id}:"


def set_revert_open(entry: Entry) -> bool:
    """The journal row holds a failed set's revert intent not yet finished (``_set_revert``)."""
    return bool(entry.target_hash and entry.tested_hash
                and entry.tested_hash.startswith(_revert_mark(entry.target_hash)))

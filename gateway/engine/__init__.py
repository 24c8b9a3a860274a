"""Per-device update engine: the MCUboot A/B flow as an explicit state machine.

Owns one device's update from "what is on it" to a final outcome::

    READ_STATE -> UPLOAD -> MARK_TEST -> RESET -> WAIT_BOOT -> VERIFY -> CONFIRM | WAIT_APP -> DONE
                                                                      \\-> ROLLED_BACK
    (any) -> REFUSED (before a byte is sent) | FAILED

Every transition is logged with the device id and written to the journal before the step
runs, so a restarted gateway resumes: an upload continues from the device's offset (the
``sha`` resume of img_mgmt), a device that was reset is re-checked, and an image is confirmed
only if the journal says this gateway marked exactly that hash for test.

The package is split by step; each module owns one and names the journal ``Step``s it writes:

* ``model`` - ``Step``, ``Status``, ``Stage``, ``Outcome``, ``Slots`` (no I/O)
* ``state`` - ``EngineState``: the state the steps share, the journal writer ``_step``
* ``plan`` - read the device's state and the journal, pre-flight, choose the next step
* ``upload`` - the image's bytes into a slot
* ``mark_reset`` - the test mark and the reset into the test boot
* ``verify_confirm`` - the booted image checked, health window, confirm
* ``take_back`` - revert reset, rollback report
* ``image_set`` - several MCUboot images as one set
* ``recovery`` - serial recovery, the firmware loader, the last-resort re-flash
* ``core`` - ``UpdateEngine``: ``run``, the group phases ``confirm`` and ``revert``
"""

from gateway.engine.core import UpdateEngine
from gateway.engine.model import (
    CONFIRM_SENT,
    CONFIRMED_ELSEWHERE,
    Outcome,
    ProgressFn,
    Slots,
    Stage,
    Status,
    Step,
    _Finish,
    _revert_mark,
    marking_mark,
    set_revert_open,
)

__all__ = [
    "CONFIRMED_ELSEWHERE",
    "CONFIRM_SENT",
    "Outcome",
    "ProgressFn",
    "Slots",
    "Stage",
    "Status",
    "Step",
    "UpdateEngine",
    "_Finish",
    "_revert_mark",
    "marking_mark",
    "set_revert_open",
]

"""Which flow drives a device: the one place that knows every ``ModeFlow``.

Kept apart from ``flows`` so that ``recovery`` (a flow built on ``flows``) and ``flows`` do not
import each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.bootmodes.flows import (
    DirectXipFlow,
    ModeFlow,
    OverwriteFlow,
    RamLoadFlow,
    RefusingFlow,
    SwapFlow,
)
from gateway.bootmodes.modes import DeviceMode, Mode
from gateway.bootmodes.recovery import RecoveryFlow

if TYPE_CHECKING:
    from gateway.config import DeviceConfig


def flow_for(dm: DeviceMode, dev: DeviceConfig) -> ModeFlow:
    """The flow of the device's mode (an unknown mode runs the swap flow, as before)."""
    m = dm.mode
    if m.is_swap:
        return SwapFlow(dm, dev)
    if m == Mode.OVERWRITE_ONLY:
        return OverwriteFlow(dm, dev)
    if m in (Mode.DIRECT_XIP, Mode.DIRECT_XIP_WITH_REVERT):
        return DirectXipFlow(dm, dev)
    if m == Mode.RAM_LOAD:
        return RamLoadFlow(dm, dev)
    if m in (Mode.SINGLE_APP, Mode.FIRMWARE_LOADER, Mode.SINGLE_SLOT_RAM_LOAD):
        rec = dev.recovery
        if rec is not None and rec.enabled and m != Mode.SINGLE_SLOT_RAM_LOAD:
            return RecoveryFlow(dm, dev)
        return RefusingFlow(dm, dev)
    raise AssertionError(m)

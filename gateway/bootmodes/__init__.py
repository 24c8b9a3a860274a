"""Per-MCUboot-mode update flows and multi-image sets, as the engine drives them.

``modes``: which mode a device runs (config override, bootloader info); ``flows``: one
``ModeFlow`` per mode - what may be sent, what is marked, what the outcome may promise;
``imageset``: several images updated as one set (nRF5340 app + network core, two application
images) with one reset. The engine (``gateway/engine/``) is the state machine and journal
writer; these modules decide and never talk to a device themselves.
"""

from gateway.bootmodes.choose import flow_for
from gateway.bootmodes.flows import Mark, ModeFlow
from gateway.bootmodes.modes import DeviceMode, Mode, ModeConflict, ModeSource, decide, detect

__all__ = ["DeviceMode", "Mark", "Mode", "ModeConflict", "ModeFlow", "ModeSource", "decide",
           "detect", "flow_for"]

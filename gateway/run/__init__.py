"""The gateway's per-device steps, the mixins ``gateway.daemon.Gateway`` is built from.

``gateway.daemon`` only schedules (units, sessions under limits, retries, the life cycle);
what one device's attempt does is split by step, each module naming what it writes:

* ``state`` - ``GatewayState``: the attributes the steps share (no I/O)
* ``reports`` - final reports: journalled, delivered, retried (``backoff_delay``)
* ``device`` - one device, one attempt: offer -> plan -> engine -> outcome, blocking
"""

from gateway.run.device import DeviceStep, SourceBackingOff
from gateway.run.reports import ReportsStep, backoff_delay
from gateway.run.state import GatewayState, ProgressFn

__all__ = [
    "DeviceStep",
    "GatewayState",
    "ProgressFn",
    "ReportsStep",
    "SourceBackingOff",
    "backoff_delay",
]

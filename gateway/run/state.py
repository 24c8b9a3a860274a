"""What the gateway's per-device steps share: the attributes ``gateway.daemon.Gateway`` sets up.

Owns ``GatewayState``: the one place that lists what the step mixins (``device``, ``reports``)
read and write on the gateway - its configuration ``cfg`` (c), the verified image ``store``,
the ``journal``, the fleet ``source`` and its backoff ``source_health`` (with the devices
that wait for it, ``source_waiting``), ``fleet`` (``FleetOps``: what the scheduler asks
before and after each update), ``metrics``, the per-device ``steps`` for status, and the final
reports' retry schedule - plus the two methods the steps call that scheduling owns
(``session``: a device session under every limit; ``engine``), declared for the type checker
only. No I/O; writes no journal records.
"""
from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

from gateway.config import DeviceConfig, GatewayConfig
from gateway.engine import UpdateEngine
from gateway.fleetops import FleetOps
from gateway.images import ImageStore
from gateway.journal import Journal
from gateway.metrics import Metrics
from gateway.smp.session import SMPSession
from gateway.sources.base import FleetSource, SourceHealth

ProgressFn = Callable[[str, str, int, int], None]


class GatewayState:
    """What the steps share (see the module docstring); ``Gateway.__init__`` sets every one."""

    cfg: GatewayConfig
    store: ImageStore
    journal: Journal
    source: FleetSource
    source_health: SourceHealth
    source_waiting: set[str]
    on_progress: ProgressFn | None
    steps: dict[str, str]
    _blocked_logged: dict[str, str]
    metrics: Metrics
    _report_locks: dict[str, asyncio.Lock]
    _report_due: dict[int, float]
    _report_rng: random.Random
    clock: Callable[[], float]
    fleet: FleetOps

    if TYPE_CHECKING:  # scheduling's own (gateway.daemon.Gateway), called by the steps
        def session(self, dev: DeviceConfig) -> AbstractAsyncContextManager[SMPSession]: ...

        def engine(self, dev: DeviceConfig, session: SMPSession) -> UpdateEngine: ...

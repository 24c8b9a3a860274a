"""What the daemon hands an update once it has planned it, shared by lone devices and groups.

Owns two small types that both ``gateway.daemon`` (which plans) and ``gateway.groups`` (which
runs a group's members phase by phase) need, so that neither imports the other: the ``Plan``
(a device, the offer the gateway follows for it and the verified image) and ``Stopping`` (the
gateway is shutting down: no new session starts).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import DeviceConfig
from gateway.images import VerifiedImage
from gateway.sources.base import Offer


class Stopping(Exception):
    """The gateway is shutting down: no new session starts."""


@dataclass
class Plan:
    """A device, the offer the gateway follows for it and the verified image."""

    dev: DeviceConfig
    offer: Offer
    image: VerifiedImage
    resumed: bool = False

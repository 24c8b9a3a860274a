"""Update sources (fleet backends). ``build_source`` turns the config's ``source`` into one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.sources.base import FleetSource

if TYPE_CHECKING:
    from gateway.config import GatewayConfig


def build_source(cfg: GatewayConfig) -> FleetSource:
    """The FleetSource for ``cfg.source`` (imports each backend only when it is used)."""
    src = cfg.source
    kind = src.kind
    if kind == "local":
        from gateway.sources.local import LocalSource

        return LocalSource(src)
    raise ValueError(f"unknown source kind {kind!r}")

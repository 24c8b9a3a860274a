"""The IoT Hub twin as the gateway reads it: bounded, then parsed into per-MCU offers.

Everything here is fleet-server metadata (the trust rule): a desired section says *which*
file the hub would like an MCU to run; the image's signature (a) and the device's own report
(b) decide whether it is installed. The twin is outside input: its size, nesting and number
of sections are bounded before anything is read from it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gateway.mcuboot import Version
from gateway.sources.settings import azure_key_owners, azure_twin_key

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


# a device id's / group name's twin section name, and which id a section names (exact, never
# two MCUs on one section); kept with the config schema, which refuses colliding ids
twin_key = azure_twin_key
key_owners = azure_key_owners


class TwinRefused(ValueError):
    """The twin (or a patch, a method payload) exceeds a bound or is not the documented shape."""


def depth(obj: Any, limit: int) -> int:
    """Nesting depth of ``obj`` (dicts/lists), iterative: raises TwinRefused beyond ``limit``."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    deepest = 0
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict | list):
            if d > limit:
                raise TwinRefused(f"nested deeper than {limit} levels")
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def bounded(obj: Any, max_bytes: int, max_depth: int, what: str) -> Any:
    """``obj`` when it nests at most ``max_depth`` levels and is at most ``max_bytes`` as JSON."""
    try:
        depth(obj, max_depth)
        size = len(json.dumps(obj, separators=(",", ":")))
    except (TypeError, ValueError) as exc:
        raise TwinRefused(f"{what}: {exc}") from None
    if size > max_bytes:
        raise TwinRefused(f"{what} is {size} bytes, more than {max_bytes}")
    return obj


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A desired-properties patch applied to the cached desired properties (JSON merge patch:
    ``null`` removes a property). Both are depth-bounded before they get here."""
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def strip_meta(d: dict[str, Any]) -> dict[str, Any]:
    """Without ``$metadata``/``$version`` (not properties)."""
    return {k: v for k, v in d.items() if not k.startswith("$")}


@dataclass(frozen=True)
class Desired:
    """One desired section: where it came from (``mcus.<id>`` / ``groups.<name>``) and what it
    asks. Metadata only: cross-checked, never the reason an image is trusted."""

    origin: str
    url: str
    version: Version
    size: int | None
    sha256: str | None
    hardware: str | None

    def same(self, other: Desired | None) -> bool:
        return other is not None and (self.url, self.version, self.size, self.sha256,
                                      self.hardware) == (other.url, other.version, other.size,
                                                         other.sha256, other.hardware)


def parse_entry(origin: str, raw: Any, max_size: int) -> Desired:
    """A desired section, or TwinRefused with why (reported back to the hub)."""
    if not isinstance(raw, dict):
        raise TwinRefused(f"{origin} is not an object")
    url, version = raw.get("url"), raw.get("version")
    if not isinstance(url, str) or len(url) > 4096 or urlsplit(url).scheme.lower() not in (
            "http", "https") or not urlsplit(url).hostname:
        raise TwinRefused(f"{origin}.url is not an http(s) URL")
    if not isinstance(version, str) or len(version) > 64:
        raise TwinRefused(f"{origin}.version is not a version string")
    try:
        v = Version.parse(version)
    except ValueError:
        raise TwinRefused(f"{origin}.version {version[:64]!r} is not major.minor.revision[+build]") from None
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)
                             or not 0 < size <= max_size):
        raise TwinRefused(f"{origin}.size must be 1..{max_size}")
    sha = raw.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha)):
        raise TwinRefused(f"{origin}.sha256 is not 64 hex digits")
    hw = raw.get("hardware")
    if hw is not None and (not isinstance(hw, str) or not 0 < len(hw) <= 64):
        raise TwinRefused(f"{origin}.hardware is not a short string")
    return Desired(origin, url, v, size, sha.lower() if sha else None, hw)


def sections(desired: dict[str, Any], name: str, max_sections: int) -> dict[str, Any]:
    """``desired[name]`` (the MCU or group sections), bounded in number."""
    sec = desired.get(name)
    if sec is None:
        return {}
    if not isinstance(sec, dict):
        raise TwinRefused(f"desired.{name} is not an object")
    sec = strip_meta(sec)
    if len(sec) > max_sections:
        raise TwinRefused(f"desired.{name} has {len(sec)} sections, more than {max_sections}")
    return sec

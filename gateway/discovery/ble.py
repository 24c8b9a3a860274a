"""BLE discovery: scan for devices advertising the SMP service (or a name pattern).

Owns one scan on one adapter: every advertisement carrying the MCUmgr SMP service UUID
(``8D53DC1D-1DB7-4CD3-868B-8A527460AA84``, the smp_svr sample's ``bluetooth.c`` puts it in its
advertising data) or a local name matching ``name`` becomes a candidate with its address, its
address type and name. Scans share the adapter's lock with connection set-up
(``gateway.smp.ble.scan_lock``) and are rate-limited per adapter (``min_interval_s``: a scan
asked for sooner returns the last result), because a controller that scans cannot connect and
a busy radio slows every update on it.

Random *private* addresses (resolvable or not) change over time and at every boot, so they are
never part of a device's identity: such a device is identified by what it reports over SMP
(node name, hardware id), and its link is set up by advertised name when it has one.

Backends as for the link: ``bleak`` (BlueZ; ``BleakScanner.discover(return_adv=True)``) and
``bumble`` (any HCI transport; the controller is shared with the links through the same host
registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import time
from typing import Any

from gateway.config import BleDiscovery
from gateway.discovery.candidates import Candidate
from gateway.smp.ble import (
    SMP_SERVICE_UUID,
    BleUnavailable,
    _acquire_host,
    _advert_name,
    _bluez_unavailable,
    _release_host,
    scan_lock,
)

log = logging.getLogger(__name__)

_last: dict[str, tuple[float, list[Candidate]]] = {}  # adapter -> (monotonic time, result)


def _candidate(cfg: BleDiscovery, address: str, name: str | None, addr_type: str) -> Candidate:
    attrs = {"ble_address": address, "ble_address_type": addr_type, "adapter": cfg.adapter}
    if name:
        attrs["ble_name"] = name
    if addr_type in ("public", "random-static"):
        attrs["ble_public_address"] = address
    else:  # a private address says nothing about the device: never an identity
        attrs.pop("ble_address")
        attrs["ble_private_address"] = address
    transport: dict[str, Any] = {"kind": "ble", "adapter": cfg.adapter, "backend": cfg.backend}
    if cfg.hci:
        transport["hci"] = cfg.hci
    if addr_type in ("public", "random-static") or not name:
        transport["address"] = address
    else:
        transport["name"] = name
    return Candidate("ble", address, transport, attrs, key=f"ble:{cfg.adapter}:{address}")


def _wanted(cfg: BleDiscovery, uuids: list[str], name: str | None) -> bool:
    want = SMP_SERVICE_UUID.replace("-", "")
    if cfg.service_uuid and want in [u.replace("-", "").lower() for u in uuids]:
        return True  # bumble prints UUIDs without dashes, bleak with
    return bool(cfg.name and name and fnmatch.fnmatchcase(name, cfg.name))


async def _scan_bumble(cfg: BleDiscovery) -> list[Candidate]:
    from bumble.core import UUID, AdvertisingData

    assert cfg.hci is not None
    host = await _acquire_host(cfg.hci)
    seen: dict[str, Candidate] = {}

    def on_adv(adv: Any) -> None:
        uuids: list[str] = []
        for t in (AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
                  AdvertisingData.INCOMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS):
            for u in adv.data.get_all(t) or []:
                items = u if isinstance(u, list) else [u]
                uuids += [str(x).lower() for x in items if isinstance(x, UUID)]
        name = _advert_name(adv)
        if not _wanted(cfg, uuids, name):
            return
        a = adv.address
        if a.is_public:
            kind = "public"
        elif a.is_static:
            kind = "random-static"
        else:
            kind = "random-private"
        addr = a.to_string(False)
        seen[addr] = _candidate(cfg, addr, name, kind)

    try:
        async with host.lock:
            host.device.on("advertisement", on_adv)
            try:
                await host.device.start_scanning(filter_duplicates=False)
                await asyncio.sleep(cfg.scan_s)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(host.device.stop_scanning(), 2.0)
                host.device.remove_listener("advertisement", on_adv)
    finally:
        await _release_host(host)
    return list(seen.values())


async def _scan_bleak(cfg: BleDiscovery) -> list[Candidate]:
    try:
        from bleak import BleakScanner
    except ImportError as exc:  # pragma: no cover - bleak is a dependency
        raise BleUnavailable("BLE discovery (backend bleak) needs the 'bleak' package") from exc

    try:
        found = await BleakScanner.discover(timeout=cfg.scan_s, return_adv=True,
                                            bluez={"adapter": cfg.adapter})
    except Exception as exc:
        raise _bluez_unavailable(exc, cfg.adapter) or BleUnavailable(
            f"BLE scan on {cfg.adapter}: {type(exc).__name__}: {exc}") from exc
    out = []
    for dev, adv in found.values():
        name = adv.local_name or dev.name
        if not _wanted(cfg, list(adv.service_uuids or []), name):
            continue
        details = getattr(dev, "details", None) or {}
        props = details.get("props", {}) if isinstance(details, dict) else {}
        kind = "public" if props.get("AddressType") == "public" else "random-private"
        if kind != "public" and str(dev.address)[:1].upper() in "CDEF":
            kind = "random-static"  # two top bits set: a static random address
        out.append(_candidate(cfg, str(dev.address), name, kind))
    return out


async def scan(cfg: BleDiscovery, *, force: bool = False) -> list[Candidate]:
    """Candidates seen by one scan on ``cfg.adapter`` (or the last result, if it is recent)."""
    last = _last.get(cfg.adapter)
    now = time.monotonic()
    if last is not None and not force and now - last[0] < cfg.min_interval_s:
        return last[1]
    async with scan_lock(cfg.adapter):
        result = await (_scan_bumble(cfg) if cfg.backend == "bumble" else _scan_bleak(cfg))
    _last[cfg.adapter] = (time.monotonic(), result)
    log.info("discovery: BLE scan on %s found %d SMP device(s)", cfg.adapter, len(result))
    return result

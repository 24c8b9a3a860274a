"""Device inventory: what the gateway knows of each device, for the fleet server and ``status``.

Owns one JSON-able record per device - slots (version, hash, flags), bootloader mode, MCUmgr
parameters, board/node/hardware id, transport and address, group, the journal's step and
target, the image that is blocked (by version and hash, not a bare flag) and the last outcome
with its LwM2M result - and its translation into what each backend can carry:

* hawkBit: controller attributes (``configData``), flat string key/values; hawkBit keeps keys
  and values up to 128 characters (``Target.CONTROLLER_ATTRIBUTE_KEY/VALUE_SIZE``), longer
  values are cut;
* RDFM: device metadata - *string values only* (the real server answers 400 to anything else)
  next to the three keys it requires (``rdfm.hardware.devtype``, ``rdfm.software.version``,
  ``rdfm.hardware.macaddr``), which the backend sets itself; ours are ``smp-gateway.*``;
* MQTT jobs: a shadow document ``{"state": {"reported": {...}}}`` (AWS IoT Device Shadow
  layout) published retained on a per-device topic;
* latest-release: a few query parameters next to the four the API defines.

``smp-gateway status --json`` prints the same records.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.bootmodes.modes import mode_name
from gateway.config import DeviceConfig
from gateway.discovery.identify import SlotInfo
from gateway.mcuboot import ImageFormatError, parse_image
from gateway.opstate import OpState

if TYPE_CHECKING:
    from smp.image_management import ImageState

    from gateway.config import DeviceConfig
    from gateway.journal import Entry

HAWKBIT_MAX = 128


def slots_of(states: list[ImageState] | list[SlotInfo], image: int | None = None) -> list[dict[str, Any]]:
    out = []
    for st in states:
        s = st if isinstance(st, SlotInfo) else SlotInfo.from_state(st)
        if image is None or s.image == image:
            out.append({"image": s.image, "slot": s.slot, "version": s.version, "hash": s.hash,
                        "flags": s.flags})
    return out


def lwm2m_of(unreported_or_detail: str | None) -> int | None:
    if not unreported_or_detail:
        return None
    try:
        return int(json.loads(unreported_or_detail)["result"])
    except (ValueError, KeyError, TypeError):
        return None


def blocked_of(entry: Entry | None, versions: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The blocked image, named: version (when known), hash and artifact.

    A rolled-back image is blocked by its image hash; a refused one (or an artifact that
    could not be used) by its artifact id, with the sha256 of the refused bytes as its hash."""
    if entry is None or not (entry.blocked_hash or entry.blocked_artifact):
        return None
    version = None
    if entry.blocked_hash and entry.blocked_hash == entry.target_hash:
        version = entry.target_version
    elif entry.blocked_artifact and entry.blocked_artifact == entry.artifact_id:
        version = entry.target_version
    elif versions and entry.blocked_hash:
        version = versions.get(entry.blocked_hash)
    return {"version": version, "hash": entry.blocked_hash, "artifact": entry.blocked_artifact}


def blocked_label(entry: Entry | None, versions: dict[str, str] | None = None) -> str:
    """``status``' text for the blocked image ('' when none)."""
    b = blocked_of(entry, versions)
    if b is None:
        return ""
    name = b["version"] or (b["artifact"] or "")
    return f"blocked: {name} {(b['hash'] or '')[:12]}".replace("  ", " ").strip()


def record(dev: DeviceConfig, *, slots: list[dict[str, Any]] | None = None,
           params: dict[str, Any] | None = None, bootloader_mode: int | str | None = None,
           facts: dict[str, Any] | None = None, entry: Entry | None = None,
           last: dict[str, Any] | None = None, versions: dict[str, str] | None = None,
           reachable: bool | str = True, quarantine: str | None = None) -> dict[str, Any]:
    """The inventory record of one device (any part may be unknown: None). ``quarantine``:
    why no update may touch it now (``gateway.discovery.guard``)."""
    t = dev.transport
    if t.kind == "udp":
        address: str | None = f"{t.host}:{t.port}"
    elif t.kind == "serial":
        address = t.port
    else:
        address = t.address or (f"name={t.name}" if t.name else None)
    mode = bootloader_mode
    if isinstance(mode, int):
        mode = mode_name(mode)  # the one table of MCUBOOT_MODE_* numbers
    out: dict[str, Any] = {
        "device": dev.id, "hardware": dev.hardware, "group": dev.group, "image": dev.image,
        "transport": t.kind, "address": address, "reachable": reachable,
        "slots": slots, "mcuboot_mode": mode, "mcumgr_params": params,
        "board": (facts or {}).get("board"), "node": (facts or {}).get("node"),
        "hwid": (facts or {}).get("hwid"),
        "confirm_policy": dev.confirm, "at": time.time(),
    }
    if quarantine is not None:
        out["quarantine"] = quarantine
    if entry is not None:
        out["journal"] = {"step": entry.step, "outcome": entry.outcome,
                          "target_version": entry.target_version,
                          "target_hash": entry.target_hash, "artifact": entry.artifact_id,
                          "upload": [entry.upload_offset, entry.upload_total],
                          "attempts": entry.attempts, "last_error": entry.last_error}
        out["blocked"] = blocked_of(entry, versions)
        if last is None and entry.outcome is not None:
            # last_error is the detail of a failed outcome; after a success it is the error of
            # a later attempt that decided nothing (device unreachable): not this outcome's
            failed = entry.outcome in ("failed", "rolled-back", "refused")
            last = {"status": entry.outcome, "detail": entry.last_error if failed else None,
                    "target_version": entry.target_version, "artifact": entry.artifact_id,
                    "lwm2m_result": lwm2m_of(entry.unreported)}
    out["last_outcome"] = last
    return out


def _slot(inv: dict[str, Any], n: int) -> dict[str, Any] | None:
    for s in inv.get("slots") or []:
        if s.get("slot") == n:
            return dict(s)
    return None


def flat(inv: dict[str, Any]) -> dict[str, str]:
    """The record as flat string key/values (shared by hawkBit and RDFM)."""
    out: dict[str, str] = {"transport": str(inv.get("transport") or "")}
    for n in (0, 1):
        s = _slot(inv, n)
        if s is None:
            out[f"slot{n}.version"] = ""
            continue
        out[f"slot{n}.version"] = str(s.get("version") or "")
        out[f"slot{n}.hash"] = str(s.get("hash") or "")
        out[f"slot{n}.flags"] = ",".join(s.get("flags") or [])
    if inv.get("mcuboot_mode"):
        out["mcuboot_mode"] = str(inv["mcuboot_mode"])
    p = inv.get("mcumgr_params") or {}
    if p.get("reported"):
        out["mcumgr.buf_size"] = str(p.get("buf_size"))
        out["mcumgr.buf_count"] = str(p.get("buf_count"))
    for k in ("board", "node", "hwid", "group"):
        if inv.get(k):
            out[k] = str(inv[k])
    last = inv.get("last_outcome") or {}
    if last:
        out["last_outcome"] = str(last.get("status") or "")
        if last.get("lwm2m_result") is not None:
            out["last_lwm2m_result"] = str(last["lwm2m_result"])
    if inv.get("quarantine"):
        out["quarantine"] = str(inv["quarantine"])
    b = inv.get("blocked")
    if b:
        out["blocked"] = f"{b.get('version') or b.get('artifact') or ''} {str(b.get('hash'))[:16]}".strip()
    return out


def hawkbit_attributes(inv: dict[str, Any]) -> dict[str, str]:
    return {k[:HAWKBIT_MAX]: v[:HAWKBIT_MAX] for k, v in flat(inv).items()}


def rdfm_metadata(inv: dict[str, Any]) -> dict[str, str]:
    """Extra RDFM metadata: every value a string (the server refuses anything else)."""
    return {f"smp-gateway.{k}": str(v) for k, v in flat(inv).items()}


def shadow_document(inv: dict[str, Any]) -> dict[str, Any]:
    """AWS IoT Device Shadow layout: ``{"state": {"reported": ...}}``."""
    rep = {k: v for k, v in inv.items() if k not in ("at",)}
    return {"state": {"reported": rep}, "timestamp": int(inv.get("at") or time.time())}


def release_query(inv: dict[str, Any]) -> dict[str, str]:
    """Query parameters for the latest-release API beside its own four."""
    out = {}
    s1 = _slot(inv, 1)
    if inv.get("mcuboot_mode"):
        out["mcuboot_mode"] = str(inv["mcuboot_mode"])
    if s1 is not None:
        out["secondary_version"] = str(s1.get("version") or "")
    last = inv.get("last_outcome") or {}
    if last.get("lwm2m_result") is not None:
        out["last_update_result"] = str(last["lwm2m_result"])
    return out


def all_devices(cfg: Any) -> list[DeviceConfig]:
    """``devices:`` plus the devices discovery has found (from ``fleet.sqlite``), for ``status``."""

    out = list(cfg.devices)
    path = cfg.state_dir / "fleet.sqlite"
    if cfg.device_templates and path.exists():
        ops = OpState(path)
        try:
            ids = {d.id for d in out}
            for k in ops.known().values():
                if k.device_id not in ids:
                    try:
                        out.append(DeviceConfig.model_validate(k.config))
                    except ValueError:
                        continue
        finally:
            ops.close()
    return out


def quarantined(state_dir: Any) -> dict[str, str]:
    """device id -> why no update may touch it now (``fleet.sqlite``, for ``status``)."""
    path = Path(state_dir) / "fleet.sqlite"
    if not path.exists():
        return {}
    ops = OpState(path)
    try:
        return ops.quarantined()
    finally:
        ops.close()


def image_versions(state_dir: Any) -> dict[str, str]:
    """image hash (hex) -> version, for the verified images the gateway stored."""
    out: dict[str, str] = {}
    root = Path(state_dir) / "images"
    if not root.is_dir():
        return out
    for p in root.glob("*.bin"):
        try:
            with p.open("rb") as f:
                info = parse_image(f.read())
        except (OSError, ImageFormatError, ValueError):
            continue
        out[info.hash.hex()] = str(info.version)
    return out

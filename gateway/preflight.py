"""Checks before running: ``check-config``, ``verify IMAGE --device ID``, ``run --once --dry-run``.

Owns answering "what would the gateway do" without doing it:

* ``check_config(path)`` - every problem of a configuration at once (schema errors, trusted
  key files that do not load, unusable state directory or update directory, health-check
  commands that do not exist), not only the first one ``load_config`` stops at;
* ``verify_image(cfg, image, dev, state)`` - every pre-flight check the engine makes before
  the first byte (``gateway.engine.UpdateEngine._run``) on this device: structure, hash TLV,
  trusted signature and KEYHASH, trailer/padding (``ImageStore``), MCUboot mode (config vs the
  device, ``bootmodes.modes.decide``), the build for the slot (``flow.choose``), hardware, slot
  fit, version and security counter against the running image (``images.preflight``), the
  mode's own refusals (``flow.refuse``), what the device's slots allow - with the verdict and
  the upload plan. The running image is read from the device when it answers (read-only
  requests: image list, bootloader info), else taken from the journal, and the answer says
  which;
* ``dry_run(cfg)`` - for every device: asks the source as a poll would, fetches and verifies
  the offered image into a scratch store, and says what would be updated with which image and
  why, and what would be refused or held. It never writes to a device (only image list,
  bootloader info, MCUmgr parameters, os info reads), never reports to the server and never
  writes the journal. The source is asked read-only (``FleetSource.peek``: MQTT jobs describes
  the next execution instead of starting it, hawkBit sends no configData or feedback); a source
  that cannot be asked without changing the server's state (LwM2M) is not asked at all - each
  device says so (action ``not-asked``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from smp.image_management import ImageState

from gateway.bootmodes.choose import flow_for
from gateway.bootmodes.modes import DeviceMode, ModeConflict, decide
from gateway.config import (
    ConfigError,
    DeviceConfig,
    GatewayConfig,
    LocalSourceConfig,
    _check_template,
    _describe,
    _format_loc,
    _resolve_paths,
)
from gateway.control import ControlError, _alive, request
from gateway.daemon import make_transport
from gateway.devcmd import parse_state_dicts
from gateway.engine import Slots
from gateway.images import (
    ImageRefused,
    ImageStore,
    Refusal,
    known_security_counter,
    preflight,
)
from gateway.journal import Journal
from gateway.maintenance import MaintenancePolicy
from gateway.mcuboot import TrustedKey
from gateway.opstate import OpState
from gateway.smp.session import SMPError, SMPSession, SMPTimeout
from gateway.smp.transport import TransportError
from gateway.sources import build_source
from gateway.sources.base import DeviceView, FetchError, NotReadOnly

READ_TIMEOUT_S = 3.0


# -- check-config ---------------------------------------------------------------------------
def check_config(path: Path) -> list[str]:
    """Every problem of the configuration file at ``path`` ("key: what is wrong"); [] = fine."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        return [f"{path}: cannot read config file: {exc.strerror or exc}"]
    except yaml.YAMLError as exc:
        return [f"{path}: not valid YAML: {exc}"]
    if not isinstance(data, dict):
        return [f"{path}: the top level must be a mapping of keys to values"]
    try:
        data = _resolve_paths(data, path.parent)
    except ValueError as exc:
        return [f"{path}: invalid path in the configuration: {exc}"]
    try:
        cfg = GatewayConfig.model_validate({**data, "config_path": str(path)})
    except ValidationError as exc:
        return [f"{path}: {_format_loc(tuple(e['loc']), data) or '(top level)'}: {_describe(e)}"
                for e in exc.errors()]
    problems: list[str] = []
    for i, k in enumerate(cfg.trusted_keys):
        try:
            TrustedKey.load(k)
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: trusted_keys[{i}]: {k}: {exc}")
    for i, t in enumerate(cfg.device_templates):
        try:
            _check_template(t, f"device_templates[{i}]", path, set(cfg.maintenance_windows))
        except ConfigError as exc:
            problems.append(str(exc))
    sd = cfg.state_dir
    probe = sd if sd.exists() else next((p for p in sd.parents if p.exists()), Path("/"))
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        problems.append(f"{path}: state_dir: {sd} cannot be created or written by this user")
    if isinstance(cfg.source, LocalSourceConfig):
        if not cfg.source.path.is_dir():
            problems.append(f"{path}: source.path: {cfg.source.path} is not a directory")
    for i, d in enumerate(cfg.devices):
        hc = d.health_check
        if hc is not None and hc.command is not None:
            exe = hc.command[0]
            if shutil.which(exe) is None and not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
                problems.append(f"{path}: devices[{i}].health_check.command: {exe!r} is not an "
                                "executable (give its absolute path)")
    return problems


# -- verify ---------------------------------------------------------------------------------
@dataclass
class DeviceState:
    """What is known of the device: read from it now, or the journal's last record."""

    slots: Slots
    from_device: bool
    reported_mode: int | None = None
    no_downgrade: bool = False
    note: str = ""


@dataclass
class Verdict:
    device: str
    image: str
    accepted: bool
    checks: list[dict[str, Any]] = field(default_factory=list)
    refusal: str | None = None
    lwm2m: int | None = None
    plan: dict[str, Any] | None = None
    device_state: str = ""

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append({"check": name, "ok": ok, "detail": detail})

    def refuse(self, name: str, exc: ImageRefused) -> Verdict:
        self.check(name, False, str(exc))
        self.accepted, self.refusal, self.lwm2m = False, str(exc), int(exc.reason.lwm2m)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "image": self.image,
                "verdict": "accepted" if self.accepted else "refused", "refusal": self.refusal,
                "lwm2m_result": self.lwm2m, "device_state": self.device_state,
                "checks": self.checks, "plan": self.plan}


async def read_device(dev: DeviceConfig, journal: Journal | None) -> DeviceState:
    """The device's slots and bootloader mode, read-only; else the journal's record."""
    try:
        async with SMPSession(make_transport(dev), device_id=dev.id,
                              timeout_s=min(READ_TIMEOUT_S, dev.timeouts.request_s)) as s:
            states = await s.image_state(retries=1)
            info = await s.bootloader_info(timeout_s=min(2.0, dev.timeouts.request_s))
        return DeviceState(Slots.parse(states, dev.image), True,
                           info.mode if info is not None else None,
                           bool(info.no_downgrade) if info is not None else False,
                           "read from the device")
    except (SMPError, SMPTimeout, TransportError, OSError, TimeoutError) as exc:
        return journal_state(dev, journal, f"device unreachable ({type(exc).__name__}: {exc})")


def journal_state(dev: DeviceConfig, journal: Journal | None, why: str) -> DeviceState:
    e = journal.get(dev.id) if journal is not None else None
    active = None
    if e is not None and e.running_version:
        active = ImageState(image=dev.image, slot=0, version=e.running_version,
                            hash=bytes.fromhex(e.running_hash) if e.running_hash else None,
                            active=True, confirmed=True)
    return DeviceState(Slots(active, None), False,
                       note=f"{why}; running image from the journal: "
                            f"{e.running_version if e and e.running_version else 'unknown'}")


def verify_image(cfg: GatewayConfig, store: ImageStore, path: Path, dev: DeviceConfig,
                 state: DeviceState, maint: MaintenancePolicy | None = None,
                 label: str | None = None) -> Verdict:
    """Every check the engine makes before the first byte, for ``dev`` (see the module)."""
    v = Verdict(dev.id, label or str(path), True, device_state=state.note)
    try:
        image = store.add_file(path, hardware=dev.hardware, allow_unsigned=dev.allow_unsigned)
    except ImageRefused as exc:  # (a): structure, hash TLV, signature/KEYHASH, trailer/padding
        return v.refuse("image (structure, hash TLV, signature by a trusted key, KEYHASH, "
                        "padding/trailer)", exc)
    except OSError as exc:
        return v.refuse("image file", ImageRefused(Refusal.BAD_FORMAT, f"cannot read {path}: {exc}"))
    v.check("image: structure, hash TLV, signature, KEYHASH, padding/trailer", True,
            f"version {image.version}, hash {image.hash.hex()[:16]}"
            + (f"; partly verified: {image.unverified}" if image.unverified else ""))
    try:
        dm: DeviceMode = decide(dev.mcuboot_mode, state.reported_mode, state.no_downgrade)
    except ModeConflict as exc:
        return v.refuse("MCUboot mode", ImageRefused(Refusal.MODE, str(exc)))
    flow = flow_for(dm, dev)
    v.check("MCUboot mode", True, dm.describe())
    slots = state.slots
    try:
        chosen = flow.choose(image, slots)
    except ImageRefused as exc:
        return v.refuse("build for the slot", exc)
    v.check("build for the slot", True, f"{chosen.version} ({chosen.path.name})")
    try:
        preflight(chosen, device_id=dev.id, hardware=dev.hardware, slot_size=dev.slot_size,
                  running=slots.active_version, running_hash=slots.active_hash,
                  allow_downgrade=dev.allow_downgrade,
                  running_security_counter=known_security_counter(cfg.state_dir / "images",
                                                                 slots.active_hash),
                  trailer=flow.trailer(chosen))
    except ImageRefused as exc:
        return v.refuse("hardware, slot fit, version, security counter", exc)
    v.check("hardware, slot fit, version, security counter", True,
            f"hardware {dev.hardware}, {chosen.size} + trailer {flow.trailer(chosen)} bytes in "
            f"slot {dev.slot_size or '(size not configured)'}, running "
            f"{slots.running or 'unknown'}")
    refusal = flow.refuse(chosen, slots.active_version)
    if refusal is not None:
        return v.refuse(f"{flow.mode.value} rules", refusal)
    v.check(f"{flow.mode.value} rules", True, "nothing this mode refuses")
    if slots.active_hash == chosen.hash:
        v.check("device slots", True, f"{chosen.version} already runs: nothing to send")
    elif slots.active is not None and not slots.active.confirmed:
        v.check("device slots", False, f"the device test-runs unconfirmed "
                f"{slots.active.version}: the gateway leaves it alone (no update now)")
        v.accepted = False
    elif (slots.other is not None and slots.other.pending
          and slots.other_hash != chosen.hash):
        v.check("device slots", False, f"another image ({slots.other.version}) is pending in the "
                "secondary slot: clear it first")
        v.accepted = False
    else:
        v.check("device slots", True, "secondary slot usable" if state.from_device
                else "not read (device unreachable)")
    window = None if maint is None or maint.reset_allowed(dev) else maint.describe(dev)
    steps = ["upload to the secondary slot"]
    if flow.mark.name != "NONE":
        steps.append(f"mark {flow.mark.name.lower()}")
    steps.append("reset")
    if flow.test_boot:
        steps += [f"health check {dev.health_check_s:g}s"
                  + (" + health_check hook" if dev.health_check is not None else ""),
                  "confirm" if dev.confirm == "gateway" else "wait for the application's confirm"]
    v.plan = {"version": str(chosen.version), "hash": chosen.hash.hex(), "bytes": chosen.size,
              "image_number": dev.image, "mode": flow.mode.value, "steps": steps,
              "revertible": bool(flow.test_boot), "maintenance_window": window or "reset allowed now"}
    return v


async def verify(cfg: GatewayConfig, path: Path, device_id: str) -> Verdict:
    devs = {d.id: d for d in cfg.devices}
    if device_id not in devs:
        raise ConfigError(cfg.config_path or "<config>", "devices",
                          f"no device {device_id!r} in the configuration")
    dev = devs[device_id]
    journal = Journal(cfg.state_dir / "journal.sqlite") if (
        cfg.state_dir / "journal.sqlite").exists() else None
    try:
        state = await _state_for(cfg, dev, journal)
        keys = [TrustedKey.load(k) for k in cfg.trusted_keys]
        with tempfile.TemporaryDirectory(prefix="smpgw-verify-") as tmp:
            store = ImageStore(Path(tmp), keys)
            return verify_image(cfg, store, path, dev, state,
                                MaintenancePolicy.from_config(cfg.maintenance_windows))
    finally:
        if journal is not None:
            journal.close()


async def _state_for(cfg: GatewayConfig, dev: DeviceConfig, journal: Journal | None) -> DeviceState:
    """Through the daemon when it runs (it holds the device; serialised with its work), else
    directly (read-only); else the journal."""
    if cfg.control.enabled and await _alive(cfg.control_socket):
        try:
            res = await request(cfg.control_socket, {"cmd": "device", "device": dev.id,
                                                     "op": "image-list"}, timeout_s=60)
            # the socket's other end is outside input: every value typed (devcmd)
            states = parse_state_dicts(res.get("images") if isinstance(res, dict) else None)
        except (ControlError, ValueError) as exc:
            return journal_state(dev, journal, f"device not read through the daemon ({exc})")
        return DeviceState(Slots.parse(states, dev.image), True, note="read from the device "
                           "(through the daemon)")
    return await read_device(dev, journal)


# -- run --once --dry-run ----------------------------------------------------------------------
async def dry_run(cfg: GatewayConfig) -> list[dict[str, Any]]:
    """What one pass would do, device by device (see the module: writes to no device)."""
    source = build_source(cfg)
    keys = [TrustedKey.load(k) for k in cfg.trusted_keys]
    journal = Journal(cfg.state_dir / "journal.sqlite")
    ops = OpState(cfg.state_dir / "fleet.sqlite")
    maint = MaintenancePolicy.from_config(cfg.maintenance_windows)
    out: list[dict[str, Any]] = []
    if source.peekable:  # else not even started (LwM2M: registering changes the server)
        await source.start()
    try:
        with tempfile.TemporaryDirectory(prefix="smpgw-dry-run-") as tmp:
            store = ImageStore(Path(tmp) / "images", keys)
            for dev in cfg.devices:
                state = await read_device(dev, journal)
                row: dict[str, Any] = {"device": dev.id, "running": state.slots.running,
                                       "device_state": state.note}
                e = journal.get(dev.id)
                paused = ops.is_paused(dev.id)
                try:  # read-only: nothing the server keeps (never check(): it may start a job)
                    offer = await asyncio.wait_for(source.peek(DeviceView(
                        id=dev.id, hardware=dev.hardware, running_version=state.slots.active_version,
                        running_hash=state.slots.active_hash, group=dev.group)), 60)
                except NotReadOnly as exc:
                    out.append({**row, "action": "not-asked",
                                "why": f"server state would change: not asked ({exc})"})
                    continue
                except Exception as exc:
                    out.append({**row, "action": "none", "why": f"source check failed: {exc}"})
                    continue
                if offer is None:
                    out.append({**row, "action": "none", "why": f"{source.name} offers nothing "
                                "newer: up to date"})
                    continue
                row.update({"artifact": offer.artifact_id, "why": f"offered by {source.name}"})
                if e.blocked_artifact == offer.artifact_id:
                    out.append({**row, "action": "blocked", "why": f"artifact {offer.artifact_id} "
                                f"is blocked here ({e.outcome}: {e.last_error or '-'})"})
                    continue
                try:
                    path = await asyncio.wait_for(source.fetch(offer, dev.slot_size), 600)
                except FetchError as exc:  # permanent: the daemon refuses and blocks it
                    out.append({**row, "action": "refuse" if exc.permanent else "fail",
                                "refusal": f"download: {exc}" if exc.permanent else None,
                                "lwm2m_result": int(exc.result), "why": f"download: {exc}"})
                    continue
                except Exception as exc:
                    out.append({**row, "action": "fail", "why": f"download: {exc}"})
                    continue
                v = verify_image(cfg, store, path, dev, state, maint, label=offer.artifact_id)
                row.update(v.to_dict())
                if not v.accepted:
                    row["action"] = "refuse"
                elif paused is not None:
                    row["action"], row["why"] = "hold", f"paused by the operator ({paused})"
                elif state.slots.active_hash is not None and v.plan and \
                        v.plan["hash"] == state.slots.active_hash.hex():
                    row["action"] = "none"
                elif v.plan and v.plan["maintenance_window"] != "reset allowed now":
                    row["action"] = "stage"  # uploaded, not marked or reset until a window
                else:
                    row["action"] = "update"
                out.append(row)
    finally:
        await source.close()
        journal.close()
        ops.close()
    return out

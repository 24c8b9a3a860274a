"""One-off device commands beside the daemon: ``smp-gateway device ID <command>``.

Owns what an operator may do to one device by hand - ``echo``, ``reset``, ``image list``,
``image erase``, ``image test HASH``, ``image confirm [HASH]``, ``stat [NAME]``, ``os info`` -
and the rules that keep that from undoing the gateway's work:

* **one conversation at a time**: when the daemon runs (its control socket answers) the
  command goes to it (``{"cmd": "device"}``, ``gateway.fleetops``) and runs inside
  ``Gateway.session(dev)``, i.e. under the same per-device lock as the daemon's own sessions;
  otherwise it runs directly, holding the state directory's lock (``gateway.statelock``) so a
  daemon cannot start under it. A daemon that holds the state directory but whose control
  socket is not reachable is refused, never raced.
* **operator intents are journalled first** (b/c of the trust rule): ``image test``,
  ``image confirm``, ``image erase`` and ``reset`` are written to the device's journal events
  and the ``fleet.sqlite`` audit before the request is sent, and their result after.
* ``image confirm HASH`` of an image the device does not run (its own image list, (b)) is
  refused unless ``--force``: confirming a non-running slot makes it permanent at the next
  boot, without a test boot. ``image confirm`` without a hash confirms the running image.
* ``reset`` goes through the maintenance-window gate of the gateway's configuration (c)
  unless ``--ignore-window``.
* ``image erase``, ``image test`` and ``image confirm`` (with or without a hash, also with
  ``--force``) are refused while the journal holds an update of that device open (the daemon
  would resume it - or has marked it for test and owns its health check and confirm: a
  confirm by hand would make its test image permanent without the health check).
* a command that came through the daemon carries its client's deadline: once the client has
  stopped waiting (the device was busy in a long session), nothing is sent - the operator was
  told the command failed, so it must not run later.

Every request is bounded by the device's ``timeouts.request_s``; answers are read as CBOR
maps of bounded size by ``SMPSession``.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any

import cbor2
from smp.image_management import ImageState

from gateway.config import DeviceConfig
from gateway.journal import Journal
from gateway.maintenance import MaintenancePolicy
from gateway.opstate import OpState
from gateway.smp.session import SMPSession

OP_READ, OP_WRITE = 0, 2
GROUP_OS, GROUP_IMG, GROUP_STAT = 0, 1, 2
# the operator's intents: journalled and audited before they are sent
INTENTS = ("reset", "image-test", "image-confirm", "image-erase")
OPS = ("echo", "reset", "image-list", "image-erase", "image-test", "image-confirm", "stat",
       "os-info")


class DeviceCommandRefused(Exception):
    """The command is refused (a safety rule); nothing was sent to the device."""


class _RawHeader:
    def __init__(self, op: int, group: int, seq: int, cmd: int) -> None:
        self.op, self.group_id, self.sequence, self.command_id = op, group, seq, cmd


class RawRequest:
    """An SMP v2 request of any group/command (for ``SMPSession.request(raw=True)``)."""

    def __init__(self, op: int, group: int, cmd: int, body: dict[str, Any], seq: int) -> None:
        payload = cbor2.dumps(body)
        self.header = _RawHeader(op, group, seq, cmd)
        self.BYTES = struct.pack("!BBHHBB", op | (1 << 3), 0, len(payload), group, seq,
                                 cmd) + payload


async def raw_request(session: SMPSession, op: int, group: int, cmd: int,
                      body: dict[str, Any] | None = None, timeout_s: float | None = None) -> Any:
    """One request; the answer's CBOR map (SMPError / SMPTimeout otherwise)."""
    return await session.request(lambda s: RawRequest(op, group, cmd, body or {}, s),
                                 timeout_s=timeout_s, raw=True)


def update_in_progress(journal: Journal, device_id: str) -> str | None:
    """The target hash of an update the journal holds open for the device (in progress, or
    failed after this gateway marked it for test: the next attempt resumes it)."""
    e = journal.get(device_id)
    if not e.target_hash:
        return None
    if e.outcome is None or (e.outcome == "failed" and e.tested_hash):
        return e.target_hash
    return None


def state_dicts(states: list[ImageState]) -> list[dict[str, Any]]:
    out = []
    for st in states:
        out.append({"image": st.image or 0, "slot": st.slot, "version": st.version,
                    "hash": bytes(st.hash).hex() if st.hash else None,
                    **{f: bool(getattr(st, f)) for f in ("bootable", "pending", "confirmed",
                                                          "active", "permanent")}})
    return out


def parse_state_dicts(obj: Any) -> list[ImageState]:
    """``state_dicts`` back (an answer through the control socket: outside input, typed
    here); ValueError when anything has another shape."""
    if not isinstance(obj, list) or len(obj) > 64:
        raise ValueError("images: not a list of slots")
    out = []
    for i in obj:
        if not isinstance(i, dict):
            raise ValueError("images: a slot is not an object")
        num = {k: i.get(k) for k in ("image", "slot")}
        if any(not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 256
               for v in num.values()):
            raise ValueError("images: image/slot not small integers")
        flags = {f: i.get(f) for f in ("bootable", "pending", "confirmed", "active", "permanent")}
        if any(not isinstance(v, bool) for v in flags.values()):
            raise ValueError("images: flags not booleans")
        version, h = i.get("version"), i.get("hash")
        if not isinstance(version, str) or len(version) > 64:
            raise ValueError("images: version not a string")
        if h is not None and (not isinstance(h, str) or len(h) > 128):
            raise ValueError("images: hash not a hex string")
        out.append(ImageState(image=num["image"], slot=num["slot"], version=version,
                              hash=bytes.fromhex(h) if h else None, **flags))
    return out


@dataclass
class DeviceCommand:
    op: str
    arg: str | None = None  # echo text, image hash, stat name, os info format
    slot: int | None = None
    force: bool = False
    ignore_window: bool = False

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> DeviceCommand:
        op = str(req.get("op") or "")
        if op not in OPS:
            raise DeviceCommandRefused(f"unknown device command {op!r} ({', '.join(OPS)})")
        arg = req.get("arg")
        slot = req.get("slot")
        if arg is not None and (not isinstance(arg, str) or len(arg) > 256):
            raise DeviceCommandRefused("bad argument")
        if slot is not None and (not isinstance(slot, int) or isinstance(slot, bool)
                                 or not 0 <= slot <= 15):
            raise DeviceCommandRefused("bad slot")
        return cls(op, arg, slot, bool(req.get("force")), bool(req.get("ignore_window")))

    def to_request(self, device_id: str) -> dict[str, Any]:
        return {"cmd": "device", "device": device_id, "op": self.op, "arg": self.arg,
                "slot": self.slot, "force": self.force, "ignore_window": self.ignore_window}

    def describe(self) -> str:
        return " ".join(x for x in (self.op, self.arg, f"slot={self.slot}" if self.slot is not None
                                    else None, "--force" if self.force else None,
                                    "--ignore-window" if self.ignore_window else None) if x)


def _hash(arg: str | None) -> bytes:
    try:
        h = bytes.fromhex(arg or "")
    except ValueError:
        h = b""
    if len(h) not in (32, 48, 64):
        raise DeviceCommandRefused(f"give the image hash in hex (32, 48 or 64 bytes), got {arg!r}")
    return h


async def run(dev: DeviceConfig, session: SMPSession, cmd: DeviceCommand, journal: Journal,
              ops: OpState, maint: MaintenancePolicy, actor: str,
              deadline: float | None = None) -> dict[str, Any]:
    """Run ``cmd`` on the open ``session`` (the caller holds the device's lock). ``deadline``
    (wall clock): when the client stops waiting for the answer; nothing is sent after it."""
    t = dev.timeouts.request_s

    def in_time(what: str) -> None:
        # room for one request before the client gives up; else the operator would be told
        # "failed" while the device does it
        if deadline is not None and time.time() + t > deadline:
            raise DeviceCommandRefused(f"{cmd.op} not sent: the device was busy until after the "
                                       f"client's deadline ({what})")

    in_time("before the first request")
    if cmd.op == "echo":
        return {"echo": await session.echo(cmd.arg or "ping", timeout_s=t)}
    if cmd.op == "image-list":
        return {"images": state_dicts(await session.image_state(timeout_s=t))}
    if cmd.op == "stat":
        if cmd.arg:
            return {"stat": await raw_request(session, OP_READ, GROUP_STAT, 0, {"name": cmd.arg},
                                              timeout_s=t)}
        return {"stat": await raw_request(session, OP_READ, GROUP_STAT, 1, {}, timeout_s=t)}
    if cmd.op == "os-info":
        body = await raw_request(session, OP_READ, GROUP_OS, 7, {"format": cmd.arg or "a"},
                                 timeout_s=t)
        return {"os_info": body.get("output") if isinstance(body, dict) else body}

    # -- the operator's intents: checked, journalled and audited before they are sent -------
    hash_: bytes | None = None
    if cmd.op == "reset" and not cmd.ignore_window and not maint.reset_allowed(dev):
        raise DeviceCommandRefused(f"reset refused: {maint.describe(dev)} (--ignore-window to "
                                   "reset anyway)")
    if cmd.op in ("image-erase", "image-test", "image-confirm"):
        # (c)+(b): the journal says this gateway owns the device's update (a test boot it
        # started is health-checked and confirmed by it alone); --force does not override
        open_ = update_in_progress(journal, dev.id)
        if open_ is not None:
            raise DeviceCommandRefused(f"{cmd.op.split('-')[1]} refused: the gateway has an update "
                                       f"of {dev.id} in progress (image {open_[:16]}); cancel it "
                                       "first (smp-gateway ctl cancel) or wait for it to finish")
    if cmd.op == "image-test":
        hash_ = _hash(cmd.arg)
    if cmd.op == "image-confirm" and cmd.arg:
        hash_ = _hash(cmd.arg)
        states = await session.image_state(timeout_s=t)  # (b): what the device itself runs
        running = next((st for st in states if st.active and (st.image or 0) == dev.image), None)
        if (running is None or bytes(running.hash or b"") != hash_) and not cmd.force:
            raise DeviceCommandRefused(
                f"confirm refused: {hash_.hex()[:16]} is not the running image "
                f"({bytes(running.hash).hex()[:16] if running and running.hash else 'none'}); "
                "confirming another slot installs it permanently at the next boot without a test "
                "boot (--force to do it anyway)")
    in_time("before sending")
    what = f"operator device {cmd.describe()} by {actor}"
    journal.put(journal.get(dev.id), f"{what}: sending")
    ops.audit(actor, f"device {cmd.op}", dev.id, cmd.describe())
    try:
        result: dict[str, Any]
        if cmd.op == "reset":
            result = {"reset_acknowledged": await session.reset(timeout_s=t)}
        elif cmd.op == "image-erase":
            await session.image_erase(cmd.slot)
            result = {"erased": True, "slot": cmd.slot}
        elif cmd.op == "image-test":
            assert hash_ is not None
            result = {"images": state_dicts(await session.image_test(hash_, retries=0))}
        else:  # image-confirm
            result = {"images": state_dicts(await session.image_confirm(hash_, retries=0))}
    except Exception as exc:
        journal.put(journal.get(dev.id), f"{what}: failed: {type(exc).__name__}: {exc}")
        raise
    journal.put(journal.get(dev.id), f"{what}: done")
    return result

"""``smp-gateway probe``: what discovery would learn from one device, and the config for it.

Owns connecting to one device given on the command line (``--serial PATH``, ``--udp
HOST[:PORT]``, ``--ble NAME|ADDR``), reading it the way discovery does (``gateway.discovery.
identify``: image list, MCUmgr parameters, bootloader mode, os info; never a write) and
printing: identity, MCUmgr parameters, bootloader mode, slots (version, hash, flags), the
chunk size and window an upload would start with and why, and a ``devices:`` entry and a
``device_templates:`` entry to paste into ``gateway.yaml``. With ``-v`` every SMP exchange is
logged (``SMPSession.request``: op, group, command, sequence, sizes, round-trip time).

What the stanza says rests on what the device reported (b); where probe had to guess (the
bootloader mode of a firmware without bootloader info, the slot size no Zephyr 3.4 firmware
reports) the key is written commented out with the reason, so a guess never becomes
configuration (c) unseen. On a serial port it also sends one read-only echo of the size the
upload would start with: a frame that large that gets no answer while a 256-byte one does is
SMP inside the Zephyr shell (``smp_shell.c``, ``CONFIG_MCUMGR_TRANSPORT_SHELL_MTU`` = 256),
expressed in the config as the serial transport's ``mtu: 256``.

Every failure is one line on stderr, no traceback: exit 2 for what the operator gave or the
machine lacks (a malformed address, a serial port that does not exist or is busy, a host
name that does not resolve, BlueZ not reachable), 1 for a device that does not answer.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError
from smpclient.requests.os_management import EchoWrite

from gateway.bootmodes.modes import MODE_NAMES
from gateway.config import BleTransport
from gateway.discovery.identify import DeviceFacts, identify
from gateway.smp.ble import BleError, BleLink, BleUnavailable
from gateway.smp.session import SMPError, SMPSession, SMPTimeout
from gateway.smp.transport import SerialTransport, Transport, TransportError, UdpTransport
from gateway.smp.tuning import kconfig_netbuf
from gateway.smp.upload import upload_plan

_BD_ADDR = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SHELL_MTU = 256  # CONFIG_MCUMGR_TRANSPORT_SHELL_MTU default (smp_shell.c)


class ProbeError(Exception):
    """One line for stderr and the exit code (2: usage/environment, 1: the device)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Target:
    kind: str
    transport: dict[str, Any]
    error: str | None = None  # a malformed command line, reported by run_probe (exit 2)


def target(serial: str | None, udp: str | None, ble: str | None, *, baud: int = 115200,
           adapter: str | None = None, backend: str = "bleak", hci: str | None = None) -> Target:
    if serial:
        t: dict[str, Any] = {"kind": "serial", "port": serial}
        if baud != 115200:
            t["baud"] = baud
        return Target("serial", t, None if baud > 0 else f"--baud {baud}: must be positive")
    if udp:
        host, _, port = udp.rpartition(":") if udp.count(":") == 1 else (udp, "", "")
        if udp.startswith("["):  # [v6]:port
            host, _, port = udp[1:].partition("]:")
        t = {"kind": "udp", "host": host or udp}
        if port:
            if not port.isdigit() or not 0 < int(port) < 65536:
                return Target("udp", t, f"--udp {udp}: the port must be a number 1-65535 "
                                        "(HOST[:PORT], [IPv6]:PORT)")
            t["port"] = int(port)
        return Target("udp", t)
    assert ble
    t = {"kind": "ble", "backend": backend}
    if adapter:  # else the backend's own: hci0 (bleak), the --hci transport (bumble)
        t["adapter"] = adapter
    t["address" if _BD_ADDR.match(ble) else "name"] = ble
    if hci:
        t["hci"] = hci
    return Target("ble", t)


def make_link(tg: Target) -> Transport:
    t = tg.transport
    if tg.kind == "serial":
        return SerialTransport(t["port"], int(t.get("baud", 115200)), mtu=t.get("mtu"))
    if tg.kind == "udp":
        return UdpTransport(t["host"], int(t.get("port", 1337)))
    return BleLink(BleTransport.model_validate(t))


def no_answer_hint(tg: Target) -> str:
    """What to check when the device does not answer, for the transport in use."""
    if tg.kind == "udp":
        return ("check that the device is powered and on the network, that HOST:PORT is its SMP "
                "UDP server (CONFIG_MCUMGR_TRANSPORT_UDP, port 1337 by default) and that no "
                "firewall drops UDP")
    if tg.kind == "serial":
        return ("check the baud rate (--baud) and that the firmware runs an MCUmgr serial "
                "transport on this port: the UART transport (CONFIG_MCUMGR_TRANSPORT_UART) or "
                "SMP in the shell (CONFIG_MCUMGR_TRANSPORT_SHELL)")
    return ("the device connected but does not answer on the SMP characteristic: check that "
            "the firmware enables the MCUmgr Bluetooth transport (CONFIG_MCUMGR_TRANSPORT_BT)")


async def upload_start(session: SMPSession) -> dict[str, Any]:
    """The chunk size and window an upload would start with, and why (the upload's own
    policy, ``gateway.smp.upload.upload_plan`` / ``gateway.smp.tuning.plan_upload``; no
    remembered tuning: what a first upload to this device would do)."""
    plan = await upload_plan(session)
    return {"packet_limit": plan.packet, "chunk_data": plan.chunk, "window": plan.window,
            "window_may_grow_to": plan.grow_limit, "ladder": list(plan.ladder),
            "source": plan.source, "why": plan.reason.split("; ")}


async def shell_check(session: SMPSession, packet: int, timeout_s: float) -> str | None:
    """Serial: does a frame of the upload's first size get through? One read-only echo of
    ``packet`` bytes; if it gets no answer but a ``SHELL_MTU``-byte one does, the device drops
    frames above the shell transport's MTU (what the device shows, (b)): the note to print.
    None when the large frame was answered (any answer, an error too, proves it arrived) or
    nothing can be concluded."""
    if packet <= SHELL_MTU:
        return None

    async def echo(size: int) -> bool:
        text = "x" * max(1, size - 8 - 6)  # header 8 + map head, "d" key, text head (<= 6)
        try:
            await session.request(lambda q: EchoWrite(d=text, sequence=q), timeout_s=timeout_s)
        except SMPTimeout:
            return False
        except SMPError:
            pass
        return True

    if await echo(packet):
        return None
    if not await echo(SHELL_MTU):
        return None  # long frames are lost on this link: the upload steps down by itself
    return (f"a {packet}-byte frame got no answer while a {SHELL_MTU}-byte one did: SMP "
            f"probably runs in the Zephyr shell (smp_shell.c, CONFIG_MCUMGR_TRANSPORT_SHELL_MTU "
            f"{SHELL_MTU}); uploads are capped with the serial transport's mtu: {SHELL_MTU}")


def recovery_answers(facts: DeviceFacts) -> bool:
    """No slot flagged active (an empty list, or MCUboot's serial recovery's flagless one): what
    the engine takes for serial recovery (``gateway.bootmodes.recovery.in_serial_recovery``)."""
    return not any("active" in s.flags for s in facts.slots)


def guesses(facts: DeviceFacts) -> dict[str, tuple[Any, str]]:
    """Config keys probe cannot read from the device: key -> (suggested value or None, why).
    Written commented out: a guess is never configuration until the operator checks it."""
    out: dict[str, tuple[Any, str]] = {
        "slot_size": (None, "not reported by the device: the size in bytes of its secondary "
                            "slot (slot1_partition in the board's devicetree); images larger "
                            "are refused before upload"),
    }
    if recovery_answers(facts):
        out["mcuboot_mode"] = ("single-app", "no image listed as active: the device answers "
                               "like MCUboot's serial recovery; to let run update it through "
                               "recovery also set recovery: {enabled: true, entry: present}")
    elif facts.mcuboot_mode not in MODE_NAMES:  # not answered, -1, a number without a name
        out["mcuboot_mode"] = ("swap-using-scratch", "GUESS: the device does not report its "
                               "bootloader mode (bootloader info); run assumes a swap mode - "
                               "set the mode your MCUboot is built with")
    return out


def stanzas(tg: Target, facts: DeviceFacts, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    keys = facts.keys()
    hardware = keys.get("board", "CHANGE-ME")
    dev_id = keys.get("hwid") or keys.get("node") or name
    device = {"id": re.sub(r"[^A-Za-z0-9_.:@-]", "_", dev_id), "hardware": hardware,
              "transport": tg.transport}
    match: dict[str, Any] = {"transport": tg.kind}
    if "board" in keys:
        match["board"] = keys["board"]
    rules = [r for r in ("{hwid}", "{node}") if r[1:-1] in keys]
    if tg.kind == "serial":
        rules.append("{usb_serial}")
    elif tg.kind == "udp":
        rules.append("{host}")
    template: dict[str, Any] = {"name": hardware if "board" in keys else "my-devices", "match": match,
                                "id": rules or ["{port}"]}
    if "board" not in keys:
        template["hardware"] = hardware
    opts = {k: v for k, v in tg.transport.items() if k not in ("kind", "port", "host", "name",
                                                                "address")}
    if opts:
        template[tg.kind] = opts
    if "mcuboot_mode" not in guesses(facts) and facts.mcuboot_mode:
        # reported by the device itself (bootloader info): the config only restates it
        device["mcuboot_mode"] = template["mcuboot_mode"] = facts.mcuboot_mode
    return device, template


def _commented(text: str, facts: DeviceFacts, shell_note: str | None) -> str:
    """The YAML of one stanza with the reason of each value probe did not read, and the keys
    it had to guess commented out."""
    lines = text.rstrip().splitlines()
    out = []
    for line in lines:
        if re.match(r"^\s*mcuboot_mode: ", line):
            line += "  # reported by the device (bootloader info)"
        elif shell_note and re.match(r"^\s*mtu: 256$", line):
            line += "  # the shell transport's MTU (CONFIG_MCUMGR_TRANSPORT_SHELL_MTU)"
        out.append(line)
    for key, (value, why) in guesses(facts).items():  # at the entry's keys' indentation
        shown = "N" if value is None else value
        out.append(f"  # {key}: {shown}  # {why}")
    return "\n".join(out)


async def run_probe(tg: Target, *, timeout_s: float = 3.0, hwid_format: str | None = None,
                    as_json: bool = False) -> int:
    try:
        return await _probe(tg, timeout_s=timeout_s, hwid_format=hwid_format, as_json=as_json)
    except ProbeError as exc:
        print(f"smp-gateway: probe: {exc}", file=sys.stderr)
        return exc.code


async def _open(tg: Target, timeout_s: float) -> SMPSession:
    """The session, open; ProbeError (2) for what the operator gave or the machine lacks,
    (1) for a BLE device that is not there."""
    if tg.error:
        raise ProbeError(tg.error, EXIT_USAGE)
    try:
        link = make_link(tg)
    except ValidationError as exc:
        why = "; ".join(str(e.get("msg")) for e in exc.errors())
        raise ProbeError(f"--ble: {why}", EXIT_USAGE) from None
    session = SMPSession(link, device_id=f"probe:{getattr(link, 'address', '?')}",
                         timeout_s=timeout_s)
    try:
        await session.open()
    except BleUnavailable as exc:
        text = str(exc).removeprefix("BLE needs BlueZ over D-Bus: ")
        if tg.transport.get("backend") == "bleak" and str(exc) != text:
            raise ProbeError(f"BlueZ not reachable over D-Bus: {text}; use --backend bumble "
                             "--hci usb:0 (or another HCI transport) to drive a controller "
                             "without BlueZ", EXIT_USAGE) from None
        raise ProbeError(str(exc), EXIT_USAGE) from None
    except BleError as exc:
        raise ProbeError(str(exc), EXIT_FAILED) from None
    except TransportError as exc:  # no such port, busy, no permission, unresolvable host
        raise ProbeError(str(exc), EXIT_USAGE) from None
    except OSError as exc:
        raise ProbeError(f"cannot open {tg.kind} {getattr(link, 'address', '')}: {exc}",
                         EXIT_USAGE) from None
    return session


async def _probe(tg: Target, *, timeout_s: float, hwid_format: str | None,
                 as_json: bool) -> int:
    session = await _open(tg, timeout_s)
    link = session.transport
    address = getattr(link, "address", "")
    shell_note = None
    try:
        facts = await identify(session, timeout_s=timeout_s, hwid_format=hwid_format)
        start = await upload_start(session)
        if isinstance(link, SerialTransport) and link.mtu is None:
            shell_note = await shell_check(session, start["packet_limit"], timeout_s)
            if shell_note:
                link.mtu = SHELL_MTU
                tg.transport["mtu"] = SHELL_MTU
                start = await upload_start(session)
    except SMPTimeout:
        raise ProbeError(f"no answer from {tg.kind} {address} within {timeout_s:g}s: "
                         f"{no_answer_hint(tg)}", EXIT_FAILED) from None
    except (SMPError, TransportError) as exc:  # BleError included
        raise ProbeError(f"{tg.kind} {address}: {exc}", EXIT_FAILED) from None
    finally:
        await session.close()
    p = facts.params
    if p is not None and not p.reported:
        start["assumed_netbuf"] = kconfig_netbuf(tg.kind)
    device, template = stanzas(tg, facts, "device-1")
    notes = {k: {"suggested": v, "why": why} for k, (v, why) in guesses(facts).items()}
    if recovery_answers(facts):
        run_will = ("run does not update this device: with no image listed as active it "
                    "answers like MCUboot's serial recovery, which the normal update refuses (it overwrites "
                    "the running image, no fallback); to allow it set mcuboot_mode: single-app "
                    "and recovery: {enabled: true, entry: present} in its device config")
    else:
        run_will = None
    out = {"transport": tg.transport, "identity": facts.keys(), "facts": facts.to_dict(),
           "upload_start": start, "devices_entry": device, "template_entry": template,
           "not_read": notes, "shell": shell_note, "run": run_will}
    if as_json:
        print(json.dumps(out, indent=2, default=str))
        return EXIT_OK
    print(f"device at {tg.kind} {address}")
    print(f"  node name : {facts.node or '(no os info)'}")
    print(f"  board     : {facts.board or '(no os info)'}")
    if hwid_format:
        print(f"  hardware id: {facts.hwid or '(not answered)'}")
    if p is None:
        print("  MCUmgr    : ?")
    elif p.reported:
        print(f"  MCUmgr    : buf_size {p.buf_size} buf_count {p.buf_count}")
    else:  # what the upload will really assume (gateway.smp.tuning.plan_upload)
        print(f"  MCUmgr    : parameters not reported: the upload assumes netbufs of "
              f"{start['assumed_netbuf']} bytes (Kconfig default for {tg.kind}), window "
              f"{start['window']} growing to at most {start['window_may_grow_to']}")
    print(f"  bootloader: {facts.mcuboot_mode or '(no bootloader info)'}"
          + (" no-downgrade" if facts.bootloader and facts.bootloader.no_downgrade else ""))
    print("  slots:")
    for s in facts.slots or []:
        print(f"    image {s.image} slot {s.slot}: {s.version:<12} {(s.hash or '-')[:16]}  "
              f"{','.join(s.flags)}")
    if not facts.slots:
        print("    (none listed)")
    if run_will:
        print(f"  note: {run_will}")
    if shell_note:
        print(f"  note: {shell_note}")
    print(f"  upload would start with {start['chunk_data']}-byte chunks, window {start['window']}:")
    for w in start["why"]:
        print(f"    - {w}")
    for k, v in facts.errors.items():
        print(f"  note: {k}: {v}")
    print("\n# devices: entry")
    print(_commented(yaml.safe_dump({"devices": [device]}, sort_keys=False), facts, shell_note))
    print("\n# or a device_templates: entry (with a discovery: section)")
    print(_commented(yaml.safe_dump({"device_templates": [template]}, sort_keys=False), facts,
                     shell_note))
    return EXIT_OK


def main_probe(tg: Target, **kw: Any) -> int:
    return asyncio.run(run_probe(tg, **kw))

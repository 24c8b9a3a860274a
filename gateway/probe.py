"""``smp-gateway probe``: what discovery would learn from one device, and the config for it.

Owns connecting to one device given on the command line (``--serial PATH``, ``--udp
HOST[:PORT]``, ``--ble NAME|ADDR``), reading it the way discovery does (``gateway.discovery.
identify``: image list, MCUmgr parameters, bootloader mode, os info; never a write) and
printing: identity, MCUmgr parameters, bootloader mode, slots (version, hash, flags), the
chunk size and window an upload would start with and why, and a ``devices:`` entry and a
``device_templates:`` entry to paste into ``gateway.yaml``. With ``-v`` every SMP exchange is
logged (``SMPSession.request``: op, group, command, sequence, sizes, round-trip time).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

from gateway.config import BleTransport
from gateway.discovery.identify import DeviceFacts, identify
from gateway.smp.session import SMPSession
from gateway.smp.transport import SerialTransport, Transport, UdpTransport

_BD_ADDR = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")


@dataclass
class Target:
    kind: str
    transport: dict[str, Any]


def target(serial: str | None, udp: str | None, ble: str | None, *, baud: int = 115200,
           adapter: str = "hci0", backend: str = "bleak", hci: str | None = None) -> Target:
    if serial:
        t: dict[str, Any] = {"kind": "serial", "port": serial}
        if baud != 115200:
            t["baud"] = baud
        return Target("serial", t)
    if udp:
        host, _, port = udp.rpartition(":") if udp.count(":") == 1 else (udp, "", "")
        if udp.startswith("["):  # [v6]:port
            host, _, port = udp[1:].partition("]:")
        t = {"kind": "udp", "host": host or udp}
        if port:
            t["port"] = int(port)
        return Target("udp", t)
    assert ble
    t = {"kind": "ble", "adapter": adapter, "backend": backend}
    t["address" if _BD_ADDR.match(ble) else "name"] = ble
    if hci:
        t["hci"] = hci
    return Target("ble", t)


def make_link(tg: Target) -> Transport:
    t = tg.transport
    if tg.kind == "serial":
        return SerialTransport(t["port"], int(t.get("baud", 115200)))
    if tg.kind == "udp":
        return UdpTransport(t["host"], int(t.get("port", 1337)))
    from gateway.smp.ble import BleLink

    return BleLink(BleTransport.model_validate(t))


async def upload_start(session: SMPSession) -> dict[str, Any]:
    """The chunk size and window an upload would start with, and why (the upload's own
    policy, ``gateway.smp.upload.upload_plan`` / ``gateway.smp.tuning.plan_upload``; no
    remembered tuning: what a first upload to this device would do)."""
    from gateway.smp.upload import upload_plan

    plan = await upload_plan(session)
    return {"packet_limit": plan.packet, "chunk_data": plan.chunk, "window": plan.window,
            "window_may_grow_to": plan.grow_limit, "ladder": list(plan.ladder),
            "source": plan.source, "why": plan.reason.split("; ")}


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
    return device, template


async def run_probe(tg: Target, *, timeout_s: float = 3.0, hwid_format: str | None = None,
                    as_json: bool = False) -> int:
    link = make_link(tg)
    async with SMPSession(link, device_id=f"probe:{link.address if hasattr(link, 'address') else '?'}",
                          timeout_s=timeout_s) as session:
        facts = await identify(session, timeout_s=timeout_s, hwid_format=hwid_format)
        start = await upload_start(session)
    device, template = stanzas(tg, facts, "device-1")
    out = {"transport": tg.transport, "identity": facts.keys(), "facts": facts.to_dict(),
           "upload_start": start, "devices_entry": device, "template_entry": template}
    if as_json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    p = facts.params
    print(f"device at {tg.kind} {link.address if hasattr(link, 'address') else ''}")
    print(f"  node name : {facts.node or '(no os info)'}")
    print(f"  board     : {facts.board or '(no os info)'}")
    if hwid_format:
        print(f"  hardware id: {facts.hwid or '(not answered)'}")
    print(f"  MCUmgr    : buf_size {p.buf_size} buf_count {p.buf_count}"
          + ("" if p and p.reported else " (not reported: defaults)") if p else "  MCUmgr    : ?")
    print(f"  bootloader: {facts.mcuboot_mode or '(no bootloader info)'}"
          + (" no-downgrade" if facts.bootloader and facts.bootloader.no_downgrade else ""))
    print("  slots:")
    for s in facts.slots or []:
        print(f"    image {s.image} slot {s.slot}: {s.version:<12} {(s.hash or '-')[:16]}  "
              f"{','.join(s.flags)}")
    if not facts.slots:
        print("    (none listed)")
    print(f"  upload would start with {start['chunk_data']}-byte chunks, window {start['window']}:")
    for w in start["why"]:
        print(f"    - {w}")
    for k, v in facts.errors.items():
        print(f"  note: {k}: {v}")
    print("\n# devices: entry")
    print(yaml.safe_dump({"devices": [device]}, sort_keys=False).rstrip())
    print("\n# or a device_templates: entry (with a discovery: section)")
    print(yaml.safe_dump({"device_templates": [template]}, sort_keys=False).rstrip())
    return 0


def main_probe(tg: Target, **kw: Any) -> int:
    return asyncio.run(run_probe(tg, **kw))

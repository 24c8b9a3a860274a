"""Device templates: match a found device, name it, and give it its settings.

Owns turning (candidate, facts) into a ``DeviceConfig`` through ``device_templates:`` — the
first template whose every ``match`` rule holds wins — and the device-id rule: a list of
``str.format`` patterns over the keys below; the first whose keys are all known (and not
``unknown``) names the device. Characters a device id may not hold become ``_``.

Keys: ``node``, ``board``, ``hwid`` (reported by the device), ``usb_serial``, ``usb_vid``,
``usb_pid``, ``by_id``, ``port`` (basename of the serial path), ``host``, ``udp_port``,
``ble_address``, ``ble_name`` (seen by the scan), ``template`` (the template's name).

Rules on the scan's own attributes (path, by-id name, USB ids, host, BLE name) can be checked
before the device is opened (``prematch``): a serial port that no template could match is
never written to.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import string
from typing import Any

from gateway.config import DeviceConfig, DeviceTemplate, TemplateMatch, template_device_dict
from gateway.discovery.candidates import Candidate
from gateway.discovery.identify import UNKNOWN_VALUES, DeviceFacts

_ID_BAD = re.compile(r"[^A-Za-z0-9_.:@-]")


class RuleError(ValueError):
    """No id rule of the template could be filled from what is known of the device."""


def _glob(pattern: str | None, value: str | None) -> bool:
    if pattern is None:
        return True
    return value is not None and fnmatch.fnmatchcase(value, pattern)


def _host_ok(pattern: str | None, host: str | None) -> bool:
    if pattern is None:
        return True
    if host is None:
        return False
    if "/" in pattern:
        try:
            return ipaddress.ip_address(host) in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    return fnmatch.fnmatchcase(host, pattern)


def prematch(m: TemplateMatch, cand: Candidate) -> bool:
    """The rules that need no conversation with the device."""
    a = cand.attrs
    if m.transport is not None and m.transport != cand.kind:
        return False
    if m.path is not None and not (_glob(m.path, a.get("path")) or _glob(m.path, a.get("tty"))):
        return False
    if not _glob(m.by_id, a.get("by_id")):
        return False
    if m.usb_vid_pid is not None:
        vid, pid = a.get("usb_vid", "").lower(), a.get("usb_pid", "").lower()
        if not vid or not any(r == f"{vid}:{pid}" or r == f"{vid}:*" for r in m.usb_vid_pid):
            return False
    if not _glob(m.usb_serial, a.get("usb_serial")):
        return False
    if not _host_ok(m.host, a.get("host")):
        return False
    return _glob(m.ble_name, a.get("ble_name"))


def full_match(m: TemplateMatch, cand: Candidate, facts: DeviceFacts) -> bool:
    if not prematch(m, cand):
        return False
    return (_glob(m.board, facts.board) and _glob(m.node, facts.node)
            and _glob(m.hwid, facts.hwid))


def keys_of(t: DeviceTemplate, cand: Candidate, facts: DeviceFacts) -> dict[str, str]:
    keys = {k: v for k, v in cand.attrs.items() if v and v.lower() not in UNKNOWN_VALUES}
    keys.update(facts.keys())
    keys["template"] = t.name
    return keys


def render(rule: str, keys: dict[str, str]) -> str | None:
    """``rule`` filled from ``keys``; None when a key it names is unknown."""
    names = [f for _, f, _, _ in string.Formatter().parse(rule) if f is not None]
    if any(n not in keys for n in names):
        return None
    try:
        text = rule.format(**keys)
    except (KeyError, IndexError, ValueError):
        return None
    text = _ID_BAD.sub("_", text).strip("_")
    return text or None


def device_id(t: DeviceTemplate, keys: dict[str, str]) -> str:
    for rule in t.id_rules:
        got = render(rule, keys)
        if got is not None:
            return got
    raise RuleError(f"template {t.name}: none of the id rules {t.id_rules} can be filled from "
                    f"what is known of the device ({', '.join(sorted(keys)) or 'nothing'})")


def pick(templates: list[DeviceTemplate], cand: Candidate,
         facts: DeviceFacts | None = None) -> DeviceTemplate | None:
    """The first template that matches (before identification: by ``prematch`` only)."""
    for t in templates:
        if (facts is None and prematch(t.match, cand)) or (
                facts is not None and full_match(t.match, cand, facts)):
            return t
    return None


def build_device(t: DeviceTemplate, cand: Candidate, facts: DeviceFacts,
                 device_id_override: str | None = None) -> DeviceConfig:
    """The ``DeviceConfig`` of a matched device. RuleError / ValueError when it cannot be made."""
    keys = keys_of(t, cand, facts)
    dev_id = device_id_override or device_id(t, keys)
    group = None
    if t.group is not None:
        group = render(t.group, keys)
        if group is None:
            raise RuleError(f"template {t.name}: group rule {t.group!r} needs keys the device "
                            "did not provide")
    hardware = keys.get("board")
    if t.hardware is None and hardware is None:
        raise RuleError(f"template {t.name}: no hardware: set 'hardware' in the template (the "
                        "device does not report its board: no os info)")
    data: dict[str, Any] = template_device_dict(t, cand.kind, cand.transport, dev_id, hardware, group)
    return DeviceConfig.model_validate(data)

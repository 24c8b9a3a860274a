"""LwM2M content formats: TLV, SenML JSON, SenML CBOR, plain text, link format.

Written by hand where aiocoap has nothing: aiocoap knows CoAP and its content-format numbers
but not LwM2M's TLV (OMA-TS-LightweightM2M-V1_0 section 6.4.3) nor the LwM2M use of SenML
(V1_1 section 7.4.4/7.4.5, RFC 8428). SenML CBOR uses cbor2 (already a dependency).

Every decoder is bounded: it reads only the bytes given (the CoAP payload, itself bounded by
the transport), nests at most two levels (a multiple resource inside an instance), and
raises ``ValueError`` on anything malformed - the caller answers 4.00 Bad Request.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Any

import cbor2

CT_TEXT = 0
CT_LINK = 40
CT_OPAQUE = 42
CT_CBOR = 60
CT_SENML_JSON = 110
CT_SENML_CBOR = 112
CT_TLV = 11542
CT_LWM2M_JSON = 11543

# TLV identifier types (bits 7-6 of the type byte)
_T_INSTANCE, _T_RES_INSTANCE, _T_MULTI, _T_RESOURCE = 0, 1, 2, 3
MAX_ITEMS = 256  # TLV entries / SenML records taken from one payload


Value = int | str | bool | bytes | None


@dataclass(frozen=True)
class Item:
    """One resource value: ``rid`` and, for a multiple resource, ``riid``."""

    rid: int
    value: Value
    riid: int | None = None


# -- values -----------------------------------------------------------------------------------
def _int_bytes(v: int) -> bytes:
    for size, fmt in ((1, ">b"), (2, ">h"), (4, ">i"), (8, ">q")):
        if -(1 << (8 * size - 1)) <= v < (1 << (8 * size - 1)):
            return struct.pack(fmt, v)
    raise ValueError(f"integer {v} does not fit 64 bits")


def value_bytes(v: Value) -> bytes:
    if v is None:
        return b""
    if isinstance(v, bool):
        return b"\x01" if v else b"\x00"
    if isinstance(v, int):
        return _int_bytes(v)
    if isinstance(v, str):
        return v.encode()
    return bytes(v)


def text(v: Value) -> bytes:
    """A single resource as text/plain (LwM2M: numbers in decimal, booleans 0/1)."""
    if v is None:
        return b""
    if isinstance(v, bool):
        return b"1" if v else b"0"
    if isinstance(v, bytes):
        return base64.b64encode(v)
    return str(v).encode()


# -- TLV --------------------------------------------------------------------------------------
def _tlv(kind: int, ident: int, payload: bytes) -> bytes:
    t = kind << 6
    head = b""
    if ident > 0xFF:
        t |= 0x20
        head += struct.pack(">H", ident)
    else:
        head += bytes([ident])
    n = len(payload)
    if n < 8:
        t |= n
        ln = b""
    elif n < 0x100:
        t |= 0x08
        ln = bytes([n])
    elif n < 0x10000:
        t |= 0x10
        ln = struct.pack(">H", n)
    else:
        t |= 0x18
        ln = struct.pack(">I", n)[1:]
    return bytes([t]) + head + ln + payload


def tlv_resources(items: list[Item]) -> bytes:
    """Resources of one instance: single values, and multiple resources grouped by rid."""
    out = b""
    multi: dict[int, list[Item]] = {}
    order: list[int] = []
    for it in items:
        if it.riid is None:
            out += _tlv(_T_RESOURCE, it.rid, value_bytes(it.value))
        else:
            if it.rid not in multi:
                multi[it.rid] = []
                order.append(it.rid)
            multi[it.rid].append(it)
    for rid in order:
        inner = b"".join(_tlv(_T_RES_INSTANCE, i.riid or 0, value_bytes(i.value)) for i in multi[rid])
        out += _tlv(_T_MULTI, rid, inner)
    return out


def tlv_instances(instances: dict[int, list[Item]]) -> bytes:
    return b"".join(_tlv(_T_INSTANCE, iid, tlv_resources(items)) for iid, items in instances.items())


def tlv_entries(data: bytes) -> list[tuple[int, int, bytes]]:
    """(kind, id, value bytes) of each top-level TLV entry; ValueError if malformed."""
    out: list[tuple[int, int, bytes]] = []
    i = 0
    while i < len(data):
        if len(out) >= MAX_ITEMS:
            raise ValueError("too many TLV entries")
        t = data[i]
        i += 1
        kind = t >> 6
        if t & 0x20:
            if i + 2 > len(data):
                raise ValueError("truncated TLV identifier")
            ident = struct.unpack(">H", data[i:i + 2])[0]
            i += 2
        else:
            if i + 1 > len(data):
                raise ValueError("truncated TLV identifier")
            ident = data[i]
            i += 1
        lt = (t >> 3) & 3
        if lt == 0:
            n = t & 7
        else:
            if i + lt > len(data):
                raise ValueError("truncated TLV length")
            n = int.from_bytes(data[i:i + lt], "big")
            i += lt
        if i + n > len(data):
            raise ValueError("TLV value runs past the payload")
        out.append((kind, ident, data[i:i + n]))
        i += n
    return out


def tlv_decode(data: bytes, instance_level: bool) -> list[Item]:
    """A TLV write to one resource or one instance: (rid, raw bytes[, riid]) items. Values
    stay raw bytes; the object model decodes them by the resource's type (``from_raw``)."""
    items: list[Item] = []
    entries = tlv_entries(data)
    if instance_level and len(entries) == 1 and entries[0][0] == _T_INSTANCE:
        entries = tlv_entries(entries[0][2])  # an instance wrapper around its resources
    for kind, ident, val in entries:
        if kind == _T_RESOURCE:
            items.append(Item(ident, val))
        elif kind == _T_MULTI:
            for k2, i2, v2 in tlv_entries(val):
                if k2 != _T_RES_INSTANCE:
                    raise ValueError("a multiple resource holds something else than instances")
                items.append(Item(ident, v2, i2))
        else:
            raise ValueError(f"unexpected TLV entry type {kind}")
    return items


def from_raw(kind: str, raw: bytes) -> Value:
    """A TLV/opaque value as the resource's type."""
    if kind == "int":
        if len(raw) not in (1, 2, 4, 8):
            raise ValueError(f"integer of {len(raw)} bytes")
        return int.from_bytes(raw, "big", signed=True)
    if kind == "bool":
        if raw not in (b"\x00", b"\x01"):
            raise ValueError("boolean is not 0 or 1")
        return raw == b"\x01"
    if kind == "str":
        return raw.decode()
    return raw


def from_text(kind: str, raw: bytes) -> Value:
    s = raw.decode()
    if kind == "int":
        return int(s)
    if kind == "bool":
        if s not in ("0", "1"):
            raise ValueError("boolean is not 0 or 1")
        return s == "1"
    if kind == "str":
        return s
    return base64.b64decode(s, validate=True)


# -- SenML ------------------------------------------------------------------------------------
def _senml_records(base: str, items: list[tuple[str, Value]], cbor: bool) -> list[dict[Any, Any]]:
    recs: list[dict[Any, Any]] = []
    for n, v in items:
        r: dict[Any, Any] = {}
        if not recs:
            r["bn"] = base
        r["n"] = n
        if isinstance(v, bool):
            r["vb"] = v
        elif isinstance(v, int):
            r["v"] = v
        elif isinstance(v, bytes):
            r["vd"] = v if cbor else base64.urlsafe_b64encode(v).decode().rstrip("=")
        else:
            r["vs"] = "" if v is None else v
        recs.append(r)
    return recs


_CBOR_KEYS = {"bn": -2, "n": 0, "v": 2, "vs": 3, "vb": 4, "vd": 8}


def senml(base: str, items: list[tuple[str, Value]], cbor: bool = False) -> bytes:
    """Records named ``base`` + name (e.g. base "/5/0/", names "3", "8/0")."""
    recs = _senml_records(base, items, cbor)
    if cbor:
        return bytes(cbor2.dumps([{_CBOR_KEYS[k]: v for k, v in r.items()} for r in recs]))
    return json.dumps(recs, separators=(",", ":")).encode()


def senml_decode(data: bytes, cbor: bool) -> list[tuple[str, Value]]:
    """(full name, value) of each record; ValueError if malformed."""
    try:
        raw = cbor2.loads(data) if cbor else json.loads(data)
    except Exception as exc:
        raise ValueError(f"unreadable SenML: {exc}") from None
    if not isinstance(raw, list) or len(raw) > MAX_ITEMS:
        raise ValueError("SenML is not a (bounded) array")
    inv = {v: k for k, v in _CBOR_KEYS.items()}
    base = ""
    out: list[tuple[str, Value]] = []
    for rec in raw:
        if not isinstance(rec, dict):
            raise ValueError("SenML record is not a map")
        if cbor:
            rec = {inv.get(k, k): v for k, v in rec.items()}
        if isinstance(rec.get("bn"), str):
            base = rec["bn"]
        name = base + str(rec.get("n", ""))
        v: Value
        if "vs" in rec:
            v = str(rec["vs"])
        elif "vb" in rec:
            v = bool(rec["vb"])
        elif "v" in rec:
            if not isinstance(rec["v"], int | float) or isinstance(rec["v"], bool):
                raise ValueError("SenML v is not a number")
            v = int(rec["v"])
        elif "vd" in rec:
            d = rec["vd"]
            v = d if isinstance(d, bytes) else base64.urlsafe_b64decode(str(d) + "=" * (-len(str(d)) % 4))
        else:
            v = None
        out.append((name, v))
    return out

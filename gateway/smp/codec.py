"""Decoding SMP responses exactly as the device sent them: any well-formed CBOR, no re-encoding.

Owns the step from a received frame (header + CBOR body) to a typed ``smp`` response model.

Why not ``smp``'s own ``Response.load``/``loads``: ``load(header, dict)`` builds the model,
re-encodes it with ``cbor2.dumps(canonical=True)`` and compares that length with
``header.length``. Real Zephyr encodes with zcbor, which writes maps and arrays with
*indefinite* length (``bf … ff``, ``9f … ff``) unless built with ``CONFIG_ZCBOR_CANONICAL``, so
the same answer is a few bytes longer than its canonical form and every response of a stock
device was rejected ("header.length 24 != len(data_bytes) 22"). The models also forbid
unknown keys (``extra="forbid"``), and newer firmware adds keys (``rsn``, ``flags``...).

So here: cbor2 decodes what arrived (indefinite containers, non-minimal integer heads, any
key order); unknown keys are dropped, recursively for nested models (``images[]``); the model
is built with ``smp_data`` set to the received bytes, which makes ``smp`` skip its length
comparison. The length check that matters stays: the frame must hold at least
``header.length`` body bytes, and exactly those bytes are decoded.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import cbor2
from pydantic import BaseModel
from smp import header as smphdr

__all__ = ["DecodeError", "cbor_head", "decode_body", "keep_known", "load_response"]


def cbor_head(major: int, n: int) -> bytes:
    """A CBOR item head with the shortest argument (RFC 8949 3.1). Encoding by hand is for the
    two hot paths: upload chunk requests (``smp/upload.py``) and the simulator's zcbor-style
    answers (``sim/zcbor.py``); cbor2 cannot write indefinite-length containers."""
    if n < 24:
        return bytes((major << 5 | n,))
    if n < 0x100:
        return bytes((major << 5 | 24, n))
    if n < 0x10000:
        return bytes((major << 5 | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major << 5 | 26,)) + n.to_bytes(4, "big")
    return bytes((major << 5 | 27,)) + n.to_bytes(8, "big")


class DecodeError(ValueError):
    """The frame is not a well-formed SMP response (the message says why)."""


def decode_body(frame: bytes) -> tuple[smphdr.Header, Any]:
    """(header, decoded CBOR body) of one SMP frame; DecodeError if malformed."""
    if len(frame) < smphdr.Header.SIZE:
        raise DecodeError(f"short frame: {len(frame)} bytes")
    try:
        hdr = smphdr.Header.loads(frame[: smphdr.Header.SIZE])
    except Exception as exc:  # ValueError/struct.error on odd header fields
        raise DecodeError(f"bad header: {exc}") from exc
    have = len(frame) - smphdr.Header.SIZE
    if have < hdr.length:
        raise DecodeError(f"truncated: header announces {hdr.length} bytes, {have} present")
    raw = frame[smphdr.Header.SIZE : smphdr.Header.SIZE + hdr.length]
    try:
        body = cbor2.loads(raw)
    except Exception as exc:
        raise DecodeError(f"bad CBOR: {exc}") from exc
    return hdr, body


def _model_of(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(model class, is a list of it) inside an annotation like ``list[ImageState] | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            m, is_list = _model_of(arg)
            if m is not None:
                return m, is_list
        return None, False
    if origin in (list, tuple) and typing.get_args(annotation):
        m, _ = _model_of(typing.get_args(annotation)[0])
        return m, m is not None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


_ENVELOPE = frozenset({"header", "version", "sequence", "smp_data"})  # smp.message fields


def keep_known(model: type[BaseModel], data: dict[Any, Any], *, top: bool = True) -> dict[str, Any]:
    """``data`` restricted to ``model``'s fields, nested models (and lists of them) too.

    At the top level the message envelope (``header``, ``version``...) is never taken from
    the body: a body key ``version`` is the *image* version only inside ``images[]``."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if top and name in _ENVELOPE:
            continue
        key = field.alias or name
        if key not in data:
            continue
        value = data[key]
        sub, is_list = _model_of(field.annotation)
        if sub is not None:
            if is_list and isinstance(value, list):
                value = [keep_known(sub, v, top=False) if isinstance(v, dict) else v for v in value]
            elif isinstance(value, dict):
                value = keep_known(sub, value, top=False)
        out[key] = value
    return out


def load_response(model: type[Any], hdr: smphdr.Header, body: dict[Any, Any], frame: bytes) -> Any:
    """Build ``model`` (an ``smp`` response class) from a decoded body without re-encoding it."""
    data = keep_known(model, body)
    end = smphdr.Header.SIZE + hdr.length
    return model(header=hdr, smp_data=bytes(frame[:end]), **data)

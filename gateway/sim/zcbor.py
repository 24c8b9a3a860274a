"""CBOR as Zephyr's zcbor encoder writes it (what a real ``smp_svr`` puts on the wire).

Owns the simulator's response encoding. Zephyr's MCUmgr handlers encode with zcbor
(``zcbor_map_start_encode``/``zcbor_list_start_encode``); unless the firmware is built with
``CONFIG_ZCBOR_CANONICAL``, zcbor writes maps and arrays with *indefinite* length: ``bf`` …
``ff`` and ``9f`` … ``ff`` (zcbor ``zcbor_encode.c``: ``list_map_start_encode`` emits the
indefinite-length head when ``ZCBOR_CANONICAL`` is not defined and the break byte at the end).
Strings, byte strings and integers use their minimal heads, as in canonical CBOR. Keys keep
the order the handler wrote them in (a Python dict's insertion order).

Seen on the Renode STM32F4-Discovery (Zephyr 3.4.99, zcbor 67fd8bb): MCUmgr parameters answer
``bf 68 buf_size 19 01 80 69 buf_count 04 ff`` (25 bytes; ``cbor2.dumps`` makes 24).

cbor2 has no switch for indefinite containers, so this small encoder is written here; it
covers exactly the types SMP answers carry (maps, arrays, text, bytes, ints, bools, None).
"""

from __future__ import annotations

from typing import Any

from gateway.smp.codec import cbor_head

__all__ = ["dumps"]


def _enc(obj: Any, out: bytearray, canonical: bool) -> None:
    if obj is None:
        out += b"\xf6"
    elif obj is True:
        out += b"\xf5"
    elif obj is False:
        out += b"\xf4"
    elif isinstance(obj, int):
        out += cbor_head(0, obj) if obj >= 0 else cbor_head(1, -1 - obj)
    elif isinstance(obj, bytes | bytearray | memoryview):
        b = bytes(obj)
        out += cbor_head(2, len(b)) + b
    elif isinstance(obj, str):
        b = obj.encode()
        out += cbor_head(3, len(b)) + b
    elif isinstance(obj, list | tuple):
        out += cbor_head(4, len(obj)) if canonical else b"\x9f"
        for item in obj:
            _enc(item, out, canonical)
        if not canonical:
            out += b"\xff"
    elif isinstance(obj, dict):
        out += cbor_head(5, len(obj)) if canonical else b"\xbf"
        for k, v in obj.items():
            _enc(k, out, canonical)
            _enc(v, out, canonical)
        if not canonical:
            out += b"\xff"
    else:
        raise TypeError(f"zcbor encoder: unsupported type {type(obj).__name__}")


def dumps(obj: Any, *, canonical: bool = False) -> bytes:
    """Encode ``obj`` as zcbor does: indefinite-length maps/arrays unless ``canonical``."""
    out = bytearray()
    _enc(obj, out, canonical)
    return bytes(out)

"""Responses decode from any well-formed CBOR: zcbor-style (indefinite), canonical, non-minimal
integer heads, unknown extra keys. The decoder never re-encodes to check a length."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smp import header as smphdr
from smpclient.requests.image_management import ImageStatesRead, ImageUploadWrite
from smpclient.requests.os_management import (
    BootloaderInformationRead,
    EchoWrite,
    MCUMgrParametersRead,
)

from gateway.sim import zcbor
from gateway.smp.codec import DecodeError, decode_body
from gateway.smp.session import SMPError, SMPProtocolError, SMPSession
from gateway.smp.transport import UdpTransport


def _frame(req: Any, body: bytes, *, extra_tail: bytes = b"") -> bytes:
    h = req.header
    op = int(h.op) + 1
    return struct.pack("!BBHHBB", op | (1 << 3), 0, len(body), int(h.group_id), h.sequence,
                       int(h.command_id)) + body + extra_tail


def _nonminimal(obj: Any) -> bytes:
    """Canonical-ish CBOR, but every unsigned integer with a 4-byte head (legal, not minimal)."""
    out = bytearray()

    def enc(o: Any) -> None:
        if o is True:
            out.extend(b"\xf5")
        elif o is False:
            out.extend(b"\xf4")
        elif isinstance(o, int) and o >= 0:
            out.extend(b"\x1a" + o.to_bytes(4, "big"))
        elif isinstance(o, bytes):
            out.extend(zcbor.dumps(o))
        elif isinstance(o, str):
            out.extend(zcbor.dumps(o))
        elif isinstance(o, list):
            out.extend(b"\x98" + bytes([len(o)]))
            for x in o:
                enc(x)
        elif isinstance(o, dict):
            out.extend(b"\xb8" + bytes([len(o)]))
            for k, v in o.items():
                enc(k)
                enc(v)
        else:
            raise TypeError(o)

    enc(obj)
    return bytes(out)


ENCODINGS = {
    "zcbor": lambda o: zcbor.dumps(o),
    "canonical": lambda o: zcbor.dumps(o, canonical=True),
    "non-minimal": _nonminimal,
}

versions = st.builds(lambda a, b, c: f"{a}.{b}.{c}", st.integers(0, 255), st.integers(0, 255),
                     st.integers(0, 65535))
slot = st.fixed_dictionaries(
    {"slot": st.integers(0, 3), "version": versions, "hash": st.binary(min_size=32, max_size=32),
     "bootable": st.booleans(), "pending": st.booleans(), "confirmed": st.booleans(),
     "active": st.booleans(), "permanent": st.booleans()},
    optional={"image": st.integers(0, 2), "flags": st.integers(0, 255)},  # flags: unknown key
)
extra = st.dictionaries(st.sampled_from(["x_vendor", "rsn_extra", "zz"]), st.integers(0, 2**31),
                        max_size=2)


def _session() -> SMPSession:
    return SMPSession(UdpTransport("127.0.0.1", 9), device_id="t")


@settings(max_examples=60, deadline=None)
@given(images=st.lists(slot, min_size=0, max_size=4), split=st.integers(0, 2), more=extra,
       enc=st.sampled_from(sorted(ENCODINGS)))
def test_image_state_decodes_in_every_encoding(images: list[dict[str, Any]], split: int,
                                               more: dict[str, int], enc: str) -> None:
    req = ImageStatesRead(sequence=7)
    body = {"images": images, "splitStatus": split, **more}
    rsp = _session()._decode(req, _frame(req, ENCODINGS[enc](body)))
    assert [(i.slot, i.version, bytes(i.hash), i.active, i.confirmed, i.pending, i.permanent)
            for i in rsp.images] == [
        (i["slot"], i["version"], i["hash"], i["active"], i["confirmed"], i["pending"],
         i["permanent"]) for i in images]
    assert rsp.splitStatus == split


@settings(max_examples=60, deadline=None)
@given(off=st.integers(0, 2**31), match=st.none() | st.booleans(), more=extra,
       enc=st.sampled_from(sorted(ENCODINGS)))
def test_upload_answer_decodes_in_every_encoding(off: int, match: bool | None, more: dict[str, int],
                                                 enc: str) -> None:
    req = ImageUploadWrite(off=0, data=b"x" * 40, len=100, sequence=3)
    body: dict[str, Any] = {"off": off, **more}
    if match is not None:
        body["match"] = match
    rsp = _session()._decode(req, _frame(req, ENCODINGS[enc](body)))
    assert rsp.off == off and rsp.match == match


@settings(max_examples=40, deadline=None)
@given(size=st.integers(64, 65535), count=st.integers(1, 64), enc=st.sampled_from(sorted(ENCODINGS)),
       text=st.text(max_size=40), mode=st.integers(0, 7))
def test_os_answers_decode_in_every_encoding(size: int, count: int, enc: str, text: str,
                                             mode: int) -> None:
    s = _session()
    req_p = MCUMgrParametersRead(sequence=1)
    rsp_p = s._decode(req_p, _frame(req_p, ENCODINGS[enc]({"buf_size": size, "buf_count": count})))
    assert (rsp_p.buf_size, rsp_p.buf_count) == (size, count)
    req_e = EchoWrite(d=text, sequence=2)
    assert s._decode(req_e, _frame(req_e, ENCODINGS[enc]({"r": text}))).r == text
    # Zephyr's mode answer has no "bootloader" key: the session reads it as a raw map
    req_b = BootloaderInformationRead(query="mode", sequence=3)
    raw = s._decode(req_b, _frame(req_b, ENCODINGS[enc]({"mode": mode, "no-downgrade": True})),
                    raw=True)
    assert raw == {"mode": mode, "no-downgrade": True}


def test_zephyr_params_answer_seen_on_renode() -> None:
    # the exact bytes of Zephyr 3.4's answer (indefinite map, 25 bytes; canonical would be 24)
    body = bytes.fromhex("bf") + b"\x68buf_size" + bytes.fromhex("190180") + b"\x69buf_count" + b"\x04\xff"
    assert len(body) == 25
    req = MCUMgrParametersRead(sequence=9)
    rsp = _session()._decode(req, _frame(req, body))
    assert (rsp.buf_size, rsp.buf_count) == (384, 4)


def test_errors_decode_from_indefinite_maps() -> None:
    s = _session()
    req = ImageStatesRead(sequence=4)
    with pytest.raises(SMPError) as e:
        s._decode(req, _frame(req, zcbor.dumps({"err": {"group": 1, "rc": 8}})))
    assert (e.value.group, e.value.rc) == (1, 8)
    with pytest.raises(SMPError) as e1:
        s._decode(req, _frame(req, zcbor.dumps({"rc": 8})))
    assert (e1.value.group, e1.value.rc) == (None, 8)


def test_length_check_that_matters_is_kept() -> None:
    req = MCUMgrParametersRead(sequence=5)
    body = zcbor.dumps({"buf_size": 384, "buf_count": 4})
    frame = _frame(req, body)
    with pytest.raises(SMPProtocolError, match="truncated"):
        _session()._decode(req, frame[:-3])
    # bytes after header.length (a transport's padding) are not decoded
    rsp = _session()._decode(req, frame + b"\x00\x00")
    assert rsp.buf_count == 4
    with pytest.raises(DecodeError):
        decode_body(frame[: smphdr.Header.SIZE - 1])


def test_zcbor_encoding_is_indefinite_and_decodes_with_cbor2() -> None:
    import cbor2

    obj = {"images": [{"slot": 0, "hash": b"\x01" * 32, "active": True}], "splitStatus": 0}
    z = zcbor.dumps(obj)
    assert z[0] == 0xBF and z[-1] == 0xFF and b"\x9f" in z
    assert cbor2.loads(z) == obj
    assert zcbor.dumps(obj, canonical=True) == cbor2.dumps(obj)

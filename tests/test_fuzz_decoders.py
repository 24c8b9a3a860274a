"""Property-based fuzzing of every decoder the gateway owns.

Each decoder must, for any input, return or raise its one documented error type - never
another exception (a crash) and never hang (pytest-timeout). Example counts are bounded so CI
stays fast; ``HYPOTHESIS_PROFILE=deep`` raises them for a local run.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smp import packet as smppacket
from smpclient.requests.image_management import ImageStatesRead, ImageUploadWrite
from smpclient.requests.os_management import EchoWrite, ResetWrite

from gateway import devkit
from gateway.artifacts.mender import ArtifactError, build_zephyr_artifact, unpack_zephyr_artifact
from gateway.config import ConfigError, load_config, parse_config
from gateway.images import ImageRefused, check_image
from gateway.mcuboot import ImageFormatError, TrustedKey, parse_image
from gateway.smp.session import SMPError, SMPSession
from gateway.smp.transport import SerialDeframer, Transport
from gateway.sources.local import ManifestError, load_manifest

pytestmark = pytest.mark.timeout(300)

settings.register_profile("ci", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                 HealthCheck.too_slow])
settings.register_profile("deep", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                 HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
N = settings().max_examples


# --- fixtures made once: a real key, image and artifact -------------------------------------
@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fuzzkit")
    key = devkit.make_key(root / "k.pem")
    img = devkit.sign_image(root / "img.bin", version="1.2.3", key=key, size=3000,
                            security_counter=7)
    data = img.read_bytes()
    art = build_zephyr_artifact(data, device_types=["sim_board"], version="1.2.3")
    return {"root": root, "key": TrustedKey.load(key), "image": data, "artifact": art}


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    if cut is not None and b:
        b = b[: cut % (len(b) + 1)]
    return bytes(b)


edits_st = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)
cut_st = st.none() | st.integers(0, 1 << 20)


# --- SMP responses -----------------------------------------------------------------------------
class _NullTransport(Transport):
    @property
    def max_packet(self) -> int:
        return 1024

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, packet: bytes) -> None: ...


REQS = [ImageStatesRead(sequence=3), EchoWrite(d="x", sequence=3), ResetWrite(sequence=3),
        ImageUploadWrite(off=0, data=b"", sequence=3)]


def _valid_rsp(req: Any, body: dict[str, Any]) -> bytes:
    h = req.header
    raw = cbor2.dumps(body)
    return struct.pack("!BBHHBB", int(h.op) + 1 | (1 << 3), 0, len(raw), int(h.group_id), 3,
                       h.command_id) + raw


def _decode(req: Any, frame: bytes) -> None:
    s = SMPSession(_NullTransport(), device_id="fuzz")
    try:
        s._decode(req, frame)
    except SMPError:
        pass


@settings(max_examples=N)
@given(st.sampled_from(REQS), st.binary(max_size=300))
def test_fuzz_smp_decode_arbitrary_bytes(req: Any, frame: bytes) -> None:
    _decode(req, frame)


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=8)
    | st.binary(max_size=40) | st.floats(allow_nan=True),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)
keys_st = st.sampled_from(["rc", "err", "off", "match", "images", "r", "rsn", "group", "hash",
                           "slot", "version", "x"])


@settings(max_examples=N)
@given(st.sampled_from(REQS), st.dictionaries(keys_st, cbor_values, max_size=5), edits_st, cut_st)
def test_fuzz_smp_decode_mutated_frames(req: Any, body: dict[str, Any], edits: list[tuple[int, int]],
                                        cut: int | None) -> None:
    _decode(req, _valid_rsp(req, body))
    _decode(req, mutate(_valid_rsp(req, body), edits, cut))


# --- serial framing ----------------------------------------------------------------------------
packets_st = st.lists(st.binary(min_size=8, max_size=600), min_size=1, max_size=4)


@settings(max_examples=N)
@given(packets_st, st.lists(st.binary(max_size=80).filter(lambda b: b"\n" not in b), max_size=4),
       st.lists(st.integers(1, 400), max_size=30), st.integers(16, 200))
def test_fuzz_serial_deframer_chunking_and_garbage(packets: list[bytes], garbage: list[bytes],
                                                   cuts: list[int], line_len: int) -> None:
    """Valid frames separated by console noise come out exactly, however the bytes arrive."""
    stream = b""
    for i, p in enumerate(packets):
        if i < len(garbage):
            stream += garbage[i].replace(b"\x06\x09", b"").replace(b"\x04\x14", b"") + b"\n"
        stream += b"".join(smppacket.encode(p, line_len))
    d = SerialDeframer()
    out: list[bytes] = []
    pos = 0
    for c in cuts:
        out += d.feed(stream[pos : pos + c])
        pos += c
    out += d.feed(stream[pos:])
    assert out == packets


@settings(max_examples=N)
@given(st.lists(st.binary(max_size=300), max_size=12))
def test_fuzz_serial_deframer_arbitrary_bytes(chunks: list[bytes]) -> None:
    d = SerialDeframer(max_frame=4096)
    for c in chunks:
        for pkt in d.feed(c):
            assert isinstance(pkt, bytes)
    assert len(d._buf) <= 4 * d.max_frame + 300


@settings(max_examples=N)
@given(packets_st, edits_st, st.integers(16, 200))
def test_fuzz_serial_deframer_corrupted_frames(packets: list[bytes], edits: list[tuple[int, int]],
                                               line_len: int) -> None:
    """A corrupted stream yields only CRC-valid packets, and a clean frame after it decodes."""
    stream = mutate(b"".join(b"".join(smppacket.encode(p, line_len)) for p in packets), edits, None)
    d = SerialDeframer()
    d.feed(stream)
    tail = b"\x01" * 20
    assert d.feed(b"\n" + b"".join(smppacket.encode(tail, line_len)))[-1:] == [tail]


# --- MCUboot images ----------------------------------------------------------------------------
@settings(max_examples=N)
@given(st.binary(max_size=2048))
def test_fuzz_parse_image_arbitrary(data: bytes) -> None:
    try:
        parse_image(data)
    except ImageFormatError:
        pass


@settings(max_examples=N)
@given(edits_st, cut_st, st.sampled_from([0, 4, 8, 12, 16, 20]))
def test_fuzz_parse_and_check_mutated_image(kit: dict[str, Any], edits: list[tuple[int, int]],
                                            cut: int | None, hdr_field: int) -> None:
    data = kit["image"]
    # aim half of the edits at the header and the TLV area, where the parser branches
    info = parse_image(data)
    tlv_at = info.hdr_size + info.img_size
    focused = [((tlv_at + p % (len(data) - tlv_at)) if i % 2 else (hdr_field + p % 12), v)
               for i, (p, v) in enumerate(edits)]
    bad = mutate(data, focused, cut)
    try:
        parse_image(bad)
    except ImageFormatError:
        pass
    try:
        check_image(bad, [kit["key"]])
    except ImageRefused:
        pass


# --- artifacts (tar) ---------------------------------------------------------------------------
def _unpack(tmp: Path, data: bytes, **kw: Any) -> None:
    p = tmp / "a.mender"
    p.write_bytes(data)
    try:
        unpack_zephyr_artifact(p, tmp / "out", device_type="sim_board", **kw)
    except ArtifactError:
        pass


@settings(max_examples=N // 2)
@given(st.binary(max_size=3000))
def test_fuzz_artifact_arbitrary_bytes(tmp_path: Path, data: bytes) -> None:
    _unpack(tmp_path, data)


@settings(max_examples=N)
@given(edits_st, cut_st)
def test_fuzz_artifact_mutated(kit: dict[str, Any], tmp_path: Path, edits: list[tuple[int, int]],
                               cut: int | None) -> None:
    _unpack(tmp_path, mutate(kit["artifact"], edits, cut))


def _tar(members: list[tarfile.TarInfo], contents: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            tf.addfile(m, io.BytesIO(contents.get(m.name, b"")) if m.isreg() else None)
    return buf.getvalue()


names_st = st.sampled_from(["version", "manifest", "header.tar", "data/0000.tar", "../evil",
                            "/etc/passwd", "data/../../x", "a/../../b", "ok", "data/0000/../../z"])


@settings(max_examples=N)
@given(st.lists(st.tuples(names_st, st.sampled_from([tarfile.REGTYPE, tarfile.SYMTYPE,
                                                     tarfile.LNKTYPE, tarfile.DIRTYPE,
                                                     tarfile.CHRTYPE, tarfile.FIFOTYPE])),
                min_size=1, max_size=6))
def test_fuzz_artifact_hostile_members_never_escape(tmp_path: Path,
                                                    members: list[tuple[str, bytes]]) -> None:
    """Traversal names, links and device nodes are refused; nothing lands outside out_dir."""
    infos = []
    for name, typ in members:
        ti = tarfile.TarInfo(name)
        ti.type = typ  # type: ignore[assignment]
        if typ in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            ti.linkname = "/etc/passwd"
        ti.size = 4 if typ == tarfile.REGTYPE else 0
        infos.append(ti)
    before = set(tmp_path.parent.iterdir())
    _unpack(tmp_path, _tar(infos, {n: b"\0\0\0\0" for n, _ in members}))
    assert set(tmp_path.parent.iterdir()) == before
    for p in (tmp_path / "out").rglob("*") if (tmp_path / "out").exists() else []:
        assert p.is_file() and not p.is_symlink()


def test_artifact_oversized_member_refused_without_reading_it(tmp_path: Path) -> None:
    """A member claiming 1 TiB is refused from its header (no allocation, no read)."""
    ti = tarfile.TarInfo("version")
    ti.size = 1 << 40
    hdr = ti.tobuf(tarfile.GNU_FORMAT)
    p = tmp_path / "big.mender"
    p.write_bytes(hdr + b"\0" * 1024)
    with pytest.raises(ArtifactError):
        unpack_zephyr_artifact(p, tmp_path / "out", device_type="sim_board")


def test_artifact_image_over_cap_refused(kit: dict[str, Any], tmp_path: Path) -> None:
    p = tmp_path / "a.mender"
    p.write_bytes(kit["artifact"])
    with pytest.raises(ArtifactError, match=r"limit|over"):
        unpack_zephyr_artifact(p, tmp_path / "out", device_type="sim_board", max_image_size=1000)


def test_artifact_gzip_bomb_refused(kit: dict[str, Any], tmp_path: Path) -> None:
    """A compressed data member that inflates beyond the cap is stopped while inflating."""
    import gzip
    import hashlib
    import json

    bomb = gzip.compress(b"\0" * (8 << 20))
    version = json.dumps({"format": "rdfm", "version": 3}).encode()
    hinfo = json.dumps({"payloads": [{"type": "zephyr-image"}],
                        "artifact_depends": {"device_type": ["sim_board"]}}).encode()
    htar = _tar([_ti("header-info", len(hinfo))], {"header-info": hinfo})
    manifest = "".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n"
                       for n, b in (("version", version), ("header.tar", htar),
                                    ("data/0000.tar.gz", bomb))).encode()
    outer = _tar([_ti("version", len(version)), _ti("manifest", len(manifest)),
                  _ti("header.tar", len(htar)), _ti("data/0000.tar.gz", len(bomb))],
                 {"version": version, "manifest": manifest, "header.tar": htar,
                  "data/0000.tar.gz": bomb})
    p = tmp_path / "bomb.mender"
    p.write_bytes(outer)
    with pytest.raises(ArtifactError):
        unpack_zephyr_artifact(p, tmp_path / "out", device_type="sim_board", max_image_size=1 << 20)


def _ti(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    return ti


# --- manifest and config -----------------------------------------------------------------------
yamlish = st.text(alphabet=st.sampled_from(list("images:-{}[]file:hardware,devices group\n '\"\t&*!|>%@`#0")),
                  max_size=200)


@settings(max_examples=N)
@given(yamlish | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzz_load_manifest(tmp_path: Path, text: str) -> None:
    (tmp_path / "manifest.yaml").write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        m = load_manifest(tmp_path)
        assert all(e.file and e.hardware for e in m.images)
    except ManifestError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=15,
)
config_keys = st.sampled_from(["state_dir", "trusted_keys", "source", "devices", "gateway_id",
                               "max_concurrent", "retry", "metrics", "log_format", "kind", "path",
                               "transport", "id", "hardware", "port", "host", "timeouts", "bogus"])


@settings(max_examples=N)
@given(st.dictionaries(config_keys, json_values, max_size=6) | json_values)
def test_fuzz_parse_config(data: Any) -> None:
    try:
        parse_config(data, "/nonexistent/fuzz.yaml")
    except ConfigError:
        pass


@settings(max_examples=N // 2)
@given(yamlish)
def test_fuzz_load_config_text(tmp_path: Path, text: str) -> None:
    p = tmp_path / "gw.yaml"
    p.write_text(text)
    try:
        load_config(p)
    except ConfigError:
        pass


# --- regressions: crashes found by the fuzzers above, fixed in gateway/smp/session.py/upload.py ---
@pytest.mark.parametrize("body", [{"err": {"rc": "x", "group": 1}}, {"err": {"rc": 3, "group": "a"}},
                                  {"err": {"rc": 2.5}}, {"rc": 3, "rsn": {"x": 1}}])
def test_regression_err_fields_of_the_wrong_type(body: dict[str, Any]) -> None:
    """``{"err": {"rc": "x"}}`` used to escape as ValueError from ``int()`` (a crash)."""
    for req in REQS:
        _decode(req, _valid_rsp(req, body))


def test_regression_answer_to_another_request_is_a_protocol_error() -> None:
    """A response of another group/command (or a truncated one) was accepted as the answer."""
    from gateway.smp.session import SMPProtocolError

    s = SMPSession(_NullTransport(), device_id="fuzz")
    echo_rsp = _valid_rsp(REQS[1], {"r": "x"})
    with pytest.raises(SMPProtocolError, match="another request"):
        s._decode(REQS[0], echo_rsp)
    with pytest.raises(SMPProtocolError, match="truncated"):
        s._decode(REQS[1], echo_rsp[:-1])


def test_regression_nul_byte_in_a_path_is_a_config_error() -> None:
    """``state_dir: "\\x00"`` escaped parse_config as ValueError (found by test_fuzz_parse_config)."""
    with pytest.raises(ConfigError, match="invalid path"):
        parse_config({"state_dir": "\x00"}, "/nonexistent/fuzz.yaml")

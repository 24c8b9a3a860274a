"""Mender-format artifacts (format version 3) as RDFM produces them for Zephyr devices.

Owns unpacking an artifact into the one raw MCUboot image it carries, with every check the
format offers. Layout (mender-artifact ``awriter``; RDFM's ``rdfm-artifact write
zephyr-image`` writes ``"format": "rdfm"`` and uncompressed tars, Mender writes ``"mender"``
and usually ``.gz``)::

    version            {"format": "rdfm"|"mender", "version": 3}
    manifest           "<sha256>  version" / "<sha256>  header.tar[.gz]" / "<sha256>  data/0000/<file>"
    [manifest.sig]     (signature over the manifest; not checked here - see below)
    header.tar[.gz]    header-info  {"payloads": [{"type": "zephyr-image"}],
                                     "artifact_provides": {...}, "artifact_depends": {"device_type": [...]}}
                       headers/0000/type-info  {"type": "zephyr-image",
                                     "artifact_provides": {"zephyr-image.checksum": sha256,
                                                           "zephyr-image.version": "..."}}
    data/0000.tar[.gz] zephyr.signed.bin

Checks: every member of the outer tar and of the data tar is a regular file with a safe
relative name (no absolute paths, ``..``, links, devices), no duplicate names, each member
and the total below caps; the manifest lists ``version``, the header and every data file and
their SHA-256 match; the artifact depends on the expected device type; exactly one
``zephyr-image`` payload with exactly one file; that file's SHA-256 equals
``zephyr-image.checksum`` when the artifact provides it (RDFM's client requires it, as we do
when ``require_checksum``). The MCUboot signature inside the image is checked later by the
image store, which is what actually protects the device; ``manifest.sig`` is not verified.

Bounds: at most ``MAX_MEMBERS`` members per tar; version, manifest and header at most
``MAX_META_MEMBER`` bytes each, compressed and decompressed (read with ``read(limit + 1)``,
so a gzip/xz bomb stops at the limit); the data tar is decompressed as a stream while its
members are read (never whole in memory), its members' stated sizes together at most the
image cap + 1 MiB (``set_cap(max_image_size)``, 64 MiB when unknown) and the image read
through a bounded read; zstd is refused. Synchronous: callers run it in a thread.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway import safejson
from gateway.artifacts.bundle import is_bundle, set_cap

ZEPHYR_TYPE = "zephyr-image"
MAX_META_MEMBER = 1 << 20  # version, manifest, header tar: 1 MiB is plenty
MAX_MEMBERS = 64
MAX_EXT_HEADER = 64 << 10  # one GNU long name/link or pax header's body
MAX_EXT_TOTAL = 256 << 10  # all of them in one tar (tarfile keeps them in its member list)
MAX_EXT_CHAIN = 3  # extended headers in a row before a member (pax g + x + GNU L at most)


class ArtifactError(ValueError):
    """The artifact is malformed or not for this device (wrong type, device type...)."""


class ArtifactIntegrityError(ArtifactError):
    """A checksum does not match or the archive is corrupt: the artifact was damaged/tampered."""


@dataclass(frozen=True)
class ZephyrArtifact:
    image: Path  # extracted raw MCUboot image
    name: str  # artifact_provides.artifact_name ("" when absent)
    version: str | None  # zephyr-image.version
    device_types: list[str]
    provides: dict[str, str] = field(default_factory=dict)


_EXT_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
              tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo whose extended headers are bounded before tarfile reads them.

    tarfile has no limit for these: for a GNU long name/link (``L``/``K``) or a pax header
    (``x``/``g``) it reads the whole body the 512-byte header claims into memory (a 1 GiB long
    name from 1 MiB of gzip), and chains any number of them recursively, before a TarInfo
    reaches our checks. ``_proc_member`` is where tarfile dispatches on the header type, with
    ``size`` already parsed and nothing read yet: refuse there. GNU sparse members (``S``, whose
    extension blocks tarfile also reads unbounded) are never in an artifact: refused too."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise ArtifactError("GNU sparse member is not allowed in an artifact")
        if self.type in _EXT_TYPES:
            seen = getattr(tarfile_, "_gw_ext", (0, 0))  # (bytes so far, in a row)
            total, chain = seen[0] + self.size, seen[1] + 1
            if self.size > MAX_EXT_HEADER or total > MAX_EXT_TOTAL or chain > MAX_EXT_CHAIN:
                raise ArtifactError(f"extended tar header of {self.size} bytes (type "
                                    f"{self.type!r}, {chain} in a row) is over the limits")
            tarfile_._gw_ext = (total, chain)  # type: ignore[attr-defined]
        else:
            tarfile_._gw_ext = (getattr(tarfile_, "_gw_ext", (0, 0))[0], 0)  # type: ignore[attr-defined]
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def _open_tar(**kwargs: Any) -> tarfile.TarFile:
    return tarfile.open(tarinfo=_BoundedTarInfo, **kwargs)


def _safe_name(name: str) -> str:
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise ArtifactError(f"unsafe member name {name!r}")
    norm = posixpath.normpath(name)
    if norm.startswith("../") or norm == ".." or "/../" in f"/{norm}/":
        raise ArtifactError(f"member name {name!r} escapes the archive")
    return norm


def _regular(member: tarfile.TarInfo) -> None:
    if not member.isreg():
        kind = "link" if (member.issym() or member.islnk()) else "non-regular member"
        raise ArtifactError(f"{kind} {member.name!r} is not allowed in an artifact")


def _decompress(name: str, raw: bytes, limit: int) -> bytes:
    if name.endswith(".gz"):
        return _bounded(gzip.GzipFile(fileobj=io.BytesIO(raw)), limit, name)
    if name.endswith(".xz"):
        return _bounded(lzma.LZMAFile(io.BytesIO(raw)), limit, name)
    if name.endswith(".zst"):
        raise ArtifactError(f"{name}: zstd-compressed artifacts are not supported")
    return raw


def _stream_mode(name: str) -> Literal["r|gz", "r|xz", "r|"]:
    if name.endswith(".gz"):
        return "r|gz"
    if name.endswith(".xz"):
        return "r|xz"
    return "r|"


def _bounded(f: Any, limit: int, name: str) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise ArtifactError(f"{name} decompresses to more than {limit} bytes")
    return data


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if member.size > limit:
        raise ArtifactError(f"member {member.name!r} is {member.size} bytes, over the {limit} limit")
    f = tf.extractfile(member)
    if f is None:
        raise ArtifactError(f"cannot read member {member.name!r}")
    return _bounded(f, limit, member.name)


def _members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    count = 0
    for m in tf:
        count += 1
        if count > MAX_MEMBERS:
            raise ArtifactError(f"more than {MAX_MEMBERS} members")
        _safe_name(m.name)
        _regular(m)
        yield m


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = safejson.loads(data)
    except ValueError as exc:
        raise ArtifactError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{what} is not a JSON object")
    return obj


def _parse_manifest(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ArtifactError(f"malformed manifest line {line!r}")
        digest, name = parts[0].lower(), _safe_name(parts[1])
        if name in out:
            raise ArtifactError(f"manifest lists {name!r} twice")
        out[name] = digest
    return out


def _check(manifest: dict[str, str], name: str, digest: str) -> None:
    want = manifest.get(name)
    if want is None:
        raise ArtifactError(f"{name!r} is not listed in the manifest")
    if want != digest:
        raise ArtifactIntegrityError(f"checksum mismatch for {name!r}: manifest {want}, content {digest}")


def _parse_header(header: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """header-info and headers/0000/type-info from the (decompressed) header tar."""
    infos: dict[str, bytes] = {}
    with _open_tar(fileobj=io.BytesIO(header), mode="r:") as tf:
        for m in _members(tf):
            name = _safe_name(m.name)
            if name in infos:
                raise ArtifactError(f"header member {name!r} appears twice")
            infos[name] = _read_member(tf, m, MAX_META_MEMBER)
    if "header-info" not in infos:
        raise ArtifactError("header has no header-info")
    hinfo = _json(infos["header-info"], "header-info")
    payloads = hinfo.get("payloads") or hinfo.get("updates")
    if not isinstance(payloads, list) or len(payloads) != 1:
        raise ArtifactError("artifact must carry exactly one payload")
    ptype = payloads[0].get("type") if isinstance(payloads[0], dict) else None
    if ptype != ZEPHYR_TYPE:
        raise ArtifactError(f"payload type is {ptype!r}, expected {ZEPHYR_TYPE!r}")
    tinfo_raw = infos.get("headers/0000/type-info")
    tinfo = _json(tinfo_raw, "type-info") if tinfo_raw is not None else {}
    if tinfo and tinfo.get("type") not in (None, ZEPHYR_TYPE):
        raise ArtifactError(f"type-info says {tinfo.get('type')!r}, expected {ZEPHYR_TYPE!r}")
    return hinfo, tinfo


def _device_types(hinfo: dict[str, Any], tinfo: dict[str, Any]) -> list[str]:
    # MergeArtifactDepends: artifact-level depends plus the payload's depends
    out: list[str] = []
    for src in (hinfo.get("artifact_depends"), tinfo.get("artifact_depends")):
        if isinstance(src, dict) and "device_type" in src:
            dt = src["device_type"]
            vals = dt if isinstance(dt, list) else [dt]
            if not all(isinstance(v, str) for v in vals):
                raise ArtifactError("artifact_depends.device_type must be strings")
            out += vals
    return out


def unpack_zephyr_artifact(
    path: Path,
    out_dir: Path,
    *,
    device_type: str | None,
    max_image_size: int | None = None,
    require_checksum: bool = False,
) -> ZephyrArtifact:
    """Check ``path`` and extract its MCUboot image into ``out_dir`` (0600); ArtifactError if not."""
    # the payload may be one image, or an image set (dfu_application.zip: several images, or a
    # direct-XIP release's two slot builds) - each image is checked against its slot later by
    # the image store; a file that is not a set must still fit the one slot
    image_cap: int = set_cap(max_image_size) or 64 << 20
    manifest: dict[str, str] | None = None
    seen: set[str] = set()
    version_ok = False
    pending_version = ""
    hinfo: dict[str, Any] | None = None
    tinfo: dict[str, Any] = {}
    header_name = ""
    data_files: dict[str, tuple[bytes, str]] = {}  # name -> (content, sha256)
    try:
        outer = _open_tar(name=path, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        raise ArtifactIntegrityError(f"not a tar archive: {exc}") from None
    with outer:
        try:
            for m in _members(outer):
                name = _safe_name(m.name)
                if name in seen:
                    raise ArtifactError(f"member {name!r} appears twice")
                seen.add(name)
                if name == "version":
                    raw = _read_member(outer, m, MAX_META_MEMBER)
                    ver = _json(raw, "version")
                    if ver.get("format") not in ("mender", "rdfm") or ver.get("version") != 3:
                        raise ArtifactError(f"unsupported artifact format {ver!r} (need version 3)")
                    version_ok = True
                    pending_version = hashlib.sha256(raw).hexdigest()
                elif name == "manifest":
                    if not version_ok:
                        raise ArtifactError("'manifest' must follow 'version'")
                    manifest = _parse_manifest(_read_member(outer, m, MAX_META_MEMBER))
                    _check(manifest, "version", pending_version)
                elif name in ("manifest.sig", "manifest-augment"):
                    continue
                elif name.startswith("header.tar") or name.startswith("header-augment.tar"):
                    if manifest is None:
                        raise ArtifactError(f"{name!r} precedes the manifest")
                    raw = _read_member(outer, m, MAX_META_MEMBER)
                    _check(manifest, name, hashlib.sha256(raw).hexdigest())
                    if name.startswith("header.tar"):
                        header_name = name
                        hinfo, tinfo = _parse_header(_decompress(name, raw, MAX_META_MEMBER))
                elif name.startswith("data/"):
                    if manifest is None or hinfo is None:
                        raise ArtifactError(f"{name!r} precedes the manifest or the header")
                    if name not in ("data/0000.tar", "data/0000.tar.gz", "data/0000.tar.xz"):
                        raise ArtifactError(f"unexpected data member {name!r} (one payload only)")
                    if m.size > image_cap * 2 + (1 << 20):
                        raise ArtifactError(f"member {name!r} is {m.size} bytes, over the "
                                            f"{image_cap * 2 + (1 << 20)} limit")
                    # streamed: decompressed block by block as the members are read, never
                    # whole in memory; what the members claim is capped before it is read
                    raw_f = outer.extractfile(m)
                    if raw_f is None:
                        raise ArtifactError(f"cannot read member {name!r}")
                    budget = image_cap + (1 << 20)
                    with _open_tar(fileobj=raw_f, mode=_stream_mode(name)) as dtf:
                        for dm in _members(dtf):
                            budget -= dm.size + 512
                            if budget < 0:
                                raise ArtifactError(f"{name} holds more than {image_cap + (1 << 20)}"
                                                    " bytes; refused")
                            dname = _safe_name(dm.name)
                            if "/" in dname:
                                raise ArtifactError(f"data file {dname!r} is in a subdirectory")
                            if dm.size > image_cap:
                                raise ArtifactError(
                                    f"image {dname!r} is {dm.size} bytes, over the {image_cap} limit"
                                )
                            content = _read_member(dtf, dm, image_cap)
                            if (max_image_size is not None and len(content) > max_image_size
                                    and not is_bundle(content[:4])):
                                raise ArtifactError(
                                    f"image {dname!r} is {len(content)} bytes, over the "
                                    f"{max_image_size} limit")
                            digest = hashlib.sha256(content).hexdigest()
                            _check(manifest, f"data/0000/{dname}", digest)
                            if dname in data_files:
                                raise ArtifactError(f"data file {dname!r} appears twice")
                            data_files[dname] = (content, digest)
                else:
                    raise ArtifactError(f"unexpected member {name!r}")
        except (tarfile.TarError, EOFError, OSError, lzma.LZMAError) as exc:
            raise ArtifactIntegrityError(f"corrupt archive: {exc}") from None

    if not version_ok or manifest is None or hinfo is None:
        raise ArtifactError("artifact lacks version, manifest or header")
    for listed in manifest:
        if listed.startswith("data/0000/"):
            if listed[len("data/0000/") :] not in data_files:
                raise ArtifactError(f"manifest lists {listed!r} but the payload lacks it")
        elif listed not in seen:
            raise ArtifactError(f"manifest lists {listed!r} but the artifact lacks it")
    if header_name == "":
        raise ArtifactError("artifact has no header")
    if len(data_files) != 1:
        raise ArtifactError(f"expected exactly one image in the payload, found {len(data_files)}")

    types = _device_types(hinfo, tinfo)
    if not types:
        raise ArtifactError("artifact does not say which device types it is for")
    if device_type is not None and device_type not in types:
        raise ArtifactError(f"artifact is for device types {types}, not {device_type!r}")

    provides: dict[str, str] = {}
    for src in (hinfo.get("artifact_provides"), tinfo.get("artifact_provides")):
        if isinstance(src, dict):
            provides.update({str(k): str(v) for k, v in src.items()})
    ((_fname, (content, digest)),) = data_files.items()
    want = provides.get(f"{ZEPHYR_TYPE}.checksum")
    if want is None and require_checksum:
        raise ArtifactError(f"artifact lacks {ZEPHYR_TYPE}.checksum")
    if want is not None and want.lower() != digest:
        raise ArtifactIntegrityError(f"{ZEPHYR_TYPE}.checksum {want} does not match the image ({digest})")

    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    out = out_dir / f"{digest}.img"
    tmp = out.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    os.replace(tmp, out)
    return ZephyrArtifact(
        image=out,
        name=provides.get("artifact_name", ""),
        version=provides.get(f"{ZEPHYR_TYPE}.version"),
        device_types=types,
        provides=provides,
    )


def build_zephyr_artifact(
    image: bytes,
    *,
    device_types: list[str],
    version: str,
    name: str = "zephyr-update",
    compress: bool = False,
    fmt: str = "rdfm",
) -> bytes:
    """Write an artifact the way ``rdfm-artifact write zephyr-image`` does (tests, demos)."""

    def tar_bytes(files: list[tuple[str, bytes]], gz: bool) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:", format=tarfile.GNU_FORMAT) as tf:
            for fname, content in files:
                ti = tarfile.TarInfo(fname)
                ti.size = len(content)
                ti.mode = 0o644
                tf.addfile(ti, io.BytesIO(content))
        raw = buf.getvalue()
        return gzip.compress(raw, mtime=0) if gz else raw

    ext = ".tar.gz" if compress else ".tar"
    checksum = hashlib.sha256(image).hexdigest()
    version_b = json.dumps({"format": fmt, "version": 3}).encode()
    header_info = {
        "payloads": [{"type": ZEPHYR_TYPE}],
        "artifact_provides": {"artifact_name": name},
        "artifact_depends": {"device_type": device_types},
    }
    type_info = {
        "type": ZEPHYR_TYPE,
        "artifact_provides": {f"{ZEPHYR_TYPE}.checksum": checksum, f"{ZEPHYR_TYPE}.version": version},
    }
    header = tar_bytes(
        [
            ("header-info", json.dumps(header_info).encode()),
            ("headers/0000/type-info", json.dumps(type_info).encode()),
        ],
        compress,
    )
    data = tar_bytes([("zephyr.signed.bin", image)], compress)
    manifest = "".join(
        f"{hashlib.sha256(c).hexdigest()}  {n}\n"
        for n, c in sorted(
            [("version", version_b), (f"header{ext}", header), ("data/0000/zephyr.signed.bin", image)]
        )
    ).encode()
    return tar_bytes(
        [("version", version_b), ("manifest", manifest), (f"header{ext}", header), (f"data/0000{ext}", data)],
        False,
    )

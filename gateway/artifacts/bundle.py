"""Image-set artifacts: several MCUboot images in one file (nRF Connect SDK ``dfu_application.zip``).

Owns reading and writing the one container the gateway uses for an update made of more than
one image - the images of a multi-image device (nRF5340 application + network core, two
application images), or the two builds of a direct-XIP application (one linked for each slot).
The format is nRF Connect SDK's, as ``scripts/bootloader/generate_zip.py`` writes it and
``cmake/sysbuild/image_signing*.cmake`` / ``dfu_app_zip_package`` fill it::

    dfu_application.zip
      manifest.json   {"format-version": 0, "time": ..., "name": ...,
                       "files": [{"file": "app.bin", "type": "application", "image_index": "0",
                                  "slot_index_primary": "1", "slot_index_secondary": "2",
                                  "load_address": 0x..., "version_MCUBOOT": "1.2.3", "size": N,
                                  "board": ..., "soc": ...},
                                 {"file": "net_core_app_update.bin", "image_index": "1",
                                  "board": "nrf5340dk_nrf5340_cpunet", ...},
                                 # direct-XIP (SB_CONFIG_MCUBOOT_BUILD_DIRECT_XIP_VARIANT):
                                 {"file": "app.bin", "image_index": "0", "slot": "0",
                                  "version_MCUBOOT+XIP": ...},
                                 {"file": "mcuboot_secondary_app.bin", "image_index": "0",
                                  "slot": "1", ...}]}
      app.bin, ...    the signed MCUboot images

generate_zip.py writes every value it was given as a string unless it starts with ``0x``
(then an int), so ``image_index``/``slot`` arrive as strings and ``load_address`` as an int:
both forms are accepted. Keys the gateway adds (ignored by Nordic's tools): ``"netcore":
true`` claims a network-core image; ``hardware`` names the target hardware.

Which image is a network core (never test-marked, installed for good) is the device config's
decision (``images: {N: {netcore: true}}``, trust rule (c)): the artifact's ``netcore`` key and
its ``board``/``soc`` names are unsigned manifest metadata and only a *claim*
(``BundleEntry.netcore``), which ``gateway/bootmodes/imageset.py`` cross-checks against the
config and never acts on.

Checks: a real zip whose members are regular files with safe relative names, no duplicates,
bounded sizes and count; ``manifest.json`` present and well formed; every listed file
present, its ``size`` (when given) equal to the member's; ``image_index`` an int 0-7, ``slot``
0 or 1, one file per (image, slot); a file the manifest does not list is refused (nothing
unexplained goes near a device). The MCUboot structure, hash and signature of every image are
checked afterwards by the image store, exactly as for a single image.

Bounds (the archive is input from outside: nothing its headers claim is trusted): at most
``MAX_MEMBERS + 1`` entries, read from the end record before ``zipfile`` parses the central
directory, which itself is at most ``MAX_CENTRAL_DIR`` bytes (no zip64); only stored and
deflate members (bzip2 and LZMA inflate without an output bound inside ``zipfile``); every
member is read through a bounded stream that stops ``MEMBER_MARGIN`` bytes past the cap (the
manifest: ``MAX_MANIFEST``; an image: the caller's maximum image size, else ``MAX_TOTAL``)
whatever sizes the local or central headers state, and all members together stop at
``MAX_TOTAL + MAX_MANIFEST``. Parsing is synchronous: callers on the event loop run it in a
thread (``ImageStore.add_file_async``).
"""

from __future__ import annotations

import io
import json
import posixpath
import stat
import struct
import time
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

from gateway import safejson

ZIP_MAGIC = b"PK\x03\x04"
MANIFEST = "manifest.json"
MAX_MEMBERS = 16
MAX_MANIFEST = 1 << 20
MAX_TOTAL = 64 << 20  # uncompressed bytes of all images together
MAX_IMAGE_NUMBER = 7  # DeviceConfig.image / CONFIG_UPDATEABLE_IMAGE_NUMBER <= 8
# the largest artifact file any source hands over when the device's slot size is not known: an
# image set of MAX_TOTAL stored bytes in a zip, maybe inside a Mender tar (download.py, images.py)
MAX_ARTIFACT = MAX_TOTAL + MAX_MANIFEST + (4 << 20)
MAX_CENTRAL_DIR = 1 << 20  # bytes of the central directory (17 entries need a few KiB)
MEMBER_MARGIN = 64 << 10  # read this far past a cap before refusing (a clear "too large")
READ_BLOCK = 64 << 10  # bytes per bounded read (deflate output per call is bounded by it)
_EOCD = struct.Struct("<4s4H2LH")
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate",
            zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA"}


class BundleError(ValueError):
    """The file is not a usable image-set artifact; the message says what is wrong."""


@dataclass(frozen=True)
class BundleEntry:
    """One image of an image set, as the artifact describes it."""

    name: str  # file name inside the artifact
    data: bytes
    image: int  # MCUboot image number (image_index)
    slot: int | None  # direct-XIP: the slot this build is linked for (0 primary, 1 secondary)
    load_address: int | None = None
    board: str | None = None
    # the manifest's claim that this is an nRF5340 network-core image: True (``netcore: true``
    # or a *cpunet* board/soc), False (``netcore: false``, or a board/soc without cpunet), None
    # (nothing said). Unsigned metadata: only cross-checked against the device config, never
    # decides (see the module docstring)
    netcore: bool | None = None
    hardware: str | None = None


def set_cap(max_image_size: int | None) -> int | None:
    """The size an artifact may have when it can be an image set of images of at most
    ``max_image_size`` bytes each (what a source may download before the store checks each
    image against its slot)."""
    if max_image_size is None:
        return None
    return max_image_size * MAX_MEMBERS + MAX_MANIFEST


def may_be_bundle(name: str | None) -> bool:
    """A file name (hawkBit artifact, job document file, URL path) that may hold an image set."""
    if not name:
        return False
    return name.split("?", 1)[0].lower().endswith(".zip")


def is_bundle(head: bytes) -> bool:
    """Does a file starting with ``head`` look like a zip container?"""
    return head.startswith(ZIP_MAGIC)


def _int_field(entry: dict[str, Any], key: str, where: str, lo: int, hi: int) -> int | None:
    raw = entry.get(key)
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise BundleError(f"{where}: {key} must be a number, not {raw!r}")
    try:
        val = int(raw, 0) if isinstance(raw, str) else int(raw)
    except (TypeError, ValueError):
        raise BundleError(f"{where}: {key} must be a number (got {raw!r})") from None
    if not lo <= val <= hi:
        raise BundleError(f"{where}: {key} {val} is outside {lo}..{hi}")
    return val


def _netcore_hint(entry: dict[str, Any]) -> bool | None:
    """What the manifest *claims* about a network core (see ``BundleEntry.netcore``): a claim to
    cross-check against the device config, never a decision (trust rule: manifest metadata)."""
    if isinstance(entry.get("netcore"), bool):
        return bool(entry["netcore"])
    board, soc = entry.get("board"), entry.get("soc")
    names = [x for x in (board, soc) if isinstance(x, str) and x]
    if not names:
        return None
    return any("cpunet" in x.lower() for x in names)  # nRF Connect SDK: *_cpunet, *_CPUNET_*


def _check_end_record(data: bytes, source: str) -> None:
    """Entry count and central directory size from the end record, before ``zipfile`` builds a
    ZipInfo per entry (it reads entries until the directory's stated size is used up, so both
    are checked); zip64 is refused (no image set needs it)."""
    at = data.rfind(b"PK\x05\x06", max(0, len(data) - _EOCD.size - 0xFFFF))
    if at < 0 or len(data) - at < _EOCD.size:
        return  # not a zip: zipfile says so
    _sig, _disk, _cd_disk, _here, count, cd_size, _cd_off, _comment = _EOCD.unpack_from(data, at)
    if data[max(0, at - 20):at][:4] == b"PK\x06\x07" or count == 0xFFFF or cd_size == 0xFFFFFFFF:
        raise BundleError(f"{source}: zip64 archives are not accepted")
    if count > MAX_MEMBERS + 1:
        raise BundleError(f"{source}: {count} members, at most {MAX_MEMBERS + 1} allowed")
    if cd_size > MAX_CENTRAL_DIR:
        raise BundleError(f"{source}: central directory of {cd_size} bytes, at most "
                          f"{MAX_CENTRAL_DIR} allowed")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, budget: list[int],
                 source: str) -> bytes:
    """A member's bytes through a bounded stream: refused once more than ``cap`` bytes (or the
    archive's remaining ``budget``) came out, whatever its headers claim."""
    limit = min(cap, budget[0])
    out = bytearray()
    try:
        with zf.open(info) as f:
            while True:
                block = f.read(READ_BLOCK)
                if not block:
                    break
                out += block
                if len(out) > limit:
                    raise BundleError(f"{source}: member {info.filename!r} inflates to more than "
                                      f"{limit} bytes (its headers claim {info.file_size}); refused")
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise BundleError(f"{source}: cannot read {info.filename!r}: {exc}") from None
    budget[0] -= len(out)
    return bytes(out)


def read_bundle(data: bytes, *, source: str = "artifact",
                max_image_size: int | None = None) -> list[BundleEntry]:
    """The images of a ``dfu_application.zip``-style artifact, checked (see module docstring).

    ``max_image_size``: the largest image a member may inflate to (the device's slot size;
    ``MAX_TOTAL`` when not known). Runs synchronously: off the event loop, please."""
    image_cap = (max_image_size if max_image_size is not None else MAX_TOTAL) + MEMBER_MARGIN
    budget = [MAX_TOTAL + MAX_MANIFEST + MEMBER_MARGIN]
    _check_end_record(data, source)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{source}: not a valid zip file: {exc}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS + 1:
            raise BundleError(f"{source}: {len(infos)} members, at most {MAX_MEMBERS + 1} allowed")
        names: dict[str, zipfile.ZipInfo] = {}
        total = 0
        for info in infos:
            name: str = info.filename
            norm = posixpath.normpath(name)
            if (not name or name.startswith("/") or "\\" in name or "\x00" in name
                    or norm.startswith("..") or norm != name or info.is_dir()):
                raise BundleError(f"{source}: unsafe or non-file member {name!r}")
            ftype = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix type recorded
            if ftype and ftype != stat.S_IFREG:
                raise BundleError(f"{source}: member {name!r} is not a regular file (link?)")
            if name in names:
                raise BundleError(f"{source}: member {name!r} appears twice")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                method = _METHODS.get(info.compress_type, f"method {info.compress_type}")
                raise BundleError(f"{source}: member {name!r} is compressed with {method}; only "
                                  "stored or deflate members are accepted")
            if info.flag_bits & 0x1:
                raise BundleError(f"{source}: member {name!r} is encrypted")
            names[name] = info
            total += info.file_size
        if total > MAX_TOTAL + MAX_MANIFEST:
            raise BundleError(f"{source}: {total} bytes uncompressed, more than allowed")
        if MANIFEST not in names:
            raise BundleError(f"{source}: no {MANIFEST} (an nRF Connect SDK dfu_application.zip "
                              "lists its images there)")
        if names[MANIFEST].file_size > MAX_MANIFEST:
            raise BundleError(f"{source}: {MANIFEST} is too large")
        raw_manifest = _read_member(zf, names[MANIFEST], MAX_MANIFEST, budget, source)
        try:
            manifest = safejson.loads(raw_manifest)
        except ValueError as exc:
            raise BundleError(f"{source}: {MANIFEST} is not valid JSON: {exc}") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, list) or not files:
            raise BundleError(f"{source}: {MANIFEST} has no 'files' list")
        out: list[BundleEntry] = []
        seen: set[tuple[int, int | None]] = set()
        listed: set[str] = set()
        for i, entry in enumerate(files):
            where = f"{source}: {MANIFEST} files[{i}]"
            if not isinstance(entry, dict):
                raise BundleError(f"{where} is not an object")
            fname = entry.get("file")
            if not isinstance(fname, str) or fname not in names or fname == MANIFEST:
                raise BundleError(f"{where}: file {fname!r} is not a member of the archive")
            name = fname
            if name in listed:
                raise BundleError(f"{where}: file {name!r} is listed twice")
            listed.add(name)
            image = _int_field(entry, "image_index", where, 0, MAX_IMAGE_NUMBER)
            slot = _int_field(entry, "slot", where, 0, 1)
            load = _int_field(entry, "load_address", where, 0, 0xFFFFFFFF)
            if names[name].file_size > image_cap:
                raise BundleError(f"{where}: {name!r} is {names[name].file_size} bytes, more "
                                  f"than the {image_cap - MEMBER_MARGIN} allowed")
            blob = _read_member(zf, names[name], image_cap, budget, where)
            size = _int_field(entry, "size", where, 0, MAX_TOTAL)
            if size is not None and size != len(blob):
                raise BundleError(f"{where}: {name!r} is {len(blob)} bytes, the manifest says {size}")
            key = (image or 0, slot)
            if key in seen:
                raise BundleError(f"{where}: a second file for image {key[0]}"
                                  + (f" slot {slot}" if slot is not None else ""))
            seen.add(key)
            board = entry.get("board") if isinstance(entry.get("board"), str) else None
            hw = entry.get("hardware") if isinstance(entry.get("hardware"), str) else None
            out.append(BundleEntry(name, blob, image or 0, slot, load, board,
                                   _netcore_hint(entry), hw))
        extra = sorted(set(names) - listed - {MANIFEST})
        if extra:
            raise BundleError(f"{source}: {MANIFEST} does not list {extra[0]!r}: refusing an "
                              "archive with unexplained files")
        images = {(e.image, e.slot) for e in out}
        for img in {e.image for e in out}:
            slots = {s for i, s in images if i == img}
            if None in slots and len(slots) > 1:
                raise BundleError(f"{source}: image {img} has a file for any slot and slot-"
                                  "specific files: give either one build or one per slot")
        return out


def write_bundle(entries: list[BundleEntry], *, name: str = "smp-gateway image set") -> bytes:
    """A ``dfu_application.zip`` holding ``entries`` (what ``read_bundle`` reads back).

    Used by sources that receive the images of a set as separate files (a local multi-image
    manifest, a hawkBit distribution set of several modules) to hand the gateway one artifact.
    """
    files = []
    for e in entries:
        item: dict[str, Any] = {"type": "application", "file": e.name, "image_index": str(e.image),
                                "size": len(e.data)}
        if e.slot is not None:
            item["slot"] = str(e.slot)
        if e.load_address is not None:
            item["load_address"] = e.load_address
        if e.board:
            item["board"] = e.board
        if e.netcore:
            item["netcore"] = True
        if e.hardware:
            item["hardware"] = e.hardware
        files.append(item)
    manifest = {"format-version": 0, "time": int(time.time()), "name": name, "files": files}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(_info(MANIFEST), json.dumps(manifest, indent=2))
        for e in entries:
            zf.writestr(_info(e.name), e.data)
    return buf.getvalue()


def _info(name: str) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # reproducible bytes
    zi.external_attr = (stat.S_IFREG | 0o644) << 16
    zi.compress_type = zipfile.ZIP_DEFLATED
    return zi

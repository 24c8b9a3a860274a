"""AWS IoT MQTT-based file delivery (streams), the gateway side: block bitmap, messages, resume.

Topics: request on ``$aws/things/{thing}/streams/{stream}/get/cbor`` (or ``/get/json``), blocks
on ``.../data/cbor``, errors on ``.../rejected/cbor``; DescribeStream on ``.../describe/cbor``,
answered on ``.../description/cbor`` (keys ``c`` client token, ``s`` stream version, ``d``
description, ``r`` the files: ``f`` file id, ``z`` size in bytes). The stream version goes in
every GetStream (``s``): a stream changed under a download is answered VersionMismatch, and a
resume is only taken for the same version. GetStream request keys: ``c`` client token,
``f`` file id, ``l`` block size, ``o`` block offset, ``b`` block bitmap, ``n`` number of blocks;
data message keys: ``f``, ``i`` block id, ``l`` block size, ``p`` payload; error: ``o`` code,
``m`` message, ``c`` client token. In JSON the byte strings (``b``, ``p``) are base64.

The bitmap is FreeRTOS OTA's (``ota.c``): bit ``1 << (i % 8)`` of byte ``i >> 3`` (LSB first)
stands for block ``i`` and is SET while the block is still wanted; bits past the last block
are clear. The request carries the whole bitmap from offset 0, so the service sends exactly
the missing blocks - after a lost message, a dropped connection or a restart (the bitmap and
the blocks received are kept in the state directory). Every value from the service is bounded
and checked against what was asked (file id, block id in range, block length exact).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

MIN_BLOCK, MAX_BLOCK = 256, 128 * 1024  # AWS: block size 256 bytes .. 128 KiB


class Bitmap:
    """Blocks still wanted (a set bit = wanted), LSB-first per byte, as FreeRTOS OTA keeps it."""

    def __init__(self, blocks: int, data: bytes | None = None) -> None:
        self.blocks = blocks
        n = (blocks + 7) // 8
        if data is None:
            buf = bytearray(b"\xff" * n)
            if blocks % 8:
                buf[-1] = (1 << (blocks % 8)) - 1  # bits past the last block are clear
            self.data = buf
        else:
            if len(data) != n:
                raise ValueError("bitmap of the wrong length")
            self.data = bytearray(data)

    def wanted(self, i: int) -> bool:
        return bool(self.data[i >> 3] & (1 << (i & 7)))

    def got(self, i: int) -> None:
        self.data[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def missing(self) -> int:
        return sum(bin(b).count("1") for b in self.data)


def block_len(i: int, size: int, block: int) -> int:
    return min(block, size - i * block)


MAX_STREAM_FILES = 256  # AWS: 50 files per stream; more is hostile


def encode_request(fmt: str, token: str, fileid: int, block: int, bitmap: Bitmap, n: int,
                   version: int | None = None) -> bytes:
    body: dict[str, Any] = {"c": token, "f": fileid, "l": block, "o": 0, "n": n}
    if version is not None:
        body["s"] = version
    if fmt == "cbor":
        body["b"] = bytes(bitmap.data)
        return cbor2.dumps(body)
    body["b"] = base64.b64encode(bytes(bitmap.data)).decode()
    return json.dumps(body).encode()


def encode_describe(fmt: str, token: str) -> bytes:
    body = {"c": token}
    return cbor2.dumps(body) if fmt == "cbor" else json.dumps(body).encode()


def description_of(data: dict[str, Any]) -> tuple[int | None, dict[int, int]]:
    """A DescribeStream answer: (stream version, {file id: size}); raises ValueError."""
    version, files = data.get("s"), data.get("r")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or version < 0):
        raise ValueError("s must be a non-negative integer")
    if not isinstance(files, list) or len(files) > MAX_STREAM_FILES:
        raise ValueError(f"r must be a list of at most {MAX_STREAM_FILES} files")
    out: dict[int, int] = {}
    for f in files:
        fid, size = (f.get("f"), f.get("z")) if isinstance(f, dict) else (None, None)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in (fid, size)):
            raise ValueError("r[].f and r[].z must be non-negative integers")
        assert isinstance(fid, int) and isinstance(size, int)
        out[fid] = size
    return version, out


@dataclass(frozen=True)
class Block:
    fileid: int
    index: int
    length: int
    payload: bytes


def decode(fmt: str, payload: bytes, max_len: int) -> dict[str, Any]:
    """A data or rejected message as a dict (bounded; raises ValueError when unreadable)."""
    if len(payload) > max_len:
        raise ValueError(f"message over {max_len} bytes")
    try:
        data = cbor2.loads(payload) if fmt == "cbor" else json.loads(payload)
    except Exception as exc:  # cbor2 raises several kinds for hostile input
        raise ValueError(f"unreadable {fmt}: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise ValueError("not a map")
    return data


def block_of(fmt: str, data: dict[str, Any]) -> Block:
    f, i, ln, p = data.get("f"), data.get("i"), data.get("l"), data.get("p")
    if fmt == "json" and isinstance(p, str):
        p = base64.b64decode(p, validate=True)
    for v in (f, i, ln):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError("f/i/l must be non-negative integers")
    if not isinstance(p, bytes):
        raise ValueError("p must be a byte string")
    assert isinstance(f, int) and isinstance(i, int) and isinstance(ln, int)
    return Block(f, i, ln, p)


class Partial:
    """A download in the state directory: the file being filled and its bitmap (resume data).

    Blocks are written to the file before the bitmap that says they are there is saved
    (atomically): a crash between the two costs blocks asked again, never a hole taken as data.
    """

    def __init__(self, root: Path, key: str, size: int, block: int,
                 version: int | None = None) -> None:
        self.size, self.block, self.version = size, block, version
        self.blocks = (size + block - 1) // block
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / f"{key}.part"
        self.map_path = root / f"{key}.bitmap"
        self.bitmap = Bitmap(self.blocks)
        self.resumed = 0
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            saved = json.loads(self.map_path.read_text())
            if (saved["size"] == size and saved["block"] == block
                    and saved.get("version") == version and self.path.is_file()
                    and self.path.stat().st_size == size):
                self.bitmap = Bitmap(self.blocks, bytes.fromhex(saved["bitmap"]))
                self.resumed = self.blocks - self.bitmap.missing()
        if self.resumed == 0:
            with self.path.open("wb") as fh:
                fh.truncate(size)
        self._fh = self.path.open("r+b")

    def write(self, b: Block) -> None:
        self._fh.seek(b.index * self.block)
        self._fh.write(b.payload)
        self.bitmap.got(b.index)

    def save(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        tmp = self.map_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"size": self.size, "block": self.block, "version": self.version,
                                   "bitmap": bytes(self.bitmap.data).hex()}))
        os.replace(tmp, self.map_path)

    def close(self) -> None:
        self._fh.close()

    def done(self) -> Path:
        """The complete file, moved out of the resume data (the bitmap is removed)."""
        self.close()
        final = self.path.with_suffix(".bin")
        os.replace(self.path, final)
        with contextlib.suppress(OSError):
            self.map_path.unlink()
        return final


def discard(root: Path, key: str) -> None:
    """Remove a download's files (partial file, bitmap, complete file) - nothing else."""
    for suffix in (".part", ".bitmap", ".tmp", ".bin"):
        with contextlib.suppress(OSError):
            (root / f"{key}{suffix}").unlink()


def sweep(root: Path, keep: str, max_bytes: int, max_age_s: float, now: float) -> list[str]:
    """Bound the downloads on disk: every download (its files share a key) not touched for
    ``max_age_s`` is removed, then the oldest until the rest holds at most ``max_bytes``; the
    download ``keep`` (the one about to run) is never removed. Returns the keys removed."""
    entries: dict[str, list[tuple[Path, float, int]]] = {}
    with contextlib.suppress(OSError):
        for p in root.iterdir():
            if p.suffix in (".part", ".bitmap", ".tmp", ".bin") and p.is_file():
                with contextlib.suppress(OSError):
                    st = p.stat()
                    entries.setdefault(p.stem, []).append((p, st.st_mtime, st.st_blocks * 512))
    by_age = sorted(entries.items(), key=lambda kv: max(m for _p, m, _s in kv[1]))
    total = sum(sz for _k, fs in by_age for _p, _m, sz in fs)
    removed = []
    for k, fs in by_age:
        if k == keep:
            continue
        newest = max(m for _p, m, _s in fs)
        if now - newest > max_age_s or total > max_bytes:
            discard(root, k)
            total -= sum(sz for _p, _m, sz in fs)
            removed.append(k)
    return removed

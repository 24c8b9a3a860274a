"""Developer kit: make signing keys and signed MCUboot images with the real ``imgtool``.

Owns nothing at run time; used by ``smp-gateway demo``, the benchmarks and the tests so that
every image the project handles was produced by MCUboot's own tool, exactly as a firmware
build (``west build --sysbuild``) would produce it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_HEADER_SIZE = 0x200
DEFAULT_SLOT_SIZE = 0x40000


def _imgtool(*args: str) -> None:
    # imgtool's Python API for signing is internal and changes between releases; its CLI is
    # the documented interface, so run it (from this interpreter's environment).
    cmd = [sys.executable, "-c", "import imgtool.main as m; m.imgtool()", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"imgtool {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout}")


def make_key(path: str | Path, key_type: str = "ecdsa-p256") -> Path:
    """``imgtool keygen``: a new private key in PEM (0600)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _imgtool("keygen", "-k", str(p), "-t", key_type)
    os.chmod(p, 0o600)
    return p


def fake_firmware(size: int, seed: str) -> bytes:
    """Deterministic pseudo-random application bytes (stands in for zephyr.bin)."""
    out = bytearray()
    block = hashlib.sha256(seed.encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def sign_image(
    out: str | Path,
    *,
    version: str,
    key: str | Path | None,
    payload: bytes | None = None,
    size: int = 64 * 1024,
    slot_size: int = DEFAULT_SLOT_SIZE,
    header_size: int = DEFAULT_HEADER_SIZE,
    security_counter: int | None = None,
    extra: tuple[str, ...] = (),
) -> Path:
    """``imgtool sign``: wrap ``payload`` (or deterministic bytes of ``size``) into an image.

    ``key=None`` makes an unsigned image (hash TLV only), as ``imgtool sign`` without ``-k``.
    """
    outp = Path(out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    raw = outp.with_suffix(".raw")
    raw.write_bytes(payload if payload is not None else fake_firmware(size, f"{outp.name}{version}"))
    args = [
        "sign",
        "--header-size", hex(header_size),
        "--pad-header",
        "--align", "8",
        "--version", version,
        "--slot-size", hex(slot_size),
    ]
    if key is not None:
        args += ["--key", str(key)]
    if security_counter is not None:
        args += ["--security-counter", str(security_counter)]
    args += [*extra, str(raw), str(outp)]
    try:
        _imgtool(*args)
    finally:
        raw.unlink(missing_ok=True)
    return outp

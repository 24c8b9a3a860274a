"""Verified image store and the pre-flight checks that run before any byte reaches a device.

Owns the step between a fleet source and a device: a raw file from a source becomes a
``VerifiedImage`` only after its MCUboot structure, hash and signature (against the gateway's
trusted keys, with imgtool) are checked; verified images are kept content-addressed under
``<state_dir>/images/<sha256>.bin``, named by the SHA-256 of exactly the bytes stored (not by
the image's hash TLV: two files of one image - e.g. two ECDSA signatures - differ). Only the
image itself is kept and sent - header, body and TLVs, ``total_size`` bytes: hash and signature
cover nothing after that, so a file whose tail is anything but erased flash (0xFF) - e.g. the
MCUboot trailer of ``imgtool sign --pad --confirm``, which would make the device install the
image permanently without a test - is refused.
``preflight`` then decides, per device, whether the image may be sent: hardware type, slot size
(image + MCUboot's trailer), downgrade and security counter. Every refusal is an
``ImageRefused`` with a reason code and a sentence an operator can act on.
"""

from __future__ import annotations

import enum
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gateway.mcuboot import (
    BOOT_MAGIC_SIZE,
    ImageFormatError,
    ImageInfo,
    SignatureError,
    TrustedKey,
    Version,
    boot_magics,
    parse_image,
    verify_signature,
)
from gateway.sources.base import UpdateResult


class Refusal(enum.Enum):
    BAD_FORMAT = "bad-format"
    HASH_MISMATCH = "hash-mismatch"
    UNSIGNED = "unsigned"
    UNTRUSTED = "untrusted-signature"
    TOO_LARGE = "too-large"
    WRONG_HARDWARE = "wrong-hardware"
    NOT_NEWER = "not-newer"
    SECURITY_COUNTER = "security-counter"
    ENCRYPTED = "encrypted"
    TRAILING_DATA = "trailing-data"

    @property
    def lwm2m(self) -> UpdateResult:
        return {
            Refusal.TOO_LARGE: UpdateResult.NOT_ENOUGH_FLASH,
            Refusal.WRONG_HARDWARE: UpdateResult.UNSUPPORTED_PACKAGE,
            Refusal.NOT_NEWER: UpdateResult.UNSUPPORTED_PACKAGE,
            Refusal.ENCRYPTED: UpdateResult.UNSUPPORTED_PACKAGE,
            Refusal.BAD_FORMAT: UpdateResult.UNSUPPORTED_PACKAGE,
            Refusal.TRAILING_DATA: UpdateResult.UNSUPPORTED_PACKAGE,
        }.get(self, UpdateResult.INTEGRITY_FAILURE)


class ImageRefused(Exception):
    def __init__(self, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"


@dataclass(frozen=True)
class VerifiedImage:
    """An image whose structure, hash and signature the gateway has checked."""

    path: Path
    info: ImageInfo
    signed_by: str | None  # trusted key name; None = unsigned (allowed per device only)
    hardware: str | None  # target hardware type from the source's metadata
    file_sha256: bytes  # sha256 of the stored bytes = the image (total_size): the upload's `sha`
    size: int  # info.total_size: the bytes stored, uploaded and checked against the slot

    @property
    def version(self) -> Version:
        return self.info.version

    @property
    def hash(self) -> bytes:
        return self.info.hash

    def read(self) -> bytes:
        """The verified image, exactly: what is uploaded (and what the upload's ``sha`` covers)."""
        data = self.path.read_bytes()
        if len(data) != self.size or hashlib.sha256(data).digest() != self.file_sha256:
            raise ImageRefused(Refusal.HASH_MISMATCH,
                               f"{self.path} changed on disk after verification")
        return data


def _tail_problem(data: bytes, end: int) -> str | None:
    """Why the bytes after the image (``data[end:]``) may not be dropped silently, or None.

    Erased flash (0xFF) is slot padding and is dropped; anything else is refused, naming the
    MCUboot trailer when the file ends with one (imgtool ``Image.pad_to``: magic at the very end,
    image_ok ``BOOT_MAX_ALIGN`` bytes before the 16-byte aligned magic).
    """
    tail = data[end:]
    stripped = tail.lstrip(b"\xff")
    if not stripped:
        return None
    first = end + len(tail) - len(stripped)
    if len(data) - end >= BOOT_MAGIC_SIZE + 8 and any(data.endswith(m) for m in boot_magics()):
        image_ok = data[-(BOOT_MAGIC_SIZE + 8)] == 0x01
        if image_ok:
            return (f"the file carries an MCUboot trailer after the signed image (offset {first}) "
                    "with image_ok set, as `imgtool sign --pad --confirm` writes it: uploaded, it "
                    "would make MCUboot install the image permanently at the next reset, without "
                    "a test. Sign update images without --pad/--confirm")
        return (f"the file carries an MCUboot trailer after the signed image (offset {first}), as "
                "`imgtool sign --pad` writes it (image_ok unset): uploaded, it would schedule the "
                "image without the gateway. Sign update images without --pad")
    return (f"{len(stripped)} bytes after the end of the signed image (offset {first}, image ends "
            f"at {end}) are not erased flash (0xFF); no hash or signature covers them. Give the "
            "gateway the image as imgtool signed it (nothing appended)")


def check_image(
    data: bytes, keys: list[TrustedKey], *, allow_unsigned: bool = False
) -> tuple[ImageInfo, str | None]:
    """Structure + hash + signature; returns (info, key name or None when unsigned)."""
    try:
        info = parse_image(data)
    except ImageFormatError as exc:
        raise ImageRefused(Refusal.BAD_FORMAT, f"not a valid MCUboot image: {exc}") from exc
    if not info.hash_valid:
        raise ImageRefused(Refusal.HASH_MISMATCH,
                           "the image's SHA-256 TLV does not match its contents (corrupt image)")
    if len(data) < info.total_size:
        raise ImageRefused(Refusal.BAD_FORMAT, "image is truncated")
    tail = _tail_problem(data, info.total_size)
    if tail is not None:
        raise ImageRefused(Refusal.TRAILING_DATA, tail)
    if not info.is_signed:
        if allow_unsigned:
            return info, None
        raise ImageRefused(Refusal.UNSIGNED,
                           "the image carries no signature; set allow_unsigned on the device to permit")
    try:
        key = verify_signature(data, keys)
    except SignatureError as exc:
        raise ImageRefused(Refusal.UNTRUSTED, str(exc)) from exc
    return info, key.name


class ImageStore:
    """Content-addressed store of verified images in ``<state_dir>/images``.

    A file is named by the SHA-256 of its own bytes, so it can never be replaced by other bytes
    (a stored file is only ever rewritten with identical content)."""

    def __init__(self, root: Path, keys: list[TrustedKey]) -> None:
        self.root = root
        self.keys = keys
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._cache: dict[tuple[bytes, str | None, bool], VerifiedImage] = {}

    def add_file(self, path: Path, *, hardware: str | None, allow_unsigned: bool = False) -> VerifiedImage:
        return self.add_bytes(path.read_bytes(), hardware=hardware, allow_unsigned=allow_unsigned)

    def add_bytes(self, data: bytes, *, hardware: str | None, allow_unsigned: bool = False) -> VerifiedImage:
        ck = (hashlib.sha256(data).digest(), hardware, allow_unsigned)
        if ck in self._cache:
            return self._cache[ck]
        info, signer = check_image(data, self.keys, allow_unsigned=allow_unsigned)
        data = data[: info.total_size]  # only what hash and signature cover is kept and sent
        file_sha = hashlib.sha256(data).digest()
        dest = self.root / f"{file_sha.hex()}.bin"
        if not dest.exists() or hashlib.sha256(dest.read_bytes()).digest() != file_sha:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".in-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o600)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        img = VerifiedImage(dest, info, signer, hardware, file_sha, len(data))
        self._cache[ck] = img
        return img


_COUNTERS: dict[Path, tuple[int, int, bytes, int | None]] = {}  # path -> (mtime, size, hash, counter)


def known_security_counter(store_dir: Path, image_hash: bytes | None) -> int | None:
    """The security counter of an image the store holds (by its hash TLV), else None.

    This is how the gateway learns the *running* image's counter: img_mgmt reports only the
    version and hash, but an image this gateway installed (or was given) is in its store. Files
    are named by their own SHA-256, so the store is scanned (headers parsed once per file).
    Every file with that hash TLV has the same protected (signed) counter.
    """
    if not image_hash:
        return None
    try:
        paths = sorted(store_dir.glob("*.bin"))
    except OSError:
        return None
    for p in paths:
        try:
            st = p.stat()
            got = _COUNTERS.get(p)
            if got is None or got[:2] != (st.st_mtime_ns, st.st_size):
                info = parse_image(p.read_bytes())
                if not info.hash_valid:
                    continue
                got = (st.st_mtime_ns, st.st_size, info.hash, info.security_counter)
                _COUNTERS[p] = got
        except (OSError, ImageFormatError):
            continue
        if got[2] == image_hash:
            return got[3]
    return None


def preflight(
    image: VerifiedImage,
    *,
    device_id: str,
    hardware: str,
    slot_size: int | None,
    running: Version | None,
    running_hash: bytes | None,
    allow_downgrade: bool,
    running_security_counter: int | None = None,
    trailer: int = 0,
) -> None:
    """Refuse an image this device must not receive; raises ImageRefused.

    ``trailer``: bytes MCUboot keeps at the end of the slot (``mcuboot.trailer_size`` for the
    device's flash write alignment and CONFIG_BOOT_MAX_IMG_SECTORS).
    """
    if image.hardware is not None and image.hardware != hardware:
        raise ImageRefused(Refusal.WRONG_HARDWARE,
                           f"image is built for hardware {image.hardware!r}; "
                           f"device {device_id} is {hardware!r} (fix the image's hardware in the "
                           "update source, or the device's hardware in the gateway config)")
    if image.info.is_encrypted:
        raise ImageRefused(Refusal.ENCRYPTED, "encrypted images are not supported yet")
    if slot_size is not None:
        # MCUboot swap needs the image plus its trailer to fit; the trailer is at the slot's end
        if image.size + trailer > slot_size:
            raise ImageRefused(Refusal.TOO_LARGE,
                               f"image is {image.size} bytes and MCUboot's trailer needs {trailer} "
                               f"at the end of the slot; device {device_id}'s slot holds "
                               f"{slot_size}: build a smaller image, or check slot_size, "
                               "flash_write_align and max_img_sectors in the config against the "
                               "device's partition table and MCUboot build")
    if running is not None and running_hash != image.hash and not allow_downgrade:
        if image.version <= running:
            raise ImageRefused(Refusal.NOT_NEWER,
                               f"image version {image.version} is not newer than the running "
                               f"{running} (set allow_downgrade to permit)")
    if running_security_counter is not None:
        # both counters come from the protected (signed) TLV area only (parse_image)
        if image.info.security_counter is None:
            raise ImageRefused(Refusal.SECURITY_COUNTER,
                               f"the running image has security counter {running_security_counter} "
                               "but this image has none in its protected TLVs (a counter outside "
                               "them is not signed and does not count); MCUboot's rollback "
                               "protection would refuse it: sign it with --security-counter")
        if image.info.security_counter < running_security_counter:
            raise ImageRefused(Refusal.SECURITY_COUNTER,
                               f"image security counter {image.info.security_counter} is below the "
                               f"device's {running_security_counter}; MCUboot would refuse it")

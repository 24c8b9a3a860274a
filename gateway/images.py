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

Hashes: SHA-256, SHA-384 or SHA-512 TLV; signatures: ECDSA P-256 / P-384, Ed25519, RSA-2048 /
3072 (imgtool verifies each). An *encrypted* image (ENC TLV: RSA-OAEP, ECIES-P256,
ECIES-X25519) is checked as far as the gateway can without the device's private key: header
and TLV structure, and that a trusted key signed the image's hash TLV
(``mcuboot.verify_signature_over_digest``); the hash itself covers the plaintext, which only
MCUboot can check after decrypting. ``VerifiedImage.unverified`` says so, the engine repeats it
in the outcome, and modes that cannot take an image back refuse such an image.

Image sets (``VerifiedImageSet``): an artifact holding several images (``gateway.artifacts.
bundle``: nRF Connect SDK ``dfu_application.zip`` - a multi-image update, or the two slot
builds of a direct-XIP application) is verified image by image; the set is identified by the
hashes of its members (``set_id``), which is what the journal and the daemon see as its hash.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gateway.artifacts.bundle import MAX_ARTIFACT, BundleError, is_bundle, read_bundle, set_cap
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
    verify_signature_over_digest,
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
    WRONG_SLOT = "wrong-slot"  # direct-XIP: no build linked for the slot the upload goes to
    BAD_SET = "bad-image-set"  # an image set that does not fit the device's images
    MODE = "bootloader-mode"  # what the device's MCUboot mode cannot do safely

    @property
    def lwm2m(self) -> UpdateResult:
        return {
            Refusal.TOO_LARGE: UpdateResult.NOT_ENOUGH_FLASH,
            Refusal.WRONG_HARDWARE: UpdateResult.UNSUPPORTED_PACKAGE,
            Refusal.NOT_NEWER: UpdateResult.UNSUPPORTED_PACKAGE,
            Refusal.ENCRYPTED: UpdateResult.UNSUPPORTED_PACKAGE,
            Refusal.BAD_FORMAT: UpdateResult.UNSUPPORTED_PACKAGE,
            Refusal.TRAILING_DATA: UpdateResult.UNSUPPORTED_PACKAGE,
            Refusal.WRONG_SLOT: UpdateResult.UNSUPPORTED_PACKAGE,
            Refusal.BAD_SET: UpdateResult.UNSUPPORTED_PACKAGE,
            Refusal.MODE: UpdateResult.UNSUPPORTED_PROTOCOL,
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
    # what the checks could not cover (encrypted image: the hash is over the plaintext), else None
    unverified: str | None = None

    @property
    def fully_verified(self) -> bool:
        """Structure, hash over these bytes and signature all checked by the gateway."""
        return self.unverified is None and self.signed_by is not None

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
    encrypted_hash = not info.hash_valid and info.is_encrypted
    if not info.hash_valid and not encrypted_hash:
        raise ImageRefused(Refusal.HASH_MISMATCH,
                           f"the image's {info.hash_name} TLV does not match its contents "
                           "(corrupt image)")
    if len(data) < info.total_size:
        raise ImageRefused(Refusal.BAD_FORMAT, "image is truncated")
    tail = _tail_problem(data, info.total_size)
    if tail is not None:
        raise ImageRefused(Refusal.TRAILING_DATA, tail)
    if not info.is_signed:
        if encrypted_hash:
            raise ImageRefused(Refusal.UNSIGNED,
                               "the image is encrypted and unsigned: the gateway can check neither "
                               "its hash (over the plaintext) nor a signature")
        if allow_unsigned:
            return info, None
        raise ImageRefused(Refusal.UNSIGNED,
                           "the image carries no signature; set allow_unsigned on the device to permit")
    try:
        key = verify_signature_over_digest(info, keys) if encrypted_hash else verify_signature(data, keys)
    except SignatureError as exc:
        raise ImageRefused(Refusal.UNTRUSTED, str(exc)) from exc
    return info, key.name


def unverified_part(info: ImageInfo) -> str | None:
    """What the gateway's checks of ``info`` could not cover (None: everything)."""
    if info.is_encrypted and not info.hash_valid:
        return (f"encrypted ({info.encryption}): the header, the TLVs and the signature over the "
                f"{info.hash_name} TLV were checked; the hash covers the plaintext, which only "
                "the device's MCUboot can decrypt and check")
    return None


@dataclass(frozen=True)
class SetMember:
    """One image of an image set."""

    image: int  # MCUboot image number
    slot: int | None  # direct-XIP: the slot this build is linked for; None = any / not slot-bound
    verified: VerifiedImage
    name: str = ""  # file name in the artifact
    # the artifact's unsigned claim of an nRF5340 network core (``BundleEntry.netcore``): only
    # cross-checked against the device config (``imageset.rules``), never decides
    netcore: bool | None = None
    load_address: int | None = None  # from the artifact's manifest (informative)

    @property
    def hash(self) -> bytes:
        return self.verified.hash

    def label(self) -> str:
        s = f"image {self.image}"
        return s + (f" (slot {self.slot} build)" if self.slot is not None else "")


@dataclass(frozen=True)
class VerifiedImageSet(VerifiedImage):
    """Several verified images updated together (multi-image), or the slot builds of one
    direct-XIP image. ``hash`` is the set's id; ``info``/``version`` are image 0's."""

    members: tuple[SetMember, ...] = ()
    set_id: bytes = b""

    @property
    def hash(self) -> bytes:
        return self.set_id

    @property
    def image_numbers(self) -> list[int]:
        return sorted({m.image for m in self.members})

    @property
    def slot_builds(self) -> bool:
        """The members are builds of one image for different slots (direct-XIP)."""
        return self.image_numbers == [0] and all(m.slot is not None for m in self.members)

    def describe(self) -> str:
        return ", ".join(f"{m.label()} {m.verified.version}" for m in self.members)


def set_id(members: list[tuple[int, int | None, bytes]]) -> bytes:
    """The id of a set of (image, slot, hash): the same images make the same id in any container."""
    canon = sorted((i, -1 if s is None else s, h.hex()) for i, s, h in members)
    return hashlib.sha256(b"smp-gateway image set\0" + json.dumps(canon).encode()).digest()


class ImageStore:
    """Content-addressed store of verified images in ``<state_dir>/images``.

    A file is named by the SHA-256 of its own bytes, so it can never be replaced by other bytes
    (a stored file is only ever rewritten with identical content)."""

    def __init__(self, root: Path, keys: list[TrustedKey]) -> None:
        self.root = root
        self.keys = keys
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._cache: dict[tuple[bytes, str | None, bool], VerifiedImage] = {}

    def add_file(self, path: Path, *, hardware: str | None, allow_unsigned: bool = False,
                 max_image_size: int | None = None) -> VerifiedImage:
        """``add_bytes`` of a file - refused before it is read when it is larger than any
        artifact of images of at most ``max_image_size`` bytes can be (bytes bound)."""
        cap = set_cap(max_image_size) or MAX_ARTIFACT
        size = path.stat().st_size
        if size > cap:
            raise ImageRefused(Refusal.TOO_LARGE, f"artifact is {size} bytes, more than the "
                               f"{cap} an image (or image set) for this device can be")
        return self.add_bytes(path.read_bytes(), hardware=hardware, allow_unsigned=allow_unsigned,
                              max_image_size=max_image_size)

    async def add_file_async(self, path: Path, *, hardware: str | None,
                             allow_unsigned: bool = False,
                             max_image_size: int | None = None) -> VerifiedImage:
        """``add_file`` in a worker thread: unpacking, hashing and signature checks of an
        artifact from outside take CPU time the event loop (every other device's upload, the
        sources, the status socket) must not wait for."""
        return await asyncio.to_thread(self.add_file, path, hardware=hardware,
                                       allow_unsigned=allow_unsigned,
                                       max_image_size=max_image_size)

    def add_bytes(self, data: bytes, *, hardware: str | None, allow_unsigned: bool = False,
                  max_image_size: int | None = None) -> VerifiedImage:
        """Verify and store an image - or an image set (a zip artifact): ``VerifiedImageSet``,
        unless it holds a single image, which is returned as that image. ``max_image_size``
        bounds what each member of a set may inflate to (``bundle.read_bundle``)."""
        ck = (hashlib.sha256(data).digest(), hardware, allow_unsigned)
        if ck in self._cache:
            return self._cache[ck]
        img = (self._add_set(data, hardware=hardware, allow_unsigned=allow_unsigned,
                             max_image_size=max_image_size)
               if is_bundle(data[:4]) else
               self._add_image(data, hardware=hardware, allow_unsigned=allow_unsigned))
        self._cache[ck] = img
        return img

    def _write(self, name: str, data: bytes) -> Path:
        dest = self.root / name
        if not dest.exists() or dest.read_bytes() != data:
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
        return dest

    def _add_image(self, data: bytes, *, hardware: str | None, allow_unsigned: bool,
                   what: str = "") -> VerifiedImage:
        try:
            info, signer = check_image(data, self.keys, allow_unsigned=allow_unsigned)
        except ImageRefused as exc:
            if what:
                raise ImageRefused(exc.reason, f"{what}: {exc.message}") from exc
            raise
        data = data[: info.total_size]  # only what hash and signature cover is kept and sent
        file_sha = hashlib.sha256(data).digest()
        dest = self._write(f"{file_sha.hex()}.bin", data)
        return VerifiedImage(dest, info, signer, hardware, file_sha, len(data),
                             unverified=unverified_part(info))

    def _add_set(self, data: bytes, *, hardware: str | None, allow_unsigned: bool,
                 max_image_size: int | None = None) -> VerifiedImage:
        try:
            entries = read_bundle(data, max_image_size=max_image_size)
        except BundleError as exc:
            raise ImageRefused(Refusal.BAD_FORMAT, f"image set artifact: {exc}") from exc
        members: list[SetMember] = []
        for e in entries:
            what = f"{e.name} (image {e.image}" + (f", slot {e.slot} build)" if e.slot is not None
                                                   else ")")
            img = self._add_image(e.data, hardware=e.hardware or hardware,
                                  allow_unsigned=allow_unsigned, what=what)
            members.append(SetMember(e.image, e.slot, img, e.name, e.netcore, e.load_address))
        members.sort(key=lambda m: (m.image, -1 if m.slot is None else m.slot))
        if len(members) == 1 and members[0].slot is None:
            return members[0].verified  # a dfu_application.zip of one image is that image
        slot_bound = [m for m in members if m.slot is not None]
        if slot_bound and len({m.image for m in members}) > 1:
            raise ImageRefused(Refusal.BAD_SET, "image set mixes slot-specific (direct-XIP) "
                               "builds with other images: MCUboot's direct-XIP runs one image")
        vers = {m.verified.version for m in slot_bound}
        if len(vers) > 1:
            raise ImageRefused(Refusal.BAD_SET, "the slot builds of the image differ in version ("
                               + ", ".join(sorted(str(v) for v in vers)) + "): they must be one "
                               "release linked for two slots")
        sid = set_id([(m.image, m.slot, m.hash) for m in members])
        dest = self._write(f"{hashlib.sha256(data).hexdigest()}.zip", data)
        first = members[0].verified
        unverified = "; ".join(f"{m.label()}: {m.verified.unverified}" for m in members
                               if m.verified.unverified) or None
        return VerifiedImageSet(dest, first.info, first.signed_by, hardware,
                                hashlib.sha256(data).digest(), len(data), unverified,
                                members=tuple(members), set_id=sid)


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

"""MCUboot image format: parsing, hashing and signature verification.

Owns the byte layout of an MCUboot image (``struct image_header``, the protected and
unprotected TLV areas) as MCUboot's ``bootutil/image.h`` defines it, and the check of an
image's signature against a set of trusted public keys.

Parsing is written here (it is ~100 lines of ``struct``) because imgtool exposes only a
file-based ``Image.verify`` that stops at the first problem without saying *which* TLV is
wrong and gives no access to the security counter, the key hash or the TLV list; the
signature check itself is delegated to imgtool so that it is exactly MCUboot's.
Both the gateway (before anything is sent) and the device simulator (at "boot") use it.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass, field
from enum import IntEnum
from functools import total_ordering
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

IMAGE_MAGIC = 0x96F3B83D
TLV_INFO_MAGIC = 0x6907
TLV_PROT_INFO_MAGIC = 0x6908
HEADER_STRUCT = struct.Struct("<IIHHII")  # magic, load_addr, hdr_size, prot_tlv_size, img_size, flags
VERSION_STRUCT = struct.Struct("<BBHI")
HEADER_MIN_SIZE = 32
TLV_INFO_STRUCT = struct.Struct("<HH")
TLV_STRUCT = struct.Struct("<BBH")
DEPENDENCY_STRUCT = struct.Struct("<B3xBBHI")  # struct image_dependency (bootutil/image.h)


class TLV(IntEnum):
    """TLV types from MCUboot's ``bootutil/image.h`` (the ones the gateway cares about)."""

    KEYHASH = 0x01
    PUBKEY = 0x02
    SHA256 = 0x10
    SHA384 = 0x11
    SHA512 = 0x12
    RSA2048_PSS = 0x20
    ECDSA_SIG = 0x22
    RSA3072_PSS = 0x23
    ED25519 = 0x24
    SIG_PURE = 0x25
    ENC_RSA2048 = 0x30
    ENC_KW = 0x31
    ENC_EC256 = 0x32
    ENC_X25519 = 0x33
    ENC_X25519_SHA512 = 0x34
    DEPENDENCY = 0x40
    SEC_CNT = 0x50
    BOOT_RECORD = 0x60


SIGNATURE_TLVS = frozenset({TLV.RSA2048_PSS, TLV.ECDSA_SIG, TLV.RSA3072_PSS, TLV.ED25519})
HASH_TLVS = {TLV.SHA256: "sha256", TLV.SHA384: "sha384", TLV.SHA512: "sha512"}

ENCRYPTION_TLVS = {TLV.ENC_RSA2048: "RSA-OAEP", TLV.ENC_KW: "AES key wrap", TLV.ENC_EC256: "ECIES-P256",
                   TLV.ENC_X25519: "ECIES-X25519", TLV.ENC_X25519_SHA512: "ECIES-X25519 (HMAC-SHA512)"}

# image header flags (bootutil/image.h IMAGE_F_*; imgtool image.py IMAGE_F)
IMAGE_F_PIC = 0x01
IMAGE_F_ENCRYPTED_AES128 = 0x04
IMAGE_F_ENCRYPTED_AES256 = 0x08
IMAGE_F_NON_BOOTABLE = 0x10
IMAGE_F_RAM_LOAD = 0x20
IMAGE_F_ROM_FIXED = 0x100  # imgtool --rom-fixed: load_addr is the flash offset it is linked for


class ImageFormatError(ValueError):
    """The bytes are not a well-formed MCUboot image; the message says what is wrong."""


class SignatureError(ValueError):
    """The image is well formed but its signature does not verify against any trusted key."""


@total_ordering
@dataclass(frozen=True)
class Version:
    """An MCUboot ``struct image_version``; compares like MCUboot/Zephyr (major, minor, rev, build)."""

    major: int
    minor: int
    revision: int
    build: int = 0

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse ``a.b.c``, ``a.b.c.d`` (Zephyr's img_mgmt form) or ``a.b.c+d`` (imgtool/RDFM form)."""
        raw = text.strip()
        build = 0
        if "+" in raw:
            raw, build_s = raw.split("+", 1)
            build = int(build_s)
        parts = raw.split(".")
        if not 1 <= len(parts) <= 4 or not all(p.isdigit() for p in parts):
            raise ValueError(f"not a version: {text!r} (expected a.b.c or a.b.c+build)")
        nums = [int(p) for p in parts] + [0] * (4 - len(parts))
        if len(parts) == 4:
            build = nums[3]
        v = cls(nums[0], nums[1], nums[2], build)
        if v.major > 0xFF or v.minor > 0xFF or v.revision > 0xFFFF or v.build > 0xFFFFFFFF:
            raise ValueError(f"version out of range for MCUboot: {text!r}")
        return v

    def key(self) -> tuple[int, int, int, int]:
        return (self.major, self.minor, self.revision, self.build)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.key() < other.key()

    def smp_str(self) -> str:
        """The string Zephyr's ``img_mgmt_ver_str`` reports: ``%hu.%hu.%hu`` then ``.%u`` if build."""
        s = f"{self.major}.{self.minor}.{self.revision}"
        return f"{s}.{self.build}" if self.build else s

    def semver(self) -> str:
        """``a.b.c`` or ``a.b.c+d`` (imgtool's ``--version`` syntax; RDFM's software version)."""
        s = f"{self.major}.{self.minor}.{self.revision}"
        return f"{s}+{self.build}" if self.build else s

    def __str__(self) -> str:
        return self.semver()


@dataclass(frozen=True)
class ImageInfo:
    """What the gateway knows of an MCUboot image after parsing it."""

    load_addr: int
    hdr_size: int
    protect_tlv_size: int
    img_size: int
    flags: int
    version: Version
    hash: bytes  # the SHA-256 TLV: what img_mgmt reports as the slot's "hash"
    hash_valid: bool  # does the hash TLV match the computed digest?
    tlvs: list[tuple[int, bytes]] = field(repr=False)  # (type, value), protected then unprotected
    total_size: int  # header + body + all TLVs: the bytes that must be uploaded
    security_counter: int | None = None  # SEC_CNT of the protected TLV area only
    # DEPENDENCY TLVs of the protected area: (image number, minimum version) - MCUboot's
    # ``boot_verify_slot_dependencies`` reads them there (``struct image_dependency``)
    dependencies: tuple[tuple[int, Version], ...] = ()

    @property
    def signature_types(self) -> list[int]:
        return [t for t, _ in self.tlvs if t in SIGNATURE_TLVS]

    @property
    def is_signed(self) -> bool:
        return bool(self.signature_types)

    @property
    def is_encrypted(self) -> bool:
        return bool(self.flags & (IMAGE_F_ENCRYPTED_AES128 | IMAGE_F_ENCRYPTED_AES256))

    @property
    def encryption(self) -> str | None:
        """The key-exchange scheme of an encrypted image (its ENC TLV), else None."""
        for t, _ in self.tlvs:
            if t in ENCRYPTION_TLVS:
                return ENCRYPTION_TLVS[TLV(t)]
        return "unknown scheme" if self.is_encrypted else None

    @property
    def hash_name(self) -> str:
        """SHA-256 / SHA-384 / SHA-512: the image's hash TLV."""
        for t, _ in self.tlvs:
            if t in HASH_TLVS:
                return HASH_TLVS[TLV(t)].upper().replace("SHA", "SHA-")
        return "?"

    @property
    def signature_name(self) -> str | None:
        names = {TLV.ECDSA_SIG: "ECDSA", TLV.RSA2048_PSS: "RSA-2048", TLV.RSA3072_PSS: "RSA-3072",
                 TLV.ED25519: "Ed25519"}
        for t in self.signature_types:
            return names[TLV(t)]
        return None

    @property
    def rom_fixed(self) -> int | None:
        """The flash offset a ``--rom-fixed`` image is linked for (IMAGE_F_ROM_FIXED), else None."""
        return self.load_addr if self.flags & IMAGE_F_ROM_FIXED else None

    @property
    def ram_load(self) -> bool:
        return bool(self.flags & IMAGE_F_RAM_LOAD)

    def describe(self) -> str:
        """e.g. ``2.0.0 SHA-256 ECDSA`` / ``... encrypted (ECIES-P256)``."""
        parts = [str(self.version), self.hash_name, self.signature_name or "unsigned"]
        if self.is_encrypted:
            parts.append(f"encrypted ({self.encryption})")
        return " ".join(parts)

    def tlv(self, tlv_type: int) -> bytes | None:
        for t, v in self.tlvs:
            if t == tlv_type:
                return v
        return None


def read_version(header: bytes) -> Version:
    """The version from the first 28 bytes of an image header (no other checks)."""
    return Version(*VERSION_STRUCT.unpack_from(header, 20))


def parse_image(data: bytes | bytearray | memoryview) -> ImageInfo:
    """Parse and hash-check an MCUboot image; trailing bytes (slot padding) are ignored.

    Raises ImageFormatError naming the first problem found. ``hash_valid`` is False (rather
    than raising) when everything is well formed but the digest does not match, so callers
    can report "hash mismatch" distinctly from "not an image".
    """
    buf = memoryview(data)
    if len(buf) < HEADER_MIN_SIZE:
        raise ImageFormatError(f"too short for an MCUboot header: {len(buf)} bytes")
    magic, load_addr, hdr_size, prot_size, img_size, flags = HEADER_STRUCT.unpack_from(buf, 0)
    if magic != IMAGE_MAGIC:
        raise ImageFormatError(f"bad header magic 0x{magic:08x} (expected 0x{IMAGE_MAGIC:08x})")
    if hdr_size < HEADER_MIN_SIZE:
        raise ImageFormatError(f"header size {hdr_size} is smaller than {HEADER_MIN_SIZE}")
    version = read_version(bytes(buf[:28]))
    off = hdr_size + img_size
    if off + TLV_INFO_STRUCT.size > len(buf):
        raise ImageFormatError(
            f"image truncated: header+body is {off} bytes, file has {len(buf)} and no TLV area"
        )
    tlvs: list[tuple[int, bytes]] = []
    protected: list[tuple[int, bytes]] = []
    protected_end = off
    info_magic, info_len = TLV_INFO_STRUCT.unpack_from(buf, off)
    if info_magic == TLV_PROT_INFO_MAGIC:
        if info_len != prot_size:
            raise ImageFormatError(
                f"protected TLV area is {info_len} bytes but the header says {prot_size}"
            )
        protected = _read_tlvs(buf, off, info_len, protected=True)
        tlvs += protected
        off += info_len
        protected_end = off
        if off + TLV_INFO_STRUCT.size > len(buf):
            raise ImageFormatError("image truncated after the protected TLV area")
        info_magic, info_len = TLV_INFO_STRUCT.unpack_from(buf, off)
    elif prot_size != 0:
        raise ImageFormatError(f"header announces {prot_size} bytes of protected TLVs; none found")
    if info_magic != TLV_INFO_MAGIC:
        raise ImageFormatError(f"bad TLV info magic 0x{info_magic:04x} at offset {off}")
    tlvs += _read_tlvs(buf, off, info_len, protected=False)
    total = off + info_len

    hashes = [(t, v) for t, v in tlvs if t in HASH_TLVS]
    if not hashes and any(t == TLV.SIG_PURE for t, _ in tlvs):
        raise ImageFormatError(
            "the image has a pure signature (imgtool --pure) and no hash TLV: img_mgmt reports a "
            "slot's hash from that TLV, so nothing could confirm what the device received; sign "
            "it without --pure")
    if not hashes:
        raise ImageFormatError("no SHA hash TLV: MCUboot cannot validate this image")
    if len(hashes) > 1:
        raise ImageFormatError("more than one hash TLV")
    htype, hvalue = hashes[0]
    digest = hashlib.new(HASH_TLVS[TLV(htype)], buf[:protected_end]).digest()
    # only the protected (hashed and signed) area counts: a SEC_CNT TLV in the unprotected
    # area can be added by anyone without breaking the signature, and MCUboot ignores it
    # (bootutil_get_img_security_cnt, boot/bootutil/src/image_validate.c, reads the protected
    # TLVs only)
    sec_cnt_raw = next((v for t, v in protected if t == TLV.SEC_CNT), None)
    sec_cnt = None
    if sec_cnt_raw is not None:
        if len(sec_cnt_raw) != 4:
            raise ImageFormatError(f"security counter TLV has {len(sec_cnt_raw)} bytes, not 4")
        sec_cnt = int.from_bytes(sec_cnt_raw, "little")
    deps = []
    for t, v in protected:
        if t == TLV.DEPENDENCY:
            if len(v) != DEPENDENCY_STRUCT.size:
                raise ImageFormatError(f"dependency TLV has {len(v)} bytes, not {DEPENDENCY_STRUCT.size}")
            img_id, major, minor, rev, build = DEPENDENCY_STRUCT.unpack(v)
            deps.append((img_id, Version(major, minor, rev, build)))
    return ImageInfo(
        load_addr=load_addr,
        hdr_size=hdr_size,
        protect_tlv_size=prot_size,
        img_size=img_size,
        flags=flags,
        version=version,
        hash=hvalue,
        hash_valid=digest == hvalue,
        tlvs=tlvs,
        total_size=total,
        security_counter=sec_cnt,
        dependencies=tuple(deps),
    )


def _read_tlvs(buf: memoryview, start: int, length: int, protected: bool) -> list[tuple[int, bytes]]:
    end = start + length
    where = "protected" if protected else "unprotected"
    if length < TLV_INFO_STRUCT.size or end > len(buf):
        raise ImageFormatError(f"{where} TLV area of {length} bytes at {start} overruns the image")
    out: list[tuple[int, bytes]] = []
    off = start + TLV_INFO_STRUCT.size
    while off < end:
        if off + TLV_STRUCT.size > end:
            raise ImageFormatError(f"truncated TLV header at offset {off} in the {where} area")
        t, _, ln = TLV_STRUCT.unpack_from(buf, off)
        off += TLV_STRUCT.size
        if off + ln > end:
            raise ImageFormatError(f"TLV 0x{t:02x} of {ln} bytes overruns the {where} area")
        out.append((t, bytes(buf[off : off + ln])))
        off += ln
    return out


# MCUboot's image trailer (the end of each slot: swap status, swap_size/swap_info/copy_done/
# image_ok, magic). Sizes as imgtool computes them for ``sign --pad`` / its slot check
# (``imgtool.image.Image._trailer_size``), which mirrors MCUboot's ``boot_trailer_sz``
# (boot/bootutil/src/bootutil_misc.c): BOOT_STATUS_MAX_ENTRIES (= CONFIG_BOOT_MAX_IMG_SECTORS,
# default 128) * BOOT_STATUS_STATE_COUNT (3) * the flash write size, + BOOT_MAX_ALIGN * 4,
# + the magic aligned to BOOT_MAX_ALIGN (at least 8).
BOOT_MAGIC_SIZE = 16
DEFAULT_WRITE_ALIGN = 8  # the flash write block most MCUs need at most (imgtool sign --align 8)
DEFAULT_MAX_SECTORS = 128  # CONFIG_BOOT_MAX_IMG_SECTORS default; imgtool's DEFAULT_MAX_SECTORS
WRITE_ALIGNS = (1, 2, 4, 8, 16, 32)  # what imgtool and MCUboot accept


def trailer_size(write_align: int = DEFAULT_WRITE_ALIGN, max_sectors: int = DEFAULT_MAX_SECTORS,
                 *, overwrite_only: bool = False, encrypted: bool = False) -> int:
    """Bytes MCUboot reserves at the end of a slot (swap status, flags, magic).

    Delegated to imgtool's own computation (``Image._trailer_size``) so that the gateway's limit
    is the one the signing tool enforces with ``--slot-size`` (and MCUboot with
    ``boot_trailer_sz``): overwrite-only keeps no swap status (two flags + magic); an encrypted
    image makes a swap keep both images' AES keys in the trailer as well.
    """
    import imgtool.image

    if write_align not in WRITE_ALIGNS:
        raise ValueError(f"flash write alignment {write_align} is not one of {WRITE_ALIGNS}")
    img = imgtool.image.Image(align=write_align, max_sectors=max_sectors)
    enc = object() if encrypted else None  # only "is there a key" matters for the size
    return int(img._trailer_size(write_align, max_sectors, overwrite_only, enc, False, 0))


def boot_magics() -> tuple[bytes, ...]:
    """The trailer magics imgtool writes (BOOT_MAX_ALIGN 8, and the variant for larger aligns)."""
    import imgtool.image

    return tuple(bytes(imgtool.image.Image(align=a).boot_magic[-14:]) for a in (8, 16))


@dataclass(frozen=True)
class TrustedKey:
    """A public key that may sign images, loaded with imgtool (PEM, private or public)."""

    name: str
    key: Any  # an imgtool.keys key object

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> TrustedKey:
        import imgtool.keys

        p = Path(path)
        try:
            key = imgtool.keys.load(str(p))
        except Exception as exc:  # imgtool raises bare Exceptions and click errors
            raise ValueError(f"cannot load key {p}: {exc}") from exc
        if key is None:
            raise ValueError(f"cannot load key {p}: password-protected or unsupported")
        return cls(name=name or p.stem, key=key)

    def public_pem(self) -> bytes:
        pub = self.key._get_public()
        return bytes(
            pub.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def key_hash(key: TrustedKey, size: int = 32) -> bytes:
    """The KEYHASH an image signed by ``key`` carries, as MCUboot compares it.

    imgtool (image.py ``Image.create``) hashes ``key.get_public_bytes()`` - the bytes ``imgtool
    getpub`` embeds in MCUboot - with the image's hash algorithm (SHA-256, SHA-384 for P-384
    keys, SHA-512 with ``--sha 512``); MCUboot's ``bootutil_find_key`` hashes its built-in key
    bytes the same way.
    """
    pub = bytes(key.key.get_public_bytes())
    algo = {48: hashlib.sha384, 64: hashlib.sha512}.get(size, hashlib.sha256)  # --sha 384 / 512
    return algo(pub).digest()


def verify_signature(data: bytes, keys: list[TrustedKey]) -> TrustedKey:
    """Return the trusted key whose signature the image carries, or raise SignatureError.

    The check is imgtool's ``Image.verify`` (hash over header+body+protected TLVs, then the
    signature TLV against the key), which takes a file path, so the bytes go to a temporary
    file first. When the image has a KEYHASH TLV, only the key it names is tried, as MCUboot
    does (``bootutil_find_key`` picks the key by hash and checks the signature against it
    alone): an image that names one key and is signed by another is refused by the device.
    """
    import imgtool.image

    info = parse_image(data)
    if not info.hash_valid:
        raise SignatureError("image hash mismatch: the image is corrupt")
    if not info.is_signed:
        raise SignatureError("image carries no signature TLV")
    keyhash = info.tlv(TLV.KEYHASH)
    candidates = keys
    if keyhash is not None:
        candidates = [k for k in keys if key_hash(k, len(keyhash)) == keyhash]
    fd, tmp = tempfile.mkstemp(suffix=".bin", prefix="smpgw-verify-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data[: info.total_size])

        def verifies(k: TrustedKey, reasons: list[str]) -> bool:
            try:
                result = imgtool.image.Image.verify(tmp, k.key)[0]
            except Exception as exc:  # imgtool may raise on key/TLV type combinations
                reasons.append(f"{k.name}: {exc}")
                return False
            if result == imgtool.image.VerifyResult.OK:
                return True
            reasons.append(f"{k.name}: {result.name}")
            return False

        reasons: list[str] = []
        for k in candidates:
            if verifies(k, reasons):
                return k
        if keyhash is not None:
            signer = next((k for k in keys if k not in candidates and verifies(k, [])), None)
            named = ", ".join(repr(k.name) for k in candidates)
            if signer is not None:
                raise SignatureError(
                    f"the image's KEYHASH names {named or 'no trusted key'} but it is signed with "
                    f"trusted key {signer.name!r}: MCUboot picks the key by KEYHASH and would "
                    "refuse it (re-sign it with one key: imgtool sign --key)")
            if not candidates:
                raise SignatureError(
                    f"the image's KEYHASH ({keyhash.hex()[:16]}...) names no trusted key: MCUboot "
                    "picks the key by KEYHASH and would refuse it (signed with a key the gateway "
                    "does not trust)")
    finally:
        os.unlink(tmp)
    detail = "; ".join(reasons) if reasons else "no trusted keys configured"
    raise SignatureError(f"signature not made by a trusted key ({detail})")


def verify_signature_over_digest(info: ImageInfo, keys: list[TrustedKey]) -> TrustedKey:
    """The trusted key whose signature covers the image's hash TLV value, or SignatureError.

    For an encrypted image: imgtool hashes header + *plaintext* body + protected TLVs, signs
    that, then encrypts the body (``Image.create``), so neither the hash nor imgtool's
    ``verify`` can be checked against the ciphertext. What can be checked without the
    decryption key is that the hash TLV is the one a trusted key signed: ECDSA (P-256 with
    SHA-256, P-384 with SHA-384) and RSA-PSS (MGF1-SHA-256, salt 32, as imgtool's ``sign``
    uses) sign the digest of the payload, i.e. the hash TLV's value (verified here as a
    pre-hashed message); Ed25519 signs the hash TLV value itself (``sign_digest``). The
    payload's match with that hash is MCUboot's check on the device, after decrypting.
    This uses ``cryptography`` directly because imgtool has no digest-only verification.
    """

    sigs = [(t, v) for t, v in info.tlvs if t in SIGNATURE_TLVS]
    if not sigs:
        raise SignatureError("image carries no signature TLV")
    digest = info.hash
    prehashed = {32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}.get(len(digest))
    keyhash = info.tlv(TLV.KEYHASH)
    candidates = keys if keyhash is None else [k for k in keys if key_hash(k, len(keyhash)) == keyhash]
    reasons: list[str] = []
    for k in candidates:
        pub = k.key._get_public()
        for t, sig in sigs:
            try:
                if isinstance(pub, ec.EllipticCurvePublicKey) and t == TLV.ECDSA_SIG:
                    want = 48 if pub.curve.key_size == 384 else 32
                    if prehashed is None or len(digest) != want:
                        reasons.append(f"{k.name}: the {len(digest) * 8}-bit hash is not the one "
                                       f"a P-{pub.curve.key_size} signature covers")
                        continue
                    der = sig[: sig[1] + 2] if len(sig) > 2 else sig  # imgtool's padding
                    pub.verify(der, digest, ec.ECDSA(utils.Prehashed(prehashed)))
                elif isinstance(pub, rsa.RSAPublicKey) and t in (TLV.RSA2048_PSS, TLV.RSA3072_PSS):
                    if len(digest) != 32:
                        reasons.append(f"{k.name}: RSA images are signed over SHA-256")
                        continue
                    pub.verify(sig, digest, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                        salt_length=32),
                               utils.Prehashed(hashes.SHA256()))
                elif isinstance(pub, ed25519.Ed25519PublicKey) and t == TLV.ED25519:
                    pub.verify(sig, digest)
                else:
                    continue
                return k
            except InvalidSignature:
                reasons.append(f"{k.name}: INVALID_SIGNATURE")
    detail = "; ".join(reasons) if reasons else (
        "no trusted key of the signature's type" if candidates else "the KEYHASH names no trusted key")
    raise SignatureError(f"signature over the image hash not made by a trusted key ({detail})")

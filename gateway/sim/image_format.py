"""What MCUboot reads from an image beyond what ``gateway.mcuboot.parse_image`` exposes.

Owns the simulator's view of image header flags, protected TLVs (dependencies), the hash TLV
a given MCUboot build expects, and the decryption of encrypted images, all as MCUboot's
``boot/bootutil/include/bootutil/image.h`` and ``boot/bootutil/src/image_validate.c`` /
``encrypted.c`` define them (mcu-tools/mcuboot 2023-08, the Renode firmware's pin):

* flags: IMAGE_F_ENCRYPTED_AES128 0x04, _AES256 0x08, IMAGE_F_NON_BOOTABLE 0x10,
  IMAGE_F_RAM_LOAD 0x20 (``imgtool --load-addr``), IMAGE_F_ROM_FIXED 0x100
  (``imgtool --rom-fixed``: ``ih_load_addr`` is the flash offset the image is linked for).
* ``struct image_dependency`` (TLV 0x40, protected area only: ``bootutil_tlv_iter_begin(...,
  IMAGE_TLV_DEPENDENCY, true)``): ``uint8_t image_id; uint8_t _pad1; uint16_t _pad2;
  struct image_version image_min_version`` = 12 bytes (``imgtool sign -d "(1,2.0.0)"``).
* the hash: a build validates with one algorithm (MCUBOOT_SHA512, or SHA-384 with
  MCUBOOT_SIGN_EC384, else SHA-256: ``EXPECTED_HASH_TLV``); an image carrying another hash
  TLV has no hash MCUboot can check.
* encryption: the hash TLV is computed over the *plain* image (imgtool hashes before it
  encrypts); the payload after the header is AES-CTR with a zero nonce under a random key
  carried in an ENC TLV: ENC_RSA2048 (RSA-OAEP-SHA256 of the key), ENC_EC256 / ENC_X25519
  (ECIES: ephemeral public key + HMAC tag + AES-CTR-encrypted key, HKDF-SHA256 with info
  ``MCUBoot_ECIES_v1`` from the ECDH secret, as ``imgtool.image.Image.ecies_hkdf``).
  Decryption is written here because imgtool only encrypts; the primitives are
  ``cryptography``'s.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hmac as chmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.mcuboot import TLV, ImageInfo, Version

IMAGE_F_ENCRYPTED_AES128 = 0x04
IMAGE_F_ENCRYPTED_AES256 = 0x08
IMAGE_F_NON_BOOTABLE = 0x10
IMAGE_F_RAM_LOAD = 0x20
IMAGE_F_ROM_FIXED = 0x100
ENC_X25519_SHA512 = 0x34
HASH_TLV_BY_NAME = {"sha256": (TLV.SHA256, 32), "sha384": (TLV.SHA384, 48),
                    "sha512": (TLV.SHA512, 64)}
_DEP = struct.Struct("<BBHBBHI")
_TLV_INFO = struct.Struct("<HH")
_TLV = struct.Struct("<BBH")


@dataclass(frozen=True)
class Dependency:
    """One ``struct image_dependency``: image ``image_id`` must be at least ``min_version``."""

    image_id: int
    min_version: Version


def protected_tlvs(data: bytes, info: ImageInfo) -> list[tuple[int, bytes]]:
    """The TLVs of the protected (hashed, signed) area only."""
    if not info.protect_tlv_size:
        return []
    off = info.hdr_size + info.img_size
    _magic, length = _TLV_INFO.unpack_from(data, off)
    end = off + length
    off += _TLV_INFO.size
    out = []
    while off + _TLV.size <= end:
        t, _, n = _TLV.unpack_from(data, off)
        off += _TLV.size
        out.append((t, bytes(data[off:off + n])))
        off += n
    return out


def dependencies(data: bytes, info: ImageInfo) -> list[Dependency]:
    """``boot_verify_slot_dependencies``' view: the protected DEPENDENCY TLVs.

    A TLV of the wrong length makes MCUboot fail the check (BOOT_EBADIMAGE): it is reported
    as a dependency on an impossible version so the caller treats it as unsatisfied.
    """
    out = []
    for t, v in protected_tlvs(data, info):
        if t != TLV.DEPENDENCY:
            continue
        if len(v) != _DEP.size:
            out.append(Dependency(0xFF, Version(255, 255, 65535, 0xFFFFFFFF)))
            continue
        image_id, _, _, major, minor, rev, build = _DEP.unpack(v)
        out.append(Dependency(image_id, Version(major, minor, rev, build)))
    return out


def is_encrypted(info: ImageInfo) -> bool:
    return bool(info.flags & (IMAGE_F_ENCRYPTED_AES128 | IMAGE_F_ENCRYPTED_AES256))


class DecryptionError(ValueError):
    """The device cannot decrypt this image (no key, another key, unknown TLV)."""


@dataclass(frozen=True)
class EncryptionKey:
    """MCUboot's private decryption key (CONFIG_BOOT_ENCRYPT_RSA / _EC256 / _X25519)."""

    key: object  # a cryptography private key

    @classmethod
    def load(cls, path: Path) -> EncryptionKey:
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as exc:
            raise ValueError(f"encryption_key {path}: not a private key in PEM ({exc})") from exc
        return cls(key)

    def image_key(self, info: ImageInfo) -> bytes:
        """The AES key of an encrypted image (``boot_enc_load``), or DecryptionError."""

        key_len = 32 if info.flags & IMAGE_F_ENCRYPTED_AES256 else 16
        k = self.key
        try:
            if isinstance(k, rsa.RSAPrivateKey) and (tlv := info.tlv(TLV.ENC_RSA2048)):
                return bytes(k.decrypt(tlv, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                         algorithm=hashes.SHA256(), label=None)))
            mac_hash: hashes.HashAlgorithm = hashes.SHA256()
            if isinstance(k, ec.EllipticCurvePrivateKey) and (tlv := info.tlv(TLV.ENC_EC256)):
                pub = ec.EllipticCurvePublicKey.from_encoded_point(k.curve, tlv[:65])
                shared = k.exchange(ec.ECDH(), pub)
                rest = tlv[65:]
            elif isinstance(k, x25519.X25519PrivateKey) and (
                    (tlv := info.tlv(TLV.ENC_X25519)) or (tlv := info.tlv(ENC_X25519_SHA512))):
                if info.tlv(ENC_X25519_SHA512):
                    mac_hash = hashes.SHA512()
                shared = k.exchange(x25519.X25519PublicKey.from_public_bytes(tlv[:32]))
                rest = tlv[32:]
            else:
                raise DecryptionError("the image carries no ENC TLV for this device's key type")
        except DecryptionError:
            raise
        except Exception as exc:  # wrong key: OAEP / point decoding errors
            raise DecryptionError(f"cannot unwrap the image key: {exc}") from exc
        mac_len = mac_hash.digest_size
        derived = HKDF(algorithm=mac_hash, length=key_len + mac_len, salt=None,
                       info=b"MCUBoot_ECIES_v1").derive(shared)
        tag, cipherkey = rest[:mac_len], rest[mac_len:]

        h = chmac.HMAC(derived[key_len:], mac_hash)
        h.update(cipherkey)
        if not hmac.compare_digest(h.finalize(), tag):
            raise DecryptionError("ENC TLV tag mismatch: encrypted for another key")
        dec = Cipher(algorithms.AES(derived[:key_len]), modes.CTR(bytes(16))).decryptor()
        return dec.update(cipherkey) + dec.finalize()


def crypt_range(data: bytes, start: int, info: ImageInfo, aes_key: bytes) -> bytes:
    """AES-CTR over the part of ``data`` (slot bytes from offset ``start``) that is payload.

    Encryption and decryption are the same XOR (``boot_encrypt``): the header and the TLVs are
    left alone, the payload byte at image offset ``o`` uses keystream position
    ``o - hdr_size``.
    """
    lo = max(start, info.hdr_size)
    hi = min(start + len(data), info.hdr_size + info.img_size)
    if lo >= hi:
        return data
    pos = lo - info.hdr_size
    block, skip = divmod(pos, 16)
    ctr = Cipher(algorithms.AES(aes_key), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    stream = ctr.update(bytes(skip + hi - lo))[skip:]
    n = hi - lo
    seg = (int.from_bytes(data[lo - start:hi - start], "big")
           ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return data[:lo - start] + seg + data[hi - start:]

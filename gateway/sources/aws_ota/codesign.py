"""Code-signing check of AWS OTA files (``sig-sha256-ecdsa``, ``sig-sha256-rsa``, ``sig-sha1-rsa``).

As FreeRTOS's OTA PAL does it: the signature (DER ECDSA, or RSA PKCS#1 v1.5) is over the hash of
the whole received file, checked with the public key of the code-signing certificate. Trust rests
on (c): the certificate is one the gateway's configuration holds (a certificate store directory
or an explicit name -> file map); the job's ``certfile`` only *names* one of them, and a name the
store does not hold is refused. It runs before any byte goes to a device; MCUboot's own signature
check (a) stays in force after it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from gateway.sources.aws_ota.document import OtaFile

_NAME_OK = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_MAX_CERT = 64 * 1024


class CodeSignError(ValueError):
    """The file's code signature is missing, unreadable or does not verify."""


class CertStore:
    """The code-signing certificates the configuration holds."""

    def __init__(self, cert_dir: Path | None, certs: dict[str, Path]) -> None:
        self.cert_dir = cert_dir
        self.certs = dict(certs)

    @property
    def configured(self) -> bool:
        return self.cert_dir is not None or bool(self.certs)

    def find(self, certfile: str | None) -> Path:
        """The certificate file for the job's ``certfile`` name (only a configured one)."""
        if not certfile:
            raise CodeSignError("the file names no certfile, and code signing is required")
        if certfile in self.certs:
            return self.certs[certfile]
        base = certfile.replace("\\", "/").rsplit("/", 1)[-1]
        if self.cert_dir is not None and _NAME_OK.match(base) and base not in (".", ".."):
            p = self.cert_dir / base
            if p.is_file():
                return p
        raise CodeSignError(f"certfile {certfile[:80]!r} is not in the gateway's code-signing "
                            "certificate store")


def _public_key(path: Path) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    raw = path.read_bytes()[:_MAX_CERT + 1]
    if len(raw) > _MAX_CERT:
        raise CodeSignError(f"{path.name}: certificate file over {_MAX_CERT} bytes")
    try:
        cert = x509.load_pem_x509_certificate(raw) if b"-----BEGIN" in raw \
            else x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise CodeSignError(f"{path.name}: not a certificate ({exc})") from None
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CodeSignError(f"{path.name}: neither an ECDSA nor an RSA key")
    return key


def file_digest(path: Path, algo: str) -> bytes:
    h = hashlib.new(algo)
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 16):
            h.update(chunk)
    return h.digest()


def verify(path: Path, f: OtaFile, store: CertStore) -> str:
    """Check ``path`` against the signature the job gives for ``f``; returns what was checked.

    Raises CodeSignError (missing/bad signature, unknown certificate, key of the wrong kind)."""
    cert = store.find(f.certfile)
    if f.signature is None or f.sig_algo is None or f.sig_hash is None:
        raise CodeSignError("the job gives no signature (sig-sha256-ecdsa, sig-sha256-rsa or "
                            "sig-sha1-rsa) for the file")
    key = _public_key(cert)
    algo: hashes.HashAlgorithm = hashes.SHA256() if f.sig_hash == "sha256" else hashes.SHA1()
    digest = file_digest(path, f.sig_hash)
    try:
        if f.sig_algo == "ecdsa":
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise CodeSignError(f"{cert.name} holds an RSA key; the job gives an ECDSA signature")
            key.verify(f.signature, digest, ec.ECDSA(utils.Prehashed(algo)))
        else:
            if not isinstance(key, rsa.RSAPublicKey):
                raise CodeSignError(f"{cert.name} holds an EC key; the job gives an RSA signature")
            key.verify(f.signature, digest, padding.PKCS1v15(), utils.Prehashed(algo))
    except InvalidSignature:
        raise CodeSignError(f"code signature ({f.sig_algo}/{f.sig_hash}) does not verify with "
                            f"{cert.name}") from None
    except ValueError as exc:  # a malformed DER signature
        raise CodeSignError(f"code signature unreadable: {exc}") from None
    return f"code signature {f.sig_algo}/{f.sig_hash} verified with {cert.name}"

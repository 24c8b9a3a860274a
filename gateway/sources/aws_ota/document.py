"""AWS IoT OTA job documents (the ``afr_ota`` shape FreeRTOS's OTA agent reads), parsed and bounded.

Shape (AWS IoT OTA "CreateOTAUpdate" job documents; FreeRTOS ``ota.c`` job parser keys)::

    {"afr_ota": {"protocols": ["MQTT", "HTTP"], "streamname": "AFR_OTA-...",
                 "files": [{"filepath": "/mcu-a/fw", "filesize": 123, "fileid": 1,
                            "certfile": "codesign.crt", "fileType": 0,
                            "update_data_url": "https://...", "auth_scheme": "aws.s3.presigned",
                            "sig-sha256-ecdsa": "<base64 DER>"}]}}

Unknown keys are ignored. Anything malformed raises ``JobDocumentError`` with the reason (the
source answers the execution REJECTED with it). Nothing here decides which device gets a file
or whether a file is trusted: routing is the gateway's configuration (c), trust is the
code-signing certificate the configuration holds and the MCUboot signature (a).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

MAX_FILES = 32  # files per job document
MAX_FILE_SIZE = 64 * 1024 * 1024
MAX_SIGNATURE = 1024  # bytes of a DER signature (RSA-4096 is 512)
PROTOCOLS = ("MQTT", "HTTP")
# signature keys of the OTA agent (ota_config: "sig-sha256-ecdsa"; the RSA variants)
SIG_KEYS = {"sig-sha256-ecdsa": ("ecdsa", "sha256"), "sig-sha256-rsa": ("rsa", "sha256"),
            "sig-sha1-rsa": ("rsa", "sha1")}
_STREAM_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")  # a topic level: no '/', '+', '#'


class JobDocumentError(ValueError):
    """The job document is not a usable AWS OTA document (the reason is in the message)."""


@dataclass(frozen=True)
class OtaFile:
    fileid: int
    filesize: int
    filepath: str = ""
    file_type: int | None = None
    certfile: str | None = None
    url: str | None = None
    auth_scheme: str | None = None
    sig_algo: str | None = None  # "ecdsa" | "rsa"
    sig_hash: str | None = None  # "sha256" | "sha1"
    signature: bytes | None = None


@dataclass(frozen=True)
class OtaDocument:
    protocols: tuple[str, ...]
    streamname: str | None
    files: tuple[OtaFile, ...]


def _int(f: dict[str, Any], key: str, lo: int, hi: int, where: str, required: bool = True) -> int | None:
    v = f.get(key)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise JobDocumentError(f"{where}: {key} must be an integer {lo}..{hi}, not {str(v)[:40]!r}")
    return v


def _str(f: dict[str, Any], key: str, where: str, limit: int = 2048) -> str | None:
    v = f.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > limit:
        raise JobDocumentError(f"{where}: {key} must be a string of 1-{limit} characters")
    return v


def parse(doc: Any) -> OtaDocument:
    """The ``afr_ota`` part of a job document, checked; raises JobDocumentError."""
    if not isinstance(doc, dict) or not isinstance(doc.get("afr_ota"), dict):
        raise JobDocumentError("not an AWS OTA job document (no afr_ota object)")
    ota = doc["afr_ota"]
    protocols = ota.get("protocols", ["MQTT"])
    if (not isinstance(protocols, list) or not protocols or len(protocols) > 4
            or not all(isinstance(p, str) and p in PROTOCOLS for p in protocols)):
        raise JobDocumentError(f"protocols must be a list of {'/'.join(PROTOCOLS)}")
    stream = ota.get("streamname")
    if stream is not None and (not isinstance(stream, str) or not _STREAM_RE.match(stream)):
        raise JobDocumentError("streamname must be 1-128 characters of [A-Za-z0-9_.:-]")
    raw = ota.get("files")
    if not isinstance(raw, list) or not raw:
        raise JobDocumentError("files must be a non-empty list")
    if len(raw) > MAX_FILES:
        raise JobDocumentError(f"more than {MAX_FILES} files")
    files: list[OtaFile] = []
    for n, f in enumerate(raw):
        where = f"files[{n}]"
        if not isinstance(f, dict):
            raise JobDocumentError(f"{where} is not an object")
        fileid = _int(f, "fileid", 0, 255, where)
        size = _int(f, "filesize", 1, MAX_FILE_SIZE, where)
        ftype = _int(f, "fileType", 0, 2**31 - 1, where, required=False)
        url = _str(f, "update_data_url", where)
        if url is not None and not url.lower().startswith(("https://", "http://")):
            raise JobDocumentError(f"{where}: update_data_url must be an http(s) URL")
        sigs = [k for k in SIG_KEYS if k in f]
        if len(sigs) > 1:
            raise JobDocumentError(f"{where}: more than one signature ({', '.join(sigs)})")
        algo = hsh = None
        sig = None
        if sigs:
            text = f[sigs[0]]
            if not isinstance(text, str) or len(text) > MAX_SIGNATURE * 2:
                raise JobDocumentError(f"{where}: {sigs[0]} must be a base64 string")
            try:
                sig = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise JobDocumentError(f"{where}: {sigs[0]} is not valid base64") from None
            if not sig:
                raise JobDocumentError(f"{where}: {sigs[0]} is empty")
            algo, hsh = SIG_KEYS[sigs[0]]
        assert fileid is not None and size is not None
        files.append(OtaFile(fileid=fileid, filesize=size, filepath=_str(f, "filepath", where) or "",
                             file_type=ftype, certfile=_str(f, "certfile", where, 256), url=url,
                             auth_scheme=_str(f, "auth_scheme", where, 64), sig_algo=algo,
                             sig_hash=hsh, signature=sig))
    ids = [f.fileid for f in files]
    if len(set(ids)) != len(ids):
        raise JobDocumentError("two files share a fileid")
    for f in files:
        mqtt_ok = "MQTT" in protocols and stream is not None
        http_ok = "HTTP" in protocols and f.url is not None
        if not (mqtt_ok or http_ok):
            raise JobDocumentError(f"file {f.fileid}: no way to get it (MQTT needs streamname, "
                                   "HTTP needs update_data_url)")
    return OtaDocument(tuple(protocols), stream, tuple(files))

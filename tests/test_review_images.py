"""Review r1-images: repros of problems in image/slot decisions and resource bounds."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from test_trust_bounds import PEAK_MIB, _zeros_deflate, mender_with_data, run_bounded

from gateway.artifacts.bundle import BundleError, read_bundle
from gateway.images import ImageRefused, ImageStore

pytestmark = pytest.mark.timeout(180)


def _nested_manifest_zip(depth: int = 100_000) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", "[" * depth)  # 100 KB, well under MAX_MANIFEST
    return buf.getvalue()


def test_deeply_nested_manifest_json_is_a_bundle_error() -> None:
    """A hostile dfu_application.zip whose manifest.json is 100k nested arrays: json.loads
    raises RecursionError (not ValueError), which escapes read_bundle's checks."""
    with pytest.raises(BundleError):
        read_bundle(_nested_manifest_zip())


def test_deeply_nested_manifest_is_refused_by_the_store(tmp_path: Path) -> None:
    """...so the store does not refuse it either: the daemon sees an 'internal error' (no
    REFUSED outcome, no block, no report to the server) at every poll."""
    store = ImageStore(tmp_path / "store", [])
    with pytest.raises(ImageRefused):
        store.add_bytes(_nested_manifest_zip(), hardware=None)


def _gnu_longname_bomb(inflated_mib: int = 1024) -> bytes:
    """A data tar.gz whose first header is a GNU long-name record ('L') claiming
    ``inflated_mib`` MiB: tarfile reads the whole long name into memory before the gateway's
    per-member budget ever sees a TarInfo."""
    ti = tarfile.TarInfo("././@LongLink")
    ti.type = tarfile.GNUTYPE_LONGNAME
    ti.size = inflated_mib << 20
    hdr = ti.tobuf(format=tarfile.USTAR_FORMAT)
    import struct
    gz_head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return gz_head + _zeros_deflate(inflated_mib, head=hdr) + struct.pack("<2L", 0, 0)


def test_gnu_longname_bomb_in_mender_data_tar_is_bounded(tmp_path: Path) -> None:
    """~1 MiB artifact; the parser must refuse it (ArtifactError) in bounded memory."""
    art = mender_with_data(_gnu_longname_bomb(1024))
    assert len(art) < 1_200_000
    res = run_bounded("tar", art, tmp_path, cap=None)
    assert res["error_type"] in ("ArtifactError", "ArtifactIntegrityError"), res
    assert res["peak_growth_kib"] < PEAK_MIB * 1024, res

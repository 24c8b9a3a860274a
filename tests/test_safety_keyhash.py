"""Finding 7: the signing key is the one the image's KEYHASH names, as MCUboot picks it.

MCUboot picks the key to check a signature with by the ``KEYHASH`` TLV (``bootutil_find_key``:
the hash of the public key as ``imgtool getpub`` embeds it, i.e. imgtool's
``key.get_public_bytes()``, hashed with the image's hash algorithm - SHA-256 here, see imgtool
image.py ``create``) and checks the signature against that key only. An image whose KEYHASH
names one key but which is signed by another is refused by the device, so the gateway refuses
it too - before a byte is sent.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from safety_support import replace_tlv

from gateway import devkit
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.images import ImageRefused, Refusal, check_image
from gateway.mcuboot import TLV, TrustedKey, parse_image
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(120)


def imgtool_keyhash(key_path: Path) -> bytes:
    """What imgtool writes as KEYHASH: SHA-256 of ``key.get_public_bytes()`` (image.py create)."""
    import imgtool.keys

    return hashlib.sha256(imgtool.keys.load(str(key_path)).get_public_bytes()).digest()


# --- 7: KEYHASH -------------------------------------------------------------------------------
@pytest.fixture
def two_keys(tmp_path: Path) -> dict[str, Any]:
    a = devkit.make_key(tmp_path / "keys" / "a.pem")
    b = devkit.make_key(tmp_path / "keys" / "b.pem")
    return {"a": a, "b": b, "keys": [TrustedKey.load(a), TrustedKey.load(b)], "root": tmp_path}


def test_keyhash_is_what_imgtool_embeds(two_keys: dict[str, Any]) -> None:
    img = devkit.sign_image(two_keys["root"] / "a.bin", version="1.0.0", key=two_keys["a"],
                            size=2000).read_bytes()
    assert parse_image(img).tlv(TLV.KEYHASH) == imgtool_keyhash(two_keys["a"])
    _info, signer = check_image(img, two_keys["keys"])
    assert signer == "a"


def test_keyhash_naming_another_key_is_refused(two_keys: dict[str, Any]) -> None:
    img = devkit.sign_image(two_keys["root"] / "a.bin", version="1.0.0", key=two_keys["a"],
                            size=2000).read_bytes()
    lying = replace_tlv(img, TLV.KEYHASH, imgtool_keyhash(two_keys["b"]))
    with pytest.raises(ImageRefused) as ei:
        check_image(lying, two_keys["keys"])
    assert ei.value.reason == Refusal.UNTRUSTED
    assert "KEYHASH" in ei.value.message and "'b'" in ei.value.message, ei.value.message
    unknown = replace_tlv(img, TLV.KEYHASH, b"\x11" * 32)
    with pytest.raises(ImageRefused) as ei:
        check_image(unknown, two_keys["keys"])
    assert "KEYHASH" in ei.value.message and "no trusted key" in ei.value.message


async def test_keyhash_mismatch_refused_before_a_byte(bench_factory: Any,
                                                      two_keys: dict[str, Any]) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    other = devkit.make_key(bench.root / "keys" / "other.pem")
    img = bench.images["2.0.0"].read_bytes()
    lying = bench.root / "images" / "app-2.0.0-keyhash.bin"
    lying.write_bytes(replace_tlv(img, TLV.KEYHASH, imgtool_keyhash(other)))
    bench.images["2.0.0"] = lying
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim)
        cfg = cfg.model_copy(update={"trusted_keys": [bench.key, other]})
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert "KEYHASH" in out.detail, out.detail
        assert dev.counters["upload_bytes_received"] == 0

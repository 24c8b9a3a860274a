"""Image formats in the simulated MCUboot: hash and signature types, encrypted images.

Keys and images made by imgtool (ECDSA P-256 / P-384, Ed25519, RSA-2048 / 3072; SHA-256 / 384 /
512 hash TLVs; ``-E`` encryption for ECIES-P256, ECIES-X25519 and RSA-OAEP). The simulated
MCUboot checks signatures with imgtool through ``gateway.mcuboot.verify_signature``, accepts
only the hash TLV its build checks (MCUBOOT_SHA512 / SIGN_EC384 / SHA-256), and decrypts an
encrypted upload while swapping it in when it has the private key; without it the image is
refused and erased at the reset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sim_support
from sim_support import cfg, client_for, mark, read_state, reset, upload
from smpclient.generics import success

from gateway.devkit import make_key, sign_image
from gateway.mcuboot import parse_image

pytestmark = pytest.mark.timeout(120)
sim_factory = sim_support.sim_factory  # the fixture
SLOT = 0x20000


@pytest.mark.parametrize(("key_type", "sha"), [
    ("ecdsa-p256", "sha256"), ("ecdsa-p384", "sha384"), ("ed25519", "sha256"),
    ("ed25519", "sha512"), ("rsa-2048", "sha256"), ("rsa-3072", "sha256"),
])
async def test_signature_and_hash_types(tmp_path: Path, sim_factory: Any, key_type: str,
                                        sha: str) -> None:
    key = make_key(tmp_path / "k.pem", key_type)
    other = make_key(tmp_path / "other.pem", key_type)
    extra = ("--sha", sha[3:])

    def img(name: str, version: str, k: Path) -> Path:
        return sign_image(tmp_path / f"{name}.bin", version=version, key=k, size=8000,
                          slot_size=SLOT, extra=extra)

    v1, v2, bad = img("v1", "1.0.0", key), img("v2", "2.0.0", key), img("bad", "3.0.0", other)
    sim = await sim_factory(cfg(slot_size=SLOT, key=key, initial_image=v1, hash_algorithm=sha))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        st = await read_state(c)
        assert len(st[(0, 0)].hash) == {"sha256": 32, "sha384": 48, "sha512": 64}[sha]
        await upload(c, v2)
        assert success(await mark(c, v2))
        await reset(c, dev)
        assert dev.boot_outcomes[-1] == "swap"
        assert (await read_state(c))[(0, 0)].version == "2.0.0"
        assert success(await mark(c, None, confirm=True))
        await upload(c, bad)  # same algorithm, a key this MCUboot does not trust
        assert success(await mark(c, bad))
        await reset(c, dev)
        assert dev.boot_outcomes[-1].startswith("refused:") and dev.flash.is_erased(1)
        assert (await read_state(c))[(0, 0)].version == "2.0.0"
    finally:
        await c.disconnect()


async def test_an_image_with_another_hash_type_is_invisible_and_refused(
        tmp_path: Path, sim_factory: Any) -> None:
    """A SHA-512 image on a SHA-256 build: img_mgmt finds no hash TLV of its type (no state
    entry, HASH_NOT_FOUND) and MCUboot would not validate it."""
    key = make_key(tmp_path / "k.pem", "ed25519")
    v1 = sign_image(tmp_path / "v1.bin", version="1.0.0", key=key, size=8000, slot_size=SLOT)
    v2 = sign_image(tmp_path / "v2.bin", version="2.0.0", key=key, size=8000, slot_size=SLOT,
                    extra=("--sha", "512"))
    sim = await sim_factory(cfg(slot_size=SLOT, key=key, initial_image=v1))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, v2)
        assert set(await read_state(c)) == {(0, 0)}
        assert "no SHA256 hash TLV" in (dev.validator.problem(dev.slot_bytes(1), decrypt=True)
                                        or "")
    finally:
        await c.disconnect()


@pytest.mark.parametrize(("sign_type", "enc_type"), [
    ("ecdsa-p256", "ecdsa-p256"), ("ed25519", "x25519"), ("rsa-2048", "rsa-2048")])
async def test_encrypted_image_decrypted_into_the_primary_and_reencrypted_on_revert(
        tmp_path: Path, sim_factory: Any, sign_type: str, enc_type: str) -> None:
    """imgtool wants the signing and encryption keys of one family (EC-P256 / ECIES-P256,
    Ed25519 / ECIES-X25519, RSA / RSA-OAEP)."""
    key = make_key(tmp_path / "k.pem", sign_type)
    enc = make_key(tmp_path / "enc.pem", enc_type)
    v1 = sign_image(tmp_path / "v1.bin", version="1.0.0", key=key, size=8000, slot_size=SLOT)
    v2 = sign_image(tmp_path / "v2.bin", version="2.0.0", key=key, size=9000, slot_size=SLOT,
                    extra=("-E", str(enc)))
    enc_bytes = v2.read_bytes()
    info = parse_image(enc_bytes)
    assert info.is_encrypted and not info.hash_valid  # the hash is the plain image's
    sim = await sim_factory(cfg(slot_size=SLOT, key=key, initial_image=v1, encryption_key=enc))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, v2)
        assert success(await mark(c, v2))
        await reset(c, dev)
        assert dev.boot_outcomes[-1] == "swap"
        plain = parse_image(dev.slot_bytes(0))
        assert plain.hash_valid and plain.hash == info.hash and plain.is_encrypted
        assert dev.slot_bytes(0)[:info.total_size] != enc_bytes
        await reset(c, dev)  # not confirmed: revert, v2 goes back to slot 1 encrypted
        assert dev.boot_outcomes[-1] == "revert"
        assert dev.slot_bytes(1)[:info.total_size] == enc_bytes
    finally:
        await c.disconnect()


async def test_encrypted_image_without_the_key_is_refused(tmp_path: Path,
                                                          sim_factory: Any) -> None:
    key = make_key(tmp_path / "k.pem")
    enc = make_key(tmp_path / "enc.pem", "ecdsa-p256")
    v1 = sign_image(tmp_path / "v1.bin", version="1.0.0", key=key, size=8000, slot_size=SLOT)
    v2 = sign_image(tmp_path / "v2.bin", version="2.0.0", key=key, size=9000, slot_size=SLOT,
                    extra=("-E", str(enc)))
    sim = await sim_factory(cfg(slot_size=SLOT, key=key, initial_image=v1))
    dev = sim.devices["d1"]
    c = await client_for(dev)
    try:
        await upload(c, v2)
        assert success(await mark(c, v2))
        await reset(c, dev)
        assert "no decryption key" in dev.boot_outcomes[-1] and dev.flash.is_erased(1)
        assert (await read_state(c))[(0, 0)].version == "1.0.0"
    finally:
        await c.disconnect()

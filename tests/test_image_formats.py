"""Image formats the gateway verifies before a byte is sent, all made with imgtool: SHA-256/384/512
hash TLVs; ECDSA P-256/P-384, Ed25519, RSA-2048/3072 signatures; encrypted images (ECIES-P256,
ECIES-X25519, RSA-OAEP) checked as far as the gateway can without the device's key; image-set
archives (dfu_application.zip) checked member by member."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from modes_support import active, publish_entry, reports, run_pass, upload_requests

from gateway import devkit
from gateway.artifacts.bundle import BundleEntry, BundleError, read_bundle, write_bundle
from gateway.engine import Status
from gateway.images import ImageRefused, ImageStore, Refusal, VerifiedImageSet
from gateway.mcuboot import TrustedKey, parse_image, trailer_size
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(300)

KEY_TYPES = ["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048", "rsa-3072", "x25519"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    out = {t: devkit.make_key(d / f"{t}.pem", t) for t in KEY_TYPES}
    out["other-ecdsa-p256"] = devkit.make_key(d / "other-ecdsa-p256.pem", "ecdsa-p256")
    return out


def store_for(tmp: Path, keys: dict[str, Path], *names: str) -> ImageStore:
    return ImageStore(tmp / "store", [TrustedKey.load(keys[n]) for n in names])


def sign(tmp: Path, name: str, key: Path | None, *extra: str, size: int = 8192) -> Path:
    return devkit.sign_image(tmp / name, version="1.2.3", key=key, size=size, extra=extra)


@pytest.mark.parametrize(("key", "sha", "hash_name", "sig_name"), [
    ("ecdsa-p256", None, "SHA-256", "ECDSA"),
    ("ecdsa-p384", None, "SHA-384", "ECDSA"),
    ("ed25519", None, "SHA-256", "Ed25519"),
    ("ed25519", "512", "SHA-512", "Ed25519"),
    ("rsa-2048", None, "SHA-256", "RSA-2048"),
    ("rsa-3072", None, "SHA-256", "RSA-3072"),
])
def test_hash_and_signature_kinds(tmp_path, keys, key, sha, hash_name, sig_name) -> None:
    extra = ("--sha", sha) if sha else ()
    path = sign(tmp_path, f"{key}.bin", keys[key], *extra)
    img = store_for(tmp_path, keys, "ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048",
                    "rsa-3072").add_file(path, hardware=None)
    assert img.signed_by == key
    assert img.fully_verified and img.unverified is None
    assert img.info.hash_name == hash_name and img.info.signature_name == sig_name
    assert len(img.hash) == {"SHA-256": 32, "SHA-384": 48, "SHA-512": 64}[hash_name]
    # one flipped body byte: refused as corrupt, whatever the algorithm
    data = bytearray(path.read_bytes())
    data[0x300] ^= 0x01
    with pytest.raises(ImageRefused) as exc:
        store_for(tmp_path / "b", keys, key).add_bytes(bytes(data), hardware=None)
    assert exc.value.reason == Refusal.HASH_MISMATCH and hash_name in str(exc.value)
    # a store that does not trust the key refuses the signature
    with pytest.raises(ImageRefused) as exc:
        store_for(tmp_path / "c", keys, "other-ecdsa-p256").add_file(path, hardware=None)
    assert exc.value.reason == Refusal.UNTRUSTED


@pytest.mark.parametrize(("enc", "key", "scheme"), [
    ("ecdsa-p256", "ecdsa-p256", "ECIES-P256"),
    ("ecdsa-p256", "ed25519", "ECIES-P256"),
    ("x25519", "ed25519", "ECIES-X25519"),
    ("rsa-2048", "rsa-2048", "RSA-OAEP"),
])
def test_encrypted_images_checked_as_far_as_possible(tmp_path, keys, enc, key, scheme) -> None:
    path = sign(tmp_path, "enc.bin", keys[key], "--encrypt", str(keys[enc]))
    info = parse_image(path.read_bytes())
    assert info.is_encrypted and info.encryption == scheme
    assert not info.hash_valid  # the hash covers the plaintext: not checkable here
    img = store_for(tmp_path, keys, key).add_file(path, hardware=None)
    assert img.signed_by == key and not img.fully_verified
    assert img.unverified is not None and scheme in img.unverified
    assert "signature" in img.unverified and "plaintext" in img.unverified
    # the signature over the hash TLV is checked: a key the gateway does not trust is refused
    with pytest.raises(ImageRefused) as exc:
        store_for(tmp_path / "u", keys, "other-ecdsa-p256").add_file(path, hardware=None)
    assert exc.value.reason == Refusal.UNTRUSTED
    # and so is a damaged signature
    data = bytearray(path.read_bytes())
    sig_off = data.rindex(next(v for t, v in info.tlvs if t in (0x20, 0x22, 0x23, 0x24))[:8])
    data[sig_off + 4] ^= 0x01
    with pytest.raises(ImageRefused) as exc:
        store_for(tmp_path / "d", keys, key).add_bytes(bytes(data), hardware=None)
    assert exc.value.reason == Refusal.UNTRUSTED


def test_encrypted_unsigned_is_refused_and_pure_ed25519_is_verified(tmp_path, keys) -> None:
    unsigned = sign(tmp_path, "enc-unsigned.bin", None, "--encrypt", str(keys["ecdsa-p256"]))
    with pytest.raises(ImageRefused) as exc:
        store_for(tmp_path, keys, "ecdsa-p256").add_file(unsigned, hardware=None,
                                                          allow_unsigned=True)
    assert exc.value.reason == Refusal.UNSIGNED and "neither" in str(exc.value)
    # imgtool 2.5 --pure: Ed25519 over the whole protected region (SIG_PURE TLV), and it still
    # writes the SHA-512 hash TLV img_mgmt reports - verified by imgtool like any other
    pure = sign(tmp_path, "pure.bin", keys["ed25519"], "--pure")
    img = store_for(tmp_path / "p", keys, "ed25519").add_file(pure, hardware=None)
    assert img.signed_by == "ed25519" and img.fully_verified
    with pytest.raises(ImageRefused) as exc:
        store_for(tmp_path / "q", keys, "other-ecdsa-p256").add_file(pure, hardware=None)
    assert exc.value.reason == Refusal.UNTRUSTED


def test_trailer_sizes_follow_the_mode_and_encryption() -> None:
    import imgtool.image

    img = imgtool.image.Image(align=8, max_sectors=128)
    assert trailer_size(8, 128) == img._trailer_size(8, 128, False, None, False, 0)
    assert trailer_size(8, 128, overwrite_only=True) == img._trailer_size(8, 128, True, None,
                                                                           False, 0)
    assert trailer_size(8, 128, encrypted=True) > trailer_size(8, 128)
    assert trailer_size(8, 128, overwrite_only=True) < trailer_size(8, 128)


# -- image-set archives (nRF Connect SDK dfu_application.zip) ------------------------------------
def _zip(files: dict[str, bytes], manifest: object) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for n, d in files.items():
            zf.writestr(n, d)
    return buf.getvalue()


def test_nordic_manifest_is_read(tmp_path, keys) -> None:
    app = sign(tmp_path, "app.bin", keys["ecdsa-p256"]).read_bytes()
    net = sign(tmp_path, "net.bin", keys["ecdsa-p256"], size=4096).read_bytes()
    # as generate_zip.py writes it: strings for indices, an int for load_address
    manifest = {"format-version": 0, "time": 1, "name": "x", "files": [
        {"type": "application", "board": "nrf5340dk_nrf5340_cpuapp", "soc": "nRF5340_CPUAPP_QKAA",
         "load_address": 0xC200, "image_index": "0", "slot_index_primary": "1",
         "slot_index_secondary": "2", "version_MCUBOOT": "1.2.3", "size": len(app),
         "file": "app_update.bin", "modtime": 1},
        {"type": "application", "board": "nrf5340dk_nrf5340_cpunet", "soc": "nRF5340_CPUNET_QKAA",
         "image_index": "1", "slot_index_primary": "3", "slot_index_secondary": "4",
         "load_address": 0x1000000, "version": 1, "size": len(net),
         "file": "net_core_app_update.bin", "modtime": 1}]}
    entries = read_bundle(_zip({"app_update.bin": app, "net_core_app_update.bin": net}, manifest))
    assert [(e.image, e.slot, e.netcore, e.load_address) for e in entries] == [
        (0, None, False, 0xC200), (1, None, True, 0x1000000)]
    img = store_for(tmp_path, keys, "ecdsa-p256").add_bytes(write_bundle(entries), hardware="h")
    assert isinstance(img, VerifiedImageSet) and img.image_numbers == [0, 1]
    assert img.members[1].netcore


@pytest.mark.parametrize(("files", "manifest", "problem"), [
    ({"../evil.bin": b"x"}, {"files": [{"file": "../evil.bin", "image_index": "0"}]}, "unsafe"),
    ({"a.bin": b"x", "b.bin": b"y"}, {"files": [{"file": "a.bin"}]}, "does not list 'b.bin'"),
    ({"a.bin": b"xx"}, {"files": [{"file": "a.bin", "size": 5}]}, "the manifest says 5"),
    ({"a.bin": b"x", "b.bin": b"y"},
     {"files": [{"file": "a.bin", "image_index": "0"}, {"file": "b.bin", "image_index": 0}]},
     "a second file for image 0"),
    ({"a.bin": b"x"}, {"files": [{"file": "a.bin", "image_index": "9"}]}, "outside 0..7"),
    ({"a.bin": b"x"}, {"files": [{"file": "a.bin", "slot": "2"}]}, "outside 0..1"),
    ({"a.bin": b"x"}, {"files": [{"file": "missing.bin"}]}, "not a member"),
    ({"a.bin": b"x"}, {"nothing": 1}, "no 'files' list"),
])
def test_bad_archives_are_refused(files, manifest, problem) -> None:
    with pytest.raises(BundleError, match=problem.replace("(", r"\(").replace(".", r"\.")):
        read_bundle(_zip(files, manifest))


def test_archive_member_that_fails_verification_names_itself(tmp_path, keys) -> None:
    good = sign(tmp_path, "app.bin", keys["ecdsa-p256"]).read_bytes()
    bad = sign(tmp_path, "img1.bin", keys["other-ecdsa-p256"], size=2048).read_bytes()
    blob = write_bundle([BundleEntry("app.bin", good, 0, None),
                         BundleEntry("img1.bin", bad, 1, None)])
    with pytest.raises(ImageRefused) as exc:
        store_for(tmp_path, keys, "ecdsa-p256").add_bytes(blob, hardware=None)
    assert exc.value.reason == Refusal.UNTRUSTED and "img1.bin (image 1)" in str(exc.value)


# -- end to end on the simulator -----------------------------------------------------------------
async def test_sha384_p384_image_updates_a_device_built_for_them(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0, key_type="ecdsa-p384",
                          device_kw={"hash_algorithm": "sha384"})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes
        assert active(dev) == ("2.0.0", True, 0)


async def test_encrypted_image_updates_a_swap_device_and_says_what_was_not_checked(
        bench_factory, keys) -> None:
    enc = keys["ecdsa-p256"]
    bench = bench_factory(udp=1, serial=0, device_kw={"encryption_key": str(enc)})
    img = devkit.sign_image(bench.root / "images" / "enc-2.0.0.bin", version="2.0.0",
                            key=bench.key, size=40 * 1024, extra=("--encrypt", str(enc)))
    publish_entry(bench, {"file": str(img)})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert "encrypted (ECIES-P256)" in out.detail and "plaintext" in out.detail
        assert active(dev) == ("2.0.0", True, 0)
        assert "plaintext" in reports(bench)[-1]["detail"]


async def test_encrypted_image_is_refused_by_overwrite_only(bench_factory, keys) -> None:
    enc = keys["ecdsa-p256"]
    bench = bench_factory(udp=1, serial=0, device_kw={"encryption_key": str(enc),
                                                      "mcuboot_mode": "overwrite-only"})
    img = devkit.sign_image(bench.root / "images" / "enc-2.0.0.bin", version="2.0.0",
                            key=bench.key, size=40 * 1024, extra=("--encrypt", str(enc)))
    publish_entry(bench, {"file": str(img)})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert "overwrite-only has no revert" in out.detail and "plaintext" in out.detail
        assert upload_requests(dev) == 0

"""Finding 6: the anti-rollback pre-flight reads the security counter MCUboot reads.

MCUboot's rollback protection compares the ``SEC_CNT`` TLV of the *protected* TLV area (covered
by hash and signature; ``bootutil_get_img_security_cnt`` in mcuboot
boot/bootutil/src/image_validate.c looks only there). A counter in the unprotected area can be
added by anyone without breaking the signature: it must count for nothing - neither for the
image offered nor for the running image the gateway looks up in its store.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from safety_support import with_unprotected_tlv

from gateway import devkit
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.images import Refusal, check_image, known_security_counter
from gateway.mcuboot import TLV, TrustedKey, parse_image
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(120)


# --- 6: security counter ----------------------------------------------------------------------
def test_security_counter_only_from_the_protected_area(tmp_path: Path) -> None:
    key = devkit.make_key(tmp_path / "k.pem")
    plain = devkit.sign_image(tmp_path / "p.bin", version="2.0.0", key=key, size=2000).read_bytes()
    forged = with_unprotected_tlv(plain, TLV.SEC_CNT, struct.pack("<I", 9))
    assert parse_image(forged).security_counter is None
    check_image(forged, [TrustedKey.load(key)])  # still a validly signed image
    protected = devkit.sign_image(tmp_path / "s.bin", version="2.0.0", key=key, size=2000,
                                  security_counter=3).read_bytes()
    both = with_unprotected_tlv(protected, TLV.SEC_CNT, struct.pack("<I", 9))
    assert parse_image(both).security_counter == 3
    # a stored image whose only counter is unprotected tells nothing about the running counter
    store = tmp_path / "images"
    store.mkdir()
    (store / "x.bin").write_bytes(forged)
    assert known_security_counter(store, parse_image(forged).hash) is None


async def test_unprotected_security_counter_does_not_pass_preflight(bench_factory: Any) -> None:
    """Running image: protected counter 5. Update: no protected counter, an unprotected
    ``SEC_CNT = 9`` added after signing. MCUboot's rollback protection would refuse it; the
    gateway refuses it with zero bytes sent."""
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    v1 = devkit.sign_image(bench.root / "images" / "sc-1.0.0.bin", version="1.0.0", key=bench.key,
                           size=8 * 1024, security_counter=5)
    signed = devkit.sign_image(bench.root / "images" / "sc-2.0.0.bin", version="2.0.0",
                               key=bench.key, size=8 * 1024).read_bytes()
    v2 = bench.updates_dir / "sc-2.0.0-forged.bin"
    v2.write_bytes(with_unprotected_tlv(signed, TLV.SEC_CNT, struct.pack("<I", 9)))
    for d in bench.sim_cfg.devices:
        d.initial_image = v1
    (bench.updates_dir / "manifest.yaml").write_text(
        f"images:\n  - {{file: {v2.name}, hardware: sim_board}}\n")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        gw = Gateway(bench.gateway_config(sim))
        try:
            gw.store.add_file(v1, hardware=None)  # the gateway knows the running image
            res = await gw.run_once()
        finally:
            gw.close()
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert out.detail.startswith(Refusal.SECURITY_COUNTER.value), out.detail
        assert dev.counters["upload_bytes_received"] == 0



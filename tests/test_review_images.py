"""Review r1-images: repros of problems in image/slot decisions and resource bounds."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from test_trust_bounds import PEAK_MIB, _zeros_deflate, mender_with_data, run_bounded

from gateway.artifacts.bundle import BundleError, read_bundle
from gateway.engine import Status
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


# --- a set's revert reset that does not reach the device -------------------------------------
@pytest.mark.parametrize("lost", [(2,), (2, 3, 4)], ids=["once", "every-resend"])
async def test_lost_revert_reset_of_a_failed_set_is_not_closed_as_done(bench_factory, tmp_path,
                                                                       lost) -> None:
    """Image 1 is refused at boot (signed with a key the device does not trust), image 0
    test-boots: the set failed, the revert intent is journalled and the revert reset sent -
    but it is lost (UDP). The engine reads the device, sees image 0 still test-running, and
    closes the intent anyway (tested_hash := set id, FAILED). A new offer then never finishes
    the revert: every later attempt says "test-running an unconfirmed image ... leaving it
    alone" and the failed set's image 0 runs unconfirmed until someone power-cycles it."""
    from modes_support import active, publish_entry, resets, sign
    from safety_support import Tap
    from test_trust_sets_xip import two_images

    from gateway import devkit
    from gateway.config import parse_config
    from gateway.daemon import Gateway

    bench, _imgs = two_images(bench_factory)
    other = devkit.make_key(tmp_path / "other.pem")
    bad1 = sign(bench, "img1-2.0.0-other.bin", "2.0.0", key=other, size=16 * 1024)
    publish_entry(bench, {"images": [{"file": str(bench.images["2.0.0"]), "image": 0},
                                     {"file": str(bad1), "image": 1}]})
    from gateway.sim.simulator import Simulator
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        data = bench.gateway_dict(sim)
        data["trusted_keys"].append(str(other))
        cfg = parse_config(data, bench.root / "gateway.yaml")
        tap = Tap(dev).install()
        n = [0]

        def hook(req, frame, reply) -> bool:
            if req.is_reset:
                n[0] += 1
                # the second reset (the set's revert) is lost on the way - and, in the
                # "every-resend" case, the engine's re-sends of it within the attempt too
                return n[0] not in lost
            return True

        tap.hook = hook
        gw = Gateway(cfg)
        try:
            out = (await gw.run_once()).outcomes[dev.id]
            print("first:", out.status, out.detail)
            e = gw.journal.get(dev.id)
            print("journal:", e.outcome, e.tested_hash, e.step)
            if len(lost) == 1:
                # the unanswered revert reset is re-sent while image 0 still test-runs
                assert active(dev, 0) == ("1.0.0", True, 0), out.detail
                assert out.status == Status.ROLLED_BACK, out.detail
            else:
                assert active(dev, 0)[1] is False  # image 0 2.0.0 still test-runs
                # ...and the intent stays open: not closed as done
                assert out.status == Status.FAILED, out.detail
                assert (e.tested_hash or "").startswith(f"revert:{e.target_hash}:"), e.tested_hash
            # the server moves on: a new single-image offer
            publish_entry(bench, {"file": str(sign(bench, "app-3.0.0.bin", "3.0.0"))})
            for _ in range(2):
                out = (await gw.run_once()).outcomes[dev.id]
                print("next:", out.status, out.detail)
        finally:
            gw.close()
        print("resets", resets(dev), "image0", active(dev, 0))
        # the failed set's test boot must be finished (reverted), never left running
        # unconfirmed with the journal saying the revert is done
        assert active(dev, 0)[1] is True, (active(dev, 0), out.detail)


# --- an operator's cancel of a set whose revert waits for the window --------------------------
async def test_cancel_of_a_test_booted_set_reverts_it(bench_factory, tmp_path) -> None:
    """The failed set's revert reset waits for a maintenance window (image 0 2.0.0 test-runs,
    row open). The operator cancels. ``cancel.undo`` compares the set id (the journal's
    target_hash, which the intent carries) with image 0's hash: never equal, so it sees no
    test boot, resets nothing, "erases" slot 1 and closes the row CANCELED and the intent
    "taken back" - while the device still test-runs the canceled set's image 0, and the set's
    journalled revert intent is gone with the closed row."""
    from modes_support import active, publish_entry, sign
    from test_trust_sets_xip import NEXT_OPEN, OPEN, WINDOW, Clock, two_images, window_gateway

    from gateway import devkit
    from gateway.config import parse_config
    from gateway.sim.simulator import Simulator

    bench, _imgs = two_images(bench_factory)
    other = devkit.make_key(tmp_path / "other.pem")
    bad1 = sign(bench, "img1-2.0.0-other.bin", "2.0.0", key=other, size=16 * 1024)
    publish_entry(bench, {"images": [{"file": str(bench.images["2.0.0"]), "image": 0},
                                     {"file": str(bad1), "image": 1}]})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        data = bench.gateway_dict(sim)
        data["trusted_keys"].append(str(other))
        data["maintenance_windows"] = WINDOW
        cfg = parse_config(data, bench.root / "gateway.yaml")
        clock = Clock(OPEN)
        gw = window_gateway(cfg, clock, close_at_step="verify")
        try:
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.HELD and "waits for a maintenance window" in out.detail
            assert active(dev, 0) == ("2.0.0", False, 0)
            assert gw.fleet.request_cancel(dev.id, "operator changed their mind")
            clock.now = NEXT_OPEN
            for _ in range(2):
                out = (await gw.run_once()).outcomes[dev.id]
                print("after cancel:", out.status, out.detail)
            intents = gw.journal.open_intents(dev.id)
            e = gw.journal.get(dev.id)
            print("journal:", e.outcome, e.step, e.tested_hash, "open intents:", intents)
        finally:
            gw.close()
        print("image0:", active(dev, 0), "image1:", active(dev, 1))
        # a cancel reported taken back must have taken it back
        assert active(dev, 0) == ("1.0.0", True, 0), active(dev, 0)


async def test_cancel_of_a_test_booted_set_outside_a_window_waits_then_reverts_it(
        bench_factory, tmp_path) -> None:
    """The same cancel, the device paused (nothing is re-installed afterwards) and the window
    closed when it arrives: the take-back waits - the device untouched, image 0's secondary
    (what the test boot reverts to) not erased, the intent open - and is done by the cancel
    itself once a window opens: a reset, MCUboot reverts, the old image 0 confirmed."""
    from modes_support import active, entry, publish_entry, resets, sign
    from test_trust_sets_xip import NEXT_OPEN, OPEN, WINDOW, Clock, two_images, window_gateway

    from gateway import devkit
    from gateway.config import parse_config
    from gateway.sim.simulator import Simulator

    bench, _imgs = two_images(bench_factory)
    other = devkit.make_key(tmp_path / "other.pem")
    bad1 = sign(bench, "img1-2.0.0-other.bin", "2.0.0", key=other, size=16 * 1024)
    publish_entry(bench, {"images": [{"file": str(bench.images["2.0.0"]), "image": 0},
                                     {"file": str(bad1), "image": 1}]})
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        data = bench.gateway_dict(sim)
        data["trusted_keys"].append(str(other))
        data["maintenance_windows"] = WINDOW
        cfg = parse_config(data, bench.root / "gateway.yaml")
        clock = Clock(OPEN)
        gw = window_gateway(cfg, clock, close_at_step="verify")
        try:
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.HELD and "waits for a maintenance window" in out.detail
            n_resets = resets(dev)
            gw.fleet.ops.pause(dev.id, "hands off")
            assert gw.fleet.request_cancel(dev.id, "operator changed their mind")
            out = (await gw.run_once()).outcomes[dev.id]
            assert out.status == Status.HELD, out.detail
            assert [i.kind for i in gw.journal.open_intents(dev.id)] == ["cancel"]
            assert resets(dev) == n_resets
            assert active(dev, 0) == ("2.0.0", False, 0)
            back_to = entry(dev, 0, 1)  # the old image the test boot reverts to: kept
            assert back_to is not None and back_to["version"] == "1.0.0", back_to
            clock.now = NEXT_OPEN
            out = (await gw.run_once()).outcomes[dev.id]
            print("after the window opened:", out.status, out.detail)
            assert gw.journal.open_intents(dev.id) == []
            assert resets(dev) == n_resets + 1
            assert gw.journal.get(dev.id).outcome == "canceled"
        finally:
            gw.close()
        assert active(dev, 0) == ("1.0.0", True, 0), active(dev, 0)


# --- a device that answers the first upload chunk with a negative offset ----------------------
async def test_negative_first_chunk_offset_is_an_upload_error(bench_factory) -> None:
    """``_first_chunk`` checks ``acked > total`` only: a negative ``off`` is taken as the
    acknowledged offset, the image is sliced from its tail (memoryview[-4096:]) and the chunk
    encoder raises ValueError - an 'internal error' (a gateway bug) instead of the device's
    protocol violation (UploadError / SMPProtocolError)."""
    import asyncio

    from safety_support import Tap

    from gateway.daemon import Gateway
    from gateway.sim.simulator import Simulator

    bench = bench_factory(udp=1, serial=0, image_size=24 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()

        def hook(req, frame, reply) -> bool:
            if req.is_upload:
                hdr = (req.op, (frame[0] >> 3) & 3, req.group, req.seq, req.cmd)
                reply(dev.server._pack(hdr, {"off": -4096}))
                return False
            return True

        tap.hook = hook
        gw = Gateway(bench.gateway_config(sim, health_check_s=0.3, timeouts={
            "request_s": 1.0, "reset_s": 10, "upload_first_chunk_s": 2.0}))
        try:
            out = (await asyncio.wait_for(gw.run_once(), 60)).outcomes[dev.id]
        finally:
            gw.close()
        assert out.status == Status.FAILED
        assert "internal error" not in out.detail, out.detail


# --- a manifest that swaps the images' numbers -------------------------------------------------
async def test_member_depending_on_its_own_image_number_is_refused(bench_factory) -> None:
    """The manifest's image_index is unsigned: an application binary whose signed DEPENDENCY
    TLV names image 1 (the network core it needs) listed as image 1 - and the network core's
    binary as image 0 - is refused before a byte is sent (a binary that depends on image N is
    not image N), never made permanent as image 1."""
    from modes_support import publish_entry, resets, run_pass, sign, upload_requests
    from test_multi_image import set_entry
    from test_trust_sets_xip import two_images

    from gateway.images import Refusal
    from gateway.sim.simulator import Simulator

    bench, imgs = two_images(bench_factory)
    app = sign(bench, "img0-2.0.0-dep.bin", "2.0.0", "--dependencies", "(1, 2.0.0)")
    swapped = set_entry(imgs["img1-2.0.0"], app)  # net binary as image 0, the app as image 1
    publish_entry(bench, swapped)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, images={1: {"netcore": True}}))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert out.detail.startswith(Refusal.BAD_SET.value), out.detail
        assert "dependency on image 1 itself" in out.detail, out.detail
        assert upload_requests(dev) == 0 and resets(dev) == 0
    # the same binaries numbered right still go (the dependency on image 1 >= 2.0.0 is met)
    publish_entry(bench, set_entry(app, imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes[dev.id]

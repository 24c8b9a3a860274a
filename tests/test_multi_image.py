"""Multi-image devices updated as one set, on the simulator (two application images, swap using
scratch; an nRF5340-style network core): one artifact, skip what is already there, image 0
test-marked and the others permanent, one reset, every image checked, a failure in either image
handled for the whole set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from modes_support import (
    active,
    dfu_zip,
    entry,
    publish_entry,
    reports,
    resets,
    run_pass,
    sign,
    state_writes,
    upload_requests,
)

from gateway import devkit
from gateway.engine import Status
from gateway.images import Refusal
from gateway.sim.config import ExtraImageConfig
from gateway.sim.simulator import Simulator
from gateway.sources.base import UpdateResult

pytestmark = pytest.mark.timeout(180)


def two_images(bench_factory: Any, *, update: str = "swap", **kw: Any) -> tuple[Any, dict[str, Path]]:
    """A device with image 0 (the application, 1.0.0) and image 1 (1.0.0), and set builds."""
    bench = bench_factory(udp=1, serial=0, device_kw={"buf_size": 2475, **kw})
    imgs = {
        "img1-1.0.0": sign(bench, "img1-1.0.0.bin", "1.0.0", size=16 * 1024),
        "img1-2.0.0": sign(bench, "img1-2.0.0.bin", "2.0.0", size=16 * 1024),
        "img0-3.0.0": sign(bench, "img0-3.0.0.bin", "3.0.0"),
    }
    bench.sim_cfg.devices[0].extra_images = [
        ExtraImageConfig(slot_size=0x40000, initial_image=imgs["img1-1.0.0"], update=update)]
    return bench, imgs


NETCORE1 = {1: {"netcore": True}}  # the device config says image 1 is the network core


def netcore_set(bench_factory: Any) -> Any:
    """An nRF5340-style device (image 1 a network core) and an nRF Connect SDK
    dfu_application.zip for it (2.0.0 of both; image 1's board names the cpunet), published."""
    bench, imgs = two_images(bench_factory, update="netcore")
    z = dfu_zip(bench.root / "dfu_application.zip", [
        {"path": bench.images["2.0.0"], "image": 0},
        {"path": imgs["img1-2.0.0"], "image": 1, "board": "nrf5340dk_nrf5340_cpunet"}])
    publish_entry(bench, {"file": str(z)})
    return bench


def uploads_to(dev: Any) -> list[int]:
    """Flash slots the device's img_mgmt started an upload into (2N + 1 = image N's secondary)."""
    return [int(e.detail["slot"]) for e in dev.events if e.kind == "upload-start"]


def set_entry(app: Path, img1: Path, **img1_kw: Any) -> dict[str, Any]:
    return {"images": [{"file": str(app), "image": 0}, {"file": str(img1), "image": 1, **img1_kw}]}


async def test_two_images_updated_as_one_set_with_one_reset(bench_factory) -> None:
    bench, imgs = two_images(bench_factory)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert out.result == UpdateResult.SUCCESS
        assert resets(dev) == 1  # both images in the same boot
        assert sorted(uploads_to(dev)) == [1, 3]
        assert active(dev, 0) == ("2.0.0", True, 0)
        assert active(dev, 1) == ("2.0.0", True, 0)
        # image 0 test-marked (slot 1, confirm false), then confirmed without a hash; image 1
        # marked permanent in its secondary (slot 3, confirm true) - never test-marked
        writes = state_writes(dev)
        assert {"slot": 1, "confirm": False} in writes
        assert {"slot": 3, "confirm": True} in writes
        assert not any(w["slot"] == 3 and not w["confirm"] for w in writes)
        assert "image 1 2.0.0: installed permanently" in out.detail
        assert "image 0 2.0.0: confirmed by the gateway" in out.detail
        assert reports(bench)[-1]["result"] == 1

        # the next set changes image 0 only: image 1's build is already in its slot - no upload
        publish_entry(bench, set_entry(imgs["img0-3.0.0"], imgs["img1-2.0.0"]))
        before = uploads_to(dev)
        res = await run_pass(bench.gateway_config(sim))
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes
        assert uploads_to(dev)[len(before):] == [1]
        assert active(dev, 0) == ("3.0.0", True, 0) and active(dev, 1) == ("2.0.0", True, 0)


async def test_set_confirm_is_journalled_before_it_is_sent(bench_factory) -> None:
    """Issue #22 (power cuts on Renode, multi-image): the confirm of a test-booted member is an
    intent like the single image's - journalled ("confirm sent", step confirm) after the health
    check and before the write, so a pass after a cut can tell this gateway's confirm from
    someone else's. It was sent unjournalled."""
    from gateway.engine import CONFIRM_SENT
    from gateway.journal import Journal

    bench, imgs = two_images(bench_factory)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_config(sim)
        res = await run_pass(cfg)
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes
    j = Journal(cfg.state_dir / "journal.sqlite")
    try:
        steps = [(step, detail) for _t, _d, step, detail in j.events(dev.id)]
    finally:
        j.close()
    sent = [i for i, (st, d) in enumerate(steps) if st == "confirm" and d.startswith(CONFIRM_SENT)]
    health = [i for i, (st, d) in enumerate(steps) if st == "confirm" and "health check" in d]
    assert len(sent) == 1 and "image 0" in steps[sent[0]][1], steps  # image 1 is permanent
    assert health and health[0] < sent[0], steps
    assert sent[0] < max(i for i, (st, _d) in enumerate(steps) if st == "done"), steps


async def test_a_member_whose_slot_lacks_its_last_bytes_is_uploaded_again(bench_factory) -> None:
    """Image 1's secondary lists the set's image 1 hash (an upload cut short after its hash TLV,
    by this gateway or another tool) but lacks the signature's last bytes: without the journal's
    proof it is uploaded again, not marked permanent as it is - MCUboot would refuse image 1 and
    swap image 0 alone, a set the device was never meant to run."""
    bench, imgs = two_images(bench_factory)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    data = imgs["img1-2.0.0"].read_bytes()
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        dev.flash.write(3, 0, data[:-40], sync=True)
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert sorted(uploads_to(dev)) == [1, 3]
        assert active(dev, 0) == ("2.0.0", True, 0)
        assert active(dev, 1) == ("2.0.0", True, 0)


async def test_image_0_fails_image_1_that_can_revert_reverts_too(bench_factory) -> None:
    """Both images test-capable (the device lets img_mgmt confirm a non-active image): image 0
    crashes in its test boot, the set fails, and both are back on 1.0.0 - ROLLED_BACK."""
    bench, imgs = two_images(bench_factory, crash_on_boot_versions=["2.0.0"], crash_after_s=0.3,
                             allow_confirm_non_active_image_any=True)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, health_check_s=2.0,
                                                  images={1: {"mark": "test"}}))
        out = res.outcomes[dev.id]
        assert out.status == Status.ROLLED_BACK, out
        assert out.result == UpdateResult.UPDATE_FAILED
        assert "image set failed" in out.detail
        assert active(dev, 0) == ("1.0.0", True, 0)
        assert active(dev, 1) == ("1.0.0", True, 0)
        assert not any(w["confirm"] for w in state_writes(dev))  # nothing confirmed
        assert reports(bench)[-1]["result"] == 8


async def test_image_0_fails_permanent_image_1_stays_and_is_reported(bench_factory) -> None:
    """Default rules (image 1 permanent): image 0 crashes and is reverted by MCUboot; image 1 was
    installed for good - FAILED, saying which image is where."""
    bench, imgs = two_images(bench_factory, crash_on_boot_versions=["2.0.0"], crash_after_s=0.3)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim, health_check_s=2.0))
        out = res.outcomes[dev.id]
        assert out.status == Status.FAILED, out
        assert out.result == UpdateResult.UPDATE_FAILED
        assert "image 0 2.0.0" in out.detail
        assert "[1] were installed permanently and cannot be taken back" in out.detail
        assert active(dev, 0) == ("1.0.0", True, 0)
        assert active(dev, 1) == ("2.0.0", True, 0)


async def test_image_1_refused_at_boot_image_0_is_reset_back(bench_factory, tmp_path) -> None:
    """Image 1 signed with a key the gateway trusts but the device's MCUboot lacks: MCUboot
    erases it at the reset while image 0 test-boots. The set failed: the gateway resets so
    MCUboot reverts image 0, and reports a rollback of the whole set."""
    bench, _imgs = two_images(bench_factory)
    other = devkit.make_key(tmp_path / "other.pem")
    bad1 = sign(bench, "img1-2.0.0-other.bin", "2.0.0", key=other, size=16 * 1024)
    publish_entry(bench, set_entry(bench.images["2.0.0"], bad1))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        cfg = bench.gateway_dict(sim)
        cfg["trusted_keys"].append(str(other))
        from gateway.config import parse_config

        res = await run_pass(parse_config(cfg, bench.root / "gw.yaml"))
        out = res.outcomes[dev.id]
        assert out.status == Status.ROLLED_BACK, out
        assert "image 1 2.0.0: MCUboot refused it at boot" in out.detail
        assert "MCUboot reverted image(s) [0]" in out.detail
        assert resets(dev) == 2
        assert active(dev, 0) == ("1.0.0", True, 0)
        assert active(dev, 1) == ("1.0.0", True, 0)
        assert not any(w["confirm"] and w["slot"] in (0, 1) for w in state_writes(dev))


async def test_power_cut_in_mid_swap_of_the_set(bench_factory) -> None:
    bench, imgs = two_images(bench_factory, power_cut_during_swap=True)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert any(e.kind == "power-cut" for e in dev.events)
        assert active(dev, 0) == ("2.0.0", True, 0) and active(dev, 1) == ("2.0.0", True, 0)


async def test_network_core_is_never_test_marked(bench_factory) -> None:
    """nRF5340-style image 1 (network core, no revert, its primary unreadable), declared in the
    device config (``images: {1: {netcore: true}}``) and shipped in an nRF Connect SDK
    dfu_application.zip whose board names the cpunet (consistent with the config); marked
    permanent, checked by its secondary being consumed at the reset."""
    bench = netcore_set(bench_factory)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        assert entry(dev, 1, 0) is None  # the network core's flash is not readable
        res = await run_pass(bench.gateway_config(sim, images=NETCORE1))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert "handed to the network core" in out.detail
        writes = state_writes(dev)
        assert {"slot": 3, "confirm": True} in writes
        assert not any(w["slot"] == 3 and not w["confirm"] for w in writes)
        assert resets(dev) == 1
        assert active(dev, 0) == ("2.0.0", True, 0)
        # a second pass: up to date, nothing re-sent
        n = upload_requests(dev)
        res = await run_pass(bench.gateway_config(sim, images=NETCORE1))
        assert res.outcomes[dev.id].status in (Status.UP_TO_DATE, Status.UPDATED)
        assert upload_requests(dev) == n and resets(dev) == 1


async def test_unmet_dependency_refuses_the_set_before_a_byte(bench_factory) -> None:
    bench, imgs = two_images(bench_factory)
    app = sign(bench, "img0-2.0.0-dep.bin", "2.0.0", "--dependencies", "(1, 3.0.0)")
    publish_entry(bench, set_entry(app, imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert out.detail.startswith(Refusal.BAD_SET.value)
        assert "depends on image 1 >= 3.0.0" in out.detail
        assert upload_requests(dev) == 0 and resets(dev) == 0


async def test_set_for_an_image_the_device_lacks_is_refused(bench_factory) -> None:
    bench = bench_factory(udp=1, serial=0)
    img1 = sign(bench, "img1-2.0.0.bin", "2.0.0", size=16 * 1024)
    publish_entry(bench, set_entry(bench.images["2.0.0"], img1))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert "lists images [0] only" in out.detail
        assert upload_requests(dev) == 0


async def _engine_run(bench: Any, sim: Any, until: Any, before: Any = None,
                      **cfg_kw: Any) -> Any:
    """One engine attempt on the set the local source offers, stopped at ``until``."""
    from gateway.daemon import Gateway

    gw = Gateway(bench.gateway_config(sim, **cfg_kw))
    try:
        (d,) = gw.cfg.devices
        async with gw.session(d) as session:
            plan = await gw.plan(d, session)
            if before is not None:
                await before(gw, session, plan)
            return await gw.engine(d, session).run(plan.image, None,
                                                   artifact_id=plan.offer.artifact_id,
                                                   source="local", until=until)
    finally:
        gw.close()


async def test_set_held_after_its_marks_resumes_with_one_reset(bench_factory) -> None:
    """Stopped after the marks (a gateway restart there): the next attempt finds both images
    pending - marked by this gateway, per the journal - and only resets, verifies, confirms."""
    from gateway.engine import Stage

    bench, imgs = two_images(bench_factory)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        out = await _engine_run(bench, sim, Stage.MARKED)
        assert out.status == Status.HELD, out
        assert entry(dev, 0, 1)["pending"] and entry(dev, 1, 1)["permanent"]
        writes, ups = len(state_writes(dev)), upload_requests(dev)
        res = await run_pass(bench.gateway_config(sim))
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes
        assert upload_requests(dev) == ups  # nothing sent again
        assert [w for w in state_writes(dev)[writes:]] == [{"slot": 0, "confirm": True}]
        assert resets(dev) == 1
        assert active(dev, 0) == ("2.0.0", True, 0) and active(dev, 1) == ("2.0.0", True, 0)


async def test_set_interrupted_between_its_marks_completes_them(bench_factory) -> None:
    """The gateway died after marking image 0 for test and before marking image 1 (journal:
    marks started). The next attempt marks only image 1 and resets once; image 0's test mark is
    not repeated (img_mgmt would refuse nothing, but nothing is written twice)."""
    bench, imgs = two_images(bench_factory)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        out = await stopped_while_marking(bench, sim, dev, marks=(0,), power_cut=False)
        assert out.status == Status.HELD, out
        writes = state_writes(dev)
        assert [w for w in writes if w["slot"] == 1] == [{"slot": 1, "confirm": False}]
        assert {"slot": 3, "confirm": True} in writes
        res = await run_pass(bench.gateway_config(sim))
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes
        assert resets(dev) == 1
        assert active(dev, 0) == ("2.0.0", True, 0) and active(dev, 1) == ("2.0.0", True, 0)


async def stopped_while_marking(bench: Any, sim: Any, dev: Any, *, marks: tuple[int, ...],
                                power_cut: bool, **cfg_kw: Any) -> Any:
    """The gateway uploaded the set, journalled its "marking" intent, marked the members
    ``marks`` (image 0 for test, the others permanent) and stopped before journalling "marked".
    ``power_cut``: the device lost power with it and booted on what landed (the power-cut
    campaign's multi-image cuts in image 1's trailer). Else the device keeps its pending marks
    and the next attempt (started here, held at its marks) goes on from the journal: its
    outcome is returned."""
    from gateway.engine import Stage
    from gateway.images import VerifiedImageSet

    out = await _engine_run(bench, sim, Stage.UPLOADED, **cfg_kw)
    assert out.status == Status.HELD, out

    async def marks_then_stop(gw: Any, session: Any, plan: Any) -> None:
        iset = plan.image
        assert isinstance(iset, VerifiedImageSet)
        e = gw.journal.get(dev.id)
        gw.journal.put(e.with_(step="mark-test", tested_hash=f"marking:{iset.hash.hex()}"),
                       "test: stopped between the marks")
        for m in iset.members:
            if m.image in marks:
                if m.image == 0:
                    await session.image_test(m.hash)
                else:
                    await session.image_confirm(m.hash)
        if power_cut:
            await dev.power_cycle()
            raise RuntimeError("the gateway stopped")

    if not power_cut:
        return await _engine_run(bench, sim, Stage.MARKED, before=marks_then_stop, **cfg_kw)
    with pytest.raises(RuntimeError, match="the gateway stopped"):
        await _engine_run(bench, sim, Stage.MARKED, before=marks_then_stop, **cfg_kw)
    return None


async def test_set_split_by_a_cut_between_its_marks_is_reset_back_and_tried_again(
        bench_factory) -> None:
    """Issue #22, power-cut campaign on Renode (multi-image, cuts 57129-57146 in image 1's
    trailer): image 0's test mark landed, image 1's did not, and the device booted - image 0
    test-ran beside the old image 1. The gateway reported "the device test-runs an image of this
    set that this gateway did not test" on every pass and left image 0 unconfirmed (reverted at
    whatever reset came next). Its own journal said it was marking the set: the split set is
    reset back through the revert intent (journalled first), and the next attempt installs it."""
    from gateway.journal import Journal

    bench, imgs = two_images(bench_factory)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        await stopped_while_marking(bench, sim, dev, marks=(0,), power_cut=True)
        assert active(dev, 0) == ("2.0.0", False, 0)  # test-runs, unconfirmed
        assert active(dev, 1) == ("1.0.0", True, 0)
        cfg = bench.gateway_config(sim)
        res = await run_pass(cfg)
        out = res.outcomes[dev.id]
        assert out.status == Status.FAILED, out
        assert "cut short" in out.detail and "tried again" in out.detail, out.detail
        assert active(dev, 0) == ("1.0.0", True, 0)  # MCUboot reverted it at the gateway's reset
        assert not any(w["confirm"] and w["slot"] in (0, 1) for w in state_writes(dev))
        j = Journal(cfg.state_dir / "journal.sqlite")
        try:
            ev = [(step, d) for _t, _d, step, d in j.events(dev.id)]
            e = j.get(dev.id)
        finally:
            j.close()
        intent = next(i for i, (s, d) in enumerate(ev) if "intent: reset" in d)
        reset = next(i for i, (s, _d) in enumerate(ev) if s == "reset" and i > intent)
        assert intent < reset, ev
        assert e.tested_hash is None and e.blocked_hash is None and e.blocked_artifact is None
        # the next pass: the set is installed whole (uploads again: nothing proves the slots)
        res = await run_pass(cfg)
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes
        assert active(dev, 0) == ("2.0.0", True, 0) and active(dev, 1) == ("2.0.0", True, 0)


async def test_set_booted_whole_after_a_cut_before_marked_is_checked_and_confirmed(
        bench_factory) -> None:
    """Both marks landed before the cut (the journal still says "marking"): the device booted
    the whole set - image 0 test-runs, image 1 installed. It is this gateway's test boot: health
    check, then confirm; no reset, nothing uploaded again."""
    bench, imgs = two_images(bench_factory)
    publish_entry(bench, set_entry(bench.images["2.0.0"], imgs["img1-2.0.0"]))
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        await stopped_while_marking(bench, sim, dev, marks=(0, 1), power_cut=True)
        assert active(dev, 0) == ("2.0.0", False, 0) and active(dev, 1) == ("2.0.0", True, 0)
        boots, ups = resets(dev), upload_requests(dev)
        res = await run_pass(bench.gateway_config(sim))
        out = res.outcomes[dev.id]
        assert out.status == Status.UPDATED, out
        assert resets(dev) == boots and upload_requests(dev) == ups
        assert active(dev, 0) == ("2.0.0", True, 0) and active(dev, 1) == ("2.0.0", True, 0)

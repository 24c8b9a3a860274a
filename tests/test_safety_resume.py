"""Found by the fault schedules (seed 122): an attempt that fails while the device test-runs the
new image must not leave it there.

The link dropped the state reads right after the test boot, so the attempt failed (connection
lost). The next attempt found the device running the target unconfirmed; the source offered
nothing (the device already runs the newest version), and the gateway refused to touch "an
unconfirmed image this gateway did not test" - though its journal said it did. It is resumed
now: health-checked and confirmed.
"""

from __future__ import annotations

from typing import Any

import pytest
from safety_support import Request, Tap, active_state

from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(90)


def lose_state_reads_after_the_reset(tap: Tap) -> list[bool]:
    """The reset goes through; after it, no state read is answered until ``blackout[0]`` is
    cleared or the hook removed."""
    blackout = [False]

    def hook(req: Request, frame: bytes, reply: Any) -> bool:
        if req.is_reset:
            blackout[0] = True
            return True
        return not (blackout[0] and req.op == 0 and req.group == 1 and req.cmd == 0)

    tap.hook = hook
    return blackout


async def one_pass(cfg: Any, dev_id: str) -> Any:
    gw = Gateway(cfg)
    try:
        return (await gw.run_once()).outcomes[dev_id]
    finally:
        gw.close()


async def test_failed_attempt_during_the_test_boot_is_resumed(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()
        blackout = lose_state_reads_after_the_reset(tap)
        cfg = bench.gateway_config(sim, health_check_s=0.3,
                                   timeouts={"reset_s": 3, "request_s": 0.5})
        outs = []
        for _ in range(2):
            outs.append(await one_pass(cfg, dev.id))
            blackout[0] = False
            tap.hook = None
        assert outs[0].status == Status.FAILED, outs[0]
        assert outs[1].status == Status.UPDATED, outs[1]
        assert outs[1].old_version == "1.0.0", outs[1]
        assert active_state(dev) == ("2.0.0", True)
        await dev.power_cycle(wait=True)
        assert active_state(dev) == ("2.0.0", True)


async def test_confirm_that_landed_in_a_failed_attempt_is_reported_as_done(bench_factory: Any) -> None:
    """Found by the fault schedules (seed 456): the confirm lands, its answer and every state
    read after it are lost, so the attempt fails (connection lost) and the server is told so.
    The next attempt finds the target running confirmed - this gateway's own update - and the
    server's last word becomes "updated", not silence after a failure."""
    import json

    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()
        blackout = [False]

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_confirm and not blackout[0]:
                blackout[0] = True
                tap.deliver(frame, lambda _rsp: None)  # it lands; the answer is lost
                return False
            return not (blackout[0] and req.op == 0 and req.group == 1 and req.cmd == 0)

        tap.hook = hook
        cfg = bench.gateway_config(sim, health_check_s=0.3,
                                   timeouts={"reset_s": 3, "request_s": 0.5})
        outs = []
        for _ in range(2):
            gw = Gateway(cfg)
            try:
                outs.append((await gw.run_once()).outcomes[dev.id])
            finally:
                gw.close()
            tap.hook = None
        assert outs[0].status == Status.FAILED, outs[0]
        assert outs[1].status == Status.UPDATED, outs[1]
        assert active_state(dev) == ("2.0.0", True)
        lines = [json.loads(x) for x in
                 (bench.updates_dir / "reports.jsonl").read_text().splitlines() if x.strip()]
        assert [x["result_name"] for x in lines] == ["CONNECTION_LOST", "SUCCESS"], lines


async def test_reset_that_never_arrived_is_sent_again(bench_factory: Any) -> None:
    """The reset request is lost (and so is its answer): the device still runs the old image
    with the new one pending. Read just before, that state makes another reset safe (nothing
    test-runs, nothing can be reverted); giving up instead left the image pending."""
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()
        lost = [0]

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_reset and lost[0] == 0:
                lost[0] += 1
                return False
            return True

        tap.hook = hook
        gw = Gateway(bench.gateway_config(sim, health_check_s=0.3,
                                          timeouts={"reset_s": 3, "request_s": 0.5}))
        try:
            out = (await gw.run_once()).outcomes[dev.id]
        finally:
            gw.close()
        assert out.status == Status.UPDATED, out
        assert len(tap.requests(lambda r: r.is_reset)) == 2
        assert active_state(dev) == ("2.0.0", True)


async def test_secondary_listing_the_target_without_its_last_bytes_is_uploaded_again(
        bench_factory: Any) -> None:
    """Found by a fault-schedule kill sweep (seed 2, SIGKILL at request 14): an upload cut short
    after the chunk that holds the hash TLV leaves a secondary slot that img_mgmt lists with the
    target's full hash (img_mgmt_read_info reads the TLV, nothing else) while the signature's
    last bytes are missing. The next attempt took that for a complete upload, marked it and
    reset: MCUboot refused it, and the gateway reported - and blocked - a "key mismatch". Only
    the journal (the device acknowledged this gateway's last byte) proves an upload complete;
    here it does not, so the image is uploaded again and installed."""
    from gateway.mcuboot import parse_image

    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    bench.publish("2.0.0")
    data = bench.images["2.0.0"].read_bytes()
    target = parse_image(data).hash
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        dev.flash.write(1, 0, data[:-40], sync=True)  # all but the signature's last 40 bytes
        assert dev.img.read_info(1).hash == target  # what the device lists: the full hash
        out = await one_pass(bench.gateway_config(sim, health_check_s=0.3), dev.id)
        assert out.status == Status.UPDATED, out
        uploads = [e for e in dev.events if e.kind == "upload-start"]
        assert len(uploads) == 1, uploads
        assert active_state(dev) == ("2.0.0", True)


async def test_test_boot_this_gateway_started_is_finished_after_a_wrong_rollback_verdict(
        bench_factory: Any) -> None:
    """CI, fault seed 2: the journal said rolled back (and blocked the artifact) while the device
    went on to test-run the image this gateway had marked; every later pass refused to touch
    "an unconfirmed image this gateway did not test" - though ``tested_hash`` said it did - and a
    power cut would have reverted it under a server that was told "rolled back". A test boot this
    gateway started is finished by it: health check, confirm, report updated, block lifted."""
    import json

    from gateway.journal import Journal

    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()
        lose_state_reads_after_the_reset(tap)  # the test boot happens; the gateway loses sight
        cfg = bench.gateway_config(sim, health_check_s=0.3,
                                   timeouts={"reset_s": 3, "request_s": 0.5})
        first = await one_pass(cfg, dev.id)
        tap.hook = None
        assert first.status == Status.FAILED, first
        assert active_state(dev) == ("2.0.0", False)  # test-running the image this gateway marked
        # the journal as a wrong rollback verdict leaves it: rolled back, artifact blocked
        j = Journal(bench.root / "gateway-state" / "journal.sqlite")
        e = j.get(dev.id)
        assert e.tested_hash is not None and e.tested_hash == e.target_hash
        j.put(e.with_(outcome=Status.ROLLED_BACK.value, step="rolled-back",
                      blocked_hash=e.target_hash, blocked_artifact=e.artifact_id), "test: verdict")
        j.close()

        second = await one_pass(cfg, dev.id)
        assert second.status == Status.UPDATED, second
        assert active_state(dev) == ("2.0.0", True)
        await dev.power_cycle(wait=True)
        assert active_state(dev) == ("2.0.0", True)
        j = Journal(bench.root / "gateway-state" / "journal.sqlite")
        e = j.get(dev.id)
        j.close()
        assert e.blocked_artifact is None and e.blocked_hash is None
        lines = [json.loads(x) for x in
                 (bench.updates_dir / "reports.jsonl").read_text().splitlines() if x.strip()]
        assert lines[-1]["result_name"] == "SUCCESS", lines

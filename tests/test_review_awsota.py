"""Adversarial review of the aws_ota source (issue #20): each test FAILS on the code it reviews.

1. Two MCUs of one group routed the same file (``routes: [{fileid: 1, group: g}]``, the default
   thing ``{gateway}``): their concurrent stream downloads share one ``.part`` file; the second
   one's ``Partial`` truncates the file under the first, whose bitmap already holds the blocks
   -> the first returns a file with zeroed blocks (code signing: REJECTED, a legit job lost).
2. Two files of one job routed to one MCU (file 1 to its group, file 2 to the device): only
   file 1 is offered, yet the execution is reported SUCCEEDED - file 2 never reached the MCU.
3. A job canceled on the server after the test boot (at mark-test) with the default
   ``poll_interval_s`` (60 s: cancel probe every 30 s) and the default 3 s health window: the
   source learns the cancel (the self_test "ready" update is rejected InvalidStateTransition,
   ``job.closed`` set), but nothing makes the cancel watcher look before the confirm: the
   canceled image is confirmed (made permanent).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from fleet_servers.mosquitto import mosquitto
from servers.aws_jobs import AwsJobs
from servers.aws_streams import AwsStreams
from test_conformance_aws_jobs import active
from test_source_aws_ota import THING, codesign, ota_doc, ota_file

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.sim.simulator import Simulator
from gateway.sources.aws_ota import AwsOtaSource
from gateway.sources.base import DeviceView, Report, UpdateResult, UpdateState
from gateway.sources.settings import AwsOtaSourceConfig


def _src(port: int, tmp: Path, store: Path | None, routes: list[dict[str, Any]],
         devices: list[tuple[str, str | None]], **kw: Any) -> AwsOtaSource:
    cfg = AwsOtaSourceConfig.model_validate(
        {"host": "127.0.0.1", "port": port, "tls": False, "client_id": "gw",
         "request_timeout_s": 3, "routes": routes, "progress_interval_s": 0,
         **({"code_signing_cert_dir": str(store)} if store else {}), **kw})
    return AwsOtaSource(cfg, tmp / "state", gateway_id=THING, devices=devices)


async def test_two_group_members_download_the_same_file_concurrently(tmp_path: Path) -> None:
    data = os.urandom(16 * 1024)  # 16 blocks of 1 KiB
    key, store = codesign(tmp_path)
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws, AwsStreams(port) as st:
        st.streams["AFR_OTA-s1"] = {1: data}
        # blocks 0-2 reach the gateway at their 1st send, 3.. are lost then; 0-2 are lost at
        # their 2nd send (random message loss, which the bitmap resume is there for)
        st.lose = lambda _f, i, nth: (i >= 3 and nth == 0) or (i < 3 and nth == 1)
        await aws.create_job("ota-g", ota_doc([ota_file(1, data, key)]), [THING])
        src = _src(port, tmp_path, store, [{"fileid": 1, "group": "g"}],
                   [("a", "g"), ("b", "g")], block_size=1024, blocks_per_request=16,
                   block_timeout_s=2.0)
        try:
            oa = await src.check(DeviceView("a", "nrf", group="g"))
            ob = await src.check(DeviceView("b", "nrf", group="g"))
            assert oa is not None and ob is not None
            ta = asyncio.create_task(src.fetch(oa, None))
            await st.wait_for(lambda: len(st.sent) == 3)  # a has blocks 0-2, waits for more
            tb = asyncio.create_task(src.fetch(ob, None))
            pa = await ta  # FAILS: code signing rejects a's file (blocks 0-2 zeroed by b)
            assert pa.read_bytes() == data
            tb.cancel()
        finally:
            await src.close()


async def test_two_files_for_one_mcu_not_reported_succeeded(tmp_path: Path) -> None:
    f1, f2 = os.urandom(2048), os.urandom(2048)
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws:
        (ex,) = await aws.create_job("ota-2f", ota_doc([ota_file(1, f1, None),
                                                        ota_file(2, f2, None)]), [THING])
        # file 1 to the MCUs of group g, file 2 to MCU a (which is in g): both are a's
        src = _src(port, tmp_path, None, [{"fileid": 1, "group": "g"}, {"fileid": 2, "device": "a"}],
                   [("a", "g")])
        try:
            # adjusted (the reviewer's version expected file 1 to be offered, then installed and
            # reported SUCCESS): no file of such a job is offered - installing one of the two
            # would leave the MCU half-updated; the job is REJECTED up front, with the reason
            offer = await src.check(DeviceView("a", "nrf", group="g"))
            again = await src.check(DeviceView("a", "nrf", group="g"))
        finally:
            await src.close()
    # file 2, routed to a by the configuration, was never offered nor installed
    assert offer is None and again is None
    assert ex.status == "REJECTED", ex.updates[-1]["statusDetails"]  # was: SUCCEEDED
    details = ex.updates[-1]["statusDetails"]
    assert "[1, 2]" in details["reason"] and details["reason"].startswith("rejected:"), details


async def test_cancel_after_test_boot_not_confirmed_default_poll(bench_factory: Any,
                                                                 tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    img = bench.images["2.0.0"].read_bytes()
    key, store = codesign(tmp_path)
    hit = asyncio.Event()
    async with (mosquitto(tmp_path) as port, AwsJobs(port) as aws, AwsStreams(port) as st,
                Simulator(bench.sim_cfg) as sim):
        st.streams["AFR_OTA-s1"] = {1: img}
        (ex,) = await aws.create_job("ota-x", ota_doc([ota_file(1, img, key)]), [THING])
        data = bench.gateway_dict(sim)
        data["source"] = {"kind": "aws_ota", "host": "127.0.0.1", "port": port, "tls": False,
                          "request_timeout_s": 3, "progress_interval_s": 0,
                          "routes": [{"fileid": 1, "device": "udp-1"}],
                          "code_signing_cert_dir": str(store), "block_size": 4096}
        cfg = parse_config(data, bench.root / "gateway.yaml")

        def progress(_dev: str, step: str, _o: int, _t: int) -> None:
            if step == "mark-test":
                hit.set()

        async def operator() -> None:
            await hit.wait()
            await aws.cancel_execution("ota-x", THING, force=True)

        op = asyncio.create_task(operator())
        gw = Gateway(cfg, on_progress=progress)
        try:
            res = await asyncio.wait_for(gw.run_once(), 120)
        finally:
            op.cancel()
            gw.close()
        dev = sim.devices["udp-1"]
        assert ex.status == "CANCELED"
        # FAILS: the canceled image is confirmed (2.0.0, True)
        assert active(dev) != ("2.0.0", True), res.outcomes


async def test_sweep_does_not_remove_another_running_download(tmp_path: Path) -> None:
    """4. ``streams.sweep`` (run when a download starts) spares only its own key: another MCU's
    download running at the same time (two files of one job, two MCUs) is deleted under it once
    the cache bound is passed - its ``done()`` then fails (FileNotFoundError, not even a
    FetchError) and its resume data is gone."""
    f1, f2 = os.urandom(16 * 1024), os.urandom(16 * 1024)
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws, AwsStreams(port) as st:
        st.streams["AFR_OTA-s1"] = {1: f1, 2: f2}
        st.lose = lambda f, i, nth: f == 1 and i >= 3 and nth == 0  # a waits for its blocks 3..
        await aws.create_job("ota-s", ota_doc([ota_file(1, f1, None), ota_file(2, f2, None)]),
                             [THING])
        src = _src(port, tmp_path, None, [{"fileid": 1, "device": "a"}, {"fileid": 2, "device": "b"}],
                   [("a", None), ("b", None)], block_size=1024, blocks_per_request=16,
                   block_timeout_s=1.0, stream_cache_bytes=2048)
        try:
            oa = await src.check(DeviceView("a", "nrf"))
            ob = await src.check(DeviceView("b", "nrf"))
            assert oa is not None and ob is not None
            ta = asyncio.create_task(src.fetch(oa, None))
            await st.wait_for(lambda: len(st.sent) == 3)
            await asyncio.sleep(0.1)
            pb = await src.fetch(ob, None)  # b's start sweeps a's running download away
            assert pb.read_bytes() == f2
            pa = await ta  # FAILS: FileNotFoundError in Partial.done()
            assert pa.read_bytes() == f1
        finally:
            await src.close()


async def test_a_shared_file_stays_while_another_member_holds_it(tmp_path: Path) -> None:
    """Fixes of 1./4.: two members of a group routed one file download it ONCE (the second
    joins the running download); one member's SUCCESS (``_forget``) and a third MCU's download
    start (``sweep`` over a tiny cache bound) leave the file the other member still holds; it
    goes once that member's update is over too."""
    f1, f2 = os.urandom(8 * 1024), os.urandom(4 * 1024)
    async with mosquitto(tmp_path) as port, AwsJobs(port) as aws, AwsStreams(port) as st:
        st.streams["AFR_OTA-s1"] = {1: f1, 2: f2}
        await aws.create_job("ota-sh", ota_doc([ota_file(1, f1, None), ota_file(2, f2, None)]),
                             [THING])
        src = _src(port, tmp_path, None, [{"fileid": 1, "group": "g"}, {"fileid": 2, "device": "c"}],
                   [("a", "g"), ("b", "g"), ("c", None)], block_size=1024, blocks_per_request=4,
                   stream_cache_bytes=2048)
        try:
            oa, ob, oc = [await src.check(DeviceView(d, "nrf", group=g))
                          for d, g in (("a", "g"), ("b", "g"), ("c", None))]
            assert oa is not None and ob is not None and oc is not None
            pa, pb = await asyncio.gather(src.fetch(oa, None), src.fetch(ob, None))
            assert pa == pb and pa.read_bytes() == f1
            assert sorted(i for f, i in st.sent if f == 1) == list(range(8))  # one download
            ok = Report(UpdateState.IDLE, UpdateResult.SUCCESS, 1.0, "updated")
            await src.report(oa, ok)
            assert pb.read_bytes() == f1  # b still holds it
            assert (await src.fetch(oc, None)).read_bytes() == f2  # its sweep spares b's file
            assert pb.read_bytes() == f1
            await src.report(ob, ok)
            assert not pb.exists()  # nobody holds it any more: removed
        finally:
            await src.close()

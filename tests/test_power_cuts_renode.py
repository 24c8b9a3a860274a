"""Issue #22: power cuts at flash operations of a gateway-driven update (``benchmarks/power_cuts.py``).

Without Renode: the judge fails the bad cases it exists for (a new image confirmed without a
test boot or without a health check, an outcome or journal that does not match the board,
something left pending, a fleet server told otherwise), the torn-flash model and the
trailer classification.

On Renode (``renode`` mark): the CI sample - ten cuts, two per MCUboot mode, spread over the
phases (img_mgmt's upload and test mark in the application, MCUboot's swap/copy), both
gateway variants (killed with the board and restarted on its journal / still running). The
operation indices come from the campaign's golden runs (``build/power-cuts/<mode>/
golden-ops.tsv``; docs/reliability.md): the Zephyr driver programs byte by byte, so the
index of an operation depends on the bytes written, not on the gateway's chunking. Each cut
checks that its operation is the kind the sample names before the judge runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import power_cuts as pc  # noqa: E402

SCRATCH = pc.MODES["swap-scratch"]
OLD, NEW = SCRATCH.old[0], SCRATCH.new[0]


def _slots(active: str, *, confirmed: bool = True, pending: bool = False) -> list[dict[str, Any]]:
    other = OLD if active == NEW else NEW
    return [{"image": 0, "slot": 0, "version": "x", "hash": active, "active": True,
             "confirmed": confirmed, "pending": False, "permanent": False},
            {"image": 0, "slot": 1, "version": "y", "hash": other, "active": False,
             "confirmed": False, "pending": pending, "permanent": False}]


MARK = ("mark-test", f"hash={NEW[:16]}")
GOOD_EVENTS = [("upload", "done"), MARK, ("reset", "x"), ("verify", "health ok"),
               ("confirm", "confirm sent"), ("done", "updated")]


def _journal(outcome: str, running: str, *, events: list[tuple[str, str]] | None = None,
             result: int = 1, state: str = "delivered") -> dict[str, Any]:
    return {"device": {"outcome": outcome, "running_hash": running},
            "events": GOOD_EVENTS if events is None else events,
            "reports": [{"id": 1, "result": result, "state": state}], "open_intents": []}


def _judge(tmp_path: Path, slots: list[dict[str, Any]], final: dict[str, str] | None,
           journal: dict[str, Any], server: list[int] | None = None) -> list[str]:
    (tmp_path / "updates").mkdir(exist_ok=True)
    lines = [json.dumps({"result": r, "report_id": f"g:{i}"}) for i, r in enumerate(server or [])]
    (tmp_path / "updates" / "reports.jsonl").write_text("\n".join(lines) + "\n")
    return pc.judge_state(SCRATCH, slots, final, journal, tmp_path, [])


def test_judge_passes_a_clean_update_and_a_clean_rollback(tmp_path: Path) -> None:
    assert _judge(tmp_path, _slots(NEW), {"result": "updated"}, _journal("updated", NEW),
                  [1]) == []
    # the cut itself test-booted the image the gateway had marked: no reset event of its own
    no_reset = [e for e in GOOD_EVENTS if e[0] != "reset"]
    assert _judge(tmp_path, _slots(NEW), {"result": "updated"},
                  _journal("updated", NEW, events=no_reset), [1]) == []
    assert _judge(tmp_path, _slots(OLD), {"result": "rolled-back"},
                  _journal("rolled-back", OLD, result=8), [8]) == []
    # a torn copy-done/image-ok byte left the new image permanent without a confirm (cuts
    # 441464, 441465): updated only after the gateway's health check of it
    torn = [("upload", "done"), MARK, ("reset", "x"), ("wait-boot", "x"),
            ("confirm", f"{pc.CONFIRMED_ELSEWHERE}; health check 2s"),
            ("done", "2.0.0 runs confirmed without ...; health check passed")]
    assert _judge(tmp_path, _slots(NEW), {"result": "updated"},
                  _journal("updated", NEW, events=torn), [1]) == []


@pytest.mark.parametrize("case", [
    "confirmed-without-test-boot", "confirmed-without-health-check", "outcome-says-updated",
    "journal-disagrees", "server-disagrees", "left-pending", "unconfirmed", "foreign-image",
    "report-undelivered", "no-outcome", "marked-another-image", "permanent-unchecked"])
def test_judge_fails_each_bad_case(tmp_path: Path, case: str) -> None:
    """The judge is strict: each of these is a failed cut (the judge can fail)."""
    slots, journal, server = _slots(NEW), _journal("updated", NEW), [1]
    final: dict[str, str] | None = {"result": "updated"}
    if case == "confirmed-without-test-boot":
        journal["events"] = [e for e in GOOD_EVENTS if e[0] != "mark-test"]
    elif case == "confirmed-without-health-check":
        journal["events"] = [MARK, ("reset", ""), ("confirm", "confirm sent"), ("verify", "late")]
    elif case == "outcome-says-updated":
        slots = _slots(OLD)
        journal = _journal("updated", OLD)
    elif case == "journal-disagrees":
        journal["device"]["outcome"] = "rolled-back"
    elif case == "server-disagrees":
        server = [8]
    elif case == "left-pending":
        slots = _slots(OLD, pending=True)
        final, journal, server = {"result": "rolled-back"}, _journal("rolled-back", OLD, result=8), [8]
    elif case == "unconfirmed":
        slots = _slots(NEW, confirmed=False)
    elif case == "foreign-image":
        slots = _slots(NEW)
        slots[0]["hash"] = "ab" * 32
    elif case == "report-undelivered":
        journal["reports"][0]["state"] = "pending"
    elif case == "no-outcome":
        final = None
    elif case == "marked-another-image":
        journal["events"] = [("mark-test", f"hash={OLD[:16]}") if e == MARK else e
                             for e in GOOD_EVENTS]
    elif case == "permanent-unchecked":  # cuts 441464/441465 before the fix
        journal["events"] = [MARK, ("reset", "x"), ("wait-boot", "x"),
                             ("confirmed-seen", "confirmed"), ("done", "updated")]
    problems = _judge(tmp_path, slots, final, journal, server)
    assert problems, f"the judge let {case} pass"


PANIC_CONSOLE = """*** Booting Zephyr OS build  ***
I: Starting bootloader
I: Primary image: magic=unset, swap_type=0x1, copy_done=0x3, image_ok=0x3
I: Scratch: magic=unset, swap_type=0x2, copy_done=0x3, image_ok=0x3
I: Boot source: primary slot
E: panic!
"""


def _panicked(op: str, op2: str, final: dict[str, str] | None) -> Any:
    v = pc.Verdict("swap-scratch", 48220, "trailer swap-info", "restarted", 3, op=op, op2=op2,
                   problems=["board not answering after the gateway's last pass (bricked or "
                             "hung): timeout"])
    pc.bootloader_verdict(v, PANIC_CONSOLE, final)
    return v


def test_an_mcuboot_panic_is_judged_apart_only_when_mcuboot_alone_was_cut() -> None:
    """Cut 48220 + second cut 3 (swap-scratch): a torn swap-info byte, then a cut in the
    resumed swap - real MCUboot stops in "panic!". Its own result, when both cuts fell inside
    MCUboot and the gateway claimed no success; anything else stays a failure."""
    v = _panicked("P boot", "P boot", {"result": "failed"})
    assert v.ok and v.bootloader.startswith("MCUboot stopped") and "E: panic!" in v.bootloader
    assert not _panicked("P boot", "P boot", {"result": "updated"}).ok  # a false success
    assert not _panicked("P app", "P boot", {"result": "failed"}).ok  # the app's write was cut
    assert not _panicked("P boot", "P app", {"result": "failed"}).ok
    v = pc.Verdict("swap-scratch", 1, "x", "restarted", None, op="P boot",
                   problems=["board not answering after the gateway's last pass: timeout"])
    pc.bootloader_verdict(v, "I: Starting bootloader\nI: Jumping to the first image slot\n", None)
    assert not v.ok and not v.bootloader  # hung without a panic: a failure


NO_IMAGE_CONSOLE = """*** Booting Zephyr OS build  ***
I: Starting bootloader
I: Primary image: magic=good, swap_type=0x2, copy_done=0x3, image_ok=0x3
I: Scratch: magic=good, swap_type=0x2, copy_done=0x3, image_ok=0x3
I: Boot source: scratch
I: Starting swap using scratch algorithm.
I: Primary image: magic=good, swap_type=0x1, copy_done=0x3, image_ok=0x1
I: Scratch: magic=unset, swap_type=0x1, copy_done=0x3, image_ok=0x3
I: Boot source: primary slot
I: Image index: 1, Swap type: perm
E: Unable to find bootable image
"""


def test_mcuboot_finding_no_bootable_image_is_judged_apart_only_after_its_own_torn_erase() -> None:
    """Cut 450126 (multi-image, running): MCUboot's erase of the one-sector scratch at the end
    of image 0's swap, torn - the stale scratch trailer survives, MCUboot resumes from it and
    copies the erased half into the primary: "Unable to find bootable image" on every boot.
    MCUboot's, when only MCUboot's erase was cut and the gateway claimed no success."""
    def stopped(op: str, final: dict[str, str] | None, console: str = NO_IMAGE_CONSOLE) -> Any:
        v = pc.Verdict("multi-image", 450126, "erase 0x80c0000 (boot)", "running", None, op=op,
                       problems=["board not answering after the gateway's last pass (bricked "
                                 "or hung): timeout"])
        pc.bootloader_verdict(v, console, final)
        return v

    v = stopped("E boot", {"result": "failed"})
    assert v.ok and "Unable to find bootable image" in v.bootloader
    assert not stopped("E boot", {"result": "updated"}).ok  # a false success
    assert not stopped("P app", {"result": "failed"}).ok  # the application's write was cut
    # the stop must be MCUboot's last word: a board that printed it once and then booted an
    # image (and hangs later) is not excused
    assert not stopped("E boot", {"result": "failed"},
                       NO_IMAGE_CONSOLE + "I: Jumping to the first image slot\n").ok


def test_torn_flash_is_half_of_the_operation() -> None:
    before = bytes([0xFF] * 8)
    prog = bytes([0xFF, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
    t = pc.torn(before, prog)
    assert t[1] not in (0xFF, 0x00) and t[1] & prog[1] == prog[1]  # some bits, not all
    erased_before = bytes(range(8))
    t = pc.torn(erased_before, bytes([0xFF] * 8))
    assert t[:4] == b"\xff" * 4 and t[4:] == erased_before[4:]


def test_trailer_fields_and_cut_points() -> None:
    assert [pc.trailer_field(x) for x in (1, 16, 17, 24, 30, 40, 41)] == [
        "magic", "magic", "image-ok", "image-ok", "copy-done", "swap-info", "swap-status"]
    end = 0x08080000 + 0x40000
    ops = [pc.Op(0, "erase", 0x08080000, 0x08050000, 1.0, "app")]
    ops += [pc.Op(1 + i, "data", 0x08080000 + i, 0x08050000, 2.0, "app") for i in range(400)]
    ops += [pc.Op(401 + i, "trailer", end - 16 + i, 0x08050000, 3.0, "app", "magic")
            for i in range(16)]
    cuts = pc.cut_points(ops, 100)
    kinds = [o.kind for o, _ in cuts]
    assert kinds.count("erase") == 1 and kinds.count("trailer") == 2
    assert kinds.count("data") == 100


# -- on Renode: the CI sample ---------------------------------------------------------------------
# (mode, operation index from the golden run, its kind, the gateway variant)
SAMPLE = [
    ("swap-scratch", 48197, "E boot", "running"),  # MCUboot's first operation: erase the scratch
    ("swap-move", 48186, "P boot", "restarted"),  # MCUboot writes the primary's trailer magic
    ("overwrite-only", 4000, "P app", "running"),  # img_mgmt, early in the upload
    ("direct-xip-revert", 8000, "P app", "restarted"),
    ("multi-image", 50300, "P app", "running"),  # image 1's upload (after image 0's 48259 B)
    # the test marks (img_mgmt writing the secondary's trailer), one per mode
    ("swap-scratch", 48196, "P app", "restarted"),  # swap-info torn: the cut itself test-boots
    ("swap-move", 48178, "P app", "running"),  # the magic's last byte
    ("overwrite-only", 48179, "P app", "restarted"),
    ("direct-xip-revert", 48227, "P app", "running"),  # the magic's first byte
    # image 0's mark landed, image 1's never did: the set boots split and is reset back, then
    # installed whole (a gateway bug this cut found: image 0 was left test-running)
    ("multi-image", 57129, "P app", "restarted"),
]


@pytest.mark.renode
@pytest.mark.timeout(1800)
def test_power_cut_sample_on_real_firmware(renode_runtime: Path) -> None:
    os.environ.setdefault("SMPGW_SHARED", str(renode_runtime))
    root = REPO / "build" / "power-cuts-ci"

    async def run() -> list[pc.Verdict]:
        sem = asyncio.Semaphore(2)

        async def one(mode: str, n: int, variant: str) -> pc.Verdict:
            async with sem:
                return await pc.run_cut(pc.MODES[mode], n, variant, root / f"{mode}-{n}-{variant}")
        return await asyncio.gather(*(one(m, n, v) for m, n, _kind, v in SAMPLE))

    verdicts = asyncio.run(run())
    bad = [(v.mode, v.cut, v.variant, v.problems,
            pc.replay_command(v.mode, v.cut, v.variant, v.second_cut)) for v in verdicts if not v.ok]
    assert not bad, bad
    # each cut fell on the operation the sample names (kind, and MCUboot or the application)
    assert [v.op for v in verdicts] == [kind for _m, _n, kind, _v in SAMPLE]
    assert all(v.reached for v in verdicts)


def test_a_gateway_that_printed_no_outcome_is_not_excused_by_mcuboots_stop() -> None:
    """Review round 5: every pass of the gateway ended without an outcome line (a crash: no
    ``final``). With a board that answers the judge fails that ("the gateway printed no
    outcome"); with a board MCUboot stopped, the excuse dropped the only problem and passed the
    cut - the gateway's own failure hidden behind MCUboot's."""
    def stopped(final: dict[str, str] | None) -> Any:
        v = pc.Verdict("multi-image", 450126, "erase 0x80c0000 (boot)", "running", None,
                       op="E boot", problems=["board not answering after the gateway's last "
                                              "pass (bricked or hung): timeout"])
        pc.bootloader_verdict(v, NO_IMAGE_CONSOLE, final)
        return v

    assert stopped({"result": "failed"}).ok  # the intended excuse
    assert not stopped(None).ok


def test_a_silent_board_is_judged_on_the_journal_and_the_fleet_server_too(tmp_path: Path) -> None:
    """Review round 5: with the board silent the judge read nothing but the printed outcome - a
    success in the journal or told to the fleet server went unseen (and MCUboot's stop would
    have excused it)."""
    quiet = {"device": {"outcome": "failed"}, "events": [], "reports": [], "open_intents": []}
    assert pc.success_claims(quiet, tmp_path) == []
    assert pc.success_claims({**quiet, "device": {"outcome": "updated"}}, tmp_path)
    (tmp_path / "updates").mkdir()
    (tmp_path / "updates" / "reports.jsonl").write_text(
        json.dumps({"result": 8}) + "\n" + json.dumps({"result": 1}) + "\n")
    assert pc.success_claims(quiet, tmp_path)

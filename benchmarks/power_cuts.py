"""Power cuts at every flash operation of a gateway-driven update, on real MCUboot in Renode.

Issue #22. The board is the shared STM32F4-Discovery firmware (one folder per MCUboot mode);
the gateway (``smp-gateway run --once``, local-dir fleet source) updates it as in
``renode/smp_gateway*.robot``.

How a flash operation is seen: Renode 1.15.3's ``STM32F4_FlashController`` takes every
program and erase through its ``FLASH_CR`` register (PG set before each programmed byte - the
Zephyr driver programs x8 - and SER+SNB+STRT for a sector erase), so a Python hook before each
``FLASH_CR`` write (``sysbus SetHookBeforePeripheralWrite flash_controller ... <0x10,0x13>``,
the same in MCUboot and in the application) counts them, in the order the CPU does them, with
the program counter (MCUboot below 0x08040000, else the application) and the emulation time.
The address of a programmed byte is the register of the driver's ``write_value`` that holds
it (found per call site: the one register in the flash range that moves between the calls).

1. ``golden``: one update without a cut logs every operation (index, kind, address, PC,
   emulation time) to ``golden-ops.tsv``; the cut points are taken from it: every erase, the
   first and the last byte of every write into an MCUboot trailer (the last KiB of a slot or
   of the scratch area: magic, swap info, copy done, image ok, swap status entries), every
   N-th program of image data (``--data-cuts`` of them).
2. ``cut``: the same update again, from the same initial flash, with the hook armed at
   operation k: there it saves the flash as it is before the operation and just after it
   (the 1 MiB that is used), halts the CPU, and the runner kills Renode (SIGKILL: the power is
   off). The flash the board powers up with is the "torn" one: the operation half done (half
   of an erased sector back to 0xFF; a programmed byte with only part of its bits cleared - the
   model stores bytes, so a half-programmed byte is the smallest torn unit it allows). A new
   Renode boots from it; the gateway either keeps running (it sees the board vanish and come
   back: variant ``running``) or was killed with the board and is started again on its
   journal (variant ``restarted``); passes of ``run --once`` follow until a final outcome.
   ``--second-cut M`` cuts the recovery again at its M-th operation.
3. The judge (``judge``): the board boots and answers; the image it runs is one of the two
   signed ones; it runs the old image confirmed, or the new one confirmed only where the
   gateway test-booted it (journal: a test mark, then the reset) and its health check passed
   (journal: verify, then confirm sent) - overwrite-only installs without a test boot; no slot
   is left pending; the outcome the gateway printed matches what runs; the journal's outcome
   and running hash match the device; the fleet server's (reports.jsonl) last report matches
   the journal's and what runs; no pass hung.

Run (each run its own Renode, PTY and folder; ``--jobs`` runs in parallel, default = cores):
    SMPGW_SHARED=/work/shared python benchmarks/power_cuts.py --mode swap-scratch
    python benchmarks/power_cuts.py --mode swap-move --kinds erase,trailer --jobs 2
    python benchmarks/power_cuts.py --mode swap-scratch --cut 1234 --variant restarted  # replay
Results: ``build/power-cuts/<mode>/results.jsonl`` (one line per cut) and a summary; a failing
cut prints its exact replay command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "renode"))

from gateway.engine import CONFIRMED_ELSEWHERE  # noqa: E402
from gateway.renode import RenodeMachine, firmware_dir  # noqa: E402

FLASH_BASE = 0x08000000
DUMP_SIZE = 0x100000  # every layout uses the first MiB of the 2 MiB model
BOOT_END = 0x08040000  # MCUboot's code (0-5); runtime flash areas start here
TRAILER_SPAN = 1024  # the trailer lies in a slot's (or the scratch's) last KiB
# STM32F4 sector addresses (2 MiB, two banks of 16/16/16/16/64/128 x 7)
_SECTORS = [0x0000, 0x4000, 0x8000, 0xC000, 0x10000] + [0x20000 * i for i in range(1, 8)]
SECTOR_ADDR = [FLASH_BASE + a for a in _SECTORS] + [FLASH_BASE + 0x100000 + a for a in _SECTORS]


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    firmware: str
    config: str  # renode/<config>
    publish: tuple[tuple[str, int | None, int | None], ...]  # (file in firmware, image, slot)
    areas: tuple[tuple[int, int], ...]  # slots and scratch: (start, size)
    old: tuple[str, ...]  # hash per image number of what runs before
    new: tuple[str, ...]  # hash per image number of what the update installs
    test_boot: bool = True  # False: overwrite-only installs permanently, no test boot


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("swap-scratch", "stm32f4_disco", "gateway.yaml",
         (("smp_svr-2.0.0.signed.bin", None, None),),
         ((0x08040000, 0x40000), (0x08080000, 0x40000), (0x080C0000, 0x20000)),
         ("b3bf0a29a3edbbdb770817da469c7dea0ab6f2047e60cbcbe8c1d8358bcbbcda",),
         ("043c6b01948cf5ee35f864450d5b0b119ebad25e8ab34851392e798d50bd5432",)),
    Mode("swap-move", "stm32f4_disco-swap-move", "modes/gateway-swap-move.yaml",
         (("img/v2.signed.bin", None, None),),
         ((0x08040000, 0x60000), (0x080A0000, 0x40000)),
         ("9c2334c621da2fd922eae3e662dcf2716885a7368e7d9e9f6eabb188644d9934",),
         ("02fecd0a89bf185efd9d923e1a10fea2ccfa37b6fdac1014c6d595f9ed1ab05e",)),
    Mode("overwrite-only", "stm32f4_disco-overwrite-only", "modes/gateway-overwrite-only.yaml",
         (("img/v2.signed.bin", None, None),),
         ((0x08040000, 0x40000), (0x08080000, 0x40000)),
         ("",),  # filled from the device at the golden run
         ("a4e1f7a4252a894f2cd156ce8e452f4d5dbd6c14ddbcde8634ad300be0f58c4f",), test_boot=False),
    Mode("direct-xip-revert", "stm32f4_disco-direct-xip-revert",
         "modes/gateway-direct-xip-revert.yaml",
         (("img/v2-slot0.signed.bin", None, 0), ("img/v2-slot1.signed.bin", None, 1)),
         ((0x08040000, 0x40000), (0x08080000, 0x40000)),
         ("e9a3b4cd9cff51191f4e2832ebfe40c2b049f7ef0b759bd9082c3a2d6e60f02d",),
         ("76cc8006eacf59cd2a5cafe438d85c37ebf2ec7c0f08845a90401d5ebd36a6ad",)),
    Mode("multi-image", "stm32f4_disco-multi-image", "modes/gateway-multi-image.yaml",
         (("img/v2.signed.bin", 0, None), ("img/image1-v2.signed.bin", 1, None)),
         ((0x08040000, 0x20000), (0x08060000, 0x20000), (0x08080000, 0x20000),
          (0x080A0000, 0x20000), (0x080C0000, 0x20000)),
         ("", ""),
         ("4ca4208110ac9098ef184683b2c8ce8f8dd4f62b11bddba21dbea31aa8a8223a",
          "b3c0544e39c13909ddff80871c6a4825b21403860fab74eae6d3b7adaf90e09d")),
)}

# The hook: IronPython inside Renode (no Python standard library there, .NET's System is).
# Before every FLASH_CR write; ``value`` is what the CPU writes.
HOOK = r'''
if not 'n' in globals():
    import System
    n = 0
    prev = 0
    after = -1
    cpu = machine["sysbus.cpu"]
    bus = machine.SystemBus
    log = System.IO.StreamWriter(LOG) if LOG else None
    seen = {}
def dump(path):
    System.IO.File.WriteAllBytes(path, bus.ReadBytes(FLASH_BASE, DUMP_SIZE))
if value == 0x7FFFFF00:
    # not a firmware write: the runner asks for the flash at the end of the golden run
    dump(OUT + ".final")
elif after >= 0:
    # the first FLASH_CR write after operation CUT: it is done (a program: PG is cleared
    # after the byte; an erase: the controller erased on STRT)
    dump(OUT + ".after")
    System.IO.File.WriteAllText(OUT + ".meta", "%d %s %x" % (CUT, kind, pc))
    after = -2
    cpu.IsHalted = True
op = None
if value != 0x7FFFFF00:  # the runner's marker has STRT set: not an operation of the firmware
    if after == -1 and (value & 0x10000):
        op = 'E'
    elif after == -1 and (value & 1) and not (prev & 1):
        op = 'P'
    prev = value
if op is not None:
    kind = op
    pc = cpu.PC.RawValue
    if n == CUT:
        dump(OUT + ".before")
        after = n
    if log is not None:
        # the golden run: the flash before MCUboot's first operation and before every erase
        if pc < 0x08040000 and not 'boot0' in globals():
            boot0 = n
            dump(OUT + ".%d" % n)
        elif op == 'E':
            dump(OUT + ".%d" % n)
    if log is not None:
        if op == 'E':
            arg = "%d" % ((value >> 3) & 0x1f)
        else:
            regs = []
            for i in range(13):
                r = cpu.GetRegisterUnsafe(i).RawValue
                if r >= 0x08040000 and r < 0x08200000:
                    regs.append("%d:%x" % (i, r))
            arg = ",".join(regs)
        log.WriteLine("%d\t%s\t%x\t%.3f\t%s" % (n, op, pc,
                      machine.ElapsedVirtualTime.TimeElapsed.TotalMilliseconds, arg))
        log.Flush()
    n += 1
'''


def hook_resc(log: Path | None, cut: int, out: Path) -> str:
    code = (HOOK.replace("LOG", f'r"{log}"' if log else "None").replace("CUT", str(cut))
            .replace("OUT", f'r"{out}"').replace("FLASH_BASE", hex(FLASH_BASE))
            .replace("DUMP_SIZE", hex(DUMP_SIZE)))
    return f'sysbus SetHookBeforePeripheralWrite flash_controller """{code}""" <0x10,0x13>\n'


class Board(RenodeMachine):
    """One machine of the firmware folder, optionally armed (``hook``) and powered up from a
    saved flash (``flash``: the first MiB)."""

    def __init__(self, firmware: Path, workdir: Path, *, pty: Path, hook: str = "",
                 flash: Path | None = None, wait_ready: bool = True) -> None:
        super().__init__(firmware, workdir)
        self.pty = pty
        self.hook = hook
        self.flash = flash
        self.wait_ready = wait_ready

    def _script(self) -> str:
        lines = [f'$pty="{self.pty}"', f"include @{self.resc}"]
        if self.flash is not None:
            lines.append(f"sysbus LoadBinary @{self.flash} {FLASH_BASE:#x}")
        lines.append(f"usart1 CreateFileBackend @{self.console} true")
        resc = self.workdir / "board.resc"
        resc.write_text("\n".join(lines) + "\n" + self.hook + "start\n")
        return f"include @{resc}"

    async def wait_smp(self, *, timeout_s: float) -> float:
        if not self.wait_ready:
            return 0.0
        return await super().wait_smp(timeout_s=timeout_s)

    async def power_off(self) -> None:
        """SIGKILL: no quit, nothing flushed; the flash the next board gets is the saved one."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        await self.stop()


# -- the work folder and the gateway ---------------------------------------------------------
def prepare(mode: Mode, work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    (work / "keys").mkdir(parents=True)
    (work / "updates").mkdir()
    fw = firmware_dir(mode.firmware)
    shutil.copy(REPO / "renode" / mode.config, work / "gateway.yaml")
    shutil.copy(fw / "signing-key.pem", work / "keys" / "signing-key.pem")
    entries = []
    for rel, image, slot in mode.publish:
        shutil.copy(fw / rel, work / "updates" / Path(rel).name)
        e: dict[str, Any] = {"file": Path(rel).name}
        if image is not None:
            e["image"] = image
        if slot is not None:
            e["slot"] = slot
        entries.append(e)
    if len(entries) == 1 and mode.publish[0][1:] == (None, None):
        manifest = {"images": [{**entries[0], "hardware": "stm32f4_disco"}]}
    else:
        manifest = {"images": [{"images": entries, "hardware": "stm32f4_disco"}]}
    (work / "updates" / "manifest.yaml").write_text(json.dumps(manifest))


class Gateway:
    """``smp-gateway -v run --once`` passes in the work folder; output in gateway-N.log."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.n = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.outputs: list[str] = []

    async def start(self) -> None:
        self.n += 1
        log = open(self.work / f"gateway-{self.n}.log", "wb")  # the child writes it
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "-v", "run", "--once", "--config", "gateway.yaml",
            cwd=self.work, stdout=log, stderr=asyncio.subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
        log.close()

    async def wait(self, timeout_s: float) -> tuple[int | None, str]:
        assert self.proc is not None
        try:
            rc: int | None = await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            await self.kill()
            rc = None
        out = (self.work / f"gateway-{self.n}.log").read_text(errors="replace")
        self.outputs.append(out)
        self.proc = None
        return rc, out

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


def outcome_of(out: str) -> dict[str, str] | None:
    found = re.findall(r"^device=disco (result=.*)$", out, re.M)
    if not found:
        return None
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', found[-1])}


FINAL = {"updated", "rolled-back", "refused", "up-to-date"}
MAX_PASSES = 6
PASS_TIMEOUT_S = 900  # one pass: uploads ~4.5 kB/s, swaps 35-110 s on a loaded machine


# -- operations and cut points ---------------------------------------------------------------
@dataclasses.dataclass
class Op:
    n: int
    kind: str  # erase / trailer / data
    addr: int
    pc: int
    t_ms: float
    phase: str  # app (img_mgmt, confirm) / boot (MCUboot)
    detail: str = ""


def parse_ops(path: Path, mode: Mode) -> list[Op]:
    rows = [ln.split("\t") for ln in path.read_text().splitlines() if ln.strip()]
    # the address register per call site: the flash-range register that changes between calls
    by_pc: dict[int, list[dict[int, int]]] = {}
    for r in rows:
        if r[1] == "P":
            regs = {int(a): int(b, 16) for a, b in (x.split(":") for x in r[4].split(",") if x)}
            by_pc.setdefault(int(r[2], 16), []).append(regs)
    reg_at: dict[int, int] = {}
    for pc, seq in by_pc.items():
        moves: Counter[int] = Counter()
        for a, b in itertools.pairwise(seq):
            for i in a:
                if i in b and 0 < b[i] - a[i] <= 8:
                    moves[i] += 1
        if moves:
            reg_at[pc] = moves.most_common(1)[0][0]
        else:  # one call only: the highest flash address held
            reg_at[pc] = max(seq[0], key=lambda i: seq[0][i]) if seq[0] else -1
    ops = []
    for r in rows:
        n, pc, t = int(r[0]), int(r[2], 16), float(r[3])
        phase = "boot" if pc < BOOT_END else "app"
        if r[1] == "E":
            ops.append(Op(n, "erase", SECTOR_ADDR[int(r[4])], pc, t, phase))
            continue
        regs = {int(a): int(b, 16) for a, b in (x.split(":") for x in r[4].split(",") if x)}
        addr = regs.get(reg_at.get(pc, -1), 0)
        kind, detail = "data", ""
        for start, size in mode.areas:
            if start + size - TRAILER_SPAN <= addr < start + size:
                kind, detail = "trailer", trailer_field(start + size - addr)
        ops.append(Op(n, kind, addr, pc, t, phase, detail))
    return ops


def trailer_field(from_end: int) -> str:
    """Which trailer field a byte ``from_end`` bytes before the area's end is in (align 8)."""
    if from_end <= 16:
        return "magic"
    if from_end <= 24:
        return "image-ok"
    if from_end <= 32:
        return "copy-done"
    if from_end <= 40:
        return "swap-info"
    return "swap-status"


def cut_points(ops: list[Op], data_cuts: int) -> list[tuple[Op, str]]:
    """Every erase; the first and last byte of every trailer write (a run of consecutive
    bytes); every N-th data program so that ``data_cuts`` of them are spread over the run."""
    cuts: list[tuple[Op, str]] = []
    data = [o for o in ops if o.kind == "data"]
    step = max(1, len(data) // max(1, data_cuts))
    chosen = {o.n for o in data[step // 2::step]}
    i = 0
    while i < len(ops):
        o = ops[i]
        if o.kind == "erase":
            cuts.append((o, f"erase {o.addr:#x} ({o.phase})"))
        elif o.kind == "trailer":
            j = i
            while (j + 1 < len(ops) and ops[j + 1].kind == "trailer"
                   and ops[j + 1].addr == ops[j].addr + 1):
                j += 1
            cuts.append((o, f"trailer {o.detail} {o.addr:#x} first byte ({o.phase})"))
            if j > i:
                cuts.append((ops[j], f"trailer {ops[j].detail} {ops[j].addr:#x} last byte "
                                     f"({o.phase})"))
            i = j
        elif o.n in chosen:
            cuts.append((o, f"data {o.addr:#x} ({o.phase})"))
        i += 1
    return cuts


class Golden:
    """The golden run's operations and flash dumps (before MCUboot's first operation, before
    every erase, at the end) and the journal as the gateway left it once the board
    acknowledged the reset: enough to rebuild the flash before any operation of MCUboot's
    and to start the gateway where it was when the swap began."""

    def __init__(self, root: Path, mode: Mode) -> None:
        self.root = root
        self.ops = parse_ops(root / "golden-ops.tsv", mode)
        self.dumps = sorted(int(p.suffix[1:]) for p in root.glob("golden-flash.*")
                            if p.suffix[1:].isdigit())
        # MCUboot's first operation of the update: after the application's first (direct-XIP's
        # MCUboot also writes a copy-done byte at the power-up before the update - that one
        # is cut live, like the application's)
        first_app = next((o.n for o in self.ops if o.phase == "app"), 0)
        self.boot0 = next((o.n for o in self.ops if o.phase == "boot" and o.n > first_app),
                          len(self.ops))
        self._cache: dict[str, bytes] = {}

    def dump(self, name: str | int) -> bytes:
        key = str(name)
        if key not in self._cache:
            self._cache[key] = (self.root / f"golden-flash.{key}").read_bytes()
        return self._cache[key]

    def _value_source(self, i: int, addr: int) -> str:
        """The dump that holds what operation ``i`` programmed at ``addr``: the one before the
        next erase of its sector (flash is programmed once between erases), else the last."""
        for d in self.dumps:
            if d > i and self.ops[d].kind == "erase" and sector_of(self.ops[d].addr) == sector_of(addr):
                return str(d)
        return "final"

    def flash_before(self, k: int) -> bytes:
        """The flash just before operation ``k`` (k >= the first dump)."""
        base = max(d for d in self.dumps if d <= k)
        state = bytearray(self.dump(base))
        for o in self.ops[base:k]:
            if o.kind == "erase":
                lo = o.addr - FLASH_BASE
                state[lo:lo + sector_size(o.addr)] = b"\xff" * sector_size(o.addr)
            else:
                state[o.addr - FLASH_BASE] = self.dump(self._value_source(o.n, o.addr))[
                    o.addr - FLASH_BASE]
        return bytes(state)

    def check(self) -> list[str]:
        """The rebuilt flash equals every dump the golden run took (proves the addresses)."""
        bad = [f"rebuilt flash before op {d} differs from its dump" for d in self.dumps
               if d != self.dumps[0] and self.flash_before(d) != self.dump(d)]
        if self.flash_before(len(self.ops)) != self.dump("final"):
            bad.append("rebuilt final flash differs from the final dump")
        return bad


def sector_of(addr: int) -> int:
    return max(i for i, a in enumerate(SECTOR_ADDR) if a <= addr)


def sector_size(addr: int) -> int:
    i = sector_of(addr)
    return SECTOR_ADDR[i + 1] - SECTOR_ADDR[i]


def torn(before: bytes, after: bytes) -> bytes:
    """The operation half done: of the bytes it changed, the first half changed (an erase
    interrupted half way); a single changed byte keeps every other bit it was to clear
    (a half-programmed byte)."""
    diff = [i for i in range(len(before)) if before[i] != after[i]] if before != after else []
    if not diff:
        return after
    out = bytearray(before)
    if len(diff) == 1:
        i = diff[0]
        cleared = before[i] & ~after[i] & 0xFF
        keep = cleared & 0x55 or cleared  # bits still to clear: only some were cleared
        out[i] = (after[i] | keep) if keep != cleared else (before[i] & ~(cleared & 0xAA)) & 0xFF
        return bytes(out)
    lo, hi = diff[0], diff[-1]
    mid = lo + (hi - lo + 1) // 2
    out[lo:mid] = after[lo:mid]
    return bytes(out)


# -- one run -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Verdict:
    mode: str
    cut: int
    label: str
    variant: str
    second_cut: int | None
    reached: bool = False
    problems: list[str] = dataclasses.field(default_factory=list)
    outcome: str = ""
    runs: str = ""
    seconds: float = 0.0
    work: str = ""
    op: str = ""  # what the hook saw at the cut: "E"/"P" and "boot"/"app" (its program counter)
    op2: str = ""  # the same for the second cut
    # MCUboot itself stopped (its "panic!"): what its console said. Judged apart from the
    # gateway (bootloader_verdict): the gateway must only not claim a success
    bootloader: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def replay_command(mode: str, cut: int, variant: str, second: int | None) -> str:
    s = f" --second-cut {second}" if second is not None else ""
    return (f"SMPGW_SHARED={os.environ.get('SMPGW_SHARED', '../shared')} python "
            f"benchmarks/power_cuts.py --mode {mode} --cut {cut} --variant {variant}{s}")


async def wait_file(path: Path, *, timeout_s: float, alive: list[Any]) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return True
        for a in alive:  # a board that died or a gateway pass that ended: no cut is coming
            if getattr(a, "returncode", None) is not None:
                return path.exists()
        await asyncio.sleep(0.2)  # files have no readiness event: poll
    return False


async def run_cut(mode: Mode, cut: int, variant: str, work: Path, *, label: str = "",
                  second_cut: int | None = None, golden: Golden | None = None,
                  log_ops: bool = False) -> Verdict:
    """One update with the power cut at operation ``cut`` (-1: none, the golden run).

    An operation of the application (img_mgmt's upload and marks, the confirm) is cut live:
    the gateway updates the board from the start and the hook stops it at ``cut``. An
    operation of MCUboot (``golden`` given) starts from the golden run instead: the flash
    rebuilt up to ``cut`` (torn), the journal as it was when the board acknowledged the reset
    - what a live run would have at that instant, without replaying the upload and the swap."""
    t0 = time.monotonic()
    work = work.resolve()
    v = Verdict(mode.name, cut, label, variant, second_cut, work=str(work))
    prepare(mode, work)
    fw = firmware_dir(mode.firmware)
    pty = work / "uart.pty"
    out = work / "cut"
    gw = Gateway(work)
    boards: list[Board] = []
    offline = golden is not None and cut >= golden.boot0
    try:
        if offline:
            assert golden is not None
            v.reached = True
            o = golden.ops[cut]
            v.op = f"{'E' if o.kind == 'erase' else 'P'} {o.phase}"
            flash = work / "flash-at-cut.bin"
            flash.write_bytes(torn(golden.flash_before(cut), golden.flash_before(cut + 1)))
            shutil.copytree(golden.root / "golden-state", work / "state")
        else:
            board = Board(fw, work / "board-1", pty=pty,
                          hook=hook_resc(work / "golden-ops.tsv" if log_ops else None, cut, out))
            boards.append(board)
            await board.start(ready_timeout_s=120)
            await gw.start()
            if log_ops:
                asyncio.get_running_loop().create_task(snapshot_at_reset(work, gw))
        if cut >= 0 and not offline:
            assert board.proc is not None and gw.proc is not None
            v.reached = await wait_file(out.with_suffix(".meta"), timeout_s=PASS_TIMEOUT_S,
                                        alive=[board.proc, gw.proc])
            if not v.reached:
                v.problems.append(f"operation {cut} never came (the update did fewer)")
                return v
            await board.power_off()
            _n, kind, pc = out.with_suffix(".meta").read_text().split()
            v.op = f"{kind} {'boot' if int(pc, 16) < BOOT_END else 'app'}"
            if variant == "restarted":
                await gw.kill()
                gw.outputs.append((work / f"gateway-{gw.n}.log").read_text(errors="replace"))
                gw.proc = None
            flash = work / "flash-at-cut.bin"
            flash.write_bytes(torn(out.with_suffix(".before").read_bytes(),
                                   out.with_suffix(".after").read_bytes()))
        if cut >= 0:
            if offline and variant == "running":
                # the gateway waits for the board it reset; the board powers up later
                await gw.start()
                await wait_text(work / f"gateway-{gw.n}.log", "device=disco", timeout_s=60)
            hook2 = hook_resc(None, second_cut, work / "cut2") if second_cut is not None else ""
            board = Board(fw, work / "board-2", pty=pty, flash=flash, hook=hook2,
                          wait_ready=False)
            boards.append(board)
            await board.start()
            if gw.proc is None:
                # the daemon's next pass: once the board's serial port exists again
                await wait_file(pty, timeout_s=120, alive=[])
                await gw.start()
            if second_cut is not None:
                # the recovery (MCUboot resuming, or the gateway's next steps) cut again; the
                # hook halts the board there whatever the gateway does meanwhile, so wait for it
                # while the board lives, giving the gateway its next passes as a daemon would
                assert board.proc is not None
                reached2 = False
                deadline = time.monotonic() + PASS_TIMEOUT_S
                while time.monotonic() < deadline and board.proc.returncode is None:
                    if await wait_file(work / "cut2.meta", timeout_s=5, alive=[board.proc]):
                        reached2 = True
                        break
                    if gw.proc is not None and gw.proc.returncode is not None:
                        _rc, text = await gw.wait(5)
                        if (outcome_of(text) or {}).get("result") in FINAL:
                            break  # finished before a 3rd operation: no second cut
                        await wait_file(pty, timeout_s=120, alive=[])
                        await gw.start()
                if reached2:
                    await board.power_off()
                    _n2, kind2, pc2 = (work / "cut2.meta").read_text().split()
                    v.op2 = f"{kind2} {'boot' if int(pc2, 16) < BOOT_END else 'app'}"
                    if variant == "restarted":
                        await gw.kill()
                        gw.outputs.append((work / f"gateway-{gw.n}.log").read_text(errors="replace"))
                        gw.proc = None
                    flash2 = work / "flash-at-cut2.bin"
                    flash2.write_bytes(torn((work / "cut2.before").read_bytes(),
                                            (work / "cut2.after").read_bytes()))
                    board = Board(fw, work / "board-3", pty=pty, flash=flash2, wait_ready=False)
                    boards.append(board)
                    await board.start()
                    if gw.proc is None:
                        await wait_file(pty, timeout_s=120, alive=[])
                        await gw.start()
        # passes until a final outcome (a real daemon keeps going the same way)
        final: dict[str, str] | None = None
        if gw.proc is None:  # finished during the recovery's wait above
            final = outcome_of(gw.outputs[-1]) if gw.outputs else None
        for i in range(MAX_PASSES if gw.proc is not None else 0):
            rc, text = await gw.wait(PASS_TIMEOUT_S)
            if rc is None:
                v.problems.append(f"gateway pass {gw.n} hung (> {PASS_TIMEOUT_S} s): killed")
                break
            final = outcome_of(text)
            if (final and final.get("result") in FINAL) or i == MAX_PASSES - 1:
                break
            await wait_file(pty, timeout_s=120, alive=[])
            await gw.start()
        v.outcome = (final or {}).get("result", "none")
        v.problems += await judge(mode, work, pty, final, gw.outputs)
        if boards and any(x.startswith("board not answering") for x in v.problems):
            console = (boards[-1].workdir / "console.log").read_text(errors="replace")
            bootloader_verdict(v, console, final)
        if log_ops:  # the flash at the end, for the rebuild (after the judge's reads)
            await boards[-1].monitor("sysbus WriteDoubleWord 0x40023C10 0x7FFFFF00")
            await wait_file(out.with_suffix(".final"), timeout_s=60, alive=[])
    except Exception as exc:  # a broken run is a failed cut, with its reason
        v.problems.append(f"run error: {type(exc).__name__}: {exc}")
    finally:
        await gw.kill()
        for b in boards:
            await b.power_off()
        v.seconds = round(time.monotonic() - t0, 1)
        with contextlib.suppress(OSError):
            v.runs = (work / "runs.txt").read_text().strip()
    return v


async def wait_text(path: Path, text: str, *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if text in path.read_text(errors="replace"):
                return True
        await asyncio.sleep(0.2)  # a log file has no readiness event: poll
    return False


async def snapshot_at_reset(work: Path, gw: Gateway) -> None:
    """The golden run: the gateway's state folder once the board acknowledged the reset that
    starts MCUboot's swap (SQLite copied with its backup API: consistent while in use)."""
    if not await wait_text(work / "gateway-1.log", "step=wait-boot", timeout_s=PASS_TIMEOUT_S):
        return
    dst = work / "state-at-reset"
    dst.mkdir(exist_ok=True)
    for f in (work / "state").iterdir():
        if f.suffix == ".sqlite":
            src = sqlite3.connect(f"file:{f}?mode=ro", uri=True, timeout=5)
            to = sqlite3.connect(dst / f.name)
            try:
                src.backup(to)
            finally:
                src.close()
                to.close()
        elif f.is_file() and not f.name.endswith(("-wal", "-shm", "-journal")):
            shutil.copy(f, dst / f.name)


# -- the judge ---------------------------------------------------------------------------------
async def device_slots(pty: Path) -> list[dict[str, Any]]:
    from gateway_keywords import _image_state  # type: ignore[import-not-found]

    last: Exception | None = None
    for _ in range(3):
        try:
            return await _image_state(str(pty), 10.0)
        except (TimeoutError, OSError, ConnectionError, AssertionError) as exc:
            last = exc
    raise RuntimeError(f"the board does not answer image state: {last!r}")


def journal_view(work: Path) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{work / 'state' / 'journal.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        db.row_factory = sqlite3.Row
        dev = db.execute("SELECT * FROM devices WHERE device_id='disco'").fetchone()
        events = [tuple(r) for r in db.execute(
            "SELECT step, detail FROM events WHERE device_id='disco' ORDER BY rowid")]
        reports = [dict(r) for r in db.execute("SELECT * FROM reports ORDER BY id")]
        intents = [dict(r) for r in db.execute("SELECT * FROM intents WHERE state != 'done'")]
    finally:
        db.close()
    return {"device": dict(dev) if dev else {}, "events": events, "reports": reports,
            "open_intents": intents}


async def judge(mode: Mode, work: Path, pty: Path, final: dict[str, str] | None,
                outputs: list[str]) -> list[str]:
    """Every rule of the issue; returns the broken ones (empty: the cut was survived)."""
    p: list[str] = []
    try:
        slots = await device_slots(pty)
    except RuntimeError as exc:
        p.append(f"board not answering after the gateway's last pass (bricked or hung): {exc}")
        # whatever stopped the board, the gateway must not have claimed a success anywhere:
        # in its journal, or to the fleet server
        return p + success_claims(journal_view(work), work)
    return judge_state(mode, slots, final, journal_view(work), work, p)


def server_reports(work: Path) -> list[dict[str, Any]]:
    """What the fleet server (the local source's reports.jsonl) was told, oldest first."""
    rj = work / "updates" / "reports.jsonl"
    return [json.loads(x) for x in rj.read_text().splitlines() if x.strip()] if rj.exists() else []


def success_claims(journal: dict[str, Any], work: Path) -> list[str]:
    """A success the gateway recorded or reported (for a board that does not answer)."""
    p = []
    if journal["device"].get("outcome") in ("updated", "up-to-date"):
        p.append(f"the journal says {journal['device']['outcome']!r} of a silent board")
    server = server_reports(work)
    if server and int(server[-1]["result"]) == 1:
        p.append("the fleet server's last word is a success, of a silent board")
    return p


# MCUboot's own stops, as its console prints them: ``panic!`` (loader.c,
# ``boot_complete_partial_swap``: a resumed swap whose trailer says no upgrade) and "Unable to
# find bootable image" (boot/zephyr/main.c, then FIH_PANIC: no slot validates - e.g. a swap
# resumed from a stale scratch status, below)
MCUBOOT_STOPS = ("panic!", "Unable to find bootable image")


def bootloader_verdict(v: Verdict, console: str, final: dict[str, str] | None) -> None:
    """A board that does not answer because MCUboot stopped (``MCUBOOT_STOPS``) after cuts
    that all fell inside MCUboot's own operations ("boot": its program counter) is MCUboot's
    result, not the gateway's: a torn program or erase is outside MCUboot's fault model (its
    simulator interrupts between flash operations, never inside one). Two such stops were
    found: a torn swap-info byte then a second cut in the resumed swap (swap-scratch 48220 +
    3: ``panic!``); and a torn erase of the scratch at the end of a swap step (multi-image
    450126: ``boot_swap_sectors`` erases the scratch's trailer sector after the primary took
    the status, "to prevent mcuboot from reading a stale status from the scratch area" - with
    a one-sector scratch that erase is the whole scratch, and torn it keeps the stale trailer
    while the image data before it is gone: MCUboot resumes from it and copies the erased data
    into the primary). The gateway had no part in either and can do nothing over SMP (MCUboot
    runs no SMP server here); its only duty then is not to claim a success. Anything else - a
    cut in the application, a success claimed, a silent board without MCUboot's stop - stays
    a failure."""
    lines = [ln.strip() for ln in console.splitlines() if ln.strip()]
    boot_log = lines[-6:]
    if not lines or not any(stop in lines[-1] for stop in MCUBOOT_STOPS):
        return
    if final is None:  # a gateway that printed no outcome (a crash) is never excused
        return
    if not v.op.endswith("boot") or (v.second_cut is not None and not v.op2.endswith("boot")):
        return
    v.bootloader = "MCUboot stopped: " + " | ".join(boot_log)
    v.problems = [x for x in v.problems if not x.startswith("board not answering")]
    if (final or {}).get("result") in ("updated", "up-to-date"):
        v.problems.append(f"MCUboot stopped but the gateway reported {final}")


def judge_state(mode: Mode, slots: list[dict[str, Any]], final: dict[str, str] | None,
                journal: dict[str, Any], work: Path, p: list[str]) -> list[str]:
    """The rules on what was read: the device's slots, the last outcome, the journal, the
    fleet server's reports. Kept apart from the reads so a test can feed it bad cases."""
    (work / "runs.txt").write_text(json.dumps(slots))
    known = {h for h in mode.old + mode.new if h}
    runs_new = []
    for img in range(len(mode.new)):
        active = [s for s in slots if s["image"] == img and s["active"]]
        if len(active) != 1:
            p.append(f"image {img}: {len(active)} active slots: {slots}")
            continue
        a = active[0]
        if a["hash"] not in known and not (mode.old[img] == "" and a["hash"] != mode.new[img]):
            p.append(f"image {img}: runs {a['hash']}, neither the old nor the new signed image")
        if not a["confirmed"]:
            p.append(f"image {img}: the running image is not confirmed: {a}")
        runs_new.append(a["hash"] == mode.new[img])
    pending = [s for s in slots if s["pending"]]
    if pending:
        p.append(f"left pending after the gateway's final outcome: {pending}")
    if p:
        return p
    new = runs_new[0]
    if any(runs_new) and not all(runs_new) and (final or {}).get("result") == "updated":
        p.append(f"reported updated but only images {runs_new} run the new set")
    ev = journal["events"]
    steps = [s for s, _ in ev]
    if new:
        if mode.test_boot:
            # the gateway's own test mark (journalled before it is sent); the reset that
            # test-boots it may be the gateway's or the power cut itself (a cut after the mark
            # landed boots the image in test mode: the gateway then health-checks and confirms)
            if not any(s == "mark-test" and d.startswith("hash=" + mode.new[0][:16])
                       for s, d in ev) and not any(s == "mark-test" and "image set" in d
                                                   for s, d in ev):
                p.append("runs the new image confirmed, but the journal has no test mark of it "
                         "by this gateway")
            sent = [i for i, (s, d) in enumerate(ev) if s == "confirm" and d.startswith("confirm sent")]
            verified = [i for i, (s, _) in enumerate(ev) if s == "verify"]
            marked = [i for i, (s, _) in enumerate(ev) if s == "mark-test"]
            # a cut that tore MCUboot's copy-done or image-ok byte leaves the new image
            # permanent without any confirm (swap type NONE, never reverted): the gateway
            # must still health-check it before it reports it updated (engine
            # _check_permanent, CONFIRMED_ELSEWHERE) - a check started after the last mark
            # whose pass is the journal's last outcome
            checked = [i for i, (s, d) in enumerate(ev) if s == "confirm"
                       and d.startswith(CONFIRMED_ELSEWHERE) and marked and i > max(marked)]
            outcomes = [i for i, (s, _) in enumerate(ev)
                        if s in ("done", "failed", "rolled-back", "refused")]
            passed = bool(checked and outcomes and outcomes[-1] > max(checked)
                          and ev[outcomes[-1]][0] == "done"
                          and "health check passed" in ev[outcomes[-1]][1])
            if passed and not sent:
                pass
            elif not sent or not verified or min(verified) > sent[-1]:
                p.append("runs the new image confirmed without a health check before the "
                         f"gateway's confirm (events {steps})")
        elif "mark-test" not in steps:
            p.append("runs the new image, but the gateway never marked it")
    result = (final or {}).get("result")
    if final is None:
        p.append("the gateway printed no outcome")
    elif (result == "updated") != new:
        p.append(f"outcome {result!r} but the board runs the {'new' if new else 'old'} image")
    dev = journal["device"]
    if dev.get("outcome") != result:
        p.append(f"journal outcome {dev.get('outcome')!r} != printed outcome {result!r}")
    if dev.get("running_hash") and dev["running_hash"] not in {s["hash"] for s in slots
                                                                 if s["active"]}:
        p.append(f"journal running_hash {dev['running_hash']} is not what runs")
    if journal["open_intents"]:
        p.append(f"open intents after the final outcome: {journal['open_intents']}")
    reports = [r for r in journal["reports"] if r["state"] != "superseded"]
    if not reports:
        p.append("the journal has no final report")
        return p
    last = reports[-1]
    if last["state"] != "delivered":
        p.append(f"last final report {last['id']} is {last['state']}, not delivered")
    server = server_reports(work)
    if not server:
        p.append("the fleet server got no report")
    else:
        s_last = server[-1]
        if int(s_last["result"]) != int(last["result"]):
            p.append(f"fleet server's last result {s_last['result']} != journal's {last['result']}")
        if (int(s_last["result"]) == 1) != new:
            p.append(f"fleet server's last word (result {s_last['result']}) does not match the "
                     f"board ({'new' if new else 'old'} image)")
    return p


# -- campaign ----------------------------------------------------------------------------------
async def golden(mode: Mode, root: Path) -> Golden:
    work = root / "golden"
    ops_path = root / "golden-ops.tsv"
    if ops_path.exists():
        return Golden(root, mode)
    v = await run_cut(mode, -1, "none", work, label="golden (no cut)", log_ops=True)
    if not v.ok:
        raise SystemExit(f"golden run failed: {v.problems} (see {work})")
    for f in work.glob("cut.*"):
        shutil.copy(f, root / f"golden-flash{f.suffix}")
    shutil.copytree(work / "state-at-reset", root / "golden-state", dirs_exist_ok=True)
    shutil.copy(work / "golden-ops.tsv", ops_path)
    g = Golden(root, mode)
    bad = g.check()
    if bad:
        ops_path.unlink()
        raise SystemExit(f"golden run: the operation log does not rebuild the flash: {bad}")
    ops = g.ops
    summary = Counter(f"{o.phase}:{o.kind}" for o in ops)
    (root / "golden.json").write_text(json.dumps(
        {"seconds": v.seconds, "ops": len(ops), "by_kind": summary,
         "last_ms": ops[-1].t_ms if ops else 0}, indent=1))
    return g


async def campaign(mode: Mode, root: Path, *, jobs: int, kinds: set[str], data_cuts: int,
                   second_every: int, limit: int | None, variants: str,
                   only: list[int] | None = None, second: int | None = None,
                   skip_done: bool = False) -> list[Verdict]:
    g = await golden(mode, root)
    ops = g.ops
    cuts = cut_points(ops, data_cuts)
    if only is not None:
        by_n = {o.n: (o, lbl) for o, lbl in cuts}
        cuts = [by_n.get(n, (ops[n], f"op {n}")) for n in only]
    # the update starts with the application's first operation: MCUboot's writes at the
    # power-up before it (direct-XIP's copy-done) belong to no update and are not cut
    first_app = next((o.n for o in ops if o.phase == "app"), 0)
    cuts = [(o, lbl) for o, lbl in cuts
            if (o.kind in kinds and o.n >= first_app) or only is not None]
    done: set[tuple[int, str]] = set()
    if skip_done and (root / "results.jsonl").exists():  # a campaign stopped and started again
        for ln in (root / "results.jsonl").read_text().splitlines():
            r = json.loads(ln)
            if not r["problems"]:
                done.add((r["cut"], r["variant"]))
    if limit:
        cuts = cuts[:limit]
    sem = asyncio.Semaphore(jobs)
    results: list[Verdict] = []
    out = (root / "results.jsonl").open("a")

    async def one(i: int, op: Op, lbl: str, variant: str) -> None:
        # the first and the middle cut of every ``second_every`` (one of each variant)
        # a replay (``--cut``) is cut again only when it says so (``--second-cut``)
        sc = second if second is not None or only is not None else (
            3 if second_every and i % second_every in (0, second_every // 2) else None)
        async with sem:
            v = await run_cut(mode, op.n, variant, root / f"cut-{op.n}-{variant}", label=lbl,
                              second_cut=sc, golden=g)
        results.append(v)
        out.write(json.dumps({**dataclasses.asdict(v), "kind": op.kind, "phase": op.phase}) + "\n")
        out.flush()
        status = "MCUBOOT" if v.bootloader and v.ok else "PASS" if v.ok else "FAIL"
        print(f"{status} {mode.name} op {op.n:>7} {lbl:<48} {variant:<9} "
              f"{'cut2 ' if sc is not None else ''}{v.outcome:<11} {v.seconds:6.1f}s", flush=True)
        if v.bootloader:
            print(f"     {v.bootloader}\n     replay: "
                  f"{replay_command(mode.name, op.n, variant, sc)}", flush=True)
        if not v.ok:
            print(f"     problems: {v.problems}\n     replay: "
                  f"{replay_command(mode.name, op.n, variant, sc)}", flush=True)
        elif not v.bootloader:
            shutil.rmtree(v.work, ignore_errors=True)

    tasks = []
    for i, (op, lbl) in enumerate(cuts):
        vs = ["restarted", "running"] if variants == "both" else (
            [variants] if variants in ("restarted", "running")
            else ["restarted" if i % 2 == 0 else "running"])
        tasks += [one(i, op, lbl, var) for var in vs if (op.n, var) not in done]
    await asyncio.gather(*tasks)
    out.close()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=sorted(MODES), required=True)
    ap.add_argument("--out", type=Path, default=REPO / "build" / "power-cuts")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--kinds", default="erase,trailer,data")
    ap.add_argument("--data-cuts", type=int, default=100)
    ap.add_argument("--second-every", type=int, default=10,
                    help="the 1st and the (K/2+1)-th of every K cuts are cut again during their "
                         "recovery (0: never)")
    ap.add_argument("--variants", default="alternate",
                    choices=["alternate", "both", "restarted", "running"])
    ap.add_argument("--limit", type=int)
    ap.add_argument("--list", action="store_true", help="golden run and the cut points only")
    ap.add_argument("--cut", type=int, action="append", help="only these operations (replay)")
    ap.add_argument("--variant", choices=["restarted", "running"])
    ap.add_argument("--second-cut", type=int)
    ap.add_argument("--skip-done", action="store_true",
                    help="skip the cuts results.jsonl already has as passed (resume a campaign)")
    a = ap.parse_args(argv)
    mode = MODES[a.mode]
    root = a.out.resolve() / mode.name
    root.mkdir(parents=True, exist_ok=True)
    if a.list:
        g = asyncio.run(golden(mode, root))
        for o, lbl in cut_points(g.ops, a.data_cuts):
            print(f"{o.n:>7} {o.t_ms:10.1f} ms {lbl}")
        return 0
    t0 = time.monotonic()
    res = asyncio.run(campaign(
        mode, root, jobs=a.jobs, kinds=set(a.kinds.split(",")), data_cuts=a.data_cuts,
        second_every=a.second_every, limit=a.limit, variants=a.variant or a.variants,
        only=a.cut, second=a.second_cut, skip_done=a.skip_done))
    by = Counter((json.loads(json.dumps(r.label)).split()[0], r.ok) for r in res)
    panics = sum(1 for r in res if r.bootloader and r.ok)
    print(f"\n{mode.name}: {len(res)} cuts, {sum(not r.ok for r in res)} failed, "
          f"{panics} MCUboot stops (the gateway reported no success), "
          f"{time.monotonic() - t0:.0f} s wall; by kind: "
          + ", ".join(f"{k} {'ok' if ok else 'FAILED'} {n}" for (k, ok), n in sorted(by.items())))
    return 1 if any(not r.ok for r in res) else 0


if __name__ == "__main__":
    raise SystemExit(main())

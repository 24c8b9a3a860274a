"""Staged rollout inside one gateway: canaries first, the rest only once they proved healthy.

Owns the decision *may this unit (a device, or a group: one unit) start installing this
artifact now?* for ``rollout: {canary, wait_s, max_failure_pct}``. One *wave* per artifact:

    canary  the first ``canary`` units (a number, or a percentage of the gateway's units,
            at least 1) that ask are admitted; the others wait
    soak    every canary confirmed its image; they must stay healthy for ``wait_s``; at the
            end each canary is checked again (``verify``: still running the image, confirmed)
    open    every unit may install
    halted  failures passed ``max_failure_pct`` of the units started: nobody else starts, the
            reason is kept and reported (``status``, ``ctl rollout``); ``ctl rollout resume``
            or a new artifact from the source starts over

A canary that fails while the failure share stays within the threshold is replaced by the next
unit that asks (the wave still needs ``canary`` healthy canaries before it opens). A unit that
was admitted once stays admitted (a resumed update is never held back). Waves persist in
``fleet.sqlite``, so a restart neither repeats nor skips the canary phase. Units that wait are
not touched at all: the image may be downloaded and verified on the gateway, but not a byte
goes to them.

Lock order (no deadlock with the scheduler's limits): ``admit`` never waits - it is called by
a unit that holds a device session and a ``max_concurrent`` slot, so it decides from the
wave's state alone. The end-of-soak check, which opens sessions with the canaries, runs in
``settle``, which the scheduler calls *before* a unit takes any session or slot; one check
runs at a time (the others wait for it, holding nothing), each canary's check is bounded
(``verify_timeout_s``), and a check that could not be made in time (no session to be had,
the gateway stopping) leaves the wave in its soak, to be checked again - it halts nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.config import RolloutConfig
from gateway.opstate import OpState

log = logging.getLogger("gateway.rollout")

VerifyFn = Callable[[str, str], Awaitable[str | None]]  # (unit, artifact) -> None or a problem


class VerifyDeferred(Exception):
    """The canary could not be checked now (no session in time, the gateway stopping): not a
    verdict on its health; the soak is checked again later."""


@dataclass
class Decision:
    go: bool
    reason: str = ""
    role: str = ""  # canary | rest
    retry_in_s: float | None = None  # when asking again makes sense (soak end)


@dataclass
class Wave:
    artifact: str
    n_canary: int
    state: str = "canary"  # canary | soak | open | halted
    canaries: dict[str, str] = field(default_factory=dict)  # unit -> pending | ok | failed
    started: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # unit -> why
    succeeded: list[str] = field(default_factory=list)
    soak_until: float = 0.0
    reason: str = ""
    created_at: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Wave:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def summary(self) -> str:
        ok = sum(1 for s in self.canaries.values() if s == "ok")
        return (f"{self.state}: canaries {ok}/{self.n_canary} ok, started {len(self.started)}, "
                f"succeeded {len(self.succeeded)}, failed {len(self.failed)}"
                + (f" - {self.reason}" if self.reason else ""))


def canary_count(spec: int | str, population: int) -> int:
    if isinstance(spec, int):
        return max(1, spec)
    pct = float(spec.rstrip("%"))
    return max(1, math.ceil(population * pct / 100.0))


class RolloutManager:
    def __init__(self, cfg: RolloutConfig | None, ops: OpState | None,
                 population: Callable[[], int], *, verify: VerifyFn | None = None,
                 clock: Callable[[], float] = time.time, verify_timeout_s: float = 60.0) -> None:
        self.cfg = cfg
        self.ops = ops
        self.population = population
        self.verify = verify
        self.clock = clock
        self.verify_timeout_s = verify_timeout_s  # one canary's end-of-soak check, at most
        self.waves: dict[str, Wave] = {}
        self.changed = asyncio.Event()  # a wave changed state: waiting units may ask again
        self._checks: dict[str, asyncio.Task[bool | None]] = {}  # artifact -> end-of-soak check
        if ops is not None:
            for art, data in ops.rollouts().items():
                self.waves[art] = Wave.from_dict(data)

    @property
    def enabled(self) -> bool:
        return self.cfg is not None

    def _save(self, w: Wave) -> None:
        if self.ops is not None:
            self.ops.put_rollout(w.artifact, asdict(w))
        self.changed.set()

    def wave(self, artifact: str) -> Wave:
        w = self.waves.get(artifact)
        if w is None:
            assert self.cfg is not None
            w = Wave(artifact, canary_count(self.cfg.canary, self.population()))
            self.waves[artifact] = w
            log.info("rollout artifact=%s started: %d canary unit(s) of %d, soak %gs, max failures %g%%",
                     artifact, w.n_canary, self.population(), self.cfg.wait_s, self.cfg.max_failure_pct)
            self._save(w)
        return w

    # -- the scheduler's questions -----------------------------------------------------------
    async def admit(self, unit: str, artifact: str) -> Decision:
        """May ``unit`` start installing ``artifact`` now? Never waits (the caller holds a
        device session and a concurrency slot): a soak that is over but not yet checked holds
        the unit until ``settle`` checked the canaries (``changed`` then wakes it)."""
        if self.cfg is None:
            return Decision(True)
        w = self.wave(artifact)
        if unit in w.started:
            return Decision(True, "already admitted", "canary" if unit in w.canaries else "rest")
        if w.state == "halted":
            return Decision(False, f"rollout of {artifact} halted: {w.reason}")
        if w.state == "canary":
            healthy_or_running = sum(1 for s in w.canaries.values() if s != "failed")
            if healthy_or_running < w.n_canary:
                w.canaries[unit] = "pending"
                w.started.append(unit)
                self._save(w)
                log.info("rollout artifact=%s unit=%s admitted as canary (%d/%d)", artifact, unit,
                         healthy_or_running + 1, w.n_canary)
                return Decision(True, "canary", "canary")
            ok = sum(1 for s in w.canaries.values() if s == "ok")
            return Decision(False, f"waiting for the canaries of {artifact} ({ok}/{w.n_canary} "
                                   "confirmed)")
        if w.state == "soak":
            left = w.soak_until - self.clock()
            if left > 0:
                return Decision(False, f"canaries of {artifact} confirmed; the rest starts once "
                                       f"they stayed healthy {left:.0f}s more", retry_in_s=left)
            if self.verify is not None:
                return Decision(False, f"canaries of {artifact} stayed healthy {self.cfg.wait_s:g}s; "
                                       "being checked once more before the rest starts",
                                retry_in_s=1.0)
            w.state = "open"  # nothing to check them with
        w.started.append(unit)
        self._save(w)
        return Decision(True, "rollout open", "rest")

    async def settle(self) -> None:
        """End every soak that is over: check its canaries (``verify``), open or halt the wave.

        Called by the scheduler before a unit takes a device session or a concurrency slot
        (never from inside one: the check opens sessions with the canaries). One check per
        wave runs at a time; a caller waits for it holding nothing, bounded by
        ``verify_timeout_s`` per canary."""
        if self.cfg is None:
            return
        now = self.clock()
        for w in list(self.waves.values()):
            if w.state != "soak" or w.soak_until > now or self.verify is None:
                continue
            t = self._checks.get(w.artifact)
            if t is None or t.done():
                t = self._checks[w.artifact] = asyncio.ensure_future(self._end_soak(w))
            n = max(1, sum(1 for s in w.canaries.values() if s == "ok"))
            try:
                await asyncio.wait_for(asyncio.shield(t), self.verify_timeout_s * n + 1.0)
            except TimeoutError:
                log.warning("rollout artifact=%s end-of-soak check still running", w.artifact)

    def close(self) -> None:
        for t in self._checks.values():
            t.cancel()
        self._checks.clear()

    async def _end_soak(self, w: Wave) -> bool | None:
        """Check the canaries again at the end of the soak; open (True) or halt (False) the
        wave; None: not checked now (``VerifyDeferred``, a check out of time) - still soaking.
        Rests only on what each canary device reports now (``verify``), never on the server."""
        problems: dict[str, str] = {}
        if self.verify is not None:
            for unit, st in list(w.canaries.items()):
                if st != "ok":
                    continue
                try:
                    why = await asyncio.wait_for(self.verify(unit, w.artifact),
                                                 self.verify_timeout_s)
                except (VerifyDeferred, TimeoutError) as exc:
                    log.warning("rollout artifact=%s canary %s not checked now (%s); checked "
                                "again later", w.artifact, unit, exc or "timed out")
                    return None
                except Exception as exc:  # unreachable at the check counts as unhealthy
                    why = f"health check failed: {exc}"
                if why is not None:
                    problems[unit] = why
        if w.state != "soak" or self.waves.get(w.artifact) is not w:
            return None  # changed meanwhile (resumed, failed): decided elsewhere
        for unit, why in problems.items():
            w.canaries[unit] = "failed"
            w.failed[unit] = f"unhealthy after the soak: {why}"
        if problems:
            w.state = "halted"
            first = next(iter(problems.items()))
            soak = self.cfg.wait_s if self.cfg else 0.0
            w.reason = (f"{len(problems)} canary unit(s) unhealthy after {soak:g}s "
                        f"(first: {first[0]}: {first[1]})")
            log.error("rollout artifact=%s halted: %s", w.artifact, w.reason)
            self._save(w)
            return False
        w.state = "open"
        log.info("rollout artifact=%s open: every canary stayed healthy", w.artifact)
        self._save(w)
        return True

    def finished(self, unit: str, artifact: str, ok: bool, detail: str = "") -> None:
        """The outcome of an admitted unit's attempt (only final outcomes, not holds)."""
        if self.cfg is None:
            return
        w = self.waves.get(artifact)
        if w is None or unit not in w.started:
            return
        if ok:
            if unit not in w.succeeded:
                w.succeeded.append(unit)
            w.failed.pop(unit, None)
            if w.canaries.get(unit) == "pending":
                w.canaries[unit] = "ok"
                if w.state == "canary" and sum(1 for s in w.canaries.values() if s == "ok") >= w.n_canary:
                    w.state = "soak"
                    w.soak_until = self.clock() + self.cfg.wait_s
                    log.info("rollout artifact=%s canaries confirmed; soak %gs", artifact, self.cfg.wait_s)
            self._save(w)
            return
        w.failed[unit] = detail or "failed"
        if unit in w.canaries:
            w.canaries[unit] = "failed"
        pct = 100.0 * len(w.failed) / max(1, len(w.started))
        log.warning("rollout artifact=%s unit=%s failed (%d of %d started, %.0f%%): %s", artifact, unit,
                    len(w.failed), len(w.started), pct, detail)
        if pct > self.cfg.max_failure_pct and (w.state != "halted" or "unit(s) failed" in w.reason):
            if w.state != "halted":
                log.error("rollout artifact=%s halted: %d of %d unit(s) failed", artifact,
                          len(w.failed), len(w.started))
            w.state = "halted"
            w.reason = (f"{len(w.failed)} of {len(w.started)} unit(s) failed ({pct:.0f}% > "
                        f"max_failure_pct {self.cfg.max_failure_pct:g}%); first: "
                        + "; ".join(f"{u}: {d}" for u, d in list(w.failed.items())[:1]))
        self._save(w)

    def resume(self, artifact: str) -> bool:
        """Operator: start a halted wave over (its failures forgotten, its canaries kept)."""
        w = self.waves.get(artifact)
        if w is None:
            return False
        w.state = "canary"
        w.reason = ""
        w.failed.clear()
        w.canaries = {u: s for u, s in w.canaries.items() if s == "ok"}
        w.started = [u for u in w.started if u in w.succeeded]
        if sum(1 for s in w.canaries.values() if s == "ok") >= w.n_canary:
            w.state = "soak"
            w.soak_until = self.clock() + (self.cfg.wait_s if self.cfg else 0.0)
        self._save(w)
        return True

    def status(self) -> dict[str, dict[str, Any]]:
        return {a: {**asdict(w), "summary": w.summary()} for a, w in self.waves.items()}

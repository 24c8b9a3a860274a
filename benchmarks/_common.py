"""Shared helpers for the benchmarks: images, a simulator in its own process, SMP clients.

The simulator always runs in a separate process (``python -m gateway.sim --config FILE``), so
the device side's CPU never competes with the client being measured inside one event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT))

from gateway import devkit  # noqa: E402


def make_image(path: Path, size: int, version: str = "2.0.0", key: Path | None = None,
               slot_size: int = 0x60000) -> bytes:
    """An imgtool-made MCUboot image of about ``size`` bytes (header + payload + TLVs)."""
    if not path.exists():
        payload = max(1024, size - 0x200 - 0x50)  # header 0x200, TLV area ~0x50 (hash only)
        devkit.sign_image(path, version=version, key=key, size=payload, slot_size=slot_size)
    return path.read_bytes()


@contextlib.contextmanager
def simulator(workdir: Path, devices: list[dict[str, Any]], timeout_s: float = 120.0) -> Iterator[
        dict[str, dict[str, Any]]]:
    """Run ``devices`` in ``python -m gateway.sim``; yields endpoints.json (id -> endpoint)."""
    workdir.mkdir(parents=True, exist_ok=True)
    state = workdir / "sim-state"
    cfg = {"state_dir": str(state), "devices": devices}
    cfg_path = workdir / "sim.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ep_file = state / "endpoints.json"
    ep_file.unlink(missing_ok=True)
    log = open(workdir / "sim.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.sim", "--config", str(cfg_path)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + timeout_s
        while not ep_file.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"simulator exited ({proc.returncode}); see {workdir / 'sim.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError("simulator did not start in time")
            time.sleep(0.1)
        yield json.loads(ep_file.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def raise_nofile(n: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(soft, n), hard)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def table(rows: list[list[str]], header: list[str]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def update_doc(section: str, text: str, doc: Path | None = None) -> None:
    """Replace the text between ``<!-- section:begin -->`` and ``<!-- section:end -->``."""
    doc = doc or DOCS / "benchmarks.md"
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    body = doc.read_text() if doc.exists() else ""
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in body and end in body:
        a, b = body.index(begin), body.index(end) + len(end)
        body = body[:a] + block + body[b:]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(body)

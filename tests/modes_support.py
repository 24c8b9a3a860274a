"""Helpers for the per-mode and multi-image tests: imgtool-made builds, one-pass runs, what the
simulated device says (through its own img_mgmt model, not the gateway's code)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway import devkit
from gateway.artifacts.bundle import BundleEntry, write_bundle
from gateway.config import GatewayConfig
from gateway.daemon import Gateway, Pass
from gateway.demo import HARDWARE, Bench


async def run_pass(cfg: GatewayConfig) -> Pass:
    gw = Gateway(cfg)
    try:
        return await gw.run_once()
    finally:
        gw.close()


def states(dev: Any) -> list[dict[str, Any]]:
    """The device's image state as its simulated img_mgmt reports it."""
    out = []
    for s in dev.server.state_images():
        out.append({"image": s.image or 0, "slot": s.slot, "version": s.version,
                    "hash": bytes(s.hash).hex() if s.hash else None, "active": bool(s.active),
                    "confirmed": bool(s.confirmed), "pending": bool(s.pending),
                    "permanent": bool(s.permanent)})
    return out


def active(dev: Any, image: int = 0) -> tuple[str, bool, int]:
    """(version, confirmed, slot) of the image's active entry."""
    a = next(s for s in states(dev) if s["image"] == image and s["active"])
    return a["version"], a["confirmed"], a["slot"]


def entry(dev: Any, image: int, slot: int) -> dict[str, Any] | None:
    return next((s for s in states(dev) if s["image"] == image and s["slot"] == slot), None)


def upload_requests(dev: Any) -> int:
    return int(dev.counters["requests.1.1"])


def resets(dev: Any) -> int:
    return int(dev.counters["requests.0.5"])


def state_writes(dev: Any) -> list[dict[str, Any]]:
    return [dict(e.detail) for e in dev.events if e.kind == "state-write"]


def reports(bench: Bench) -> list[dict[str, Any]]:
    path = bench.updates_dir / "reports.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def sign(bench: Bench, name: str, version: str, *extra: str, key: Path | None = None,
         size: int = 40 * 1024, payload_seed: str | None = None) -> Path:
    """``imgtool sign`` a new build into the bench's images folder."""
    payload = devkit.fake_firmware(size, payload_seed or f"{name}{version}")
    return devkit.sign_image(bench.root / "images" / name, version=version,
                             key=key if key is not None else bench.key, payload=payload,
                             extra=tuple(extra))


def publish_entry(bench: Bench, entry: dict[str, Any]) -> None:
    """Copy the entry's files into the update directory and make it the only manifest entry."""
    import shutil

    files = [entry["file"]] if "file" in entry else [f["file"] for f in entry["images"]]
    for f in files:
        src = Path(f)
        if src.is_absolute():
            shutil.copy(src, bench.updates_dir / src.name)
    def rel(x: str) -> str:
        return Path(x).name

    e = dict(entry)
    e.setdefault("hardware", HARDWARE)
    if "file" in e:
        e["file"] = rel(e["file"])
    else:
        e["images"] = [{**f, "file": rel(f["file"])} for f in e["images"]]
    (bench.updates_dir / "manifest.yaml").write_text(yaml.safe_dump({"images": [e]}))


def dfu_zip(out: Path, files: list[dict[str, Any]]) -> Path:
    """An nRF Connect SDK style dfu_application.zip of ``files`` ({path, image, slot, ...})."""
    entries = [BundleEntry(Path(f["path"]).name, Path(f["path"]).read_bytes(), f.get("image", 0),
                           f.get("slot"), board=f.get("board"), netcore=f.get("netcore", False))
               for f in files]
    out.write_bytes(write_bundle(entries))
    return out


def outcome_line(res: Pass, dev_id: str) -> tuple[str, int, str]:
    o = res.outcomes[dev_id]
    return o.status.value, int(o.result), o.detail


def health_hook(code: int) -> dict[str, Any]:
    """A device override: a ``health_check:`` command that prints "probe said CODE" and exits
    with CODE (0 = healthy)."""
    return {"health_check": {"command": [sys.executable, "-c",
                                         f"print('probe said {code}'); import sys; sys.exit({code})"],
                             "timeout_s": 30}}


def confirm_writes(dev: Any) -> list[Any]:
    """The simulated device's img_mgmt state writes that confirmed something."""
    return [e for e in dev.events if e.kind == "state-write" and e.detail.get("confirm")]

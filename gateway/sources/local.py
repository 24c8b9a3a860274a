"""Local-directory update source: the embedded default.

Owns reading a directory of signed MCUboot images described by ``manifest.yaml``::

    images:
      - file: app-v2.0.0.bin        # path relative to the directory
        hardware: nrf52840dk        # target hardware type (required)
        devices: [sensor-1]         # optional: only these device ids
        group: main-board           # optional: only devices of this group

For each device the newest image (by the MCUboot version in the image header) whose
``hardware`` matches the device, and whose ``devices``/``group`` filters admit it, is the
target. The manifest is re-read at every check, so dropping in a new image and editing the
manifest is picked up by a running daemon. Reports are logged and kept in
``<dir>/reports.jsonl`` when the directory is writable (a read-only image directory is not an
error: the log line is the report). The report handle (``Offer.report_to``) is
``{"file"}``, the image the report is about.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.mcuboot import ImageFormatError, ImageInfo, parse_image
from gateway.sources.base import DeviceView, FetchError, FleetSource, Offer, Report, UpdateResult

if TYPE_CHECKING:
    from gateway.config import LocalSourceConfig

log = logging.getLogger(__name__)


class ManifestEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str = Field(min_length=1)
    hardware: str = Field(min_length=1)
    devices: list[str] | None = None
    group: str | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    images: list[ManifestEntry] = []


class ManifestError(FetchError):
    pass


def load_manifest(directory: Path) -> Manifest:
    path = directory / "manifest.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest.yaml in the update directory",
                            UpdateResult.INVALID_URI) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: cannot read: {exc}", UpdateResult.INVALID_URI) from exc
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        raise ManifestError(f"{path}: {loc}: {e['msg']}", UpdateResult.UNSUPPORTED_PACKAGE) from None


class LocalSource(FleetSource):
    name = "local"

    def __init__(self, cfg: LocalSourceConfig) -> None:
        self.dir = cfg.path
        self.interval = cfg.poll_interval_s
        self.reports: list[tuple[str, Report]] = []
        # every device asks at every poll: re-read a file only when its (mtime, size) changed
        self._manifest: tuple[tuple[int, int], Manifest] | None = None
        self._infos: dict[Path, tuple[tuple[int, int], ImageInfo]] = {}

    def _stamp(self, path: Path) -> tuple[int, int]:
        st = path.stat()
        return (st.st_mtime_ns, st.st_size)

    def _load_manifest(self) -> Manifest:
        try:
            stamp = self._stamp(self.dir / "manifest.yaml")
        except OSError:
            return load_manifest(self.dir)  # raises the clear error
        if self._manifest is None or self._manifest[0] != stamp:
            self._manifest = (stamp, load_manifest(self.dir))
        return self._manifest[1]

    def _image_info(self, path: Path) -> ImageInfo:
        stamp = self._stamp(path)
        hit = self._infos.get(path)
        if hit is None or hit[0] != stamp:
            with path.open("rb") as f:
                hit = (stamp, parse_image(f.read()))
            self._infos[path] = hit
        return hit[1]

    def poll_interval(self) -> float:
        return self.interval

    async def check(self, device: DeviceView) -> Offer | None:
        manifest = self._load_manifest()
        best: tuple[object, Offer] | None = None
        for e in manifest.images:
            if e.hardware != device.hardware:
                continue
            if e.devices is not None and device.id not in e.devices:
                continue
            if e.group is not None and e.group != device.group:
                continue
            path = (self.dir / e.file).resolve()
            if self.dir.resolve() not in path.parents:
                log.warning("manifest entry %s points outside %s: ignored", e.file, self.dir)
                continue
            try:
                info = self._image_info(path)
            except (OSError, ImageFormatError) as exc:
                log.warning("local source: %s unusable: %s", path, exc)
                continue
            offer = Offer(device_id=device.id, source=self.name, artifact_id=info.hash.hex(),
                          version=info.version, hardware=e.hardware, handle=path,
                          report_to={"file": e.file})
            if best is None or info.version.key() > best[0]:  # type: ignore[operator]
                best = (info.version.key(), offer)
        if best is None:
            return None
        offer = best[1]
        if device.running_hash is not None and offer.artifact_id == device.running_hash.hex():
            return None  # already running it
        return offer

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        path = offer.handle
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise FetchError(f"{path}: {exc.strerror}", UpdateResult.INVALID_URI) from exc
        if max_size is not None and size > max_size:
            raise FetchError(f"{path} is {size} bytes, more than the {max_size}-byte slot",
                             UpdateResult.NOT_ENOUGH_FLASH)
        return Path(path)

    async def report(self, offer: Offer, report: Report) -> None:
        self.reports.append((offer.device_id, report))
        if not report.finished:
            return
        log.info("device=%s outcome of %s: %s (%d) %s", offer.device_id, offer.report_to.get("file"),
                 report.result.name, int(report.result), report.detail)
        line = {"time": time.time(), "device": offer.device_id, "artifact": offer.artifact_id,
                "file": offer.report_to.get("file"), "version": str(offer.version),
                "state": int(report.state), "result": int(report.result),
                "result_name": report.result.name, "detail": report.detail,
                "report_id": report.report_id}
        try:
            with (self.dir / "reports.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as exc:  # read-only image directory: the log line is the report
            log.info("report of %s not added to %s: %s", offer.device_id, self.dir / "reports.jsonl",
                     exc.strerror)

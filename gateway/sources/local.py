"""Local-directory update source: the embedded default.

Owns reading a directory of signed MCUboot images described by ``manifest.yaml``::

    images:
      - file: app-v2.0.0.bin        # path relative to the directory
        hardware: nrf52840dk        # target hardware type (required)
        devices: [sensor-1]         # optional: only these device ids
        group: main-board           # optional: only devices of this group

      # several images updated together (a multi-image device: one artifact, one reset)
      - images:
          - {file: app-v2.bin, image: 0}
          - {file: net-v2.bin, image: 1, netcore: true}   # nRF5340 network core
        hardware: nrf5340dk

      # direct-XIP: one release built for each slot; the gateway sends the build for the slot
      # the device does not run
      - images:
          - {file: app-v2-slot0.bin, slot: 0}
          - {file: app-v2-slot1.bin, slot: 1}
        hardware: stm32f4_disco

      # an nRF Connect SDK dfu_application.zip (manifest.json + images) is taken as it is
      - file: dfu_application.zip
        hardware: nrf5340dk

For each device the newest entry (by image 0's MCUboot version) whose ``hardware`` matches the
device, and whose ``devices``/``group`` filters admit it, is the target. The manifest is re-read
at every check, so dropping in a new image and editing the manifest is picked up by a running
daemon. An ``images:`` entry is handed to the gateway as one ``dfu_application.zip``-format
artifact (``gateway.artifacts.bundle.write_bundle``, written to a private temporary folder);
its artifact id is the image set's id (the member hashes), the same for the same images in any
container. Reports are logged and appended to ``<dir>/reports.jsonl``; a report that cannot be
written there is not delivered (``ReportNotDelivered``: the journal keeps it and it is retried).
The report handle (``Offer.report_to``) is ``{"file"}``, the entry the report is about.

An entry that matches a device but cannot be used (its file is missing, not an MCUboot image,
outside the directory) is never silently skipped: it is offered as a broken release whose
download fails permanently, so the device's outcome is ``refused`` (reported once, and
``run --once`` exits 1) until the manifest is fixed. A manifest that cannot be read or does not
validate fails the check with its path, line and what is wrong (not as a lost connection).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.artifacts.bundle import BundleEntry, BundleError, is_bundle, read_bundle, write_bundle
from gateway.images import set_id
from gateway.mcuboot import ImageFormatError, ImageInfo, Version, parse_image
from gateway.sources.base import (
    DeviceView,
    FetchError,
    FleetSource,
    Offer,
    Report,
    ReportNotDelivered,
    UpdateResult,
)

if TYPE_CHECKING:
    from gateway.config import LocalSourceConfig

log = logging.getLogger(__name__)


class SetFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str = Field(min_length=1)
    image: int = Field(0, ge=0, le=7, description="MCUboot image number")
    slot: int | None = Field(None, ge=0, le=1, description="direct-XIP: the slot it is linked for")
    netcore: bool = False


class ManifestEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str | None = Field(None, min_length=1)
    images: list[SetFile] | None = Field(None, min_length=1)
    hardware: str = Field(min_length=1)
    devices: list[str] | None = None
    group: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ManifestEntry:
        if (self.file is None) == (self.images is None):
            raise ValueError("give either file: (one image or a dfu_application.zip) or images: "
                             "(several files updated together)")
        return self

    @property
    def name(self) -> str:
        if self.file is not None:
            return self.file
        return "+".join(f.file for f in self.images or [])


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    images: list[ManifestEntry] = []


class ManifestError(FetchError):
    """The update directory or its manifest is unusable: the operator's to fix (not an outage)."""

    hint = "fix the update directory or its manifest.yaml (source.path in the config)"


def _line_of(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the deepest node of ``loc`` found in the composed YAML document."""
    node, line = root, None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        nxt = None
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
        node = nxt
    if node is not None:
        line = node.start_mark.line + 1
    return line


def load_manifest(directory: Path) -> Manifest:
    path = directory / "manifest.yaml"
    if not directory.is_dir():
        raise ManifestError(f"update directory {directory} does not exist or is not a directory",
                            UpdateResult.INVALID_URI)
    try:
        text = path.read_text()
        data = yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest.yaml in the update directory",
                            UpdateResult.INVALID_URI) from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror or exc}",
                            UpdateResult.INVALID_URI) from exc
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:  # PyYAML recurses
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ManifestError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}",
                            UpdateResult.UNSUPPORTED_PACKAGE) from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        try:
            root = yaml.compose(text)
        except yaml.YAMLError:
            root = None
        problems = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
            line = _line_of(root, tuple(e["loc"]))
            msg = str(e["msg"]).removeprefix("Value error, ")
            problems.append(f"{path}{f':{line}' if line else ''}: {loc}: {msg}")
        raise ManifestError("; ".join(problems), UpdateResult.UNSUPPORTED_PACKAGE) from None


class _Outside(Exception):
    """A manifest path that resolves outside the update directory."""


class _Broken:
    """A manifest entry that matches but cannot be used: offered so that it fails, never skipped."""

    def __init__(self, reason: str, result: UpdateResult) -> None:
        self.reason = reason
        self.result = result
        self.artifact_id = "unusable-" + hashlib.sha256(reason.encode()).hexdigest()[:24]


class _Target:
    """What one manifest entry offers: its version, artifact id and where its bytes are."""

    def __init__(self, version: Version, artifact_id: str, path: Path | None,
                 entries: list[BundleEntry] | None, images: set[int], image0: set[bytes],
                 slot_builds: bool = False) -> None:
        self.version = version
        self.artifact_id = artifact_id
        self.path = path  # a file used as it is (an image, or a dfu_application.zip)
        self.entries = entries  # or the images of an images: entry, bundled at fetch time
        self.images = images  # MCUboot image numbers it updates
        self.image0 = image0  # image 0's hash(es): one per slot build for direct-XIP
        self.slot_builds = slot_builds

    @property
    def is_set(self) -> bool:
        return len(self.images) > 1 or self.slot_builds


class LocalSource(FleetSource):
    name = "local"
    peekable = True  # check() is read-only: the manifest and files are only read

    def __init__(self, cfg: LocalSourceConfig) -> None:
        self.dir = cfg.path
        self.interval = cfg.poll_interval_s
        self.reports: list[tuple[str, Report]] = []
        # every device asks at every poll: re-read a file only when its (mtime, size) changed
        self._manifest: tuple[tuple[int, int], Manifest] | None = None
        self._infos: dict[Path, tuple[tuple[int, int], ImageInfo]] = {}
        self._bundles: dict[Path, tuple[tuple[int, int], list[tuple[BundleEntry, ImageInfo]]]] = {}
        self._tmp: Path | None = None
        # device -> (artifact id, image-0 hash) of an image set it was reported to run: the
        # device view carries image 0's hash only, so a set is not offered again while that holds
        self._installed: dict[str, str] = {}
        self._broken_logged: set[str] = set()

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

    def _bundle(self, path: Path) -> list[tuple[BundleEntry, ImageInfo]]:
        stamp = self._stamp(path)
        hit = self._bundles.get(path)
        if hit is None or hit[0] != stamp:
            entries = read_bundle(path.read_bytes(), source=str(path))
            hit = (stamp, [(e, parse_image(e.data)) for e in entries])
            self._bundles[path] = hit
        return hit[1]

    def _inside(self, rel: str) -> Path | None:
        path = (self.dir / rel).resolve()
        if self.dir.resolve() not in path.parents:
            return None
        return path

    def _target(self, e: ManifestEntry) -> _Target | _Broken:
        """Parse one entry (cached); ``_Broken`` (why, logged once) when it cannot be used."""
        try:
            return self._parse_target(e)
        except FileNotFoundError as exc:
            broken = _Broken(f"{e.name}: {exc.filename or e.name} does not exist in {self.dir}",
                             UpdateResult.INVALID_URI)
        except _Outside as exc:
            broken = _Broken(f"{e.name}: {exc} points outside {self.dir}", UpdateResult.INVALID_URI)
        except OSError as exc:
            broken = _Broken(f"{e.name}: {exc.filename or e.name}: {exc.strerror or exc}",
                             UpdateResult.INVALID_URI)
        except (ImageFormatError, BundleError) as exc:
            broken = _Broken(f"{e.name}: not a usable MCUboot image: {exc}",
                             UpdateResult.UNSUPPORTED_PACKAGE)
        if broken.reason not in self._broken_logged:
            self._broken_logged.add(broken.reason)
            log.warning("local source: manifest entry unusable: %s", broken.reason)
        return broken

    def _parse_target(self, e: ManifestEntry) -> _Target:
        def inside(rel: str) -> Path:
            p = self._inside(rel)
            if p is None:
                raise _Outside(rel)
            return p

        pairs: list[tuple[BundleEntry, ImageInfo]] = []
        path: Path | None = None
        if e.file is not None:
            path = inside(e.file)
            if not is_bundle_path(path):
                info = self._image_info(path)
                return _Target(info.version, info.hash.hex(), path, None, {0}, {info.hash})
            pairs = self._bundle(path)
        else:
            for sf in e.images or []:
                p = inside(sf.file)
                pairs.append((BundleEntry(Path(sf.file).name, b"", sf.image, sf.slot,
                                          netcore=sf.netcore), self._image_info(p)))
        images = {be.image for be, _ in pairs}
        image0 = {info.hash for be, info in pairs if be.image == 0}
        first = next((info for be, info in pairs if be.image == 0), pairs[0][1])
        slot_builds = all(be.slot is not None for be, _ in pairs)
        if len(pairs) == 1 and not slot_builds:  # one image: the same as a file: entry
            return _Target(first.version, first.hash.hex(), path, None if path else
                           [pairs[0][0]], images, image0)
        sid = set_id([(be.image, be.slot, info.hash) for be, info in pairs])
        return _Target(first.version, sid.hex(), path,
                       None if path is not None else [be for be, _ in pairs], images, image0,
                       slot_builds)

    def poll_interval(self) -> float:
        return self.interval

    async def check(self, device: DeviceView) -> Offer | None:
        manifest = self._load_manifest()
        best: tuple[object, Offer, _Target] | None = None
        for e in manifest.images:
            if e.hardware != device.hardware:
                continue
            if e.devices is not None and device.id not in e.devices:
                continue
            if e.group is not None and e.group != device.group:
                continue
            t = self._target(e)
            if isinstance(t, _Broken):
                # a release the operator named for this device cannot be used: that is this
                # device's failure (refused, reported once, blocked until the entry changes),
                # never "up-to-date" - whatever else the manifest offers it
                return Offer(device_id=device.id, source=self.name, artifact_id=t.artifact_id,
                             hardware=e.hardware, handle=(e, t), report_to={"file": e.name})
            offer = Offer(device_id=device.id, source=self.name, artifact_id=t.artifact_id,
                          version=t.version, hardware=e.hardware, handle=(e, t),
                          report_to={"file": e.name})
            if best is None or t.version.key() > best[0]:  # type: ignore[operator]
                best = (t.version.key(), offer, t)
        if best is None:
            return None
        _, offer, t = best
        running = device.running_hash
        if running is not None and offer.artifact_id == running.hex():
            return None  # already running it
        if t.slot_builds and running in t.image0:
            return None  # direct-XIP: the device runs one of the release's slot builds
        if t.is_set and self._installed.get(device.id) == offer.artifact_id and (
                0 not in t.images or running in t.image0):
            # the device view carries image 0's hash only: a set reported installed is not
            # offered again while image 0 still runs its build
            return None
        return offer

    def _bundle_dir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="smp-gateway-local-"))
            os.chmod(self._tmp, 0o700)
        return self._tmp

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        entry, t = offer.handle
        if isinstance(t, _Broken):  # the same entry can never pass: refused and blocked
            raise FetchError(f"manifest entry unusable: {t.reason}", t.result, permanent=True)
        if t.entries is not None:  # an images: entry -> one dfu_application.zip artifact
            blobs = []
            for sf, be in zip(entry.images or [], t.entries, strict=True):
                p = self._inside(sf.file)
                if p is None:
                    raise FetchError(f"{sf.file}: outside {self.dir}", UpdateResult.INVALID_URI)
                try:
                    data = p.read_bytes()
                except OSError as exc:
                    raise FetchError(f"{p}: {exc.strerror}", UpdateResult.INVALID_URI) from exc
                if max_size is not None and be.image == 0 and len(data) > max_size:
                    raise FetchError(f"{p} is {len(data)} bytes, more than the {max_size}-byte slot",
                                     UpdateResult.NOT_ENOUGH_FLASH)
                blobs.append(BundleEntry(be.name, data, be.image, be.slot, netcore=be.netcore))
            out = self._bundle_dir() / f"{t.artifact_id}.zip"
            out.write_bytes(write_bundle(blobs, name=entry.name))
            return out
        path = t.path
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise FetchError(f"{path}: {exc.strerror}", UpdateResult.INVALID_URI) from exc
        if max_size is not None and size > max_size and not is_bundle_path(path):
            raise FetchError(f"{path} is {size} bytes, more than the {max_size}-byte slot",
                             UpdateResult.NOT_ENOUGH_FLASH)
        return Path(path)

    async def report(self, offer: Offer, report: Report) -> None:
        if not report.finished:
            self.reports.append((offer.device_id, report))
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
        except OSError as exc:  # not delivered: the journal keeps it and it is sent again
            raise ReportNotDelivered(f"report of {offer.device_id} not written to "
                                     f"{self.dir / 'reports.jsonl'}: {exc.strerror or exc}") from exc
        self.reports.append((offer.device_id, report))
        if report.result == UpdateResult.SUCCESS:
            self._installed[offer.device_id] = offer.artifact_id


def is_bundle_path(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return is_bundle(f.read(4))
    except OSError:
        return False


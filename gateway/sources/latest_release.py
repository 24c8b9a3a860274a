"""HTTP "latest release" fleet source, Memfault style.

Owns asking a release server which build a device should run:
``GET {url}/api/v0/releases/latest?device_serial=&hardware_version=&software_type=&current_version=``
with the project key in a header (Memfault: ``Memfault-Project-Key``).

- 200 → JSON with the artifact: Memfault's shape ``{"version", "artifacts": [{"url", "file_size",
  "md5", ...}]}`` (``sha256``/``size`` used when present), or a flat ``{"url", "sha256", "size",
  "version"}``.
- 204 → the device is up to date.
- 503 (or 429) with ``Retry-After`` (delta-seconds or an HTTP-date) → no offer, and neither this
  device nor the next poll asks again before that time.

Reporting: this API has no deployment-status endpoint (Memfault learns the running version
from the device's own heartbeats and from ``current_version`` on the next query), so
``report()`` only logs, and the next check carries the version actually running. Its report
handle (``Offer.report_to``) is ``{"version"}``: the release named in that log line.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from gateway.artifacts.bundle import may_be_bundle, set_cap
from gateway.download import retry_after_seconds
from gateway.inventory import release_query
from gateway.mcuboot import Version
from gateway.sources._http import HttpSource, read_json
from gateway.sources.base import DeviceView, FetchError, Offer, Report, UpdateResult
from gateway.sources.settings import LatestReleaseSourceConfig

log = logging.getLogger(__name__)


class LatestReleaseSource(HttpSource):
    server_label = "release server"
    name = "latest_release"
    peekable = True  # check() is read-only: one GET

    def __init__(
        self, cfg: LatestReleaseSourceConfig, state_dir: Path, gateway_id: str = "smp-gateway"
    ) -> None:
        super().__init__(cfg, cfg.url, state_dir)
        self.cfg = cfg
        self.gateway_id = gateway_id
        self._not_before = 0.0  # time.time() before which the server asked us not to come back

    def poll_interval(self) -> float:
        wait = self._not_before - time.time()
        return max(wait, self.cfg.poll_interval_s) if wait > 0 else self.cfg.poll_interval_s

    def retry_at(self) -> float:
        """Wall-clock time before which the server asked not to be queried (0 = none)."""
        return self._not_before

    async def check(self, device: DeviceView) -> Offer | None:
        if time.time() < self._not_before:
            log.debug("release server asked to wait; not querying for %s", device.id)
            return None
        await self.start()
        assert self._session is not None
        params = {
            "device_serial": self.cfg.device_serial.format(device=device.id, gateway=self.gateway_id),
            "hardware_version": device.hardware,
            "software_type": self.cfg.software_type,
            "current_version": device.running_version.semver() if device.running_version else "",
        }
        if device.inventory:  # a few inventory facts beside the API's own four parameters

            params = {**release_query(device.inventory), **params}
        headers = {self.cfg.key_header: self.cfg.project_key.get(), "Accept": "application/json"}
        try:
            async with self._session.get(
                f"{self.base}/api/v0/releases/latest", params=params, headers=headers
            ) as r:
                if r.status == 204:
                    return None
                if r.status in (429, 503):
                    delay = retry_after_seconds(r.headers.get("Retry-After"))
                    delay = min(
                        delay if delay is not None else self.cfg.poll_interval_s, self.cfg.max_retry_after_s
                    )
                    self._not_before = time.time() + delay
                    log.info("release server answered %d; retrying after %.0fs", r.status, delay)
                    return None
                if r.status in (401, 403):
                    raise FetchError(
                        f"release server refused the project key (HTTP {r.status})",
                        UpdateResult.CONNECTION_LOST,
                    )
                if r.status == 404:
                    log.info("release server knows no release for %s (404)", device.id)
                    return None
                if r.status != 200:
                    raise FetchError(f"release server answered HTTP {r.status}", UpdateResult.CONNECTION_LOST)
                data = await read_json(r, "release server")  # bounded in bytes
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchError(f"release server unreachable: {exc}", UpdateResult.CONNECTION_LOST) from None
        return self._offer(device, data)

    def _offer(self, device: DeviceView, data: Any) -> Offer | None:
        if not isinstance(data, dict):
            raise FetchError("release answer is not a JSON object", UpdateResult.INVALID_URI)
        art: dict[str, Any] = data
        arts = data.get("artifacts")
        if isinstance(arts, list) and arts:
            art = next((a for a in arts if isinstance(a, dict) and a.get("url")), {})
        url = art.get("url")
        if not isinstance(url, str) or not url:
            raise FetchError("release answer has no artifact URL", UpdateResult.INVALID_URI)
        sha = art.get("sha256")
        size = art.get("file_size", art.get("size"))
        vtext = data.get("version", art.get("version"))
        version = None
        if isinstance(vtext, str):
            try:
                version = Version.parse(vtext)
            except ValueError:
                version = None
        if version is not None and device.running_version is not None and version == device.running_version:
            return None
        sha_s = sha.lower() if isinstance(sha, str) else None
        return Offer(
            device_id=device.id,
            source=self.name,
            artifact_id=f"release-{sha_s}" if sha_s else f"release-{vtext}-{url}",
            version=version,
            sha256=sha_s,
            size=size if isinstance(size, int) else None,
            handle={"url": url, "version": vtext},
            report_to={"version": vtext},
        )

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        if may_be_bundle(urlsplit(offer.handle["url"]).path):  # an image set (dfu_application.zip)
            max_size = set_cap(max_size)
        return await self._downloader.fetch(
            offer.handle["url"], sha256=offer.sha256, max_size=max_size, size=offer.size
        )

    async def report(self, offer: Offer, report: Report) -> None:
        if report.finished:
            log.info(
                "release %s on %s: %s (%d) %s",
                offer.report_to.get("version"),
                offer.device_id,
                report.result.name,
                int(report.result),
                report.detail,
            )

"""A loopback Memfault-style release server: ``GET /api/v0/releases/latest``.

200 with ``{"version", "artifacts": [{"url", "file_size", "md5", "sha256"}]}``, 204 when the
device runs the latest version, 401 without the project key, 503 + Retry-After on demand.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .common import FileStore


@dataclass
class ReleaseServer:
    project_key: str = "proj-key-123"
    releases: dict[tuple[str, str], tuple[str, str]] = field(
        default_factory=dict
    )  # (hw, type) -> (ver, file)
    queries: list[dict[str, str]] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)  # Retry-After values for the next 503s
    files: FileStore = field(default_factory=lambda: FileStore(prefix="/dl"))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v0/releases/latest", self.latest)
        self.files.routes(app)
        return app

    def publish(self, hardware: str, version: str, image: bytes, software_type: str = "main") -> None:
        name = f"{hardware}-{version}.bin"
        self.files.add(name, image)
        self.releases[(hardware, software_type)] = (version, name)

    async def latest(self, request: web.Request) -> web.Response:
        if request.headers.get("Memfault-Project-Key") != self.project_key:
            return web.json_response({"error": "unauthorized"}, status=401)
        q = dict(request.query)
        self.queries.append(q)
        if self.unavailable:
            return web.Response(status=503, headers={"Retry-After": self.unavailable.pop(0)})
        rel = self.releases.get((q.get("hardware_version", ""), q.get("software_type", "")))
        if rel is None or rel[0] == q.get("current_version"):
            return web.Response(status=204)
        version, name = rel
        data = self.files.files[name]
        art: dict[str, Any] = {
            "type": "firmware",
            "url": f"{request.scheme}://{request.host}/dl/{name}",
            "file_size": len(data),
            "md5": hashlib.md5(data).hexdigest(),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        return web.json_response({"version": version, "display_name": version, "artifacts": [art]})

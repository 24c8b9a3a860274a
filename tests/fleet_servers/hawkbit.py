"""A loopback hawkBit DDI server (the controller side of ``DdiRootController``).

GatewayToken auth; ``GET /{tenant}/controller/v1/{id}`` with ``config.polling.sleep`` and
``_links`` (deploymentBase with ``?c=`` etag, cancelAction, configData when attributes are
requested); deploymentBase (404 once canceling); feedback (410 once the action is closed);
cancelAction + its feedback (closed/success → canceled, rejected → cancel rejected);
``PUT configData``; artifacts with Range support under ``/{tenant}/controller/v1/{id}/
softwaremodules/{sm}/artifacts/{file}``.

Every feedback the server accepted is in ``Action.feedback`` (``finals()``: the closing ones).
Fault knobs for the final (``execution: closed``) feedback: ``final_faults`` - an HTTP status
answers that instead of accepting it, ``"drop"`` accepts it and then drops the connection
without an answer; ``hold_final`` - a closing feedback arriving while it is set is held until
the Event is set and then lost (answered 503, not applied: a gateway killed while its feedback
was in flight); ``final_seen`` is set when a closing feedback arrives.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .common import FileStore

_ids = itertools.count(100)


@dataclass
class Action:
    id: int
    controller: str
    filename: str
    version: str
    status: str = "running"  # running | canceling | canceled | finished | error | downloaded
    feedback: list[dict[str, Any]] = field(default_factory=list)
    cancel_feedback: list[dict[str, Any]] = field(default_factory=list)
    update: str = "forced"

    def finals(self) -> list[dict[str, Any]]:
        """The closing feedbacks this server accepted (the outcome; exactly one is expected)."""
        return [f for f in self.feedback if f["status"]["execution"] == "closed"]


@dataclass
class HawkbitServer:
    tenant: str = "DEFAULT"
    gateway_token: str = "gw-secret-token"
    sleep: str = "00:00:05"
    actions: dict[int, Action] = field(default_factory=dict)
    attributes: dict[str, dict[str, str]] = field(default_factory=dict)
    request_attributes: set[str] = field(default_factory=set)
    config_puts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    unauthorized: int = 0
    files: FileStore = field(default_factory=lambda: FileStore(prefix="/artifacts"))
    final_faults: list[int | str] = field(default_factory=list)  # next closing feedbacks
    hold_final: asyncio.Event | None = None
    final_seen: asyncio.Event = field(default_factory=asyncio.Event)
    feedback_posts: int = 0  # every feedback POST that reached the server

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        b = f"/{self.tenant}/controller/v1/{{cid}}"
        app.router.add_get(b, self.base)
        app.router.add_get(b + "/deploymentBase/{aid}", self.deployment)
        app.router.add_post(b + "/deploymentBase/{aid}/feedback", self.feedback)
        app.router.add_get(b + "/cancelAction/{aid}", self.cancel_action)
        app.router.add_post(b + "/cancelAction/{aid}/feedback", self.cancel_feedback)
        app.router.add_put(b + "/configData", self.config_data)
        self.files.routes(app)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"GatewayToken {self.gateway_token}":
            self.unauthorized += 1
            return web.Response(status=401)
        resp: web.StreamResponse = await handler(request)
        return resp

    # -- management side -----------------------------------------------------------------
    def deploy(self, controller: str, image: bytes, version: str, filename: str = "app.signed.bin",
               update: str = "forced") -> Action:
        """``update``: forced | attempt (soft) | skip (download-only / outside a window)."""
        act = Action(next(_ids), controller, filename, version, update=update)
        self.files.add(f"{act.id}-{filename}", image)
        self.actions[act.id] = act
        self.request_attributes.add(controller)
        return act

    def cancel(self, act: Action) -> None:
        act.status = "canceling"

    def _active(self, controller: str) -> Action | None:
        for a in self.actions.values():
            if a.controller == controller and a.status in ("running", "canceling"):
                return a
        return None

    # -- DDI -------------------------------------------------------------------------------
    async def base(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        root = f"{request.scheme}://{request.host}/{self.tenant}/controller/v1/{cid}"
        links: dict[str, Any] = {}
        act = self._active(cid)
        if act is not None and act.status == "canceling":
            links["cancelAction"] = {"href": f"{root}/cancelAction/{act.id}"}
        elif act is not None:
            links["deploymentBase"] = {"href": f"{root}/deploymentBase/{act.id}?c=-2129030598"}
        if cid in self.request_attributes or cid not in self.attributes:
            links["configData"] = {"href": f"{root}/configData"}
        return web.json_response({"config": {"polling": {"sleep": self.sleep}}, "_links": links})

    async def deployment(self, request: web.Request) -> web.Response:
        act = self.actions.get(int(request.match_info["aid"]))
        if act is None or act.status != "running":
            return web.Response(status=404)
        data = self.files.files[f"{act.id}-{act.filename}"]
        href = f"{request.scheme}://{request.host}/artifacts/{act.id}-{act.filename}"
        return web.json_response(
            {
                "id": str(act.id),
                "deployment": {
                    "download": "forced",
                    "update": act.update,
                    "chunks": [
                        {
                            "part": "os",
                            "version": act.version,
                            "name": "zephyr-app",
                            "artifacts": [
                                {
                                    "filename": act.filename,
                                    "hashes": {
                                        "sha1": hashlib.sha1(data).hexdigest(),
                                        "md5": hashlib.md5(data).hexdigest(),
                                        "sha256": hashlib.sha256(data).hexdigest(),
                                    },
                                    "size": len(data),
                                    "_links": {"download-http": {"href": href}},
                                }
                            ],
                        }
                    ],
                },
            }
        )

    async def feedback(self, request: web.Request) -> web.Response:
        act = self.actions[int(request.match_info["aid"])]
        body = await request.json()
        self.feedback_posts += 1
        closing = body.get("status", {}).get("execution") == "closed"
        if closing:
            self.final_seen.set()
        if closing and self.hold_final is not None:
            await self.hold_final.wait()
            return web.Response(status=503)
        if act.status not in ("running", "canceling"):
            return web.Response(status=410)
        fault = self.final_faults.pop(0) if closing and self.final_faults else None
        if isinstance(fault, int):
            return web.Response(status=fault)
        status = body["status"]
        assert status["execution"] in (
            "closed",
            "proceeding",
            "canceled",
            "scheduled",
            "rejected",
            "resumed",
            "downloaded",
            "download",
        )
        assert status["result"]["finished"] in ("success", "failure", "none")
        act.feedback.append(body)
        if status["execution"] == "closed":
            act.status = "finished" if status["result"]["finished"] == "success" else "error"
        elif status["execution"] == "downloaded" and act.update == "skip":
            act.status = "downloaded"  # a download-only action ends at DOWNLOADED
        if fault == "drop":  # accepted, but the answer never leaves
            assert request.transport is not None
            request.transport.close()
        return web.Response(status=200)

    async def cancel_action(self, request: web.Request) -> web.Response:
        act = self.actions.get(int(request.match_info["aid"]))
        if act is None or act.status != "canceling":
            return web.Response(status=404)
        return web.json_response({"id": str(act.id), "cancelAction": {"stopId": str(act.id)}})

    async def cancel_feedback(self, request: web.Request) -> web.Response:
        act = self.actions[int(request.match_info["aid"])]
        body = await request.json()
        act.cancel_feedback.append(body)
        ex = body["status"]["execution"]
        if ex == "closed" and body["status"]["result"]["finished"] != "failure":
            act.status = "canceled"
        elif ex == "rejected":
            act.status = "running"  # CANCEL_REJECTED: the action goes on
        return web.Response(status=200)

    async def config_data(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        body = await request.json()
        assert isinstance(body["data"], dict) and all(isinstance(v, str) for v in body["data"].values())
        self.config_puts.append((cid, body))
        if body.get("mode", "merge") == "merge":
            self.attributes.setdefault(cid, {}).update(body["data"])
        else:
            self.attributes[cid] = dict(body["data"])
        self.request_attributes.discard(cid)
        return web.Response(status=200)

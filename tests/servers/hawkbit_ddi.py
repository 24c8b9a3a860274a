"""A hawkBit DDI conformance server, written from Eclipse hawkBit's own sources.

Independent of ``gateway/`` (nothing is imported from it) and of ``tests/fleet_servers``. What
it does, and the hawkBit source each behaviour was taken from (repo ``eclipse-hawkbit/hawkbit``):

``hawkbit-ddi/hawkbit-ddi-resource/src/main/java/org/eclipse/hawkbit/ddi/rest/resource/DdiRootController.java``
  - ``GET {tenant}/controller/v1/{cid}`` registers an unknown target (findOrRegister...);
    ``deploymentBase/{aid}``: 404 for an unknown action, another target's action, a canceling
    or canceled one, or one waiting for confirmation, else 200 (also for a closed action);
  - ``deploymentBase/{aid}/feedback``: 404 while waiting for confirmation, 410 GONE once the
    action is not active, else the status is added (``generateUpdateStatus``: closed+failure →
    ERROR, closed otherwise → FINISHED, downloaded → DOWNLOADED, download → DOWNLOAD,
    canceled → CANCELED entry, rejected → WARNING entry, anything else → RUNNING entry);
  - ``cancelAction/{aid}``: 200 ``{"id", "cancelAction": {"stopId"}}`` while canceling or
    canceled, else 404; its feedback (``generateActionCancelStatus``): closed+failure → ERROR,
    closed otherwise → CANCELED, rejected → CANCEL_REJECTED, canceled → WARNING (an error log:
    "not supported"), others → RUNNING entry;
  - ``calculateDownloadType`` (download-only or forced/time-forced-and-due → forced, else
    attempt), ``calculateUpdateType`` (download-only → skip; with a maintenance schedule:
    the download type while the window is available, else skip), ``calculateMaintenanceWindow``
    (absent without a schedule);
  - ``confirmationBase`` / ``confirmationBase/{aid}`` / its feedback (confirmed → RUNNING,
    denied → stays waiting; 410 once closed, 404 when not waiting).
``.../ddi/rest/resource/DataConversionHelper.java`` (``fromTarget``)
  - links: ``confirmationBase`` (waiting for confirmation) else ``cancelAction`` (canceling)
    else ``deploymentBase`` with ``?c=<etag>`` (the etag changes when a time-forced action hits
    its force time or its maintenance window opens); ``installedBase`` for the last finished
    action; ``configData`` while the target's attributes are requested.
``hawkbit-ddi/hawkbit-ddi-api/src/main/java/org/eclipse/hawkbit/ddi/json/model/``
  ``DdiActionFeedback`` (``status`` required), ``DdiStatus`` (``execution`` and ``result``
  required; execution one of closed, proceeding, canceled, scheduled, rejected, resumed,
  downloaded, download; ``code`` integer; ``details`` list of strings), ``DdiResult``
  (``finished`` required: success, failure, none; ``progress`` optional), ``DdiProgress``
  (``cnt`` required, ``of``), ``DdiDeployment`` (HandlingType skip/attempt/forced,
  DdiMaintenanceWindowStatus available/unavailable), ``DdiCancel``/``DdiCancelActionToStop``,
  ``DdiConfigData`` (``data`` a non-empty map of strings; ``mode`` merge/replace/remove),
  ``DdiConfirmationFeedback`` (``confirmation`` confirmed/denied). A body Jackson or the bean
  validation would refuse is answered 400.
``hawkbit-repository/hawkbit-repository-jpa/.../management/JpaControllerManagement.java``
  - ``handleDownloadedActionStatus``: DOWNLOADED closes only a DOWNLOAD_ONLY action;
    ``addCancelActionStatus``: a cancel feedback for an action that is not canceling is
    refused (CancelActionNotAllowedException → 405 in the REST exception mapping); CANCELED
    or FINISHED finish the cancellation, ERROR / CANCEL_REJECTED put it back to RUNNING;
    ``updateControllerAttributes``: keys and values at most 128 characters of
    ``[a-zA-Z0-9_\\-!@#$%^&*()+=\\[\\]{}|;:'",.<>/\\\\?\\s]`` (else 400); REPLACE/MERGE clear
    the attribute request, REMOVE does not; ``cancelAction`` → CANCELING.
``.../repository/model/Action.java``: ``isForcedOrTimeForced`` (TIMEFORCED counts as forced
  once ``forcedTime`` has passed).

Auth (``hawkbit-security``): ``Authorization: GatewayToken <tenant token>`` for any
controller, ``TargetToken <token>`` only for its own controller; otherwise 401.

The management side is plain methods (``deploy``, ``cancel``, ``open_window`` ...). Every
request is recorded (``requests``); fault knobs: ``down`` (answer every DDI request with that
status), ``final_faults`` (statuses for the next closing feedbacks; ``"drop"`` applies it and
drops the connection), and the server can be stopped and started again on its port.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

EXECUTIONS = ("closed", "proceeding", "canceled", "scheduled", "rejected", "resumed",
              "downloaded", "download")
FINISHED = ("success", "failure", "none")
ATTR_RE = re.compile(r"[a-zA-Z0-9_\-!@#$%^&*()+=\[\]{}|;:'\",.<>/\\?\s]*")
ATTR_MAX = 128
MAX_ATTRIBUTES = 100  # quota default: hawkbit.server.security.dos.maxAttributeEntriesPerTarget
MAX_MESSAGES = 50  # quota default: maxMessagesPerActionStatus

_ids = itertools.count(1000)


class BadBody(Exception):
    pass


@dataclass
class Artifact:
    filename: str
    data: bytes


@dataclass
class Module:
    """A software module: one DDI chunk."""

    id: int
    name: str
    version: str
    artifacts: list[Artifact]
    part: str = "os"
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Action:
    id: int
    controller: str
    modules: list[Module]
    action_type: str = "forced"  # forced | soft | timeforced | downloadonly
    forced_time: float | None = None  # epoch seconds (timeforced)
    maintenance: str | None = None  # None (no schedule) | available | unavailable
    # running | canceling | canceled | finished | error | downloaded | wait_for_confirmation
    status: str = "running"
    active: bool = True
    feedback: list[dict[str, Any]] = field(default_factory=list)
    cancel_feedback: list[dict[str, Any]] = field(default_factory=list)
    confirmation_feedback: list[dict[str, Any]] = field(default_factory=list)
    # (status at arrival, execution) of every accepted deploymentBase feedback
    trail: list[tuple[str, str]] = field(default_factory=list)
    links_origin: str | None = None  # artifacts linked on another origin (a CDN)
    link_scheme: str | None = None  # e.g. "http" to offer plain-http links

    def finals(self) -> list[dict[str, Any]]:
        return [f for f in self.feedback if f["status"]["execution"] == "closed"]

    def forced_now(self) -> bool:
        if self.action_type == "forced":
            return True
        return self.action_type == "timeforced" and self.forced_time is not None and \
            time.time() >= self.forced_time

    def download_type(self) -> str:
        return "forced" if self.action_type == "downloadonly" or self.forced_now() else "attempt"

    def update_type(self) -> str:
        dl = self.download_type()
        if self.action_type == "downloadonly":
            return "skip"
        if self.maintenance is not None:
            return dl if self.maintenance == "available" else "skip"
        return dl

    def etag(self) -> int:
        off = 1231 if self.action_type == "timeforced" and self.forced_now() else 1237
        if self.maintenance == "available":
            off = 1249
        return 31 * self.id + off


@dataclass
class HawkbitDDI:
    tenant: str = "DEFAULT"
    gateway_token: str = "gw-conformance-token"
    sleep: str = "00:00:01"
    target_tokens: dict[str, str] = field(default_factory=dict)
    actions: dict[int, Action] = field(default_factory=dict)
    targets: set[str] = field(default_factory=set)
    attributes: dict[str, dict[str, str]] = field(default_factory=dict)
    request_attributes: set[str] = field(default_factory=set)
    config_puts: list[tuple[str, dict[str, Any], int]] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    rejected: list[tuple[str, int, Any]] = field(default_factory=list)  # (path, status, body)
    unauthorized: int = 0
    down: int | None = None
    final_faults: list[int | str] = field(default_factory=list)
    slow_artifacts: float = 0.0  # seconds between 4 KiB pieces of an artifact
    corrupt: set[str] = field(default_factory=set)  # artifacts served with a byte flipped
    artifact_started: asyncio.Event = field(default_factory=asyncio.Event)
    on_feedback: Any = None  # callable(action, body) when a deploymentBase feedback arrives
    feedback_event: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    port: int = 0

    # -- running -------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._mw])
        b = f"/{self.tenant}/controller/v1/{{cid}}"
        app.router.add_get(b, self.base)
        app.router.add_get(b + "/deploymentBase/{aid}", self.deployment)
        app.router.add_post(b + "/deploymentBase/{aid}/feedback", self.feedback)
        app.router.add_get(b + "/cancelAction/{aid}", self.cancel_action)
        app.router.add_post(b + "/cancelAction/{aid}/feedback", self.cancel_feedback)
        app.router.add_get(b + "/installedBase/{aid}", self.installed)
        app.router.add_put(b + "/configData", self.config_data)
        app.router.add_get(b + "/confirmationBase", self.confirmation_base)
        app.router.add_get(b + "/confirmationBase/{aid}", self.confirmation_action)
        app.router.add_post(b + "/confirmationBase/{aid}/feedback", self.confirmation_feedback)
        app.router.add_get(b + "/softwaremodules/{sm}/artifacts/{file}", self.artifact)
        return app

    async def start(self) -> str:
        """Listen on loopback (the same port again after ``stop``); returns the base URL."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> HawkbitDDI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- management side -----------------------------------------------------------------
    def deploy(self, controller: str, modules: list[tuple[str, str, list[tuple[str, bytes]]]]
               | bytes, version: str = "", *, action_type: str = "forced",
               forced_time: float | None = None, maintenance: str | None = None,
               confirmation: bool = False, metadata: list[dict[str, str]] | None = None,
               filename: str = "app.signed.bin") -> Action:
        """Assign a distribution set: ``modules`` [(name, version, [(filename, bytes)])] or one
        image. ``confirmation``: the action waits for the user's confirmation first."""
        if isinstance(modules, bytes):
            modules = [("zephyr-app", version, [(filename, modules)])]
        mods = []
        for i, (name, ver, arts) in enumerate(modules):
            meta = (metadata or [{}] * len(modules))[i]
            mods.append(Module(next(_ids), name, ver, [Artifact(f, d) for f, d in arts],
                               metadata=dict(meta)))
        assert action_type in ("forced", "soft", "timeforced", "downloadonly")
        assert maintenance in (None, "available", "unavailable")
        for a in self.actions.values():  # a new assignment cancels the open one (no weight)
            if a.controller == controller and a.active and a.status != "canceling":
                a.status, a.active = "canceled", False
        act = Action(next(_ids), controller, mods, action_type, forced_time, maintenance,
                     status="wait_for_confirmation" if confirmation else "running")
        self.actions[act.id] = act
        self.targets.add(controller)
        return act

    def cancel(self, act: Action) -> None:
        """``cancelAction``: only an active action that is not canceling already."""
        assert act.active and act.status != "canceling", act.status
        act.status = "canceling"

    def open_window(self, act: Action) -> None:
        act.maintenance = "available"

    def close_window(self, act: Action) -> None:
        act.maintenance = "unavailable"

    def confirm(self, act: Action) -> None:
        """The operator confirms for the user (management API)."""
        assert act.status == "wait_for_confirmation"
        act.status = "running"

    def active(self, controller: str) -> Action | None:
        acts = [a for a in self.actions.values() if a.controller == controller and a.active]
        return min(acts, key=lambda a: a.id) if acts else None

    def installed_action(self, controller: str) -> Action | None:
        done = [a for a in self.actions.values() if a.controller == controller
                and a.status == "finished"]
        return max(done, key=lambda a: a.id) if done else None

    def auth_headers_seen(self) -> list[str]:
        return [h.get("Authorization", "") for _, _, h in self.requests]

    # -- plumbing ------------------------------------------------------------------------
    @web.middleware
    async def _mw(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs, dict(request.headers)))
        if self.down is not None:
            return web.Response(status=self.down)
        cid = request.match_info.get("cid", "")
        auth = request.headers.get("Authorization", "")
        ok = auth == f"GatewayToken {self.gateway_token}" or (
            cid in self.target_tokens and auth == f"TargetToken {self.target_tokens[cid]}")
        if not ok:
            self.unauthorized += 1
            return web.Response(status=401)
        resp: web.StreamResponse = await handler(request)
        return resp

    def _root(self, request: web.Request, cid: str) -> str:
        return f"{request.scheme}://{request.host}/{self.tenant}/controller/v1/{cid}"

    def _action(self, request: web.Request) -> Action:
        """``findActionForTarget``: 404 for an unknown target/action or another target's."""
        cid = request.match_info["cid"]
        try:
            aid = int(request.match_info["aid"])
        except ValueError:
            raise web.HTTPBadRequest() from None  # a Long path variable that is none
        act = self.actions.get(aid)
        if cid not in self.targets or act is None or act.controller != cid:
            raise web.HTTPNotFound()
        return act

    async def _json(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw)
        except ValueError:
            raise BadBody("not JSON") from None

    def _bad(self, request: web.Request, body: Any, why: str) -> web.Response:
        self.rejected.append((request.path, 400, body))
        return web.json_response({"errorCode": "hawkbit.server.error.rest.body.notReadable",
                                  "message": why}, status=400)

    # -- DDI -----------------------------------------------------------------------------
    async def base(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        if cid not in self.targets:
            self.targets.add(cid)
            self.request_attributes.add(cid)  # a new target: its attributes are requested
        root = self._root(request, cid)
        links: dict[str, Any] = {}
        act = self.active(cid)
        if act is not None:
            if act.status == "wait_for_confirmation":
                links["confirmationBase"] = {"href": f"{root}/confirmationBase/{act.id}"
                                                     f"?c={act.etag()}"}
            elif act.status in ("canceling", "canceled"):
                links["cancelAction"] = {"href": f"{root}/cancelAction/{act.id}"}
            else:
                links["deploymentBase"] = {"href": f"{root}/deploymentBase/{act.id}"
                                                   f"?c={act.etag()}"}
        inst = self.installed_action(cid)
        if inst is not None:
            links["installedBase"] = {"href": f"{root}/installedBase/{inst.id}"}
        if cid in self.request_attributes:
            links["configData"] = {"href": f"{root}/configData"}
        return web.json_response({"config": {"polling": {"sleep": self.sleep}}, "_links": links})

    def _deployment(self, request: web.Request, act: Action) -> dict[str, Any]:
        cid = act.controller
        chunks = []
        for m in act.modules:
            arts = []
            for a in m.artifacts:
                origin = act.links_origin or f"{request.scheme}://{request.host}"
                if act.link_scheme:
                    origin = act.link_scheme + "://" + origin.split("://", 1)[1]
                href = (f"{origin}/{self.tenant}/controller/v1/{cid}/softwaremodules/{m.id}/"
                        f"artifacts/{a.filename}")
                arts.append({"filename": a.filename,
                             "hashes": {"sha1": hashlib.sha1(a.data).hexdigest(),
                                        "md5": hashlib.md5(a.data).hexdigest(),
                                        "sha256": hashlib.sha256(a.data).hexdigest()},
                             "size": len(a.data),
                             "_links": {"download": {"href": href},
                                        "download-http": {"href": href},
                                        "md5sum-http": {"href": href + ".MD5SUM"}}})
            chunk: dict[str, Any] = {"part": m.part, "version": m.version, "name": m.name,
                                     "artifacts": arts}
            if m.metadata:
                chunk["metadata"] = [{"key": k, "value": v} for k, v in m.metadata.items()]
            chunks.append(chunk)
        dep: dict[str, Any] = {"download": act.download_type(), "update": act.update_type(),
                               "chunks": chunks}
        if act.maintenance is not None:
            dep["maintenanceWindow"] = act.maintenance
        return {"id": str(act.id), "deployment": dep}

    async def deployment(self, request: web.Request) -> web.Response:
        act = self._action(request)
        if act.status in ("canceling", "canceled", "wait_for_confirmation"):
            return web.Response(status=404)
        return web.json_response(self._deployment(request, act))

    async def installed(self, request: web.Request) -> web.Response:
        act = self._action(request)
        if act.active or act.status in ("canceling", "canceled"):
            return web.Response(status=404)
        return web.json_response(self._deployment(request, act))

    @staticmethod
    def _status(body: Any) -> dict[str, Any]:
        """``DdiActionFeedback`` → its ``DdiStatus``, as Jackson + bean validation read it."""
        if not isinstance(body, dict):
            raise BadBody("feedback is not an object")
        for k in ("time", "timestamp"):
            if k in body and body[k] is not None and not isinstance(body[k], (str, int)):
                raise BadBody(f"{k} has the wrong type")
        st = body.get("status")
        if not isinstance(st, dict):
            raise BadBody("status is required")
        if st.get("execution") not in EXECUTIONS:
            raise BadBody(f"execution {st.get('execution')!r} is not an ExecutionStatus")
        res = st.get("result")
        if not isinstance(res, dict):
            raise BadBody("result is required")
        if res.get("finished") not in FINISHED:
            raise BadBody(f"finished {res.get('finished')!r} is not a FinalResult")
        prog = res.get("progress")
        if prog is not None:
            if not isinstance(prog, dict) or not _is_int(prog.get("cnt")):
                raise BadBody("progress.cnt is required (integer)")
            if prog.get("of") is not None and not _is_int(prog.get("of")):
                raise BadBody("progress.of is not an integer")
        if st.get("code") is not None and not _is_int(st.get("code")):
            raise BadBody("code is not an integer")
        det = st.get("details")
        if det is not None:
            if not isinstance(det, list) or not all(isinstance(d, str) for d in det):
                raise BadBody("details is not a list of strings")
            if len(det) > MAX_MESSAGES:
                raise BadBody("too many details")
        return st

    async def feedback(self, request: web.Request) -> web.Response:
        act = self._action(request)
        try:
            body = await self._json(request)
            st = self._status(body)
        except BadBody as exc:
            return self._bad(request, None, str(exc))
        closing = st["execution"] == "closed"
        if act.status == "wait_for_confirmation":
            return web.Response(status=404)
        if not act.active:
            return web.Response(status=410)
        fault = self.final_faults.pop(0) if closing and self.final_faults else None
        if isinstance(fault, int):
            return web.Response(status=fault)
        act.feedback.append(body)
        act.trail.append((act.status, st["execution"]))
        if self.on_feedback is not None:
            self.on_feedback(act, body)
        ex, fin = st["execution"], st["result"]["finished"]
        if ex == "closed":
            act.active = False
            act.status = "error" if fin == "failure" else "finished"
            if fin != "failure":
                self.request_attributes.add(act.controller)
        elif ex == "downloaded" and act.action_type == "downloadonly":
            act.active = False
            act.status = "downloaded"
            self.request_attributes.add(act.controller)
        # anything else is an information entry (RUNNING, DOWNLOAD, DOWNLOADED of an action
        # that is not download-only, WARNING...): the action stays as it is (canceling too)
        self.feedback_event.set()
        if fault == "drop":
            assert request.transport is not None
            request.transport.close()
        return web.Response(status=200)

    async def cancel_action(self, request: web.Request) -> web.Response:
        act = self._action(request)
        if act.status not in ("canceling", "canceled"):
            return web.Response(status=404)
        return web.json_response({"id": str(act.id), "cancelAction": {"stopId": str(act.id)}})

    async def cancel_feedback(self, request: web.Request) -> web.Response:
        act = self._action(request)
        try:
            body = await self._json(request)
            st = self._status(body)
        except BadBody as exc:
            return self._bad(request, None, str(exc))
        if act.status not in ("canceling", "canceled"):
            return web.Response(status=405)  # CancelActionNotAllowedException
        act.cancel_feedback.append(body)
        ex, fin = st["execution"], st["result"]["finished"]
        if ex == "closed" and fin != "failure":
            act.status, act.active = "canceled", False
        elif (ex == "closed" and fin == "failure") or ex == "rejected":
            act.status = "running"  # ERROR / CANCEL_REJECTED: back to running
        self.feedback_event.set()
        return web.Response(status=200)

    async def config_data(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        try:
            body = await self._json(request)
            if not isinstance(body, dict):
                raise BadBody("not an object")
            data = body.get("data")
            if not isinstance(data, dict) or not data:
                raise BadBody("data must be a non-empty map")
            if not all(isinstance(v, str) or v is None for v in data.values()):
                raise BadBody("data values must be strings")
            mode = body.get("mode")
            if mode is not None and mode not in ("merge", "replace", "remove"):
                raise BadBody(f"mode {mode!r} is not an UpdateMode")
        except BadBody as exc:
            self.config_puts.append((cid, {}, 400))
            return self._bad(request, None, str(exc))
        for k, v in data.items():
            if len(k) > ATTR_MAX or not ATTR_RE.fullmatch(k) or (
                    v is not None and (len(v) > ATTR_MAX or not ATTR_RE.fullmatch(v))):
                self.config_puts.append((cid, body, 400))
                self.rejected.append((request.path, 400, {k: v}))
                return web.json_response({"errorCode": "hawkbit.server.error.target.attributes"
                                          ".invalid", "message": f"invalid attribute {k!r}"},
                                         status=400)
        if cid not in self.targets:
            return web.Response(status=404)
        attrs = dict(self.attributes.get(cid, {}))
        mode = mode or "merge"
        if mode == "remove":
            for k in data:
                attrs.pop(k, None)
        else:
            if mode == "replace":
                attrs.clear()
            for k, v in data.items():
                if v is None:
                    attrs.pop(k, None)
                else:
                    attrs[k] = v
        if len(attrs) > MAX_ATTRIBUTES:
            self.config_puts.append((cid, body, 403))
            return web.Response(status=403)  # QuotaExceededException
        self.attributes[cid] = attrs
        if mode != "remove":
            self.request_attributes.discard(cid)
        self.config_puts.append((cid, body, 200))
        return web.Response(status=200)

    async def confirmation_base(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        self.targets.add(cid)
        root = self._root(request, cid)
        links: dict[str, Any] = {"activateAutoConfirm": {"href": f"{root}/confirmationBase/"
                                                                 "activateAutoConfirm"}}
        act = self.active(cid)
        if act is not None and act.status == "wait_for_confirmation":
            links["confirmationBase"] = {"href": f"{root}/confirmationBase/{act.id}"
                                                 f"?c={act.etag()}"}
        return web.json_response({"autoConfirm": {"active": False}, "_links": links})

    async def confirmation_action(self, request: web.Request) -> web.Response:
        act = self._action(request)
        if act.status != "wait_for_confirmation":
            return web.Response(status=404)
        return web.json_response(self._deployment(request, act))

    async def confirmation_feedback(self, request: web.Request) -> web.Response:
        act = self._action(request)
        try:
            body = await self._json(request)
            if not isinstance(body, dict) or body.get("confirmation") not in ("confirmed",
                                                                              "denied"):
                raise BadBody("confirmation must be confirmed or denied")
            if body.get("code") is not None and not _is_int(body.get("code")):
                raise BadBody("code is not an integer")
        except BadBody as exc:
            return self._bad(request, None, str(exc))
        if not act.active:
            return web.Response(status=410)
        if act.status != "wait_for_confirmation":
            return web.Response(status=404)
        act.confirmation_feedback.append(body)
        if body["confirmation"] == "confirmed":
            act.status = "running"
        return web.Response(status=200)

    async def artifact(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["cid"]
        try:
            sm = int(request.match_info["sm"])
        except ValueError:
            return web.Response(status=400)
        name = request.match_info["file"]
        art = next((a for act in self.actions.values() if act.controller == cid
                    for m in act.modules if m.id == sm for a in m.artifacts
                    if a.filename == name), None)
        if art is None:
            return web.Response(status=404)
        self.artifact_started.set()
        data = art.data
        if name in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return await serve_bytes(request, data, self.slow_artifacts)


def _is_int(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (
        isinstance(v, str) and v.lstrip("-").isdigit())


async def serve_bytes(request: web.Request, data: bytes, slow: float = 0.0) -> web.StreamResponse:
    """An artifact with Range support (``FileStreamingUtil``: 206 / 416), optionally slow."""
    start, status = 0, 200
    etag = '"' + hashlib.sha1(data).hexdigest() + '"'
    rng = request.headers.get("Range")
    if rng and request.headers.get("If-Range") in (None, etag):
        start = int(rng.removeprefix("bytes=").split("-")[0] or 0)
        if start >= len(data):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        status = 206
    body = data[start:]
    headers = {"Content-Length": str(len(body)), "Accept-Ranges": "bytes", "ETag": etag}
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
    resp = web.StreamResponse(status=status, headers=headers)
    await resp.prepare(request)
    step = 4096 if slow else len(body) or 1
    for i in range(0, len(body), step):
        await resp.write(body[i:i + step])
        if slow:
            await asyncio.sleep(slow)
    await resp.write_eof()
    return resp


@dataclass
class Cdn:
    """Another origin serving artifacts (a CDN / object store); records every request."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    redirect_to: str | None = None  # answer 302 to this origin instead
    _runner: web.AppRunner | None = None
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, dict(request.headers)))
        if self.redirect_to is not None:
            raise web.HTTPFound(self.redirect_to + request.path)
        data = next((d for n, d in self.files.items() if request.path.endswith("/" + n)), None)
        if data is None:
            return web.Response(status=404)
        return await serve_bytes(request, data)

    async def __aenter__(self) -> Cdn:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

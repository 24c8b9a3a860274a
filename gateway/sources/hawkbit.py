"""Eclipse hawkBit DDI fleet source: one gateway token, one controller per MCU.

Owns the DDI conversation for each device, as hawkBit's ``DdiRootController`` /
``DataConversionHelper`` and the ``ddi.json.model`` classes implement it:

- ``GET /{tenant}/controller/v1/{controllerId}`` with ``Authorization: GatewayToken <t>`` →
  ``config.polling.sleep`` ("HH:MM:SS") and ``_links``: ``deploymentBase`` (an open action),
  ``cancelAction`` (the action is being canceled), ``configData`` (the server wants the
  controller attributes), ``installedBase``.
- ``GET deploymentBase/{actionId}?c=..`` → ``{"id", "deployment": {"download", "update",
  "maintenanceWindow", "chunks": [{"part", "version", "name", "artifacts": [{"filename",
  "hashes": {"sha1", "md5", "sha256"}, "size", "_links": {"download", "download-http"}}]}]}}``;
  404 once the action is canceled. ``update: "skip"`` (download-only, or outside the
  maintenance window) is not installed.
- ``POST deploymentBase/{actionId}/feedback`` ``{"status": {"execution": "proceeding"|"closed",
  "result": {"finished": "none"|"success"|"failure", "progress": {"cnt", "of"}}, "code",
  "details": [..]}}``; 410 Gone once the action is no longer active.
- ``GET cancelAction/{actionId}`` → ``{"id", "cancelAction": {"stopId"}}``; answer on
  ``cancelAction/{actionId}/feedback``: ``execution: closed`` + ``finished: success`` confirms
  (hawkBit marks the action CANCELED; ``execution: canceled`` there is only a WARNING),
  ``execution: rejected`` refuses (CANCEL_REJECTED). The source only reports a cancel
  (``ServerCanceled`` from ``check``/``fetch``, ``canceled`` while the engine runs): the gateway
  journals it, takes back what its journal says reached the device (a staged slot-1 image is
  erased) and then confirms - or rejects when it is too late (confirmed) - through
  ``acknowledge_cancel``; the same after a restart.
- ``PUT configData`` ``{"mode": "merge", "data": {..}}`` with hardware type, running version
  and image hash: sent when the server asks (``configData`` link) or the values changed.

Action types (``DdiRootController.calculateUpdateType``): ``update: skip`` without a
``maintenanceWindow`` is a download-only action, which hawkBit closes on ``downloaded``; ``skip``
with ``maintenanceWindow: unavailable`` is an action staged outside its maintenance window: it
stays open after ``downloaded`` and is installed (its ``update`` type: forced/attempt) once the
window is ``available``. While it is not, the staged action is not offered again, and
``install_gate`` keeps the engine from marking/resetting (the window may close mid-update).
``downloaded`` is posted only once the device holds the image (hash read back), never when the
gateway's own download finished (that is a ``proceeding``). A cancel is watched for during the
artifact download too, and checked once more before anything is pushed to the device.

Every answer is read bounded in bytes (``_http.MAX_ANSWER_BYTES``); any unusable shape of the
server's data (wrong types, nesting too deep, a link with user:password@) is the server's error
(``FetchError``), never the device's. A maintenance window not read since a restart counts as
closed (``install_gate`` holds until the deployment is read again).

Credentials go only to the configured server origin (scheme, host, port): a ``_links`` href to
another origin is not followed; an artifact on another origin is downloaded only when that
origin is in ``download_hosts``, and then without the token; otherwise the action fails.

Report handle (``Offer.report_to``): ``{"controller", "action_id", "feedback_url",
"maintenance_window"}`` - enough to
post the action's feedback from another process after a restart. A feedback that does not get
a 200 raises ``ReportNotDelivered``; 410 Gone (the action is no longer active: an earlier
delivery of this final report whose answer was lost, or a cancel) and 404 raise
``ReportRefused`` - retrying cannot deliver it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from gateway.artifacts.bundle import BundleEntry, may_be_bundle, set_cap, write_bundle
from gateway.inventory import hawkbit_attributes
from gateway.mcuboot import Version
from gateway.sources._http import HttpSource, parse_json, read_body
from gateway.sources.base import (
    DeviceView,
    FetchError,
    Offer,
    Report,
    ReportNotDelivered,
    ReportRefused,
    ServerCanceled,
    UpdateResult,
    UpdateState,
    peeking,
)
from gateway.sources.settings import HawkbitSourceConfig

log = logging.getLogger(__name__)

UNKNOWN = "unknown"  # a maintenance window not (yet) read: treated as closed
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # an action id as the gateway takes it from the server
_ATTR_BAD = re.compile(r"[^a-zA-Z0-9_\-!@#$%^&*()+=\[\]{}|;:'\",.<>/\\?\s]")


def parse_sleep(text: str) -> float:
    """hawkBit's ``polling.sleep`` ("HH:MM:SS") in seconds."""
    parts = text.strip().split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not HH:MM:SS: {text!r}")
    h, m, s = (int(p) for p in parts)
    return float(h * 3600 + m * 60 + s)


@dataclass
class _Action:
    controller: str
    action_id: str
    feedback_url: str
    started_upload: bool = False
    pushing: bool = False  # this attempt reported UPDATING: the engine runs
    closed: bool = False
    staged: bool = False  # downloaded (staged) outside hawkBit's maintenance window
    # hawkBit's maintenanceWindow as last read: None (the action has none), "available",
    # "unavailable", or UNKNOWN (it has one, not read yet, e.g. rebuilt after a restart, or
    # unreadable): install_gate holds on anything but None / "available" - fail safe
    window: str | None = None
    last_cnt: int = -100
    last_progress_at: float = 0.0
    last_sig: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class HawkbitSource(HttpSource):
    server_label = "hawkBit server"
    name = "hawkbit"
    peekable = True  # peek: controller base and deployment read; no configData, no feedback

    def __init__(self, cfg: HawkbitSourceConfig, state_dir: Path, gateway_id: str = "smp-gateway") -> None:
        super().__init__(cfg, cfg.url, state_dir)
        self.cfg = cfg
        self.gateway_id = gateway_id
        self._sleep: float = cfg.poll_interval_s
        self._attrs_sent: dict[str, dict[str, str]] = {}
        self._actions: dict[tuple[str, str], _Action] = {}
        self._canceled: set[tuple[str, str]] = set()
        self._origin = _origin(self.base)
        self._download_origins = {_origin(h if "://" in h else "https://" + h)
                                  for h in cfg.download_hosts}

    def poll_interval(self) -> float:
        return max(self.cfg.min_poll_interval_s, self._sleep)

    def controller_id(self, device: DeviceView) -> str:
        return self.cfg.controller_id.format(
            device=device.id, gateway=self.gateway_id, hardware=device.hardware, group=device.group or ""
        )

    def controller_url(self, controller: str) -> str:
        return f"{self.base}/{self.cfg.tenant}/controller/v1/{controller}"

    def _headers(self) -> dict[str, str]:
        return {
            "Authorization": f"GatewayToken {self.cfg.gateway_token.get()}",
            "Accept": "application/hal+json, application/json",
        }

    async def _request(self, method: str, url: str, json_body: Any = None) -> tuple[int, Any]:
        if _origin(url) != self._origin:  # (c): the token goes only where the config says
            raise FetchError(f"hawkBit link {url} is not on the configured server {self.base}: "
                             "not followed (the gateway token is sent only there)",
                             UpdateResult.INVALID_URI)
        if _userinfo(url):
            raise FetchError(f"hawkBit link with credentials in it ({_origin(url)[1]}): not "
                             "followed", UpdateResult.CONNECTION_LOST)
        if peeking() and method != "GET":  # run --dry-run: nothing that changes the server
            raise FetchError(f"hawkBit {method} {url}: not sent in a read-only check",
                             UpdateResult.CONNECTION_LOST)
        await self.start()
        assert self._session is not None
        try:
            async with self._session.request(method, url, json=json_body, headers=self._headers()) as r:
                data = None
                if r.status == 200 and r.content_length != 0:
                    # bounded in bytes (read_body: FetchError past MAX_ANSWER_BYTES); an
                    # unreadable body is None, which every caller treats as the server's error
                    raw = await read_body(r, f"hawkBit {method} {url}")
                    with contextlib.suppress(FetchError):
                        data = parse_json(raw, "hawkBit") if raw.strip() else None
                return r.status, data
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: a bad URL
            raise FetchError(
                f"hawkBit request {method} {url} failed: {exc}", UpdateResult.CONNECTION_LOST
            ) from None

    def attributes(self, device: DeviceView) -> dict[str, str]:
        attrs = {
            "hw_type": device.hardware,
            "sw_version": device.running_version.semver() if device.running_version else "",
            "image_hash": device.running_hash.hex() if device.running_hash else "",
            "gateway": self.gateway_id,
            "device_id": device.id,
        }
        if device.inventory:  # slots, bootloader mode, params, last outcome (gateway.inventory)

            attrs.update(hawkbit_attributes(device.inventory))
        attrs.update(self.cfg.attributes)
        # hawkBit refuses the whole PUT (400) for one key or value outside its character set
        # or longer than 128 (JpaControllerManagement.isAttributeEntryValid)
        return {_ATTR_BAD.sub("?", k)[:128]: _ATTR_BAD.sub("?", v)[:128] for k, v in attrs.items()}

    async def check(self, device: DeviceView) -> Offer | None:
        controller = self.controller_id(device)
        status, base = await self._request("GET", self.controller_url(controller))
        if status in (401, 403):
            exc = FetchError(f"hawkBit refused the gateway token (HTTP {status})",
                             UpdateResult.CONNECTION_LOST)
            exc.hint = ("authentication error: check source.gateway_token in the config (the "  # type: ignore[attr-defined]
                        f"tenant's gateway security token of {self.base}, tenant {self.cfg.tenant})")
            raise exc
        if status != 200 or not isinstance(base, dict):
            raise FetchError(f"hawkBit controller base answered HTTP {status}", UpdateResult.CONNECTION_LOST)
        sleep = _obj(_obj(base.get("config")).get("polling")).get("sleep")
        if isinstance(sleep, str):
            try:
                self._sleep = parse_sleep(sleep)
            except ValueError:
                log.warning("hawkBit sent an unreadable polling.sleep %r", sleep)
        links = _obj(base.get("_links"))

        attrs = self.attributes(device)
        if not peeking() and ("configData" in links or self._attrs_sent.get(controller) != attrs):
            href = _href(links.get("configData")) or f"{self.controller_url(controller)}/configData"
            st, _ = await self._request("PUT", href, {"mode": "merge", "data": attrs})
            if st in (200, 201, 204):
                self._attrs_sent[controller] = attrs
                log.debug("hawkBit attributes of %s sent", controller)
            else:
                log.warning("hawkBit configData for %s answered HTTP %d", controller, st)

        cancel = _href(links.get("cancelAction"))
        if cancel:  # reported, not decided here: the gateway journals and takes it back
            raise await self._server_canceled(device, controller, cancel)

        deployment = _href(links.get("deploymentBase"))
        if not deployment:
            if _href(links.get("confirmationBase")):
                log.info("hawkBit action for %s waits for the user's confirmation in hawkBit; "
                         "nothing is installed until it is confirmed there", controller)
            return None
        st, dep = await self._request("GET", deployment)
        if st == 404:
            return None  # canceled meanwhile
        if st != 200 or not isinstance(dep, dict):
            raise FetchError(f"hawkBit deploymentBase answered HTTP {st}", UpdateResult.CONNECTION_LOST)
        action_id = str(dep.get("id"))
        if not _ID.fullmatch(action_id):  # it goes into the feedback URL: plain ids only
            raise FetchError("hawkBit deploymentBase names no usable action id",
                             UpdateResult.CONNECTION_LOST)
        if (controller, action_id) in self._canceled:
            return None
        act = self._actions.get((controller, action_id))
        if act is not None and act.closed:
            return None
        body = _obj(dep.get("deployment"))
        # action types: forced (download/update forced), soft (attempt), download-only and an
        # action outside hawkBit's maintenance window (update skip): staged only, installed
        # when the server switches update to attempt/forced
        install = {"skip": "download-only", "attempt": "soft"}.get(str(body.get("update")), "forced")
        window = body.get("maintenanceWindow")
        window = window if window in ("available", "unavailable") else None
        if act is not None:
            act.window = window
        if install == "download-only" and body.get("download") == "skip":
            return None
        if install == "download-only" and act is not None and act.staged:
            log.info("hawkBit action %s for %s: staged; waits for hawkBit's maintenance window",
                     action_id, controller)
            return None
        if install == "download-only":
            log.info("hawkBit action %s for %s: update=skip (%s): download and stage only",
                     action_id, controller, "outside hawkBit's maintenance window"
                     if body.get("maintenanceWindow") == "unavailable" else "download-only")
        picked = self._pick(_list(body.get("chunks")))
        if picked is None and peeking():
            raise FetchError(f"hawkBit action {action_id}: no artifact matches "
                             f"{self.cfg.artifact_pattern or '(any)'} (a pass closes the action as "
                             "failed)", UpdateResult.UNSUPPORTED_PACKAGE)
        if picked is None:
            try:  # the next poll offers the action again if this does not get through
                await self._feedback(
                    _Action(controller, action_id, self._feedback_url(controller, action_id)),
                    "closed",
                    "failure",
                    [
                        f"LwM2M result {int(UpdateResult.UNSUPPORTED_PACKAGE)} (UNSUPPORTED_PACKAGE): "
                        "no artifact matches " + (self.cfg.artifact_pattern or "(any)")
                    ],
                    code=int(UpdateResult.UNSUPPORTED_PACKAGE),
                )
            except ReportNotDelivered as exc:
                log.warning("hawkBit action %s of %s: %s", action_id, controller, exc)
            return None
        chunk, art = picked
        links_a = _obj(art.get("_links"))
        url = _href(links_a.get("download")) or _href(links_a.get("download-http"))
        if not url:
            return None
        sha = _obj(art.get("hashes")).get("sha256")
        version = None
        if isinstance(chunk.get("version"), str):
            try:
                version = Version.parse(chunk["version"])
            except ValueError:
                version = None
        if act is None:
            act = _Action(controller, action_id, self._feedback_url(controller, action_id))
            self._actions[(controller, action_id)] = act
        act.window, act.pushing, act.staged = window, False, False
        act.extra = {"url": url, "filename": art.get("filename")}
        # hawkBit closes only a DOWNLOAD_ONLY action on `downloaded` (handleDownloadedActionStatus)
        # "maintenance_window": a restarted gateway knows the action has one (and reads it
        # before any reset: install_gate holds until then)
        report_to = {"controller": controller, "action_id": action_id,
                     "feedback_url": act.feedback_url,
                     "closes_on_downloaded": install == "download-only" and window is None,
                     "maintenance_window": window is not None}
        parts = _image_parts(_list(body.get("chunks")), self.cfg.artifact_pattern)
        if len(parts) > 1:  # a distribution set of several modules, one per MCUboot image
            act.extra["parts"] = parts
            set_id = hashlib.sha256("".join(p["sha256"] or p["url"] for p in parts)
                                    .encode()).hexdigest()
            return Offer(device_id=device.id, source=self.name,
                         artifact_id=f"hawkbit-set-{set_id}", version=version, handle=act,
                         report_to=report_to, install=install)
        return Offer(
            device_id=device.id,
            source=self.name,
            artifact_id=f"hawkbit-{sha.lower()}"
            if isinstance(sha, str)
            else f"hawkbit-{action_id}-{art.get('filename')}",
            version=version,
            sha256=sha.lower() if isinstance(sha, str) else None,
            size=art.get("size") if isinstance(art.get("size"), int) else None,
            handle=act,
            report_to=report_to,
            install=install,
        )

    def _pick(self, chunks: list[Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
        for chunk in chunks:
            if not isinstance(chunk, dict):
                continue
            for art in _list(chunk.get("artifacts")):
                if not isinstance(art, dict):
                    continue
                name = str(art.get("filename", ""))
                if self.cfg.artifact_pattern is None or fnmatch.fnmatch(name, self.cfg.artifact_pattern):
                    return chunk, art
        return None

    def _feedback_url(self, controller: str, action_id: str) -> str:
        return f"{self.controller_url(controller)}/deploymentBase/{action_id}/feedback"

    async def _server_canceled(self, device: DeviceView, controller: str,
                               href: str) -> ServerCanceled:
        """The action hawkBit cancels (``cancelAction``), as a ServerCanceled for the gateway
        to journal and act on - whether it is confirmed (closed) or rejected rests on what the
        gateway's journal says reached the device, never on this process's memory."""
        st, data = await self._request("GET", href)
        if st != 200 or not isinstance(data, dict):
            raise FetchError(f"hawkBit cancelAction answered HTTP {st}", UpdateResult.CONNECTION_LOST)
        action_id, feedback = self._cancel_ids(controller, data)
        act = self._actions.get((controller, action_id))
        if act is None:
            act = self._actions[(controller, action_id)] = _Action(
                controller, action_id, self._feedback_url(controller, action_id))
        act.extra["cancel_feedback"] = feedback
        log.info("hawkBit cancels action %s of %s", action_id, controller)
        offer = Offer(device_id=device.id, source=self.name,
                      artifact_id=f"hawkbit-action-{action_id}",
                      report_to={"controller": controller, "action_id": action_id,
                                 "feedback_url": act.feedback_url})
        return ServerCanceled(f"hawkBit canceled action {action_id}", offer,
                              {"controller": controller, "action_id": action_id})

    def _cancel_ids(self, controller: str, data: dict[str, Any]) -> tuple[str, str]:
        """(the canceled action's id, the cancel's feedback URL) of a cancelAction answer; the
        ids are the server's data: only plain ids are taken (FetchError otherwise)."""
        stop = _obj(data.get("cancelAction")).get("stopId")
        cid = data.get("id")
        action_id = stop if stop is not None else cid
        if not all(isinstance(x, str | int) and not isinstance(x, bool)
                   and _ID.fullmatch(str(x)) for x in (action_id, cid)):
            raise FetchError("hawkBit cancelAction names no usable action id",
                             UpdateResult.CONNECTION_LOST)
        return str(action_id), f"{self.controller_url(controller)}/cancelAction/{cid}/feedback"

    async def canceled(self, offer: Offer) -> str | None:
        """The controller base shows ``cancelAction`` for this action: hawkBit canceled it.
        Else the action's maintenance window is refreshed (for ``install_gate``)."""
        act = self._action_for(offer)
        return await self._cancel_for(act, refresh_window=True)

    async def _cancel_for(self, act: _Action, refresh_window: bool = False) -> str | None:
        try:
            return await self._cancel_for_unchecked(act, refresh_window)
        except (TypeError, AttributeError, ValueError, KeyError, RecursionError) as exc:
            # whatever shape the server's data has, it is the server's problem (FetchError)
            raise FetchError(f"hawkBit answered unusable data: {type(exc).__name__}: {exc}",
                             UpdateResult.CONNECTION_LOST) from None

    async def _cancel_for_unchecked(self, act: _Action, refresh_window: bool) -> str | None:
        st, base = await self._request("GET", self.controller_url(act.controller))
        if st != 200 or not isinstance(base, dict):
            return None
        links = _obj(base.get("_links"))
        href = _href(links.get("cancelAction"))
        if not href:
            dep = _href(links.get("deploymentBase"))
            if refresh_window and dep and act.window is not None:
                st, data = await self._request("GET", dep)
                if st == 200 and isinstance(data, dict) and str(data.get("id")) == act.action_id:
                    dep_body = data.get("deployment")
                    w = dep_body.get("maintenanceWindow") if isinstance(dep_body, dict) else None
                    w = w if w in ("available", "unavailable") else UNKNOWN  # unreadable: closed
                    if w != act.window:
                        log.info("hawkBit action %s of %s: maintenance window %s", act.action_id,
                                 act.controller, w)
                    act.window = w
            return None
        st, data = await self._request("GET", href)
        if st != 200 or not isinstance(data, dict):
            return None
        stop, feedback = self._cancel_ids(act.controller, data)
        if stop != act.action_id:
            return None
        act.extra["cancel_feedback"] = feedback
        return f"hawkBit canceled action {act.action_id}"

    def install_gate(self, offer: Offer) -> Callable[[], str | None]:
        """For the engine's reset gate: why not to mark/reset now (hawkBit's maintenance window
        of this action is closed), else None. Server metadata only ever withholds a reset here,
        never allows one (that rests on the gateway's own config, (c))."""
        act = self._action_for(offer)

        def gate() -> str | None:
            if act.window == UNKNOWN:  # rebuilt after a restart and not read since: closed
                return (f"hawkBit's maintenance window of action {act.action_id} could not be "
                        "read (it is read again before the next attempt)")
            if act.window not in (None, "available"):
                return f"hawkBit's maintenance window of action {act.action_id} is not open"
            return None
        return gate

    async def acknowledge_cancel(self, offer: Offer, done: bool, detail: str) -> None:
        """closed + success confirms (hawkBit: CANCELED); rejected refuses (too late)."""
        act = self._action_for(offer)
        url = act.extra.get("cancel_feedback")
        if not url:
            return
        if done:
            status = {"execution": "closed", "result": {"finished": "success"}, "details": [detail]}
            self._canceled.add((act.controller, act.action_id))
            act.closed = True
        else:
            status = {"execution": "rejected", "result": {"finished": "none"}, "details": [detail]}
        st, _ = await self._request("POST", url, {"status": status})
        if st >= 500 or st in (401, 403, 429):
            # not taken: the caller keeps the acknowledgement journalled and sends it again
            raise ReportNotDelivered(f"hawkBit cancel feedback for action {act.action_id} "
                                     f"answered HTTP {st}")
        if st != 200:  # 4xx: hawkBit will never take it (action closed or unknown) - final
            log.warning("hawkBit cancel feedback for action %s answered HTTP %d", act.action_id, st)

    def _download_headers(self, url: str) -> dict[str, str]:
        """The headers for an artifact URL: the token only on the server's own origin; another
        origin only when ``download_hosts`` allows it, without the token (c)."""
        if _userinfo(url):
            raise FetchError("artifact link with credentials in it: not downloaded",
                             UpdateResult.INVALID_URI)
        if _origin(url) == self._origin:
            return {"Authorization": self._headers()["Authorization"]}
        if _origin(url) in self._download_origins:
            return {}
        o = _origin(url)
        raise FetchError(f"artifact link {url} is on {o[0]}://{o[1]}:{o[2]}, neither the hawkBit "
                         f"server ({self.base}) nor in source.download_hosts: not downloaded",
                         UpdateResult.INVALID_URI)

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        """The artifact(s), while watching for a cancel of the action (polled like the
        controller base); once more after the download, so nothing is pushed for an action
        hawkBit is canceling. A cancel seen here is confirmed (nothing reached the device)."""
        act: _Action = offer.handle
        if (act.controller, act.action_id) in self._canceled:
            raise FetchError(f"hawkBit action {act.action_id} was canceled", UpdateResult.UPDATE_FAILED)
        for p in act.extra.get("parts") or [{"url": act.extra["url"]}]:
            self._download_headers(p["url"])  # every link checked before anything is fetched
        dl = asyncio.ensure_future(self._fetch(act, offer, max_size))
        watch = asyncio.ensure_future(self._watch_cancel(act))
        try:
            await asyncio.wait({dl, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            dl.cancel()
            watch.cancel()
            raise
        why: str | None = None
        if dl.done():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch
            path = dl.result()
            with contextlib.suppress(FetchError, ReportNotDelivered):
                why = await self._cancel_for(act)
            if why is None:
                return path
        else:  # the watch ended first: a cancel - never a download left running behind it
            dl.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await dl
            try:
                why = watch.result()
            except Exception as exc:  # (it does not fail; if it did, it is the server's)
                raise FetchError(f"hawkBit cancel check of action {act.action_id} failed: "
                                 f"{type(exc).__name__}: {exc}", UpdateResult.CONNECTION_LOST) from None
        # reported, not confirmed here: the gateway journals it and answers it (ServerCanceled)
        raise ServerCanceled(f"{why} during the artifact download", Offer(
            device_id=offer.device_id, source=self.name, artifact_id=offer.artifact_id,
            report_to=dict(offer.report_to)),
            {"controller": act.controller, "action_id": act.action_id})

    async def _watch_cancel(self, act: _Action) -> str:
        period = min(30.0, max(0.5, self.poll_interval()))
        while True:
            await asyncio.sleep(period)
            try:
                why = await self._cancel_for(act)
            except Exception as exc:  # a server hiccup (or garbage) is not a cancel
                log.debug("hawkBit cancel check for action %s failed: %s", act.action_id, exc)
                continue
            if why:
                return why

    async def _fetch(self, act: _Action, offer: Offer, max_size: int | None) -> Path:
        url = act.extra["url"]
        if act.extra.get("parts"):
            return await self._fetch_parts(act, max_size)
        if may_be_bundle(act.extra.get("filename")):  # an image set (dfu_application.zip)
            max_size = set_cap(max_size)
        return await self._downloader.fetch(
            url, sha256=offer.sha256, max_size=max_size, size=offer.size,
            headers=self._download_headers(url)
        )

    async def _fetch_parts(self, act: _Action, max_size: int | None) -> Path:
        """Every module's artifact (checked against its sha256), as one image-set artifact;
        each with the headers of its own origin."""
        entries = []
        first: Path | None = None
        for p in act.extra["parts"]:
            path = await self._downloader.fetch(p["url"], sha256=p["sha256"], max_size=max_size,
                                                size=p["size"],
                                                headers=self._download_headers(p["url"]))
            first = first or path
            entries.append(BundleEntry(p["filename"] or f"image{p['image']}.bin",
                                       path.read_bytes(), p["image"], None))
        assert first is not None
        out = first.parent / f"hawkbit-{act.action_id}-set.zip"
        out.write_bytes(write_bundle(entries, name=f"hawkBit action {act.action_id}"))
        return out

    def _action_for(self, offer: Offer) -> _Action:
        """The action of ``offer`` from its report handle (also after a restart)."""
        rt = offer.report_to
        try:
            controller, action_id = str(rt["controller"]), str(rt["action_id"])
            url = str(rt.get("feedback_url") or self._feedback_url(controller, action_id))
        except KeyError as exc:
            raise ReportRefused(f"hawkBit report handle of {offer.device_id} lacks {exc}") from None
        act = self._actions.get((controller, action_id))
        if act is None:
            # not this process's offer (a restart): whether the action has a maintenance window
            # is in the handle (absent: an older handle - assume it has one); its state is not
            # known until the deployment is read again (report/canceled do): closed until then
            windowed = rt.get("maintenance_window") is not False
            act = self._actions[(controller, action_id)] = _Action(
                controller, action_id, url, window=UNKNOWN if windowed else None)
        return act

    async def report(self, offer: Offer, report: Report) -> None:
        act = self._action_for(offer)
        if act.closed:
            if report.finished:
                if (act.controller, act.action_id) in self._canceled:
                    log.info("hawkBit action %s of %s: closed by its cancel's feedback; not "
                             "reported again (%s)", act.action_id, act.controller, report.detail)
                    return
                raise ReportRefused(f"hawkBit action {act.action_id} of {act.controller} is already "
                                    "closed (canceled, or its final feedback was sent)")
            return
        if report.state == UpdateState.UPDATING or (report.progress is not None and report.progress > 0):
            act.started_upload = True
            if (not act.pushing or report.progress == 0.0) and act.window is not None:
                # an attempt starts (also one resumed from the journal): refresh the window
                with contextlib.suppress(FetchError):  # the engine's install_gate reads it
                    await self._cancel_for(act, refresh_window=True)
            act.pushing = True
        sig = (int(report.state), int(report.result))
        now = time.monotonic()
        if report.state == UpdateState.DOWNLOADED and not act.pushing:
            # the gateway's own download: nothing is on the device yet (not DDI `downloaded`)
            await self._feedback(act, "proceeding", "none", [
                "artifact downloaded by the gateway and its hash checked; not yet sent to "
                "the device"])
            return
        if report.state == UpdateState.DOWNLOADED:
            # the engine held after the upload: the device holds the image, hash read back (b).
            # DDI `downloaded`; hawkBit closes only a download-only action with it
            closes = bool(offer.report_to.get("closes_on_downloaded",
                                              offer.install == "download-only"))
            await self._feedback(act, "downloaded", "success" if closes else "none",
                                 ["image staged in the device's secondary slot, its hash read "
                                  "back from the device: " + report.detail])
            act.closed = closes
            act.staged = offer.install == "download-only" and not closes
            return
        if not report.finished:
            cnt = round(report.progress * 100) if report.progress is not None else None
            if sig == act.last_sig:
                since = now - act.last_progress_at
                stepped = cnt is not None and cnt - act.last_cnt >= 10 and since >= 1.0
                if not stepped and since < self.cfg.progress_interval_s:
                    return  # bounded: every 10 % (at most once a second) or every interval
            act.last_sig, act.last_progress_at = sig, now
            progress = None
            if cnt is not None:
                act.last_cnt = cnt
                progress = {"cnt": cnt, "of": 100}
            detail = f"LwM2M state {int(report.state)} ({report.state.name})"
            await self._feedback(
                act,
                "proceeding",
                "none",
                [detail + (f": {report.detail}" if report.detail else "")],
                progress=progress,
            )
            return
        finished = "success" if report.result == UpdateResult.SUCCESS else "failure"
        detail = f"LwM2M result {int(report.result)} ({report.result.name})"
        await self._feedback(
            act,
            "closed",
            finished,
            [detail + (f": {report.detail}" if report.detail else "")],
            code=int(report.result),
        )
        act.closed = True

    async def _feedback(
        self,
        act: _Action,
        execution: str,
        finished: str,
        details: list[str],
        progress: dict[str, int] | None = None,
        code: int | None = None,
    ) -> None:
        """POST the action's feedback; returns only on 200, else raises ReportNotDelivered."""
        result: dict[str, Any] = {"finished": finished}
        if progress is not None:
            result["progress"] = progress
        status: dict[str, Any] = {"execution": execution, "result": result, "details": details}
        if code is not None:
            status["code"] = code
        body = {"status": status}  # "time"/"timestamp" is optional and changed name across versions
        try:
            st, _ = await self._request("POST", act.feedback_url, body)
        except FetchError as exc:
            raise ReportNotDelivered(f"hawkBit feedback ({execution}) for action {act.action_id} "
                                     f"not delivered: {exc}") from None
        if st == 200:
            return
        if st in (404, 410):
            act.closed = True
            raise ReportRefused(
                f"hawkBit action {act.action_id} of {act.controller} is no longer active (HTTP {st}): "
                "closed by an earlier delivery of this feedback whose answer was lost, or canceled")
        raise ReportNotDelivered(f"hawkBit feedback ({execution}) for action {act.action_id} "
                                 f"answered HTTP {st}")


def _obj(x: Any) -> dict[str, Any]:
    """``x`` when the server sent an object there, else empty (hostile or missing shapes)."""
    return x if isinstance(x, dict) else {}


def _list(x: Any) -> list[Any]:
    """``x`` when the server sent an array there, else empty."""
    return x if isinstance(x, list) else []


def _href(link: Any) -> str | None:
    if isinstance(link, dict) and isinstance(link.get("href"), str):
        return str(link["href"])
    return None


def _userinfo(url: str) -> bool:
    """``url`` carries user:password@ (never followed: credentials are the config's, (c))."""
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return True  # not even a URL: not followed either


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: the unit credentials
    are scoped to."""
    try:
        p = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[": matches no origin, so it is not followed
        return "invalid", "", None
    scheme = p.scheme.lower()
    try:
        port = p.port
    except ValueError:
        port = -1
    return scheme, (p.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _image_parts(chunks: list[Any], pattern: str | None) -> list[dict[str, Any]]:
    """A distribution set whose software modules each carry one MCUboot image: modules with a
    target-visible metadata key ``image_index`` (DDI ``chunks[].metadata``), one matching
    artifact each. Fewer than two such modules: not a set (the single-artifact path applies)."""
    parts = []
    for chunk in chunks:
        if not isinstance(chunk, dict):
            continue
        meta = {str(m.get("key")): m.get("value") for m in _list(chunk.get("metadata"))
                if isinstance(m, dict)}
        raw = meta.get("image_index")
        if raw is None:
            continue
        arts = [a for a in _list(chunk.get("artifacts")) if isinstance(a, dict) and (
            pattern is None or fnmatch.fnmatch(str(a.get("filename", "")), pattern))]
        if len(arts) != 1:
            continue
        art = arts[0]
        links = _obj(art.get("_links"))
        url = _href(links.get("download")) or _href(links.get("download-http"))
        try:
            image = int(str(raw), 0)
        except ValueError:
            continue
        if url:
            sha = _obj(art.get("hashes")).get("sha256")
            parts.append({"url": url, "filename": art.get("filename"), "image": image,
                          "sha256": sha.lower() if isinstance(sha, str) else None,
                          "size": art.get("size") if isinstance(art.get("size"), int) else None})
    return sorted(parts, key=lambda p: p["image"])

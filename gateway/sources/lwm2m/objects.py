"""The LwM2M object tree of one client endpoint, served with aiocoap.

Each object instance is a dict of ``Res`` (id, type, operations, getter/setter/executor). The
tree is put on an aiocoap ``Site`` at /O, /O/I and /O/I/R; reads answer in the format the
server asks for (Accept: TLV, SenML JSON, SenML CBOR, text for a single resource; TLV when it
asks for none), writes take text, TLV, SenML JSON/CBOR and opaque, executes POST. Every node
is observable; ``Tree.changed(path)`` sends the notifications of a resource and of its
instance and object (aiocoap re-renders each observation in the format it asked for).

Access rules of the spec are kept: the Security object (/0) is never readable by the
server (only a bootstrap server may touch it), a resource is read/written/executed only if
its operations allow it (else 4.05 Method Not Allowed), an unknown path is 4.04.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import aiocoap.resource as resource
from aiocoap.numbers.codes import Code

from gateway.sources.lwm2m import codec
from gateway.sources.lwm2m.codec import Item, Value

log = logging.getLogger("gateway.sources.lwm2m")


def _of_kind(kind: str, v: Value) -> bool:
    """A decoded SenML value has the resource's type (bool is not an int here)."""
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, {"str": str, "bool": bool, "opaque": bytes}.get(kind, object))


class CoapError(Exception):
    def __init__(self, code: Code, text: str = "") -> None:
        super().__init__(text)
        self.code = code


@dataclass
class Res:
    rid: int
    kind: str  # int | str | bool | opaque | none (executable)
    ops: str  # R, W, RW, E
    get: Callable[[], Value | list[Value]] | None = None
    set: Callable[[Value], Awaitable[None]] | None = None
    exe: Callable[[bytes], Awaitable[None]] | None = None
    multi: bool = False
    # a writable resource that handles its own request (Block1 PUSH of /5/0/0)
    raw_put: Callable[[aiocoap.Message], Awaitable[aiocoap.Message]] | None = None

    def items(self) -> list[Item]:
        assert self.get is not None
        v = self.get()
        if self.multi:
            assert isinstance(v, list)
            return [Item(self.rid, x, i) for i, x in enumerate(v)]
        assert not isinstance(v, list)
        return [Item(self.rid, v)]


@dataclass
class Tree:
    objects: dict[int, dict[int, dict[int, Res]]] = field(default_factory=dict)
    nodes: dict[tuple[int, ...], list[_Node]] = field(default_factory=dict)
    hidden: set[int] = field(default_factory=lambda: {0})  # /0 Security: bootstrap only

    def links(self) -> str:
        """The registration payload: every object instance (``</1/0>,</3/0>,...``)."""
        return ",".join(f"</{o}/{i}>" for o, insts in sorted(self.objects.items())
                        for i in sorted(insts))

    def changed(self, oid: int, iid: int, rid: int) -> None:
        for path in ((oid, iid, rid), (oid, iid), (oid,)):
            for n in self.nodes.get(path, []):
                n.updated_state()

    def changed_all(self) -> None:
        """Every observation gets the current value (after a re-registration)."""
        for ns in self.nodes.values():
            for n in ns:
                n.updated_state()

    def site(self, extra: resource.Site | None = None) -> resource.Site:
        site = extra or resource.Site()
        for oid, insts in self.objects.items():
            self._add(site, (oid,))
            for iid, ress in insts.items():
                self._add(site, (oid, iid))
                for rid in ress:
                    self._add(site, (oid, iid, rid))
        return site

    def _add(self, site: resource.Site, path: tuple[int, ...]) -> None:
        node = _Node(self, path)
        self.nodes.setdefault(path, []).append(node)
        site.add_resource([str(p) for p in path], node)

    # -- reads ---------------------------------------------------------------------------------
    def _readable(self, insts: dict[int, Res]) -> list[Res]:
        return [r for _, r in sorted(insts.items()) if "R" in r.ops and r.get is not None]

    def read(self, path: tuple[int, ...], accept: int | None) -> tuple[int, bytes]:
        oid = path[0]
        if oid in self.hidden:
            raise CoapError(Code.UNAUTHORIZED, "the Security object is for the bootstrap server")
        insts = self.objects.get(oid)
        if insts is None:
            raise CoapError(Code.NOT_FOUND)
        if len(path) == 3:
            res = insts.get(path[1], {}).get(path[2])
            if res is None:
                raise CoapError(Code.NOT_FOUND)
            if "R" not in res.ops or res.get is None:
                raise CoapError(Code.METHOD_NOT_ALLOWED, "not readable")
            items = res.items()
            if accept in (None, codec.CT_TEXT) and not res.multi:
                if res.kind == "opaque":
                    return codec.CT_OPAQUE, codec.value_bytes(items[0].value)
                return codec.CT_TEXT, codec.text(items[0].value)
            if accept == codec.CT_OPAQUE and res.kind == "opaque" and not res.multi:
                return codec.CT_OPAQUE, codec.value_bytes(items[0].value)
            by_inst = {path[1]: items}
        elif len(path) == 2:
            if path[1] not in insts:
                raise CoapError(Code.NOT_FOUND)
            by_inst = {path[1]: [i for r in self._readable(insts[path[1]]) for i in r.items()]}
        else:
            by_inst = {iid: [i for r in self._readable(rs) for i in r.items()]
                       for iid, rs in sorted(insts.items())}
        if accept in (None, codec.CT_TLV):
            if len(path) == 1:
                return codec.CT_TLV, codec.tlv_instances(by_inst)
            return codec.CT_TLV, codec.tlv_resources(next(iter(by_inst.values())))
        if accept in (codec.CT_SENML_JSON, codec.CT_SENML_CBOR):
            recs: list[tuple[str, Value]] = []
            for iid, items in by_inst.items():
                for it in items:
                    name = f"{iid}/{it.rid}" + (f"/{it.riid}" if it.riid is not None else "")
                    recs.append((name, it.value))
            return accept, codec.senml(f"/{oid}/", recs, cbor=accept == codec.CT_SENML_CBOR)
        raise CoapError(Code.NOT_ACCEPTABLE, f"content format {accept} not supported")

    def discover(self, path: tuple[int, ...]) -> bytes:
        oid = path[0]
        insts = self.objects.get(oid)
        if insts is None or oid in self.hidden:
            raise CoapError(Code.NOT_FOUND)
        out = [f"</{oid}>"] if len(path) == 1 else []
        for iid, rs in sorted(insts.items()):
            if len(path) >= 2 and iid != path[1]:
                continue
            if len(path) <= 2:
                out.append(f"</{oid}/{iid}>")
            out += [f"</{oid}/{iid}/{rid}>" for rid in sorted(rs)
                    if len(path) < 3 or rid == path[2]]
        return ",".join(out).encode()

    # -- writes / executes ---------------------------------------------------------------------
    async def write(self, path: tuple[int, ...], ct: int | None, payload: bytes) -> None:
        if len(path) < 2:
            raise CoapError(Code.METHOD_NOT_ALLOWED, "write an instance or a resource")
        insts = self.objects.get(path[0])
        if insts is None or path[1] not in insts or path[0] in self.hidden:
            raise CoapError(Code.NOT_FOUND)
        ress = insts[path[1]]
        if len(path) == 3 and path[2] not in ress:
            raise CoapError(Code.NOT_FOUND)
        updates: list[tuple[Res, Value]] = []
        try:
            if ct in (None, codec.CT_TEXT, codec.CT_OPAQUE):
                if len(path) != 3:
                    raise ValueError("text and opaque write one resource")
                res = ress[path[2]]
                if ct == codec.CT_OPAQUE:
                    val: Value = payload if res.kind == "opaque" else codec.from_raw(res.kind, payload)
                else:
                    val = codec.from_text(res.kind, payload)
                updates.append((res, val))
            elif ct == codec.CT_TLV:
                for it in codec.tlv_decode(payload, instance_level=len(path) == 2):
                    res = self._target(ress, path, it.rid)
                    raw = it.value if isinstance(it.value, bytes) else b""
                    updates.append((res, codec.from_raw(res.kind, raw)))
            elif ct in (codec.CT_SENML_JSON, codec.CT_SENML_CBOR):
                prefix = f"/{path[0]}/{path[1]}/"
                for name, v in codec.senml_decode(payload, cbor=ct == codec.CT_SENML_CBOR):
                    if not name.startswith(prefix):
                        raise ValueError(f"SenML record {name!r} is outside {prefix}")
                    rest = name[len(prefix):].split("/")
                    res = self._target(ress, path, int(rest[0]))
                    if res.kind == "opaque" and isinstance(v, str):
                        v = v.encode()
                    if not _of_kind(res.kind, v):
                        # e.g. a number for the Package URI: refused, never read as "empty"
                        # (which would be a cancel)
                        raise ValueError(f"SenML {name!r}: a {type(v).__name__} for a "
                                         f"{res.kind} resource")
                    updates.append((res, v))
            else:
                raise CoapError(Code.UNSUPPORTED_CONTENT_FORMAT, f"content format {ct}")
        except (ValueError, UnicodeDecodeError, OverflowError) as exc:
            raise CoapError(Code.BAD_REQUEST, str(exc)[:200]) from None
        for res, _v in updates:
            if "W" not in res.ops or res.set is None:
                raise CoapError(Code.METHOD_NOT_ALLOWED, f"resource {res.rid} is not writable")
        for res, v in updates:
            assert res.set is not None
            await res.set(v)

    @staticmethod
    def _target(ress: dict[int, Res], path: tuple[int, ...], rid: int) -> Res:
        if len(path) == 3 and rid != path[2]:
            raise ValueError(f"a write of resource {path[2]} names resource {rid}")
        res = ress.get(rid)
        if res is None:
            raise ValueError(f"no resource {rid}")
        return res

    async def execute(self, path: tuple[int, ...], payload: bytes) -> None:
        if len(path) != 3:
            raise CoapError(Code.METHOD_NOT_ALLOWED)
        res = self.objects.get(path[0], {}).get(path[1], {}).get(path[2])
        if res is None or path[0] in self.hidden:
            raise CoapError(Code.NOT_FOUND)
        if "E" not in res.ops or res.exe is None:
            raise CoapError(Code.METHOD_NOT_ALLOWED, "not executable")
        await res.exe(payload)


class _Node(resource.ObservableResource):
    """One path of the tree (/O, /O/I or /O/I/R) as a CoAP resource."""

    def __init__(self, tree: Tree, path: tuple[int, ...]) -> None:
        super().__init__()
        self.tree = tree
        self.path = path

    def _res(self) -> Res | None:
        if len(self.path) != 3:
            return None
        return self.tree.objects[self.path[0]][self.path[1]][self.path[2]]

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        res = self._res()
        # the PUSH resource streams each Block1 block to a file itself (never the whole
        # package in memory); aiocoap assembles nothing for it
        return not (res is not None and res.raw_put is not None and request.code == Code.PUT)

    def get_link_description(self) -> Any:
        return None  # /.well-known/core is not LwM2M's discovery

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        try:
            accept = request.opt.accept
            accept = None if accept is None else int(accept)
            if accept == codec.CT_LINK:
                return aiocoap.Message(code=Code.CONTENT, payload=self.tree.discover(self.path),
                                       content_format=codec.CT_LINK)
            ct, payload = self.tree.read(self.path, accept)
            return aiocoap.Message(code=Code.CONTENT, payload=payload, content_format=ct)
        except CoapError as exc:
            return aiocoap.Message(code=exc.code, payload=str(exc).encode()[:200])

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        res = self._res()
        if res is not None and res.raw_put is not None and (
                request.opt.content_format in (None, codec.CT_OPAQUE) or request.opt.block1):
            return await res.raw_put(request)
        if not request.payload and request.opt.uri_query:
            return aiocoap.Message(code=Code.CHANGED)  # Write-Attributes (pmin/pmax): taken, not used
        try:
            ct = request.opt.content_format
            await self.tree.write(self.path, None if ct is None else int(ct), request.payload)
            return aiocoap.Message(code=Code.CHANGED)
        except CoapError as exc:
            return aiocoap.Message(code=exc.code, payload=str(exc).encode()[:200])

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        try:
            if len(self.path) == 3:
                await self.tree.execute(self.path, request.payload)
            else:  # a partial-update write to an instance
                ct = request.opt.content_format
                await self.tree.write(self.path, None if ct is None else int(ct), request.payload)
            return aiocoap.Message(code=Code.CHANGED)
        except CoapError as exc:
            return aiocoap.Message(code=exc.code, payload=str(exc).encode()[:200])

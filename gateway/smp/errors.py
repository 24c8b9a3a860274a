"""The SMP layer's error types, in one module that imports nothing else of the gateway.

Owns the exceptions the session (``session.py``) and the upload (``upload.py``) raise, so that
neither has to import the other to raise or catch them (``gateway.smp.session`` re-exports
every name for the modules that import them from there).
"""

from __future__ import annotations

from smp import error as smperr
from smp import header as smphdr
from smp.image_management import IMG_MGMT_ERR
from smp.os_management import OS_MGMT_RET_RC

__all__ = ["SMPError", "SMPProtocolError", "SMPTimeout", "UploadError"]


class SMPError(Exception):
    """The device answered with an SMP error."""

    def __init__(self, request: str, group: int | None, rc: int, rsn: str | None = None) -> None:
        self.request, self.group, self.rc, self.rsn = request, group, rc, rsn
        super().__init__(f"{request}: {self.rc_name}" + (f" ({rsn})" if rsn else ""))

    @property
    def rc_name(self) -> str:
        try:
            if self.group == smphdr.GroupId.IMAGE_MANAGEMENT:
                return f"img_mgmt {IMG_MGMT_ERR(self.rc).name} ({self.rc})"
            if self.group == smphdr.GroupId.OS_MANAGEMENT:
                return f"os_mgmt {OS_MGMT_RET_RC(self.rc).name} ({self.rc})"
            if self.group is None:
                return f"MGMT_ERR {smperr.MGMT_ERR(self.rc).name} ({self.rc})"
        except ValueError:
            pass
        return f"group {self.group} rc {self.rc}"

    @property
    def not_supported(self) -> bool:
        return self.group is None and self.rc == smperr.MGMT_ERR.ENOTSUP


class SMPProtocolError(SMPError):
    """The answer is not a well-formed SMP response to the request (bad header, length, CBOR,
    group/command/op of another request, fields of the wrong type). Unlike an error the device
    chose to return, it says nothing about the device's state: idempotent requests retry it."""


class SMPTimeout(TimeoutError):
    """No answer within the request's timeout (after its retries)."""


class UploadError(Exception):
    """The upload could not complete (the device refused, or the link gave up)."""

"""The LwM2M source over coaps:// (DTLS 1.2, PSK) against a DTLS LwM2M server.

Wakaama's shared build has no DTLS server: the peer is ``lwm2m_dtls_server`` (the spec's
registration interface on aiocoap's tinydtls server transport), reached through a UDP relay
that records every datagram the endpoint sends - so the tests can tell that nothing but DTLS
records leaves it (no plain-CoAP fallback), and inject a plain-CoAP request from the server's
address (which must get no answer).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from lwm2m_dtls_server import DtlsLwm2mServer, UdpRelay, is_dtls_record
from lwm2m_server import tlv_int

from gateway.sources.lwm2m.endpoint import Endpoint
from gateway.sources.settings import Lwm2mSourceConfig

pytestmark = pytest.mark.timeout(60)

KEY = bytes.fromhex("5ec7e7c0ffee0123456789abcdef0042")
KEY_ENV = "SMPGW_TEST_LWM2M_PSK"


def _need_dtls() -> None:
    try:
        import DTLSSocket  # noqa: F401
    except ImportError:
        msg = "coaps tests need DTLSSocket (the lwm2m-dtls extra)"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must provide it)")
        pytest.skip(msg)


@pytest.fixture
async def relay() -> AsyncIterator[tuple[DtlsLwm2mServer, UdpRelay]]:
    _need_dtls()
    async with DtlsLwm2mServer({"gw-dev-1": KEY}) as srv:
        r = await UdpRelay.start((srv.host, srv.port))
        try:
            yield srv, r
        finally:
            r.close()


def cfg_for(port: int, **kw: object) -> Lwm2mSourceConfig:
    return Lwm2mSourceConfig.model_validate({
        "server": f"coaps://127.0.0.1:{port}", "psk_identity": "gw-{device_id}",
        "psk_key": {"env": KEY_ENV}, "lifetime_s": 30, "request_timeout_s": 4, **kw})


async def test_coaps_registration_with_the_right_psk(
        relay: tuple[DtlsLwm2mServer, UdpRelay], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Registration, a server Read over the same DTLS session, De-register - and every
    datagram the endpoint sent was a DTLS record; a plain-CoAP Read from the server's address
    gets no answer."""
    srv, r = relay
    monkeypatch.setenv(KEY_ENV, KEY.hex())
    ep = Endpoint(cfg_for(r.port), "dev-1", "dev-1", tmp_path, on_change=lambda *_: None)
    await ep.start()
    try:
        await srv.wait("register", "dev-1")
        await asyncio.wait_for(ep.registered.wait(), 10)
        reg = srv.by_ep("dev-1")
        assert reg is not None and reg.identity == ":gw-dev-1"  # the session's PSK identity
        assert "</5/0>" in reg.links and reg.query["lt"] == "30"
        resp = await srv.request(reg, Code.GET, "/5/0/3")  # server -> client, over DTLS
        assert resp.code == Code.CONTENT and tlv_int(resp.payload) == 0
        n = len(r.sent)
        plain = aiocoap.Message(code=Code.GET, uri_path=("5", "0", "3"))
        plain.mtype, plain.mid, plain.token = aiocoap.CON, 0x1234, b"pl41"
        r.inject(plain.encode())  # from the server's address, in the clear
        await srv.request(reg, Code.GET, "/5/0/5")  # (a round trip: the endpoint is alive)
        assert not any(d[:1] and d[0] >> 6 == 1 and b"pl41" in d for d in r.sent[n:])
    finally:
        await ep.close()
    await srv.wait("deregister", "dev-1")
    assert r.sent and all(is_dtls_record(d) for d in r.sent), [d[:4].hex() for d in r.sent]


async def test_coaps_wrong_psk_fails_clearly_without_fallback(
        relay: tuple[DtlsLwm2mServer, UdpRelay], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    srv, r = relay
    wrong = bytes(16)
    monkeypatch.setenv(KEY_ENV, wrong.hex())
    caplog.set_level(logging.WARNING, "gateway.sources.lwm2m")
    ep = Endpoint(cfg_for(r.port), "dev-1", "dev-1", tmp_path, on_change=lambda *_: None)
    await ep.start()
    try:
        await asyncio.wait_for(ep.failed.wait(), 20)
        assert ep.last_error
    finally:
        await ep.close(deregister=False)
    assert not srv.regs and not ep.registered.is_set()
    lines = [rec.getMessage() for rec in caplog.records if "cannot register" in rec.getMessage()]
    assert lines and "\n" not in lines[0]
    print("\n" + lines[0])
    assert "PSK identity 'gw-dev-1'" in lines[0] and f"env={KEY_ENV}" in lines[0], lines[0]
    assert wrong.hex() not in lines[0] and KEY.hex() not in lines[0]  # never the key
    assert r.sent and all(is_dtls_record(d) for d in r.sent), [d[:4].hex() for d in r.sent]


def test_coaps_config_refuses_missing_or_misplaced_keys() -> None:
    with pytest.raises(ValueError, match="psk_key"):
        Lwm2mSourceConfig.model_validate({"server": "coaps://127.0.0.1:5684"})
    with pytest.raises(ValueError, match="coaps:// only"):
        Lwm2mSourceConfig.model_validate({"server": "coap://127.0.0.1:5683",
                                          "psk_key": "00ff"})
    with pytest.raises(ValueError):
        Lwm2mSourceConfig.model_validate({"server": "coaps://h", "psk_key": "00",
                                          "psk_identity": "x" * 129})


async def test_coaps_non_hex_key_is_refused_at_start(tmp_path: Path) -> None:
    _need_dtls()
    cfg = Lwm2mSourceConfig.model_validate({"server": "coaps://127.0.0.1:9",
                                            "psk_key": "not-hex-at-all"})
    ep = Endpoint(cfg, "dev-1", "dev-1", tmp_path, on_change=lambda *_: None)
    with pytest.raises(ValueError, match=r"source.psk_key \(SecretRef\(value=\*\*\*\)\) is not hex"):
        await ep.start()
    await ep.close(deregister=False)

"""The serving pieces that need no server: settings from the environment, the audit log's pseudonyms, the
series aggregation rule, and the gateway middleware (auth, body limits, GET aliases, error bodies, audit)
driven in-process with an ASGI test client."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cthub.errors import ConfigError
from serving.audit import AUDIT_KEY, AuditLog
from serving.gateway import Gateway
from serving.results import aggregate_series, decide
from serving.settings import MB, ServeSettings


def test_settings_from_the_environment(tmp_path: Path) -> None:
    s = ServeSettings.from_env({})
    assert s.variant == "fp32" and s.max_upload_bytes == 64 * MB and s.allowed_modalities == ("CT",)
    assert s.api_token is None and s.http_config() == {} and s.demo is True
    secret = tmp_path / "token"
    secret.write_text("abc123\n")
    s = ServeSettings.from_env(
        {
            "CTHUB_API_TOKEN_FILE": str(secret),
            "CTHUB_SERVE_VARIANT": "INT8",
            "CTHUB_MAX_UPLOAD_MB": "0.5",
            "CTHUB_ALLOW_MODALITIES": "ct, mr",
            "CTHUB_CORS_ORIGINS": "https://a.example,https://b.example",
            "CTHUB_DEMO": "0",
        }
    )
    assert s.api_token == "abc123" and s.variant == "int8" and s.max_upload_bytes == MB // 2
    assert s.allowed_modalities == ("CT", "MR") and s.demo is False
    assert s.http_config()["cors"]["access_control_allow_origins"] == [
        "https://a.example",
        "https://b.example",
    ]
    assert "abc123" not in repr(s)
    for bad in (
        {"CTHUB_API_TOKEN": "x", "CTHUB_API_TOKEN_FILE": str(secret)},
        {"CTHUB_API_TOKEN_FILE": str(tmp_path / "missing")},
        {"CTHUB_MAX_UPLOAD_MB": "lots"},
        {"CTHUB_SERVE_VARIANT": "fp16"},
        {"CTHUB_BATCH_MAX_SIZE": "1"},
    ):
        with pytest.raises(ConfigError):
            ServeSettings.from_env(bad)


def test_audit_pseudonyms_are_keyed_hashes() -> None:
    uid = "1.2.840.113619.2.30.1.1762295590.1623.978668949.886"
    salted = AuditLog("pepper")
    assert salted.pseudonym(uid) == hmac.new(b"pepper", uid.encode(), hashlib.sha256).hexdigest()[:16]
    assert AuditLog("other").pseudonym(uid) != salted.pseudonym(uid)
    assert AuditLog().pseudonym(uid) != AuditLog().pseudonym(uid)  # random salt per process without one
    assert salted.pseudonym("") is None and salted.pseudonym(None) is None
    line = salted.line(
        endpoint="/predict", method="POST", status=200, started=0.0, details={"study_uid": uid}
    )
    assert uid not in json.dumps(line) and line["study"] == salted.pseudonym(uid)


def test_series_rule_is_the_mean_of_the_top_k_slices() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    out = aggregate_series(probs, ["normal", "bleed"], None, 3, [0.1, 0.5, 0.2, None, 0.3])
    assert out["top_k"] == 3 and out["scores"]["bleed"] == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert out["scores"]["normal"] == pytest.approx((0.9 + 0.6 + 0.3) / 3)
    assert out["label"] == "bleed" and out["peak_slice"] == 4 and out["ood_median"] == pytest.approx(0.25)
    binary = aggregate_series(probs[:1], ["normal", "bleed"], 0.05, 3, [None])
    assert binary["top_k"] == 1 and binary["label"] == "bleed" and binary["decision"]["rule"] == "threshold"
    assert decide(np.array([0.6, 0.4]), ["normal", "bleed"], 0.3) == "bleed"


# ---- the gateway ------------------------------------------------------------------------------------------


async def fake_api(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Stands in for BentoML: /echo and /model read the body and report it and the method (as an endpoint
    does, leaving audit details); /crash answers 500 before any endpoint ran (a request BentoML could not
    parse); /invalid answers BentoML's validation body."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    if path == "/crash":
        status, payload = 500, {"error": "An unexpected error has occurred, please check the server log."}
    elif path == "/invalid":
        status, payload = (
            400,
            {"error": "1 validation error", "detail": [{"loc": ["file"], "msg": "Field required"}]},
        )
    else:
        scope["state"][AUDIT_KEY] = {"model_sha256": "ab" * 32, "study_uid": "1.2.3", "slices": 1}
        status, payload = 200, {"method": scope["method"], "size": len(body)}
    data = json.dumps(payload).encode()
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": data})


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    """A request body sent chunked (no Content-Length)."""
    for part in parts:
        yield part


def client(token: str | None = None) -> httpx.AsyncClient:
    app = Gateway(
        fake_api,
        token=token,
        audit=AuditLog("salt"),
        limits={"/echo": 1000},
        default_limit=100,
        api_paths=frozenset({"/echo", "/crash", "/invalid", "/model"}),
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_gateway_auth_limits_aliases_and_error_bodies(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="serving.audit")
    asyncio.run(exercise_gateway())
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "serving.audit"]
    assert [(a["endpoint"], a["status"]) for a in lines][:3] == [
        ("/echo", 401),
        ("/echo", 401),
        ("/echo", 200),
    ]
    assert all(a["endpoint"] != "/readyz" for a in lines)
    ok_line = lines[2]
    assert ok_line["study"] == hmac.new(b"salt", b"1.2.3", hashlib.sha256).hexdigest()[:16]
    assert ok_line["model_sha256"] == "ab" * 32 and lines[0]["error"] == "unauthorized"


async def exercise_gateway() -> None:
    async with client(token="t0ken") as c:
        r = await c.post("/echo", content=b"x" * 10)
        assert r.status_code == 401 and r.json()["type"] == "AuthError"
        assert (
            await c.post("/echo", content=b"x", headers={"Authorization": "Bearer nope"})
        ).status_code == 401
        ok = await c.post("/echo", content=b"x" * 10, headers={"Authorization": "Bearer t0ken"})
        assert ok.status_code == 200 and ok.json() == {"method": "POST", "size": 10}
        assert (await c.get("/readyz")).status_code == 200  # health is open
        assert (await c.options("/echo")).status_code == 200  # CORS preflight is not the gateway's to refuse
    async with client() as c:
        assert (await c.post("/echo", content=b"x" * 1001)).status_code == 413
        chunked = await c.post("/echo", content=chunks(b"x" * 600, b"x" * 600))  # no Content-Length
        assert chunked.status_code == 413 and chunked.json()["error"] == "payload_too_large"
        assert (await c.post("/echo", content=chunks(b"x" * 400, b"x" * 400))).json()["size"] == 800
        assert (await c.post("/model", content=b"x" * 101)).status_code == 413  # the default limit
        assert (await c.get("/model")).json()["method"] == "POST"  # GET alias of a read-only API
        crash = await c.post("/crash")
        assert crash.status_code == 400 and set(crash.json()) == {"error", "type", "detail"}
        invalid = await c.post("/invalid")
        assert invalid.status_code == 400 and invalid.json()["detail"] == "file: Field required"

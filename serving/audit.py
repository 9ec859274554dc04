"""The audit trail: one JSON line per request on the `serving.audit` logger.

A line holds the time (UTC), endpoint, method, status, latency, the served model's sha256, the error code of a
refused request, the number of analysed slices, and keyed hashes (HMAC-SHA256, 16 hex digits) of the Study
and Series Instance UIDs: the same study gives the same pseudonym under the same salt, and the UID cannot be
recovered from it. Never the UIDs themselves, file names or any patient attribute.

The salt comes from $CTHUB_AUDIT_SALT / $CTHUB_AUDIT_SALT_FILE; without one each worker process draws a
random salt, so pseudonyms can then be matched only within one process's lifetime.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from datetime import datetime, timezone
from typing import Any

LOGGER_NAME = "serving.audit"
PSEUDONYM_HEX = 16
AUDIT_KEY = "cthub_audit"  # request-state key under which an endpoint leaves its part of the line


class AuditLog:
    """Writes audit lines; turns UIDs into salted pseudonyms."""

    def __init__(self, salt: str | None = None, logger: logging.Logger | None = None) -> None:
        self._key = (salt or secrets.token_hex(32)).encode()
        self.ephemeral_salt = salt is None
        self._log = logger or logging.getLogger(LOGGER_NAME)

    def pseudonym(self, uid: object) -> str | None:
        """HMAC-SHA256 of a UID under the salt, truncated; None for an empty UID."""
        text = str(uid or "").strip()
        if not text:
            return None
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]

    def line(
        self,
        *,
        endpoint: str,
        method: str,
        status: int,
        started: float,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The audit record of one request; `details` is what the endpoint left in the request state
        (model_sha256, error, slices, study_uid, series_uid; the UIDs are replaced by pseudonyms)."""
        d = dict(details or {})
        return {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "event": "request",
            "endpoint": endpoint,
            "method": method,
            "status": status,
            "latency_ms": round(1000 * (time.perf_counter() - started), 1),
            "model_sha256": d.get("model_sha256"),
            "error": d.get("error"),
            "slices": d.get("slices"),
            "study": self.pseudonym(d.get("study_uid")),
            "series": self.pseudonym(d.get("series_uid")),
        }

    def emit(self, record: dict[str, Any]) -> None:
        self._log.info(json.dumps(record, separators=(",", ":")))

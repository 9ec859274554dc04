"""What the loop leaves behind besides its results: one PHI-free JSON line per series it was told about, and
its position in the PACS's change feed.

A record (`RecordLog.write`) is one of

    {"event": "stored",  "change": 8, "study": "<pseudonym>", "series": "<pseudonym>", "modality": "CT",
     "instances": 4, "slices": 3, "rejected": [{"index": 3, "status": 400, "reason": "truncated", ...}],
     "report_series": "<pseudonym>", "overlays": 3, "overlay_series": "<pseudonym>",
     "maps": 1, "map_series": "<pseudonym>",
     "model_sha256": "...", "time": "..."}
    {"event": "failed",  ..., "stage": "lookup|fetch|analyse|store|internal", "error": "...",
     "reason": "...", "detail": "...", "attempts": 3, "rejected": [...]}
    {"event": "skipped", ..., "why": "modality MR is not among the accepted (CT)"}

written to a JSON-lines file and to the `pacs.records` logger. Study and Series Instance UIDs appear only as
keyed hashes (HMAC-SHA256 under $CTHUB_AUDIT_SALT, as `serving.audit` makes them, so the same series has the
same pseudonym in the API's audit log and here); `change` is the sequence number of the PACS's change,
which an operator can look up in the PACS itself (`GET /changes?since=change-1&limit=1`). Never a UID, a
name, a date or any other header value: `detail` is the message of a `CTHubError`, which by the project's
rule describes the file, never the patient; other errors are named by their type only.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from serving.audit import AuditLog

LOGGER_NAME = "pacs.records"
EVENTS = ("stored", "failed", "skipped")


class RecordLog:
    """Appends outcome records to a JSON-lines file (created 0600) and logs them."""

    def __init__(self, path: Path | None, salt: str | None = None) -> None:
        self.path = path
        self._audit = AuditLog(salt, logging.getLogger(LOGGER_NAME))
        self._log = logging.getLogger(LOGGER_NAME)

    @property
    def ephemeral_salt(self) -> bool:
        return self._audit.ephemeral_salt

    def pseudonym(self, uid: object) -> str | None:
        return self._audit.pseudonym(uid)

    def write(
        self, event: str, change: int, *, study_uid: str = "", series_uid: str = "", **fields: Any
    ) -> dict[str, Any]:
        """One record: the event, the change it answers, pseudonyms of the UIDs, then `fields`."""
        assert event in EVENTS, event
        record = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "event": event,
            "change": change,
            "study": self.pseudonym(study_uid),
            "series": self.pseudonym(series_uid),
            **fields,
        }
        line = json.dumps(record, separators=(",", ":"), default=str)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        self._log.log(logging.WARNING if event == "failed" else logging.INFO, line)
        return record


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file (an empty list when there is none yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Position:
    """The sequence number of the last change the watcher has finished with, kept in a small JSON file that
    is replaced atomically (a crash leaves the old or the new position, never a broken file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> int:
        """The saved position; 0 (the beginning of the feed) when there is none."""
        try:
            return int(json.loads(self.path.read_text(encoding="utf-8"))["last_change"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError, OSError):
            logging.getLogger(__name__).warning("%s is unreadable: starting from the beginning", self.path)
            return 0

    def save(self, seq: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"last_change": int(seq)}) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

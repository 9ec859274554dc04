"""The loop: follow the PACS's change feed, analyse each CT series once it is stable, store its SR with the
study, and leave one record per series.

For every `StableSeries` change, in order:

1. look the series up (`PacsClient.series`): gone from the PACS, an output of ct-ssl-hub (Manufacturer), or
   a modality outside the accepted ones (`CTHUB_ALLOW_MODALITIES`, default CT) -> a `skipped` record;
   more instances than `CTHUB_MAX_SLICES` -> a `failed` record, nothing fetched;
2. fetch it by WADO-RS into a private temporary directory (deleted afterwards);
3. analyse it in this process (`pacs.analysis.SeriesReporter`, the `/report` endpoint's code): instances
   that cannot be read are left out and listed in the record; a series with nothing readable -> `failed`;
4. store the SR (and with `--cam` the overlay series of `pacs.overlay` and the Parametric Map series of
   `serving.parametric_map`) by STOW-RS into the same study -> a `stored` record.

Lookup, fetch and store talk to the PACS and are retried (`WatchSettings.attempts`, doubling waits) before a
`failed` record is written; the analysis is not (the same files give the same answer). Nothing that one
series does stops the loop: every change gets exactly one record, and the position in the feed is saved
after each series (`pacs.records.Position`), so a restarted watcher goes on where it stopped. A series
interrupted by a stop is not recorded and is processed again after the restart (at least once, never
silently dropped). While the PACS cannot be reached the watcher waits and tries again, with growing pauses.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cthub.errors import CTHubError
from pacs.analysis import SeriesRefused, SeriesReport, SeriesReporter
from pacs.client import Fetched, PacsClient, SeriesInfo
from pacs.records import Position, RecordLog
from serving.report import MANUFACTURER

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class WatchSettings:
    """How the watcher polls and how often it tries again."""

    attempts: int = 3  # tries of each PACS step (lookup, fetch, store) of one series
    backoff_s: float = 2.0  # wait after a failed try, doubled after each one
    poll_s: float = 1.0  # wait between two polls of the change feed when nothing is new
    max_wait_s: float = 30.0  # longest wait while the PACS cannot be reached
    page: int = 100  # changes read per request


class _GaveUp(Exception):
    def __init__(self, stage: str, error: BaseException, attempts: int) -> None:
        super().__init__(stage)
        self.stage, self.error, self.attempts = stage, error, attempts


class _Stopped(Exception):
    """A stop was asked for while a series was in progress: no record, the change is done again later."""


def describe_error(e: BaseException) -> dict[str, Any]:
    """{error, reason?, detail?, status?} of an exception without anything it may quote from a header or a
    URL: the message only of the project's own errors (PHI-free by rule), else the type and HTTP status."""
    if isinstance(e, CTHubError):
        out: dict[str, Any] = {"error": e.code, "type": type(e).__name__, "detail": str(e)}
        if reason := getattr(e, "reason", None):
            out["reason"] = reason
        return out
    out = {"error": type(e).__name__}
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        out["status"] = status
    return out


class Watcher:
    """Follows one PACS's change feed with one model (see the module doc)."""

    def __init__(
        self,
        client: PacsClient,
        reporter: SeriesReporter,
        position: Position,
        records: RecordLog,
        settings: WatchSettings | None = None,
        tmp_dir: Path | None = None,
    ) -> None:
        self.client, self.reporter = client, reporter
        self.position, self.records = position, records
        self.settings = settings or WatchSettings()
        self.tmp_dir = tmp_dir
        self.handled = 0  # StableSeries changes answered with a record by this watcher

    # -- the feed ---------------------------------------------------------------------------------------

    def start_position(self) -> int:
        """The saved position, or 0 when the PACS's feed is shorter (its database was replaced)."""
        pos = self.position.load()
        last = self.client.last_change()
        if pos > last:
            log.warning(
                "saved position %d is past the PACS's last change %d (a new PACS database?): "
                "starting from its beginning",
                pos,
                last,
            )
            pos = 0
        return pos

    def run(self, stop: threading.Event) -> None:
        """Follow the feed until `stop` is set; never raises for what the PACS or a series does."""
        pos: int | None = None
        failures = 0
        caught_up: int | None = None  # the value of `handled` when "caught up" was last logged
        while not stop.is_set():
            try:
                if pos is None:
                    pos = self.start_position()
                    log.info("watching the PACS's changes after change %d", pos)
                pos, done = self.poll_once(pos, stop)
            except Exception as e:  # noqa: BLE001 -- the PACS is down or answered nonsense: wait, try again
                failures += 1
                wait = min(self.settings.max_wait_s, self.settings.backoff_s * 2 ** (failures - 1))
                log.warning(
                    "the PACS's change feed cannot be read (%s); trying again in %.0f s",
                    describe_error(e),
                    wait,
                )
                stop.wait(wait)
                continue
            failures = 0
            if done:
                if caught_up != self.handled:  # once after start and after each series, not per instance
                    log.info("caught up at change %d", pos)
                    caught_up = self.handled
                stop.wait(self.settings.poll_s)

    def poll_once(self, pos: int, stop: threading.Event | None = None) -> tuple[int, bool]:
        """Handle the changes after `pos` (one page); (new position, whether the feed is exhausted)."""
        stop = stop or threading.Event()
        page = self.client.changes(pos, self.settings.page)
        for change in page.get("Changes", []):
            seq = int(change["Seq"])
            if change.get("ChangeType") == "StableSeries" and change.get("ResourceType") == "Series":
                try:
                    self.handle(seq, str(change["ID"]), stop)
                except _Stopped:
                    self.position.save(pos)
                    return pos, False
                self.handled += 1
                self.position.save(seq)
            pos = seq
        if page.get("Changes"):
            self.position.save(pos)
        return pos, bool(page.get("Done", True))

    # -- one series -------------------------------------------------------------------------------------

    def handle(self, seq: int, orthanc_id: str, stop: threading.Event) -> dict[str, Any]:
        """Process the series of one StableSeries change; its record (raises _Stopped only)."""
        info: SeriesInfo | None = None
        try:
            info = self._retry("lookup", lambda: self.client.series(orthanc_id), stop)
            return self._process(seq, info, stop)
        except _GaveUp as g:
            log.warning("change %d: %s failed after %d attempts", seq, g.stage, g.attempts)
            return self._record(
                "failed", seq, info, stage=g.stage, attempts=g.attempts, **describe_error(g.error)
            )
        except _Stopped:
            raise
        except Exception as e:  # noqa: BLE001 -- a bug must cost one series (recorded), not the loop
            log.error("change %d: %s at\n%s", seq, type(e).__name__, _where(e))
            return self._record("failed", seq, info, stage="internal", **describe_error(e))

    def _process(self, seq: int, info: SeriesInfo | None, stop: threading.Event) -> dict[str, Any]:
        if info is None:
            return self._record("skipped", seq, None, why="the series is no longer in the PACS")
        if info.manufacturer == MANUFACTURER:
            return self._record("skipped", seq, info, why=f"an output of {MANUFACTURER}")
        accepted = self.reporter.allowed_modalities
        if info.modality not in accepted:
            why = f"modality {info.modality or '(missing)'} is not among the accepted ({'/'.join(accepted)})"
            return self._record("skipped", seq, info, why=why)
        if info.instances > self.reporter.max_slices:
            return self._record(
                "failed",
                seq,
                info,
                stage="fetch",
                error="payload_too_large",
                detail=f"{info.instances} instances, more than the limit of {self.reporter.max_slices}",
            )
        if self.tmp_dir is not None:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="cthub-pacs-", dir=self.tmp_dir) as tmp:
            fetched = self._retry("fetch", lambda: _fetch_fresh(self.client, info, Path(tmp)), stop)
            if not fetched.files:
                return self._record(
                    "failed",
                    seq,
                    info,
                    stage="fetch",
                    error="unreadable",
                    detail=f"none of the {info.instances} instances could be read from the PACS",
                    rejected=fetched.unreadable,
                )
            try:
                report = self.reporter.report(fetched.files)
            except SeriesRefused as e:
                return self._record(
                    "failed",
                    seq,
                    info,
                    stage="analyse",
                    **describe_error(e.error),
                    rejected=fetched.unreadable + e.rejected,
                    skipped=e.skipped,
                    other_series=e.other_series,
                )
            except CTHubError as e:
                return self._record(
                    "failed", seq, info, stage="analyse", rejected=fetched.unreadable, **describe_error(e)
                )
            except Exception as e:  # noqa: BLE001 -- unexpected: recorded, and the loop goes on
                log.error("change %d: the analysis failed with %s at\n%s", seq, type(e).__name__, _where(e))
                return self._record("failed", seq, info, stage="analyse", **describe_error(e))
        stored = [report.sr, *report.overlays, *report.maps]
        self._retry("store", lambda: self.client.store(info.study_uid, stored), stop)
        return self._stored(seq, info, fetched, report)

    def _stored(self, seq: int, info: SeriesInfo, fetched: Fetched, report: SeriesReport) -> dict[str, Any]:
        overlays = report.overlays
        log.info(
            "change %d: SR stored with the study (%d slice(s) analysed, %d instance(s) left out)",
            seq,
            report.slices,
            len(fetched.unreadable) + len(report.rejected),
        )
        return self._record(
            "stored",
            seq,
            info,
            slices=report.slices,
            rejected=fetched.unreadable + report.rejected,
            skipped=report.skipped,
            report_series=self.records.pseudonym(report.sr.SeriesInstanceUID),
            overlays=len(report.overlays),
            overlay_series=self.records.pseudonym(overlays[0].SeriesInstanceUID if overlays else ""),
            maps=len(report.maps),
            map_series=self.records.pseudonym(report.maps[0].SeriesInstanceUID if report.maps else ""),
            model_sha256=self.reporter.identity.get("sha256"),
        )

    def _record(self, event: str, seq: int, info: SeriesInfo | None, **fields: Any) -> dict[str, Any]:
        if info is not None:
            fields = {"modality": info.modality, "instances": info.instances} | fields
        return self.records.write(
            event,
            seq,
            study_uid=info.study_uid if info else "",
            series_uid=info.series_uid if info else "",
            **fields,
        )

    def _retry(self, stage: str, step: Callable[[], T], stop: threading.Event) -> T:
        """`step()`, tried up to `attempts` times with doubling waits; _GaveUp / _Stopped otherwise."""
        wait = self.settings.backoff_s
        for attempt in range(1, self.settings.attempts + 1):
            if stop.is_set():
                raise _Stopped
            try:
                return step()
            except Exception as e:  # noqa: BLE001 -- network, PACS or protocol errors: bounded retries
                if attempt == self.settings.attempts:
                    raise _GaveUp(stage, e, attempt) from None
                log.warning(
                    "%s: attempt %d of %d failed (%s); again in %.0f s",
                    stage,
                    attempt,
                    self.settings.attempts,
                    describe_error(e),
                    wait,
                )
                if stop.wait(wait):
                    raise _Stopped from None
                wait *= 2
        raise AssertionError("unreachable")


def _where(e: BaseException) -> str:
    """Where an exception was raised (file, line, code), not its message: messages may quote header values."""
    return "".join(traceback.format_tb(e.__traceback__))


def _fetch_fresh(client: PacsClient, info: SeriesInfo, tmp: Path) -> Fetched:
    """Fetch into an emptied folder (a failed attempt may have left part of the series)."""
    into = tmp / "series"
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir()
    return client.fetch_series(info, into)

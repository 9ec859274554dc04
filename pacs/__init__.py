"""PACS in the loop: a local Orthanc, and a watcher that follows its change feed, analyses each stable CT
series with the project's model (in-process, the `/report` endpoint's code) and stores the DICOM SR with the
study (WADO-RS in, STOW-RS out), leaving one PHI-free record per series. Importing this package loads
neither the model nor any HTTP client.

Names are imported on first use (PEP 562) so that `cthub --help` does not load torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cthub.lazy import lazy_exports

if TYPE_CHECKING:
    from pacs.analysis import SeriesRefused, SeriesReport, SeriesReporter
    from pacs.client import Fetched, PacsClient, SeriesInfo
    from pacs.orthanc import OrthancConfig, OrthancProcess, PacsError, missing_parts, start_orthanc
    from pacs.records import Position, RecordLog, read_records
    from pacs.watcher import Watcher, WatchSettings

_EXPORTS: dict[str, str] = {
    "Fetched": "pacs.client",
    "OrthancConfig": "pacs.orthanc",
    "OrthancProcess": "pacs.orthanc",
    "PacsClient": "pacs.client",
    "PacsError": "pacs.orthanc",
    "Position": "pacs.records",
    "RecordLog": "pacs.records",
    "SeriesInfo": "pacs.client",
    "SeriesRefused": "pacs.analysis",
    "SeriesReport": "pacs.analysis",
    "SeriesReporter": "pacs.analysis",
    "WatchSettings": "pacs.watcher",
    "Watcher": "pacs.watcher",
    "missing_parts": "pacs.orthanc",
    "read_records": "pacs.records",
    "start_orthanc": "pacs.orthanc",
}
__all__ = [
    "Fetched",
    "OrthancConfig",
    "OrthancProcess",
    "PacsClient",
    "PacsError",
    "Position",
    "RecordLog",
    "SeriesInfo",
    "SeriesRefused",
    "SeriesReport",
    "SeriesReporter",
    "WatchSettings",
    "Watcher",
    "missing_parts",
    "read_records",
    "start_orthanc",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)

"""PACS in the loop: a local Orthanc, and a watcher that follows its change feed, analyses each stable CT
series with the project's model (in-process, the `/report` endpoint's code) and stores the DICOM SR with the
study (WADO-RS in, STOW-RS out), leaving one PHI-free record per series. Importing this package loads
neither the model nor any HTTP client."""

from pacs.analysis import SeriesRefused, SeriesReport, SeriesReporter
from pacs.client import Fetched, PacsClient, SeriesInfo
from pacs.orthanc import OrthancConfig, OrthancProcess, PacsError, missing_parts, start_orthanc
from pacs.records import Position, RecordLog, read_records
from pacs.watcher import Watcher, WatchSettings

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

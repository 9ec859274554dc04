"""PACS in the loop: a local Orthanc, and a watcher that follows its change feed, analyses each stable CT
series with the project's model (in-process, the `/report` endpoint's code) and stores the DICOM SR with the
study (WADO-RS in, STOW-RS out), leaving one PHI-free record per series. Importing this package loads
neither the model nor any HTTP client.

Names are imported on first use (PEP 562) so that `cthub --help` does not load torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cthub.lazy import lazy_package

if TYPE_CHECKING:
    from pacs.analysis import SeriesReporter
    from pacs.client import PacsClient
    from pacs.orthanc import OrthancConfig, PacsError, missing_parts, start_orthanc
    from pacs.records import read_records
    from pacs.watcher import Watcher, WatchSettings

__getattr__, __all__ = lazy_package(__name__, __file__)

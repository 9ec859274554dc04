"""What the loop asks of the PACS: Orthanc's change feed and resource lookups over its REST API, the images
and the results over DICOMweb.

- **Notification**: `GET /changes?since=N` (Orthanc REST). Orthanc lists every change with an increasing
  sequence number; `StableSeries` comes once no instance has arrived for `StableAge` seconds. `series(id)`
  turns Orthanc's series ID into the study/series UIDs, modality, manufacturer and instance count.
- **Retrieval**: WADO-RS (`dicomweb-client`), asking for every instance *as stored* (transfer syntax `*`):
  Orthanc's default transcoding to Explicit VR Little Endian fails the whole series request (500) when a
  single instance cannot be decoded, and the project's own reader decodes JPEG 2000, JPEG-LS and RLE.
  Instances are streamed to disk one by one. When the series answer cannot be parsed, each instance is
  retrieved on its own (its SOP Instance UIDs listed by QIDO-RS), so one bad instance costs only itself.
- **Storage**: STOW-RS to `/studies/{StudyInstanceUID}`: the PACS refuses an object of another study, and its
  answer lists what it stored and what it refused (FailedSOPSequence), checked here.

Only the change feed and `series()` are Orthanc-specific; the DICOMweb half works with any DICOMweb archive.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacs.orthanc import DICOMWEB_ROOT, PacsError

AS_STORED = (("application/dicom", "*"),)  # WADO-RS: no transcoding


@dataclass(frozen=True)
class SeriesInfo:
    """What the loop needs to know about a series before fetching it (UIDs are never logged)."""

    orthanc_id: str
    study_uid: str
    series_uid: str
    modality: str
    manufacturer: str
    instances: int


@dataclass
class Fetched:
    """A series on disk: one Part 10 file per instance that could be read, and the ones that could not
    (their 0-based index in the PACS's listing and the error type; no UIDs)."""

    files: list[Path]
    unreadable: list[dict[str, Any]]


class PacsClient:
    """Orthanc's REST API (httpx) and DICOMweb (dicomweb-client, requests) with one base URL."""

    def __init__(self, url: str, *, auth: tuple[str, str] | None = None, timeout: float = 60.0) -> None:
        import httpx
        import requests
        from dicomweb_client import DICOMwebClient

        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, auth=auth, timeout=timeout)
        self._session = session = requests.Session()
        if auth:
            session.auth = auth
        self._web = DICOMwebClient(self.url + DICOMWEB_ROOT.rstrip("/"), session=session, timeout=timeout)
        self._web.set_http_retry_params(retry=False)  # the loop's own bounded retries apply

    def close(self) -> None:
        self._http.close()
        self._session.close()

    def __enter__(self) -> PacsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, **params: Any) -> Any:
        """GET and decode JSON; once more at once when the PACS had closed the kept-alive connection."""
        import httpx

        try:
            r = self._http.get(path, params=params or None)
        except httpx.RemoteProtocolError:
            r = self._http.get(path, params=params or None)
        r.raise_for_status()
        return r.json()

    # -- Orthanc REST -----------------------------------------------------------------------------------

    def system(self) -> dict[str, Any]:
        """GET /system: name, version, ports, API version."""
        return dict(self._get("/system"))

    def versions(self) -> dict[str, str]:
        """Orthanc's and the DICOMweb plugin's versions as the running server reports them."""
        out = {"orthanc": str(self.system().get("Version", "?"))}
        try:
            out["dicomweb"] = str(self._get("/plugins/dicom-web").get("Version", "?"))
        except Exception:  # noqa: BLE001 -- informative only
            out["dicomweb"] = "?"
        return out

    def changes(self, since: int, limit: int = 100) -> dict[str, Any]:
        """GET /changes: {Changes: [{ChangeType, ID, ResourceType, Seq, ...}], Done, Last}."""
        return dict(self._get("/changes", since=since, limit=limit))

    def last_change(self) -> int:
        """The sequence number of the newest change Orthanc holds (0 when none)."""
        return int(self._get("/changes", last="").get("Last", 0))

    def series(self, orthanc_id: str) -> SeriesInfo | None:
        """The series with Orthanc ID `orthanc_id`, or None when the PACS no longer holds it."""
        import httpx

        try:
            s = self._get(f"/series/{orthanc_id}")
            study = self._get(f"/studies/{s['ParentStudy']}")
        except httpx.HTTPStatusError as e:
            if e.response.status_code == 404:
                return None
            raise
        tags, study_tags = s.get("MainDicomTags", {}), study.get("MainDicomTags", {})
        return SeriesInfo(
            orthanc_id=orthanc_id,
            study_uid=str(study_tags.get("StudyInstanceUID", "")),
            series_uid=str(tags.get("SeriesInstanceUID", "")),
            modality=str(tags.get("Modality", "")).upper(),
            manufacturer=str(tags.get("Manufacturer", "")),
            instances=len(s.get("Instances", [])),
        )

    # -- DICOMweb ---------------------------------------------------------------------------------------

    def fetch_series(self, info: SeriesInfo, into: Path) -> Fetched:
        """Every instance of the series as stored, written to `into` (NNNNNN.dcm). HTTP errors propagate
        (the caller retries); an answer that cannot be parsed falls back to one request per instance."""
        import requests

        written: list[Path] = []
        try:
            for i, ds in enumerate(self._web.iter_series(info.study_uid, info.series_uid, AS_STORED)):
                written.append(_write(ds, into / f"{i:06d}.dcm"))
            return Fetched(written, [])
        except requests.RequestException:
            raise
        except Exception:  # noqa: BLE001 -- a part of the answer that cannot be parsed: instance by instance
            for p in written:
                p.unlink(missing_ok=True)
        return self.fetch_instances(info, into)

    def fetch_instances(self, info: SeriesInfo, into: Path) -> Fetched:
        """Every instance of the series in its own WADO-RS request (listed by QIDO-RS): an instance whose
        answer cannot be parsed is listed in `unreadable`, the others are written. HTTP errors propagate."""
        import requests

        found = self._web.search_for_instances(
            info.study_uid, info.series_uid, fields=["SOPInstanceUID"], get_remaining=True
        )
        sops = [str(item["00080018"]["Value"][0]) for item in found if item.get("00080018", {}).get("Value")]
        files: list[Path] = []
        unreadable: list[dict[str, Any]] = []
        for i, sop in enumerate(sops):
            try:
                ds = self._web.retrieve_instance(info.study_uid, info.series_uid, sop, AS_STORED)
                files.append(_write(ds, into / f"{i:06d}.dcm"))
            except requests.RequestException:
                raise
            except Exception as e:  # noqa: BLE001 -- this instance's content: reported, the rest goes on
                unreadable.append({"index": i, "error": type(e).__name__, "stage": "fetch"})
        return Fetched(files, unreadable)

    def store(self, study_uid: str, datasets: list[Any]) -> None:
        """STOW-RS into the study; PacsError unless the PACS stored every dataset."""
        answer = self._web.store_instances(datasets, study_instance_uid=study_uid)
        failed = answer.get("FailedSOPSequence") or []
        stored = {str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence") or []}
        missing = [ds for ds in datasets if str(ds.SOPInstanceUID) not in stored]
        if failed or missing:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise PacsError(
                f"the PACS refused {len(failed) or len(missing)} of {len(datasets)} objects "
                f"(STOW-RS failure reasons: {', '.join(reasons) or 'not listed'})"
            )


def _write(ds: Any, path: Path) -> Path:
    """A dataset as the DICOM Part 10 file it came from (its file meta and transfer syntax)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())
    return path

"""`cthub pacs --model DIR`: a local Orthanc on 127.0.0.1 and the watcher that sends its CT series through the
model and stores the SR with each study, in one command (or `--url` to watch an Orthanc already running)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cthub.errors import ConfigError

if TYPE_CHECKING:
    from cthub.cli import SubParsers

PACS_USER_ENV = "CTHUB_PACS_USER"
PACS_PASSWORD_ENV = "CTHUB_PACS_PASSWORD"  # noqa: S105 -- the variable's name, not a password
QUIET = {
    "dicomweb_client": logging.WARNING,  # logs every retrieval with its UIDs at INFO
    "httpx": logging.WARNING,  # a line per poll of the change feed
    "urllib3": logging.WARNING,
    "highdicom": logging.ERROR,  # may quote header values (patient data) in warnings
}


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "pacs",
        help="PACS in the loop: a local Orthanc + the watcher that stores an SR with each CT series",
        description="Starts Debian's Orthanc (orthanc + orthanc-dicomweb) on 127.0.0.1 in DIR and watches "
        "its change feed: each CT series that becomes stable is fetched by WADO-RS, analysed by MODEL (its "
        "exported ONNX file, as POST /report does) and its DICOM SR is stored into the same study by "
        "STOW-RS. One PHI-free JSON line per series in DIR/records.jsonl. With --url, watches an Orthanc "
        f"that is already running instead (basic auth from ${PACS_USER_ENV} / ${PACS_PASSWORD_ENV}).",
    )
    p.add_argument("--model", required=True, help="classifier folder (exported: model.onnx) or hub name")
    p.add_argument("--dir", type=Path, default=None, help="work dir: Orthanc's data, log, position, records")
    p.add_argument("--http-port", type=int, default=8042, help="Orthanc's REST/DICOMweb port (127.0.0.1)")
    p.add_argument("--dicom-port", type=int, default=4242, help="Orthanc's DICOM port (C-STORE from here)")
    p.add_argument("--aet", default="CTHUB_PACS", help="Orthanc's DICOM application entity title")
    p.add_argument("--stable-age", type=int, default=5, help="seconds without new instances: series stable")
    p.add_argument("--url", default=None, help="watch this running Orthanc instead of starting one")
    p.add_argument("--records", type=Path, default=None, help="records file (default DIR/records.jsonl)")
    p.add_argument("--attempts", type=int, default=3, help="tries of each PACS step of a series")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls of the change feed")
    p.add_argument(
        "--cam",
        action="store_true",
        help="also store the class activation maps of the deciding slices as a Secondary Capture series "
        "labeled NOT FOR DIAGNOSTIC USE",
    )
    p.add_argument("--orthanc", default=None, help="Orthanc executable (default /usr/sbin/Orthanc)")
    p.set_defaults(func=pacs)


def _auth() -> tuple[str, str] | None:
    user, password = os.environ.get(PACS_USER_ENV, ""), os.environ.get(PACS_PASSWORD_ENV, "")
    if bool(user) != bool(password):
        raise ConfigError(f"set both {PACS_USER_ENV} and {PACS_PASSWORD_ENV}, or neither")
    return (user, password) if user else None


def _salt(workdir: Path) -> str:
    """$CTHUB_AUDIT_SALT(_FILE) when set, else a random salt kept in the work dir (0600), so the records of
    one work dir keep their pseudonyms across restarts."""
    from serving.settings import ServeSettings

    if salt := ServeSettings.from_env().audit_salt:
        return salt
    path = workdir / "audit-salt"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return path.read_text().strip()


def _quiet_process() -> None:
    """Entry-point settings: third-party loggers that would print UIDs or header values, ORT's logger."""
    import warnings

    from export.session import quiet_onnxruntime_process

    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", module="highdicom")
    warnings.filterwarnings("ignore", module="pydicom")
    quiet_onnxruntime_process()


def pacs(args: argparse.Namespace) -> int:
    from hub.io import hub_dir
    from pacs.analysis import SeriesReporter
    from pacs.client import PacsClient
    from pacs.orthanc import OrthancConfig, OrthancProcess, start_orthanc
    from pacs.records import Position, RecordLog
    from pacs.watcher import Watcher, WatchSettings

    if args.attempts < 1 or args.poll <= 0 or args.stable_age < 1:
        raise ConfigError("--attempts and --stable-age must be at least 1, --poll above 0")
    _quiet_process()
    workdir = (args.dir or hub_dir() / "pacs").expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)
    # a missing, stale or tampered export fails here, before Orthanc starts
    reporter = SeriesReporter(args.model, cam=args.cam)
    ident = reporter.identity
    records_path = args.records or workdir / "records.jsonl"
    records = RecordLog(records_path, salt=_salt(workdir))
    stop, signalled = threading.Event(), threading.Event()
    orthanc: OrthancProcess | None = None
    if args.url is None:
        config = OrthancConfig(workdir, args.http_port, args.dicom_port, args.aet, args.stable_age)
        orthanc = start_orthanc(config, binary=args.orthanc)
        threading.Thread(target=_stop_when_gone, args=(orthanc, stop), daemon=True).start()
    url = orthanc.url if orthanc else args.url

    def on_signal(signum: int, frame: object) -> None:
        signalled.set()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        with PacsClient(url, auth=_auth()) as client:
            watcher = Watcher(
                client,
                reporter,
                Position(workdir / "position.json"),
                records,
                WatchSettings(attempts=args.attempts, poll_s=args.poll),
                tmp_dir=workdir / "tmp",
            )
            _banner(url, orthanc, client.versions(), ident, records_path, args.cam)
            watcher.run(stop)
    finally:
        code = orthanc.stop() if orthanc is not None and orthanc.proc.poll() is None else None
    if orthanc is not None and code is None and not signalled.is_set():
        print(f"cthub pacs: Orthanc stopped on its own; its log:\n{orthanc.log_tail()}", file=sys.stderr)
        return 1
    print("cthub pacs: stopped", file=sys.stderr, flush=True)
    return 0


def _stop_when_gone(orthanc: Any, stop: threading.Event) -> None:
    orthanc.proc.wait()
    stop.set()


def _banner(
    url: str, orthanc: Any, versions: dict[str, str], ident: dict[str, Any], records: Path, cam: bool
) -> None:
    dicom = (
        f"  DICOM      AET {orthanc.aet} at 127.0.0.1:{orthanc.dicom_port} (C-STORE from this machine)\n"
        if orthanc
        else ""
    )
    send = (
        f"  storescu -aec {orthanc.aet} 127.0.0.1 {orthanc.dicom_port} series/*.dcm\n" if orthanc else ""
    ) + f"  curl -X POST {url}/instances --data-binary @slice.dcm\n"
    print(
        f"\ncthub pacs is ready:\n"
        f"  Orthanc    {url}/app/explorer.html (Orthanc {versions.get('orthanc')}, "
        f"DICOMweb plugin {versions.get('dicomweb')}; REST API {url}, DICOMweb {url}/dicom-web)\n"
        f"{dicom}"
        f"  model      {ident.get('name')} {ident.get('version', '')} ({ident.get('variant', 'fp32')} ONNX)\n"
        f"  records    {records}\n"
        f"  overlays   {'class activation maps, NOT FOR DIAGNOSTIC USE' if cam else 'off (--cam)'}\n"
        f"Send a CT series; its SR is stored in the same study once the series is stable:\n{send}",
        flush=True,
    )

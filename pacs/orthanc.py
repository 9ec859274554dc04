"""A local Orthanc for the loop: its configuration, start, readiness check and stop.

`start_orthanc(OrthancConfig(workdir, ...))` writes `orthanc.json` and `loopback.lua` into `workdir` and
starts Debian's `/usr/sbin/Orthanc` with only the DICOMweb plugin loaded, its storage and SQLite index in
`workdir/storage`, its log in `workdir/orthanc.log`. It answers on 127.0.0.1 only:

- HTTP (REST API, Orthanc Explorer, DICOMweb at /dicom-web/): Orthanc 1.10 listens on every interface but
  `RemoteAccessAllowed: false` refuses every request that does not come from this machine;
- DICOM (C-STORE from a modality or `storescu`): Orthanc has no bind address for it, so the Lua filter
  `ReceivedInstanceFilter` refuses instances sent over DICOM from any address but the loopback one.

`StableAge` (seconds without a new instance before Orthanc declares a series stable) is short by default here
(5 s, Orthanc's own default is 60 s) so a user trying the loop sees the result soon after sending a study.

Tested with Debian 12's orthanc 1.10.1+dfsg-2+deb12u1 and orthanc-dicomweb 1.7+dfsg-6+b2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cthub.errors import CTHubError

ORTHANC_BINARY = "/usr/sbin/Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
DICOMWEB_ROOT = "/dicom-web/"
TESTED = {"orthanc": "1.10.1+dfsg-2+deb12u1", "orthanc-dicomweb": "1.7+dfsg-6+b2"}
INSTALL_HINT = "install Debian's Orthanc and its DICOMweb plugin: apt-get install orthanc orthanc-dicomweb"

# DICOM C-STORE only from this machine: Orthanc 1.10 has no bind address for its DICOM port.
LOOPBACK_FILTER = """\
-- written by ct-ssl-hub (pacs/orthanc.py): DICOM instances sent over the network only from this machine
function ReceivedInstanceFilter(dicom, origin, info)
  if origin["RequestOrigin"] == "DicomProtocol" then
    local ip = origin["RemoteIp"]
    return ip == "127.0.0.1" or ip == "::1" or ip == "::ffff:127.0.0.1"
  end
  return true
end
"""


class PacsError(CTHubError):
    """The PACS cannot be started or reached, or refused what the loop sent it."""

    http_status = 502
    code = "pacs_error"


@dataclass(frozen=True)
class OrthancConfig:
    """Where and on which loopback ports a local Orthanc runs."""

    workdir: Path
    http_port: int = 8042
    dicom_port: int = 4242
    aet: str = "CTHUB_PACS"
    stable_age_s: int = 5
    name: str = "ct-ssl-hub PACS"

    def to_json(self, plugin: Path, lua: Path) -> dict[str, Any]:
        """Orthanc's configuration (the options not listed keep Orthanc's defaults)."""
        storage = str(self.workdir / "storage")
        return {
            "Name": self.name,
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "Plugins": [str(plugin)],
            "LuaScripts": [str(lua)],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomAlwaysAllowStore": True,
            "StableAge": self.stable_age_s,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": False},
        }


def find_orthanc(binary: str | Path | None = None) -> Path | None:
    """The Orthanc executable: `binary` when given (and only it), else Debian's /usr/sbin/Orthanc, else
    `Orthanc` on the PATH."""
    for cand in (binary,) if binary else (ORTHANC_BINARY, shutil.which("Orthanc")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return Path(cand)
    return None


def find_dicomweb_plugin() -> Path | None:
    """Debian's DICOMweb plugin (package orthanc-dicomweb), or None."""
    for d in PLUGIN_DIRS:
        p = Path(d) / DICOMWEB_PLUGIN
        if p.is_file():
            return p
    return None


def missing_parts(binary: str | Path | None = None) -> str | None:
    """Why a local Orthanc for the loop cannot be started here (None: it can)."""
    if find_orthanc(binary) is None:
        return f"no Orthanc executable ({binary or ORTHANC_BINARY}); {INSTALL_HINT}"
    if find_dicomweb_plugin() is None:
        return f"no DICOMweb plugin {DICOMWEB_PLUGIN} in {' or '.join(PLUGIN_DIRS)}; {INSTALL_HINT}"
    return None


def write_config(config: OrthancConfig, plugin: Path) -> Path:
    """`orthanc.json` and `loopback.lua` in the work directory; returns the configuration's path."""
    config.workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(config.workdir, 0o700)  # the storage holds patient data
    lua = config.workdir / "loopback.lua"
    lua.write_text(LOOPBACK_FILTER)
    path = config.workdir / "orthanc.json"
    path.write_text(json.dumps(config.to_json(plugin, lua), indent=2) + "\n")
    return path


@dataclass
class OrthancProcess:
    """A running local Orthanc: its REST base URL, DICOM port, process and log file."""

    url: str
    dicom_port: int
    aet: str
    proc: subprocess.Popen
    log: Path

    @property
    def dicomweb(self) -> str:
        return self.url + DICOMWEB_ROOT.rstrip("/")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Orthanc shuts down cleanly), SIGKILL if it lingers; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode


def _die_with_parent() -> list[str]:
    """A command prefix that makes Orthanc get SIGTERM when the process that started it dies, so a killed
    `cthub pacs` leaves no Orthanc behind: util-linux `setpriv --pdeathsig` (Linux), else nothing."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv and sys.platform == "linux" else []


def start_orthanc(
    config: OrthancConfig, *, binary: str | Path | None = None, timeout: float = 60.0
) -> OrthancProcess:
    """Start Orthanc for `config` and wait until its REST API and DICOMweb plugin answer; PacsError (with the
    tail of Orthanc's log) when it is not installed, stops, or does not answer within `timeout` seconds."""
    import httpx

    if why := missing_parts(binary):
        raise PacsError(why)
    exe, plugin = find_orthanc(binary), find_dicomweb_plugin()
    assert exe is not None and plugin is not None
    path = write_config(config, plugin)
    log = config.workdir / "orthanc.log"
    with open(log, "ab") as out:
        # its own session: a Ctrl+C meant for the caller does not reach Orthanc, which the caller stops with
        # one SIGTERM (a second signal during Orthanc's shutdown kills it before its database is closed)
        proc = subprocess.Popen(  # noqa: S603 -- Debian's Orthanc, a configuration written here
            [*_die_with_parent(), str(exe), str(path)],
            cwd=config.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    orthanc = OrthancProcess(f"http://127.0.0.1:{config.http_port}", config.dicom_port, config.aet, proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            plugins = httpx.get(f"{orthanc.url}/plugins", timeout=2)
            if plugins.status_code == 200 and "dicom-web" in plugins.json():
                return orthanc
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    orthanc.stop()
    raise PacsError(
        f"Orthanc did not start on 127.0.0.1:{config.http_port} (DICOM {config.dicom_port}); "
        f"its log:\n{orthanc.log_tail()}"
    )

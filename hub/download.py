"""Download one file over HTTP(S) for a person waiting on it: a progress bar, resume, timeouts, Google Drive's
large-file confirmation step, and one typed error for whatever goes wrong.

Built on urllib (standard library) and tqdm, not gdown (MIT): gdown follows Drive's confirmation page only
for hosts named drive.google.com or docs.google.com (gdown/parse_url.py), so its Drive path could not be run
against the local stand-in host the tests use; it also keeps cookies in ~/.cache/gdown.

Google Drive, as the authors' links behave: `https://drive.google.com/uc?export=download&id=ID` redirects to
`https://drive.usercontent.google.com/download?id=ID&export=download`, which sends a small file at once but,
for a file too large to scan for viruses (above ~100 MB, as the ResNet50 checkpoints are), answers an HTML
page "Virus scan warning" with `<form id="download-form" action=".../download">` whose hidden inputs (`id`,
`export`, `confirm=t`, `uuid=...`) make the URL of the file. Older pages offered a `href="/uc?export=download
&confirm=TOKEN&id=ID"` link instead; both are followed. Any other page (quota exceeded, no access, not found)
where a file was expected raises NotAFileError with the page's own words.

Resume: bytes go to `<dest>.part`; a transfer cut off is continued with `Range: bytes=N-` (up to `attempts`
times in one call), and a `.part` left by an earlier call is continued the same way. A host that ignores the
Range header (200 instead of 206) restarts the file from its first byte.

`$CTHUB_GDRIVE_ENDPOINT` (or `endpoint=`) replaces https://drive.google.com: a mirror, or a test host.
"""

from __future__ import annotations

import hashlib
import html.parser
import http.client
import http.cookiejar
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from hub.remote import CONNECT_TIMEOUT_S, RemoteUnavailable, host_reachable, is_offline

GDRIVE_ENDPOINT_ENV = "CTHUB_GDRIVE_ENDPOINT"
DEFAULT_GDRIVE_ENDPOINT = "https://drive.google.com"
READ_TIMEOUT_S = 60.0  # per connect and per read of a block: a stalled transfer fails, a slow one does not
ATTEMPTS = 4  # one transfer and up to three resumes per call
CHUNK = 1 << 20
MAX_PAGE = 1 << 20  # an HTML page is read up to 1 MiB, no more
MAX_CONFIRMATIONS = 3
USER_AGENT = "ct-ssl-hub (python urllib)"
log = logging.getLogger(__name__)


class DownloadError(RemoteUnavailable):
    """A file could not be downloaded: offline, host unreachable, refused, timed out or cut off."""

    http_status = 502
    code = "download_failed"


class NotAFileError(DownloadError):
    """The host answered with a web page (an error, a quota or access notice) where a file was expected."""

    code = "not_a_file"


class _RangeNotSatisfiable(Exception):
    """HTTP 416: the partial file is not a prefix the host can continue (e.g. the file changed)."""


@dataclass(frozen=True)
class Downloaded:
    path: Path
    sha256: str
    size: int
    url: str  # the URL the bytes came from, after redirects and confirmation
    resumed: int  # how many times the transfer was continued with a Range request


def gdrive_endpoint(override: str | None = None) -> str:
    """Base URL of Google Drive: `override`, else $CTHUB_GDRIVE_ENDPOINT, else https://drive.google.com."""
    return (override or os.environ.get(GDRIVE_ENDPOINT_ENV) or DEFAULT_GDRIVE_ENDPOINT).rstrip("/")


def gdrive_url(file_id: str, endpoint: str | None = None) -> str:
    """The direct-download link of a Drive file, as the authors publish theirs."""
    query = urllib.parse.urlencode({"export": "download", "id": file_id})
    return f"{gdrive_endpoint(endpoint)}/uc?{query}"


class _PageParser(html.parser.HTMLParser):
    """The title, Drive's error caption, and the confirmation form or link of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.caption = ""
        self.forms: list[tuple[dict[str, str], dict[str, str]]] = []  # (form attributes, hidden inputs)
        self.confirm_links: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "title":
            self._in = "title"
        elif tag == "p" and "uc-error-subcaption" in a.get("class", ""):
            self._in = "caption"
        elif tag == "form":
            self.forms.append((a, {}))
        elif tag == "input" and self.forms and a.get("type", "").lower() == "hidden" and a.get("name"):
            self.forms[-1][1][a["name"]] = a.get("value", "")
        elif tag == "a" and "confirm=" in a.get("href", "") and "export=download" in a.get("href", ""):
            self.confirm_links.append(a["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("title", "p"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "title":
            self.title += data
        elif self._in == "caption":
            self.caption += data


def confirmation_url(page: str, base: str) -> str | None:
    """The URL that Drive's "Virus scan warning" page confirms the download with, or None for other pages."""
    p = _PageParser()
    p.feed(page)
    for attrs, hidden in p.forms:
        if attrs.get("id") == "download-form" or "confirm" in hidden:
            action = urllib.parse.urljoin(base, attrs.get("action") or base)
            sep = "&" if urllib.parse.urlsplit(action).query else "?"
            return action + sep + urllib.parse.urlencode(hidden)
    if p.confirm_links:
        return urllib.parse.urljoin(base, p.confirm_links[0])
    return None


def describe_page(page: str) -> str:
    """A page's own words: Drive's error caption, else its title."""
    p = _PageParser()
    p.feed(page)
    words = " ".join((p.caption or p.title).split())
    return f"'{words[:200]}'" if words else "an untitled page"


def _is_page(resp: http.client.HTTPResponse) -> bool:
    ctype = resp.headers.get("Content-Type", "").lower()
    attachment = "attachment" in resp.headers.get("Content-Disposition", "").lower()
    return ctype.startswith(("text/html", "application/xhtml")) and not attachment


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _opener() -> urllib.request.OpenerDirector:
    """Redirects followed (a Range header goes along), cookies kept for this download only."""
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))


def _open(
    opener: urllib.request.OpenerDirector, url: str, start: int, timeout: float
) -> tuple[http.client.HTTPResponse, str]:
    """Open `url` (from byte `start`) and follow confirmation pages to the file; returns it and its URL."""
    for _ in range(MAX_CONFIRMATIONS + 1):
        headers = {"User-Agent": USER_AGENT} | ({"Range": f"bytes={start}-"} if start else {})
        try:
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):  # a page's form could say file:
                raise DownloadError(f"{url}: only http and https URLs are downloaded")
            req = urllib.request.Request(url, headers=headers)  # noqa: S310 - scheme checked above
            resp = opener.open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and start:
                raise _RangeNotSatisfiable from None
            body = e.read(MAX_PAGE).decode("utf-8", "replace") if e.fp is not None else ""
            said = f": {describe_page(body)}" if "<" in body else ""
            raise DownloadError(f"{_host(url)} answered HTTP {e.code} {e.reason} for {url}{said}") from None
        except urllib.error.URLError as e:
            raise DownloadError(f"{_host(url)} could not be reached ({e.reason})") from None
        if not _is_page(resp):
            return resp, resp.geturl()
        with resp:
            page = resp.read(MAX_PAGE).decode("utf-8", "replace")
        confirmed = confirmation_url(page, resp.geturl())
        if confirmed is None:
            raise NotAFileError(
                f"{_host(resp.geturl())} answered with an HTML page, {describe_page(page)}, instead of the "
                f"file at {url} (a moved or private file, or a download quota that was exceeded: the link "
                "may work again later, or in a browser)"
            )
        url = confirmed
    raise NotAFileError(f"{_host(url)} asked to confirm the download {MAX_CONFIRMATIONS} times; giving up")


def _receive(resp: http.client.HTTPResponse, part: Path, start: int, progress: bool, desc: str) -> str:
    """Write the body into `part` (appending at `start` for a 206); "" when complete, else why it stopped."""
    if resp.status == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", "").strip())
        if m is None or int(m[1]) != start:
            raise DownloadError(
                f"{_host(resp.geturl())} answered a range request with Content-Range "
                f"{resp.headers.get('Content-Range')!r}, not bytes {start}-"
            )
        total: int | None = int(m[3]) if m[3] != "*" else None
    else:
        start = 0  # the host sent the whole file
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
    expected = None if total is None else total - start
    got = 0
    with (
        resp,
        open(part, "ab" if start else "wb") as f,
        tqdm(
            total=total,
            initial=start,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        try:
            while block := resp.read(CHUNK):
                if (
                    start == 0
                    and got == 0
                    and block.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))
                ):
                    raise NotAFileError(
                        f"{_host(resp.geturl())} sent an HTML page, "
                        f"{describe_page(block.decode('utf-8', 'replace'))}, where a file was expected"
                    )
                f.write(block)
                got += len(block)
                bar.update(len(block))
        except http.client.IncompleteRead as e:
            f.write(e.partial)
            return "the connection closed early"
        except TimeoutError:
            return "no data within the read timeout"
        except OSError as e:
            return f"{type(e).__name__}: {e}"
    if expected is not None and got < expected:
        return "the connection closed early"
    return ""


def download(
    url: str,
    dest: str | Path,
    *,
    timeout: float = READ_TIMEOUT_S,
    attempts: int = ATTEMPTS,
    progress: bool = True,
) -> Downloaded:
    """Download `url` into `dest` (written only when complete); resumes from `<dest>.part` when present.

    Offline (HF_HUB_OFFLINE) or an unreachable host fails at once, before any transfer; every failure is a
    DownloadError (NotAFileError for a web page) naming the host and what it answered.
    """
    dest = Path(dest)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http and https URLs are downloaded")
    if is_offline():
        raise DownloadError(f"HF_HUB_OFFLINE is set: {url} is not downloaded (unset it to go online)")
    if not host_reachable(url, CONNECT_TIMEOUT_S):
        raise DownloadError(
            f"{_host(url)} did not answer within {CONNECT_TIMEOUT_S:.0f} s (offline, or the host is down)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    log.info("downloading %s into %s", url, dest)
    opener, target, resumed, cut = _opener(), url, 0, ""
    for _ in range(attempts):
        start = part.stat().st_size if part.is_file() else 0
        try:
            resp, target = _open(opener, target, start, timeout)
        except _RangeNotSatisfiable:
            part.unlink()  # start over from the first byte
            continue
        except TimeoutError:
            cut = f"no answer within {timeout:.0f} s"
            continue
        resumed += resp.status == 206
        cut = _receive(resp, part, start, progress, dest.name)
        if not cut:
            break
    else:
        have = part.stat().st_size if part.is_file() else 0
        raise DownloadError(
            f"the transfer from {_host(url)} was cut off {attempts} times ({cut}); {have} bytes are kept in "
            f"{part}: run the same command again to resume"
        )
    h = hashlib.sha256()
    with open(part, "rb") as f:
        while block := f.read(CHUNK * 4):
            h.update(block)
    size = part.stat().st_size
    os.replace(part, dest)
    return Downloaded(path=dest, sha256=h.hexdigest(), size=size, url=target, resumed=resumed)

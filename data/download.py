"""Files fetched once into the user cache: where that cache is, the WAT_OFFLINE switch, a file's
SHA-256, and the one download (atomic, with a progress bar and a timeout) that the Whisper loader
(`wat.extract.load`) and the official Whisper-AT heads (`wat.data.heads.official`) share.

A download goes to a `*.partial` temporary file beside its target and is renamed onto it only
when every byte announced by the server arrived and the caller's check of the file passed: a
killed or cut transfer leaves nothing under the target's name, so nothing half-written is ever
loaded. urllib honours http(s)_proxy / no_proxy.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from .files import atomic_path, one_line

# seconds a download may wait for the connection or for more data before it counts as failed
DOWNLOAD_TIMEOUT = 20.0
CHUNK = 1 << 20


class DownloadError(OSError):
    """A download that did not deliver the whole file; the message says why (HTTP status, network
    error, a transfer cut short, a file that failed its check)."""


def offline() -> bool:
    """WAT_OFFLINE=1: never try the network (use what is cached or installed)."""
    return os.getenv("WAT_OFFLINE", "") not in ("", "0")


def cache_root(sub: str) -> Path:
    """`$XDG_CACHE_HOME/SUB`, or `~/.cache/SUB` (openai-whisper's rule, so "whisper" is its cache)."""
    default = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.getenv("XDG_CACHE_HOME", default)) / sub


def sha256(path) -> str:
    """Hex SHA-256 of a file, read in 16 MB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def socket_timeout(seconds: float):
    """openai-whisper's download calls urlopen without a timeout (a blackholed network would hang
    it); urllib takes the process default for sockets it opens, so set that for the download only."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download(url: str, target, *, desc: str, check=None, timeout: float | None = None) -> str:
    """Fetch URL into TARGET atomically with a progress bar; returns the file's SHA-256.
    `check(tmp_path, sha256)`, when given, may raise (its exception propagates) to refuse the file
    before it takes TARGET's name. Network trouble is a DownloadError: an HTTP status, no
    connection, `timeout` seconds without data (default DOWNLOAD_TIMEOUT), or fewer bytes than the
    Content-Length announced."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        digest = _fetch(url, tmp, desc, DOWNLOAD_TIMEOUT if timeout is None else timeout)
        if check is not None:
            check(tmp, digest)
    return digest


def _fetch(url: str, dest: Path, desc: str, timeout: float) -> str:
    from .clikit.progress import progress

    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as src:
            length = src.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            got = 0
            with open(dest, "wb") as out, progress(total=total, desc=desc, unit="B", unit_scale=True,
                                                   unit_divisor=1024) as bar:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DownloadError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"no connection ({one_line(e.reason) if e.reason else one_line(e)})") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts, resets, bad responses
        raise DownloadError(f"{type(e).__name__}: {one_line(e)}") from None
    # http.client returns a short body without an error when the connection drops
    if total is not None and got != total:
        raise DownloadError(f"the transfer stopped after {got} of {total} bytes")
    return h.hexdigest()

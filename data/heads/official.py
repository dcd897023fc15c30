"""The official Whisper-AT heads by name: `whisper-at` (TL-Tr at the encoder width, the released
`RELEASE_ori.pth`) and `whisper-at-low` (TL-Tr512, `RELEASE_low.pth`, released for small, medium
and large only), resolved for the Whisper model in use and fetched once into the user cache.

The files are those the `whisper-at` package lists (`_MODELS_AT` in its `whisper_at/__init__.py`):
public Dropbox links, no published checksums. So the SHA-256 of each file is recorded when it is
first downloaded (`$XDG_CACHE_HOME/wat/whisper-at/SHA256SUMS`, sha256sum's format) and a later
file that differs — the cached one changed, or a re-download brings other bytes — is refused. A
download is checked to be the official head of that release (527 AudioSet outputs, the release's
width, the variant's projection) before it takes its name; a killed one leaves only a `.partial`
file that nothing loads (removed by the next download).

`WAT_WHISPER_AT_URL` replaces the Dropbox links by a mirror holding the files under their names
(`$WAT_WHISPER_AT_URL/tiny.en_ori.pth`); `WAT_OFFLINE=1` uses only what is cached.

Naming: whisper-at's "large" is large-v2 (its `load_model("large")` and its "large" heads), but
"large" is large-v3 in openai-whisper and wat, for which no head was released; the large heads
are asked for by their model, `large-v1` or `large-v2`.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .. import download
from ..files import atomic_write
from .checkpoint import WHISPER_WIDTHS, HeadInfo, load_head
from .kinds import HeadError

log = logging.getLogger(__name__)

NAMES = {"whisper-at": "ori", "whisper-at-low": "low"}  # head name -> file variant
URL_ENV = "WAT_WHISPER_AT_URL"
SUMS = "SHA256SUMS"
LOW_DIM = 512  # projection width of the `_low` heads (whisper-at's mode tl_down_tr_512_1_8)

# whisper-at's _MODELS_AT: file -> Dropbox share id (https://www.dropbox.com/s/ID/FILE?dl=1)
_SHARES = {
    "tiny.en_ori.pth": "atq9so6w0qug5ai", "tiny_ori.pth": "cib4q4iz6g758l0",
    "base.en_ori.pth": "qtzgsbuquoz0afn", "base_ori.pth": "2odwh42u6e9ger7",
    "small.en_ori.pth": "cyx50ycl1ul7lji", "small.en_low.pth": "507o66zgl8v6ddd",
    "small_ori.pth": "jftj9s0kr4ycvr1", "small_low.pth": "a1x0416v58f7wrf",
    "medium.en_ori.pth": "bbvylvmgns8ja4p", "medium.en_low.pth": "2q5wprr8f9gti5t",
    "medium_ori.pth": "65aabayr7o819az", "medium_low.pth": "0mnfmcasram4n6o",
    "large-v1_ori.pth": "b8x2en1fdzc8nhk", "large-v1_low.pth": "5o79h70wyla8jlk",
    "large-v2_ori.pth": "3zxpyvdrxy22eq7", "large-v2_low.pth": "jw2rh4uylhqgn85",
}
# the Whisper releases with an official head, as wat and openai-whisper name them
RELEASES = ("tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en", "medium", "large-v1", "large-v2")
_WIDTH = {size: width for width, (_, size) in WHISPER_WIDTHS.items()}
# a release name, bare or as OpenAI's Hugging Face id (the same weights)
_SPEC = re.compile(r"(?:openai/whisper-)?((?:tiny|base|small|medium|large)[\w.-]*|turbo)")


class OfficialHeadError(HeadError):
    """An official head that cannot be had for this model; the message says why and what to do."""


def is_official(spec) -> bool:
    """Whether a --head / --init value names an official head rather than a file."""
    return isinstance(spec, str) and spec in NAMES


def _listing() -> str:
    return ", ".join(RELEASES)


def release_of(model: str) -> str:
    """The Whisper release of a model spec ("tiny.en", "openai/whisper-large-v2") whose official
    head fits it; OfficialHeadError naming the fix for any other model."""
    m = _SPEC.fullmatch(model)
    release = m.group(1) if m else None
    if release in RELEASES:
        return release
    if release == "large":
        raise OfficialHeadError(
            f"'{model}' is large-v3 in openai-whisper and wat (whisper-at's 'large' was large-v2) and "
            f"Whisper-AT released no head for large-v3: use the model large-v2 (whisper-at's 'large') or large-v1")
    if release is not None:
        raise OfficialHeadError(f"Whisper-AT released no head for {model}; official heads exist for {_listing()}: "
                                "use one of those models, or train a head on features of this one (wat-train)")
    raise OfficialHeadError(f"{model} is not a Whisper release name, so which official head fits it is unknown "
                            f"(heads exist for {_listing()}): load the model by its release name, or give the "
                            "head file itself")


def file_name(name: str, model: str) -> str:
    """`RELEASE_ori.pth` / `RELEASE_low.pth` of head `name` for `model`."""
    if name not in NAMES:
        raise OfficialHeadError(f"unknown official head {name!r}: expected {' or '.join(NAMES)}")
    release = release_of(model)
    file = f"{release}_{NAMES[name]}.pth"
    if file not in _SHARES:
        low = sorted({f.rsplit('_', 1)[0] for f in _SHARES if f.endswith("_low.pth")}, key=RELEASES.index)
        raise OfficialHeadError(f"Whisper-AT released no low-dimension head ({name}) for {release}, only for "
                                f"{', '.join(low)}: use whisper-at")
    return file


def url(file: str) -> str:
    """Where `file` is downloaded from: $WAT_WHISPER_AT_URL/FILE, else whisper-at's Dropbox link."""
    base = os.getenv(URL_ENV, "").strip()
    if base:
        return f"{base.rstrip('/')}/{file}"
    return f"https://www.dropbox.com/s/{_SHARES[file]}/{file}?dl=1"


def folder() -> Path:
    """Where the heads and their recorded digests are kept."""
    return download.cache_root("wat") / "whisper-at"


def _recorded(where: Path) -> dict[str, str]:
    try:
        text = (where / SUMS).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if len(digest) == 64 and name:
            out[name.strip()] = digest
    return out


def _record(where: Path, file: str, digest: str) -> None:
    sums = {**_recorded(where), file: digest}
    atomic_write(where / SUMS, "".join(f"{d}  {f}\n" for f, d in sorted(sums.items())))


def _check_head(path, release: str, variant: str) -> HeadInfo:
    """The file must be the official head of this release and variant (shapes checked by loading it)."""
    _, info = load_head(path)
    want = (_WIDTH[release.split(".")[0].split("-")[0]], LOW_DIM if variant == "low" else None)
    if info.model.startswith("whisper-at:") and (info.dim_in, info.proj_dim) == want:
        return info
    raise HeadError(f"not the {release} {variant} head: width {info.dim_in}, projection {info.proj_dim}, "
                    f"expected width {want[0]}, projection {want[1]}")


def fetch(name: str, model: str) -> Path:
    """The local file of official head `name` for `model`, downloaded (with a progress bar) on
    first use; OfficialHeadError, in one line with the fix, when it cannot be had."""
    from filelock import FileLock

    file = file_name(name, model)
    release, variant = file[: -len(".pth")].rsplit("_", 1)
    where = folder()
    target = where / file
    source = url(file)
    fix = (f"download {source} on a machine with network and put it at {target}, or set {URL_ENV} to a "
           f"mirror of the files, or give a head file instead of {name!r}")
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OfficialHeadError(f"cannot create {where} for the official heads ({e.strerror or e})") from None
    with FileLock(str(where / f"{file}.lock")):  # one download per file, whatever the processes
        known = _recorded(where).get(file)
        if target.is_file():
            digest = download.sha256(target)
            if known is None:  # placed there by hand: trusted now, checked from now on
                _record(where, file, digest)
                log.info("official head %s: %s (SHA-256 %s recorded)", file, target, digest[:16])
            elif digest != known:
                raise OfficialHeadError(
                    f"{target}: SHA-256 {digest[:16]}... is not the {known[:16]}... recorded when it was first "
                    f"downloaded (the file changed since): delete it to download it again, or its line in "
                    f"{where / SUMS} if you trust this file")
            return target
        if download.offline():
            raise OfficialHeadError(f"official Whisper-AT head {file} is not cached and WAT_OFFLINE is set: {fix}")
        for stale in where.glob(f"{file}.*.partial"):  # left by a killed download (we hold the lock)
            stale.unlink(missing_ok=True)

        def check(tmp, digest):
            if known is not None and digest != known:
                raise OfficialHeadError(
                    f"{source}: SHA-256 {digest[:16]}... is not the {known[:16]}... recorded when {file} was first "
                    f"downloaded (the file at the source changed); not kept. If you trust it, delete the line of "
                    f"{file} in {where / SUMS}")
            try:
                _check_head(tmp, release, variant)
            except HeadError as e:
                raise OfficialHeadError(f"{source} is not the official Whisper-AT head {file} "
                                        f"({str(e).removeprefix(str(tmp) + ': ')}); not kept") from None

        try:
            digest = download.download(source, target, desc=f"whisper-at {file}", check=check)
        except download.DownloadError as e:
            raise OfficialHeadError(f"cannot download official Whisper-AT head {file} from {source}: {e}; {fix}") \
                from None
        if known is None:
            _record(where, file, digest)
        log.info("official head %s: downloaded to %s (SHA-256 %s)", file, target, digest[:16])
    return target


def load_named_head(spec, model: str, n_layers: int | None = None, map_location="cpu"):
    """`load_head` of a head file, or of the official head `spec` names ("whisper-at",
    "whisper-at-low") for the Whisper `model` the features come from (downloaded on first use).
    An official head's info names its release ("whisper-at:large-v2")."""
    if not is_official(spec):
        return load_head(spec, n_layers, map_location)
    path = fetch(spec, model)
    head, info = load_head(path, n_layers, map_location)
    info.model = f"whisper-at:{release_of(model)}"
    return head, info

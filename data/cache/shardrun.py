"""A resumable run that writes a cache shard by shard (wat-extract, wat-robust): `ShardRun`.

    feats.h5                 the index over the non-empty shards (`build_index`)
    feats.shards/
      .lock                  held (an OS lock, `files.output_lock`) by the run writing this folder
      manifest.json          what a rerun must agree on to keep the shards already written
      shard-00000.h5         a shard (`write_shard`)
      shard-00000.json       its record, written (atomically) after the shard: the commit point

A shard is finished when its record exists (and, when it holds rows, its file does); a rerun redoes
the others, after checking every finished shard in full (`drop_damaged`: a truncated or bit-rotten
shard is forgotten and made again). Refusals are `ShardRunError`s; each command words them as its
own error type.
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

from ..files import locked_folder, write_json
from .check import check_shard
from .layout import shard_path
from .meta import CacheError, CacheMeta, padding_of
from .write import build_index

MANIFEST = "manifest.json"
LOCK = ".lock"  # held (flock) by the run writing this folder
ERRORS = "errors.tsv"
PROBLEMS = "problems.tsv"
# what runs made before `storage`/`layers` existed wrote: no key, fp16 and every layer
_MANIFEST_DEFAULTS = {"storage": "fp16", "layers": "all"}


class ShardRunError(CacheError):
    """An output folder that this run must not write into as asked (made differently, not ours,
    unfinished shards)."""


def shard_dir_for(index_path) -> Path:
    """`feats.h5` -> `feats.shards/` beside it."""
    p = Path(index_path)
    return p.with_name(p.stem + ".shards")


def record_path(shard_dir, i: int) -> Path:
    return Path(shard_dir) / f"shard-{i:05d}.json"


def finished(shard_dir, i: int) -> dict | None:
    """The shard's record if the shard is complete on disk, else None (to be redone)."""
    rp = record_path(shard_dir, i)
    if not rp.exists():
        return None
    try:
        rec = json.loads(rp.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("n_written", 0) > 0 and not shard_path(shard_dir, i).exists():
        return None
    return rec


def write_record(shard_dir, i: int, record: dict) -> None:
    """Commit shard i: its record, written after its shard file."""
    write_json(record_path(shard_dir, i), record, indent=None)


def _with_defaults(manifest: dict) -> dict:
    # both sides: older runs, and callers that write only fp16 of every layer (wat-robust), omit the
    # storage/layers keys; runs before cache schema 4 omit the padding (their pad30 padded samples)
    out = {**_MANIFEST_DEFAULTS, **manifest}
    out.setdefault("pad30_padding", padding_of(out.get("policy", ""), None))
    return out


class ShardRun:
    """The shard folder of the index `index` (`feats.h5` -> `feats.shards/`), for one run."""

    def __init__(self, index, tool: str = "wat-extract"):
        self.index = Path(index)
        self.dir = shard_dir_for(self.index)
        self.tool = tool  # names the command in what it prints

    @contextmanager
    def locked(self, what: str):
        """Hold the folder's lock while the block runs: a second run on the same output is refused
        (`files.LockedError`) before it loads or writes anything. A folder this call made is removed
        again when the block fails before anything but the lock was written."""
        with locked_folder(self.dir, LOCK, what):
            yield self

    def prepare(self, manifest: dict, overwrite: bool) -> Path:
        """Create the shard folder, or check that the one there was made the same way (`manifest`);
        `overwrite`: clear what an earlier run wrote instead. Returns the folder."""
        index_path, shard_dir = self.index, self.dir
        mpath = shard_dir / MANIFEST
        old = json.loads(mpath.read_text()) if mpath.exists() else None
        manifest = _with_defaults(manifest)
        if old is not None:
            old = _with_defaults(old)
        if old is not None and old != manifest and not overwrite:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in manifest.items() if old.get(k) != v)
            raise ShardRunError(f"{shard_dir} was extracted differently ({diff}); use --overwrite to replace it "
                                f"or choose another --out")
        if old is None and index_path.exists() and not overwrite:
            raise ShardRunError(f"{index_path} exists and was not made by this extractor run; use --overwrite or "
                                f"another --out")
        if overwrite:
            self._clear()
        shard_dir.mkdir(parents=True, exist_ok=True)
        write_json(mpath, manifest, indent=None)
        return shard_dir

    def _clear(self) -> None:
        # only remove what a shard run writes: never a user's other files
        if self.index.exists():
            self.index.unlink()
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith("shard-") or p.name in (MANIFEST, ERRORS, PROBLEMS) or p.name.endswith(".partial"):
                    p.unlink()

    def finished(self, i: int) -> dict | None:
        return finished(self.dir, i)

    def write_record(self, i: int, record: dict) -> None:
        write_record(self.dir, i, record)

    def drop_damaged(self, n_shards: int, meta: CacheMeta, progress: bool | None = None) -> list[str]:
        """Check every finished shard in full (`check_shard`: every byte against its checksums) and
        forget those that fail (truncated, bit rot, edited), so that this run makes them again.
        Reading a shard costs a small fraction of making it. Returns one line per shard."""
        from tqdm import tqdm

        from ..clikit.progress import progress as progress_bar

        done = [(i, r) for i in range(n_shards) if (r := self.finished(i)) is not None and r["n_written"] > 0]
        row = 2 * (meta.n_layers * meta.n_frames * meta.dim + meta.n_layers * meta.dim)
        out = []
        with progress_bar(total=row * sum(r["n_written"] for _, r in done), unit="B", unit_scale=True, desc="check",
                          disable=None if progress is None else not progress) as bar:
            for i, _ in done:
                path = shard_path(self.dir, i)
                problems, _ = check_shard(path, meta, bar=bar)
                if problems:
                    out.append(f"{path.name}: {problems[0]}")
                    tqdm.write(f"{self.tool}: {path.name} is damaged, extracting it again ({problems[0]})",
                               file=sys.stderr)
                    record_path(self.dir, i).unlink(missing_ok=True)  # the record first: no record = to do
                    path.unlink(missing_ok=True)
        return out

    def records(self, n_shards: int) -> list[dict]:
        """Every shard's record; ShardRunError when some shard is not finished."""
        records = [self.finished(i) for i in range(n_shards)]
        missing = [i for i, r in enumerate(records) if r is None]
        if missing:
            raise ShardRunError(f"{len(missing)} shard(s) not finished ({', '.join(map(str, missing[:10]))}); "
                                f"rerun the same command to resume")
        return records

    def written(self, records: list[dict]) -> list[Path]:
        """The shard files of the shards that hold rows (a shard whose clips all failed has none)."""
        return [shard_path(self.dir, i) for i, r in enumerate(records) if r["n_written"] > 0]

    def build_index(self, shard_files, index=None) -> None:
        """The index (`index`, default this run's) over `shard_files`."""
        build_index(self.index if index is None else index, shard_files)

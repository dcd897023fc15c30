"""Per-process state of the readers: open read-only h5py files and descriptors (never across a
fork or a pickle) and which shards this process has already checked against their checksums."""
from __future__ import annotations

import os
from pathlib import Path

import h5py

from .meta import CacheError


def verify_key(path, field: str) -> tuple:
    """Key of `VERIFIED`: the file (resolved), what was checked, and the file's mtime and size."""
    st = os.stat(path)
    return (str(Path(path).resolve()), field, st.st_mtime_ns, st.st_size)


def open_h5(path) -> h5py.File:
    path = Path(path)
    if path.name.endswith(".partial"):
        raise CacheError(f"{path}: unfinished file (.partial), not a shard")
    if path.is_dir():   # e.g. the dataset folder given for the cache: "file missing" sent people looking for it
        raise CacheError(f"{path}: a folder, not a cache file (the .h5 file wat-extract --out wrote)")
    if not path.is_file():
        raise CacheError(f"{path}: file missing")
    try:
        # default locking: HDF5 refuses a second open of one file with other locking flags (a VDS read
        # opens the shards itself). On network filesystems set HDF5_USE_FILE_LOCKING=FALSE instead.
        return h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"{path}: unreadable HDF5 file ({e})") from None


# Open read-only files, per process: h5py handles never cross a fork or a pickle.
_HANDLES: dict[str, tuple[int, h5py.File]] = {}
# (shard path, field, mtime, size) whose every row this process has checked against its checksums
# (or, without checksums, for zero/non-finite rows): readers check a shard once per run. Field
# "mean:L": layer L of `mean`, checked against its per-layer checksums (`check_layer_block`).
VERIFIED: set[tuple] = set()


def handle(path: str) -> h5py.File:
    entry = _HANDLES.get(path)
    if entry is None or entry[0] != os.getpid() or not entry[1].id.valid:
        _HANDLES[path] = entry = (os.getpid(), open_h5(path))
    return entry[1]


# Plain file descriptors of the same files, for readers that copy raw rows (`row_offsets`).
_FDS: dict[str, tuple[int, int]] = {}


def raw_fd(path: str) -> int:
    """A read-only descriptor of shard `path` for os.preadv, one per process (valid until `forget`)."""
    entry = _FDS.get(path)
    if entry is None or entry[0] != os.getpid():
        _FDS[path] = entry = (os.getpid(), os.open(path, os.O_RDONLY))
    return entry[1]


def forget(path: str) -> None:
    entry = _HANDLES.pop(path, None)
    if entry is not None and entry[0] == os.getpid() and entry[1].id.valid:
        entry[1].close()
    fd = _FDS.pop(path, None)
    if fd is not None and fd[0] == os.getpid():
        os.close(fd[1])

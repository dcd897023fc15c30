"""wat.data.files: the one durable atomic write and the writers built on it."""
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from wat.data import files


def test_atomic_write_content_and_durability(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "out.txt"
    target.write_text("old")
    files.atomic_write(target, "new ü")
    assert target.read_bytes() == "new ü".encode()
    # the file's data (same inode after the rename) and then the folder holding the rename
    assert synced == [target.stat().st_ino, tmp_path.stat().st_ino]
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            Path(tmp).write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with pytest.raises(TypeError):  # not bytes/str: nothing is written, nothing is left
        files.atomic_write(tmp_path / "x", 3.5)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_json_is_strict(tmp_path):
    files.write_json(tmp_path / "m.json", {"a": float("nan"), "b": np.float32(0.5), "c": np.int64(3),
                                           "d": [float("inf"), (1, 2)]})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"a": None, "b": 0.5, "c": 3, "d": [None, [1, 2]]}
    assert "NaN" not in text and "Infinity" not in text


def test_tsv_and_csv_round_trip_awkward_fields(tmp_path):
    rows = [("a\tb", "line\nbreak", 'quote "x"'), ("plain", None, 1.0 / 3)]
    files.write_tsv(tmp_path / "t.tsv", ["id", "path", "reason"], rows)
    with open(tmp_path / "t.tsv", newline="") as f:
        back = list(csv.reader(f, dialect="excel-tab"))
    assert back == [["id", "path", "reason"], ["a\tb", "line\nbreak", 'quote "x"'], ["plain", "", "0.333333"]]
    files.write_csv(tmp_path / "t.csv", ["x", "y"], [("a,b", 'q"')])
    with open(tmp_path / "t.csv", newline="") as f:
        assert list(csv.reader(f)) == [["x", "y"], ["a,b", 'q"']]


def test_save_figure_writes_png_only(tmp_path):
    plt = files.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    files.save_figure(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]
    assert not plt.get_fignums()


def test_output_lock_refuses_a_second_holder_and_is_released(tmp_path):
    lock = tmp_path / "out.lock"
    with files.output_lock(lock, "OUT"):
        with pytest.raises(files.LockedError, match="OUT is being written by another run"):
            with files.output_lock(lock, "OUT"):
                pass
    with files.output_lock(lock, "OUT"):  # released on exit: a later writer gets it
        pass
    # (a lock left by a process killed with SIGKILL: tests/test_train.py, test_run_dir_lock_...)


def test_locked_folder_removes_only_the_bare_folders_it_made(tmp_path):
    from wat.data.files import LockedError, locked_folder
    target = tmp_path / "a" / "b" / "run"
    with pytest.raises(KeyError):
        with locked_folder(target, "x.lock", "run"):
            assert (target / "x.lock").exists()
            raise KeyError("refused")
    assert not (tmp_path / "a").exists()  # every folder it made, none it did not
    with pytest.raises(KeyError):
        with locked_folder(target, "x.lock", "run"):
            (target / "out.json").write_text("{}")  # something was written: kept
            raise KeyError("late failure")
    assert (target / "out.json").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(KeyError):
        with locked_folder(tmp_path / "mine", "x.lock", "run"):
            raise KeyError("refused")
    assert (tmp_path / "mine").is_dir()
    with locked_folder(tmp_path / "mine", "x.lock", "run"):  # the lock is held, then released
        with pytest.raises(LockedError):
            with locked_folder(tmp_path / "mine", "x.lock", "run"):
                pass
    with locked_folder(tmp_path / "mine", "x.lock", "run"):
        pass


def test_load_torch_refuses_pickles_in_one_quiet_line(tmp_path):
    """A foreign pickle is refused without running it, in one line, and torch's UserWarning about
    the pickle protocol is not printed (a CLI's stderr would get it beside its error line)."""
    import pickle
    import warnings

    import torch
    from wat.data.files import UnreadableFile, load_torch, save_torch

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "h.pt").write_bytes(pickle.dumps(Hostile(), protocol=4))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for name in ("h.pt", "junk.pt", "missing.pt"):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with pytest.raises(UnreadableFile) as e:
                load_torch(tmp_path / name)
        assert "\n" not in str(e.value) and not seen, (name, str(e.value), [str(w.message) for w in seen])
    assert not (tmp_path / "pwned").exists()
    save_torch(tmp_path / "ok.pt", {"w": torch.arange(3)})
    assert torch.equal(load_torch(tmp_path / "ok.pt")["w"], torch.arange(3))

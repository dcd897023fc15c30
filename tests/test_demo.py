"""Demo data: ESC-50 layout, loads as a dataset, byte-identical for a seed."""
import csv

import numpy as np
import pytest
import soundfile as sf

from wat.data.audio import load_audio
from wat.data.cli import main
from wat.data.datasets import load_dataset
from wat.data.demo import CLASSES, LEVEL_DBFS


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_layout_and_loading(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "d"), "--clips-per-class", "5", "--seed", "3"]) == 0
    root = tmp_path / "d"
    with open(root / "meta" / "esc50.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    assert len(rows) == 5 * len(CLASSES) >= 50  # 11 classes
    info = sf.info(root / "audio" / rows[0]["filename"])
    assert (info.samplerate, info.frames, info.channels, info.subtype) == (44_100, 220_500, 1, "PCM_16")

    ds = load_dataset("esc50", root)
    assert not ds.problems and len(ds) == 5 * len(CLASSES)
    assert ds.vocab.names == tuple(fn.__name__ for fn in CLASSES)
    # five clips per class -> every fold holds exactly one clip of every class
    for fold in range(1, 6):
        assert sorted(c.labels[0] for c in ds.clips if c.fold == fold) == list(range(len(CLASSES)))
    # every clip decodes, is not silent, and clips of one class are not copies of each other
    first, peaks = {}, []
    for clip in ds.clips:
        audio = load_audio(clip.path)
        peaks.append(20 * np.log10(np.abs(audio).max()))
        assert len(audio) == 80_000 and LEVEL_DBFS[0] - 1 < peaks[-1] <= 0.0
        label = clip.labels[0]
        if label in first:
            assert not np.allclose(audio, first[label], atol=1e-3)
        first.setdefault(label, audio)
    assert max(peaks) - min(peaks) > 15  # loudness varies like real recordings (LEVEL_DBFS)


def test_demo_is_deterministic_for_a_seed(tmp_path):
    from wat.data.demo import make_demo

    a = _files(make_demo(tmp_path / "a", clips_per_class=1, seed=7))
    b = _files(make_demo(tmp_path / "b", clips_per_class=1, seed=7))
    c = _files(make_demo(tmp_path / "c", clips_per_class=1, seed=8))
    assert a == b
    assert a.keys() == c.keys() and a["meta/esc50.csv"] == c["meta/esc50.csv"]
    assert all(a[k] != c[k] for k in a if k.startswith("audio/"))


def test_demo_cli_rejects_bad_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # refused by argparse, before anything is written
        main(["demo", "--out", str(tmp_path), "--clips-per-class", "0"])
    assert e.value.code == 2 and "error: argument --clips-per-class" in capsys.readouterr().err

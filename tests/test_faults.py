"""Fault injection: the classes of failure issue 25 found, kept closed.

- a full disk (RLIMIT_FSIZE: write() fails with EFBIG, as with ENOSPC) in every command that writes
  files: one `PROG: error:` line, exit 2, no traceback, no `.partial` file, no half-written file (each
  file left is whole: atomic writes), no folder the run made and left empty. wat-extract and
  wat-train have their own (subprocess) cases in test_extract.py / test_train.py; kill -9 and resume
  of the long commands (wat-extract, wat-train, wat-robust) are in those modules and test_robust.py.
- adversarial output names: `output_stems` over name sets built to collide, and wat-tag writing them.
- a sweep over every command's error paths (missing, empty, foreign and wrong-kind inputs, unwritable
  outputs, refusals): each is one error line and exit 1/2, never a traceback.
- byte flips over every field of a small fp16 and int8 cache: see test_integrity.py.

In-process where it can be (a file-size limit set and restored around one `main()` call; Python
ignores SIGXFSZ, so the write fails instead of killing the process): a few seconds per case.
"""
import json
import os
import resource
import signal
import unicodedata
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from wat.data.labels import Vocabulary
from wat.data.naming import output_stems
from synthetic_cache import synthetic_meta, write_synthetic_cache

N, L, T, D, C = 40, 3, 4, 16, 4


@contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` in any file fail with EFBIG (a full disk) while the block runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def one_error(capsys, code, prog: str, *needles) -> str:
    """The command failed with one `PROG: error:` line (exit 1 or 2) and no traceback; returns it."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert code in (1, 2) and "Traceback" not in err, (code, err[-3000:])
    assert len(lines) == 1, err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def run_main(main, argv):
    """main(argv) -> exit status (SystemExit from argparse included)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def no_partial_files(folder: Path):
    assert not [p for p in folder.rglob("*") if ".partial" in p.name], list(folder.rglob("*"))


def whole(path: Path) -> None:
    """A file a command left must be readable as what it is (atomic writes: never torn)."""
    data = path.read_bytes()
    assert data, path
    if path.suffix == ".json":
        json.loads(data)
    elif path.suffix == ".png":
        assert data.startswith(b"\x89PNG") and data.rstrip().endswith(b"IEND\xaeB`\x82"), path
    elif path.suffix == ".npz":
        np.load(path).files
    elif path.suffix in (".csv", ".tsv", ".txt", ".html", ".vtt", ".srt"):
        data.decode("utf-8")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A single-label 4-class cache of 40 clips in 4 folds whose class shows in the features, and a
    WA-MLP head trained on it."""
    from wat.train.loop import TrainOptions, train
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    y = np.arange(N) % C
    x = rng.standard_normal((N, L, T, D)).astype(np.float32)
    x[np.arange(N), :, :, y] += 2.0
    meta = synthetic_meta(vocab=Vocabulary.from_names([f"c{i}" for i in range(C)]), multilabel=False,
                          n_layers=L, n_frames=T, dim=D)
    write_synthetic_cache(root / "feats.h5", meta, x, [(int(c),) for c in y], folds=np.arange(N) % 4 + 1,
                          shards=[20, 20], shard_dir=root / "feats.shards")
    train(TrainOptions(features=str(root / "feats.h5"), out=str(root / "run"), head="wa-mlp", epochs=2, lr=1e-2,
                       batch_size=8, progress=False))
    return root / "feats.h5", root / "run" / "wa.pt"


# ---------------------------------------------------------------- full disk, every writer

def test_full_disk_wat_data_demo(tmp_path, capsys):
    from wat.data.cli import main
    out = tmp_path / "new" / "demo"
    with file_size_limit(100_000):  # a clip is 441 kB: the first one fails
        code = run_main(main, ["demo", "--out", out, "--clips-per-class", "1"])
    one_error(capsys, code, "wat-data", "File too large")
    assert code == 2 and not (tmp_path / "new").exists()  # what it made is gone again
    with file_size_limit(6_000_000):  # every clip fits; a rerun into an existing folder, then the CSV fits too
        assert run_main(main, ["demo", "--out", out, "--clips-per-class", "1"]) == 0
    for p in out.rglob("*"):
        if p.is_file():
            whole(p)


def test_full_disk_wat_probe(small, tmp_path, capsys):
    from wat.eval.cli import probe_main
    feats, _ = small
    out = tmp_path / "probe"
    with file_size_limit(3_000):  # the CSVs fit, the first PNG does not
        code = run_main(probe_main, ["--features", feats, "--out", out, "--workers", "1", "--fusion", "none"])
    one_error(capsys, code, "wat-probe", "File too large")
    no_partial_files(tmp_path)
    for p in out.rglob("*"):
        whole(p)
    with file_size_limit(1):  # nothing fits: no empty folder is left
        code = run_main(probe_main, ["--features", feats, "--out", tmp_path / "p2", "--workers", "1", "--fusion", "none"])
    one_error(capsys, code, "wat-probe", "File too large")
    assert not (tmp_path / "p2").exists()


def test_full_disk_wat_eval(small, tmp_path, capsys):
    from wat.eval.cli import eval_main
    feats, head = small
    for limit, out in ((1, tmp_path / "e1"), (2_500, tmp_path / "e2")):
        with file_size_limit(limit):
            code = run_main(eval_main, ["--features", feats, "--head", head, "--out", out])
        one_error(capsys, code, "wat-eval", "File too large")
        no_partial_files(tmp_path)
        if out.exists():
            assert any(out.iterdir())  # a folder is left only with whole files in it
            for p in out.rglob("*"):
                whole(p)
    assert not (tmp_path / "e1").exists()


def test_full_disk_wat_tag(tiny_model, speech_wav, tmp_path, capsys):
    """-f all under a limit that lets the small outputs through: an input gets all its files or none."""
    from wat.data.heads import save_head
    from wat.tag.cli import main
    from test_tag import _random_head
    head, info = _random_head(tiny_model)
    save_head(tmp_path / "head.pt", head, info)
    audio = tmp_path / "in" / "x.wav"
    audio.parent.mkdir()
    audio.write_bytes(speech_wav.read_bytes())
    argv = [audio, "--model", "tiny.en", "--head", tmp_path / "head.pt", "--time-res", "2", "-f", "all",
            "--beam_size", "1", "--best_of", "1"]
    assert run_main(main, argv + ["-o", tmp_path / "full"]) == 0
    sizes = sorted(p.stat().st_size for p in (tmp_path / "full").iterdir())
    with file_size_limit(sizes[len(sizes) // 2]):  # some outputs fit, others not
        code = run_main(main, argv + ["-o", tmp_path / "cut"])
    one_error(capsys, code, "wat-tag", "File too large", "x.wav")
    assert code == 2 and not (tmp_path / "cut").exists()  # the one input has none of its outputs


def test_full_disk_wat_robust(tiny_model, refusable, tmp_path, capsys):
    """The shards of the mixture cache cannot be written: one error line, no .partial, and the output
    folder holds no half-written file (the run made it: with nothing whole in it, it is gone)."""
    from wat.robust.cli import main
    argv = ["--speech", refusable["s"], "--noise-dataset", "esc50", "--noise-root", refusable["d"], "--model",
            "tiny.en", "--snr", "10,0", "--limit", "1", "--out", tmp_path / "r", "--batch-size", "2"]
    with file_size_limit(20_000):  # a shard of tiny.en features is larger; records and TSVs are not
        code = run_main(main, argv)
    one_error(capsys, code, "wat-robust", "File too large")
    no_partial_files(tmp_path)
    for p in (tmp_path / "r").rglob("*") if (tmp_path / "r").exists() else ():
        if p.is_file() and not p.name.endswith(".lock"):
            whole(p)


# ---------------------------------------------------------------- adversarial output names

def _files(stems, suffixes):
    keys = [unicodedata.normalize("NFC", s + x).casefold() for s in stems for x in suffixes]
    folders = {unicodedata.normalize("NFC", "/".join(s.split("/")[:k])).casefold()
               for s in stems for k in range(1, len(s.split("/")))}
    return keys, folders


NAME_SETS = {
    "same stem, two folders": ["a/x.wav", "b/x.wav"],
    "same flattened path": ["a/x.wav", "a-x.wav", "a_x.wav"],
    "same stem, two extensions": ["d/y.wav", "d/y.flac", "d/y.wav.flac"],
    "case only": ["A.wav", "a.wav", "a.WAV"],
    "unicode forms": ["caf\u00e9.wav", "cafe\u0301.wav"],
    "one file twice": ["x.wav", "x.wav", "./x.wav"],
    "a file where a folder must be": ["a.wav", "a/x.wav"],
    "a suffix inside a name": ["x.wav", "x.tags.wav"],
    "tilde names": ["x.wav", "x.wav~2.flac", "x.flac", "X.wav"],
}


@pytest.mark.parametrize("name", list(NAME_SETS))
@pytest.mark.parametrize("suffixes", [("",), (".txt", ".tags.tsv"), (".txt", ".vtt", ".srt", ".tsv", ".json", ".tags.tsv")])
def test_output_stems_never_collide(name, suffixes, tmp_path):
    paths = [tmp_path / p for p in NAME_SETS[name]]
    stems = output_stems(paths, suffixes)
    keys, folders = _files(stems, suffixes)
    assert len(set(keys)) == len(keys), (name, stems)            # distinct files, as a case-insensitive disk sees them
    assert not set(keys) & folders, (name, stems)               # no file where another output needs a folder
    assert all(s and not s.startswith("/") and ".." not in s.split("/") for s in stems)
    if len({os.path.abspath(p) for p in paths}) == len(paths) and name not in ("case only", "unicode forms"):
        # readable: the name is the input's path below the common parent, with or without its extension
        top = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
        rel = [Path(os.path.relpath(p, top)).as_posix() for p in paths]
        assert all(r == s or r.rsplit(".", 1)[0] == s or s.startswith(r) for r, s in zip(rel, stems)), stems


def test_output_stems_are_plain_stems_when_nothing_clashes(tmp_path):
    assert output_stems([tmp_path / "one.wav", tmp_path / "two.flac"]) == ["one", "two"]
    assert output_stems(["a/x.wav", "b/x.wav"]) == ["a/x", "b/x"]
    assert output_stems(["d/y.wav", "d/y.flac"]) == ["y.wav", "y.flac"]
    assert output_stems(["A.wav", "a.wav"]) == ["A.wav", "a.wav~2"]
    assert output_stems(["A.wav", "a.wav"], exact=True) == ["A", "a"]  # ids, not files


def test_folders_named_one_at_a_time_never_collide():
    """wat-robust names a folder per model as each loads: `/a/model.pt` and `/b/Model.pt` are two."""
    from wat.data.naming import distinct_name, folder_name
    taken = []
    for k, spec in enumerate(["/a/model.pt", "/b/Model.pt", "org/model.pt", "tiny.en"], 1):
        taken.append(distinct_name(folder_name(spec), taken, k))
    assert taken == ["model.pt", "Model.pt~2", "model.pt~3", "tiny.en"]
    assert folder_name("org/a b:c") == "a_b_c" and folder_name("") == "model"


def test_wat_tag_writes_adversarial_names_without_overwriting(tiny_model, speech_audio, tmp_path, capsys):
    """Inputs whose names clash every way at once, given as files and as a folder: every input gets
    its own complete set of files, none is overwritten (each holds its own input's transcript path)."""
    import soundfile as sf
    from wat.data.heads import save_head
    from wat.tag.cli import expand_inputs, main
    from test_tag import _random_head
    head, info = _random_head(tiny_model)
    save_head(tmp_path / "head.pt", head, info)
    root = tmp_path / "in"
    names = ["a/x.wav", "a-x.wav", "d/y.wav", "d/y.flac", "Z.wav", "z.wav"]
    clip = speech_audio[:16000 * 2]
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / n, clip, 16000)
    out = tmp_path / "out"
    code = run_main(main, [root, "--model", "tiny.en", "--head", tmp_path / "head.pt", "--time-res", "2",
                           "-f", "json", "-o", out, "--beam_size", "1", "--best_of", "1"])
    assert code == 0, capsys.readouterr().err
    docs = sorted(out.rglob("*.json"))
    assert len(docs) == len(names) and len(sorted(out.rglob("*.tags.tsv"))) == len(names)
    # whisper's JSON writer keeps no file name: each input is told apart by its output name
    stems = sorted(str(p.relative_to(out))[:-len(".json")] for p in docs)
    assert stems == sorted(output_stems(expand_inputs([str(root)]), (".json", ".tags.tsv")))
    assert {"a/x", "a-x", "d/y.wav", "d/y.flac", "Z.wav"} <= set(stems)


# ---------------------------------------------------------------- every command's error paths

def _junk(tmp_path):
    """Inputs of the wrong kind: a text file, an empty file, a folder, a torch file of a list."""
    import torch
    (tmp_path / "text.h5").write_text("not hdf5\n")
    (tmp_path / "empty.h5").write_bytes(b"")
    (tmp_path / "folder.h5").mkdir()
    torch.save([1, 2], tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "file").write_text("a file where a folder should be\n")
    (tmp_path / "badhf").mkdir()
    (tmp_path / "badhf" / "config.json").write_text("not json{")  # a Hugging Face folder with a broken config
    (tmp_path / "badhf" / "model.safetensors").write_bytes(b"")
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("path,labels\nx.wav,caf\u00e9\n".encode("latin-1"))
    return tmp_path


def _sweep():
    """(prog, main module:function, argv template, what the error line must contain). `{j}`: the junk
    folder, `{c}`: the small cache, `{h}`: its head."""
    missing = "{j}/missing"
    cases = []
    for bad in (missing + ".h5", "{j}/text.h5", "{j}/empty.h5", "{j}/folder.h5"):
        cases += [("wat-cache", "wat.data.cache_cli:main", ["info", bad], ""),
                  ("wat-cache", "wat.data.cache_cli:main", ["verify", bad], ""),
                  ("wat-train", "wat.train.cli:main", ["--features", bad, "--out", "{j}/run"], ""),
                  ("wat-probe", "wat.eval.cli:probe_main", ["--features", bad, "--out", "{j}/p"], ""),
                  ("wat-eval", "wat.eval.cli:eval_main", ["--features", bad, "--head", "{h}", "--out", "{j}/e"], "")]
    for bad in (missing + ".pt", "{j}/text.pt", "{j}/list.pt", "{j}/folder.h5"):
        cases += [("wat-eval", "wat.eval.cli:eval_main", ["--features", "{c}", "--head", bad, "--out", "{j}/e"], ""),
                  ("wat-train", "wat.train.cli:main", ["--features", "{c}", "--init", bad, "--head", "wa-mlp",
                                                       "--out", "{j}/run"], "--init")]
    cases += [
        ("wat-train", "wat.train.cli:main", ["--features", "{c}", "--folds", "3", "--out", "{j}/run"], "--folds 3"),
        ("wat-train", "wat.train.cli:main", ["--features", "{c}", "--eval-features", missing + ".h5", "--out", "{j}/run"], ""),
        ("wat-train", "wat.train.cli:main", ["--features", "{c}", "--out", "{j}/file", "--head", "wa-mlp",
                                             "--epochs", "1"], "file"),
        ("wat-probe", "wat.eval.cli:probe_main", ["--features", "{c}", "--folds", "3", "--out", "{j}/p"], "--folds 3"),
        ("wat-probe", "wat.eval.cli:probe_main", ["--features", "{c}", "--layers", "7", "--out", "{j}/p"], "layer"),
        ("wat-probe", "wat.eval.cli:probe_main", ["--features", "{c}", "--eval-features", "{j}/text.h5", "--out", "{j}/p"], ""),
        ("wat-eval", "wat.eval.cli:eval_main", ["--features", "{c}", "--head", "{h}", "--out", "{j}/file"], ""),
        ("wat-eval", "wat.eval.cli:eval_main", ["--features", "{c}", "--head", "{h}", "--out", "{j}/e",
                                                "--tune-thresholds-on", "{c}"], "multi-label"),
        ("wat-data", "wat.data.cli:main", ["list", "--dataset", "csv", "--root", "{j}/latin1.csv"], "latin1.csv:2"),
        ("wat-data", "wat.data.cli:main", ["list", "--dataset", "esc50", "--root", missing], ""),
        ("wat-data", "wat.data.cli:main", ["list", "--dataset", "folder", "--root", "{j}/folder.h5"], ""),
        ("wat-data", "wat.data.cli:main", ["demo", "--out", "{j}/file"], ""),
        ("wat-extract", "wat.extract.cli:main", ["--dataset", "csv", "--root", "{j}/latin1.csv", "--model", "tiny.en",
                                                 "--out", "{j}/x.h5"], "latin1.csv:2"),
        ("wat-extract", "wat.extract.cli:main", ["--dataset", "esc50", "--root", missing, "--model", "tiny.en",
                                                 "--out", "{j}/x.h5"], ""),
        ("wat-tag", "wat.tag.cli:main", ["-", "--model", "tiny.en", "--head", "{h}"], "standard input"),
        ("wat-tag", "wat.tag.cli:main", ["{j}/folder.h5", "--model", "tiny.en", "--head", "{h}"], "without audio"),
        ("wat-tag", "wat.tag.cli:main", ["{j}/text.h5", "--model", "tiny.en", "--head", "{h}", "-o", "{j}/file"], ""),
        ("wat-robust", "wat.robust.cli:main", ["--speech", missing, "--noise-dataset", "esc50", "--noise-root",
                                                       missing, "--model", "tiny.en", "--out", "{j}/r"], ""),
        ("wat-extract", "wat.extract.cli:main", ["--dataset", "esc50", "--root", "{d}", "--model", "{j}/badhf",
                                                 "--out", "{j}/x.h5"], "config.json: not a JSON object"),
        ("wat-tag", "wat.tag.cli:main", ["{j}/text.h5", "--model", "{j}/badhf", "--head", "{h}"], "config.json"),
        # a name no family knows: every family's names, not only Whisper's (the catch-all's)
        ("wat-extract", "wat.extract.cli:main", ["--dataset", "esc50", "--root", "{d}", "--model", "crepe-huge",
                                                 "--out", "{j}/x.h5"], "unknown encoder 'crepe-huge'"),
        # negative values reach their option's own check (they were "expected one argument")
        ("wat-extract", "wat.extract.cli:main", ["--dataset", "esc50", "--root", "{d}", "--model", "tiny.en",
                                                 "--out", "{j}/x.h5", "--layers", "-1:2"], "numbered from 0"),
        ("wat-robust", "wat.robust.cli:main", ["--speech", missing, "--noise-dataset", "esc50", "--noise-root", "{d}",
                                               "--model", "tiny.en", "--snr", "-10,0", "--out", "{j}/r"], "speech"),
        # refusals before work (issue 25, point 7)
        ("wat-probe", "wat.eval.cli:probe_main", ["--features", "{o}", "--out", "{j}/p"], "at least two classes"),
        ("wat-train", "wat.train.cli:main", ["--features", "{o}", "--folds", "2", "--head", "wa-mlp",
                                             "--out", "{j}/run"], "at least two classes"),
        ("wat-train", "wat.train.cli:main", ["--features", "{t}", "--eval-features", "{t}", "--lr", "auto",
                                             "--head", "wa-mlp", "--out", "{j}/run"], "--lr auto"),
        ("wat-robust", "wat.robust.cli:main", ["--speech", "{s}", "--noise-dataset", "esc50", "--noise-root", "{d}",
                                               "--model", "tiny.en", "--noise-per-utterance", "50", "--out", "{j}/r"],
         "--noise-per-utterance 50"),
        ("wat-extract", "wat.extract.cli:main", ["--dataset", "esc50", "--root", "{d}", "--model", "tiny.en", "--out",
                                                 "{j}/x.h5", "--policy", "trim", "--clip-seconds", "0.01"],
         "--clip-seconds 0.01"),
        ("wat-extract", "wat.extract.cli:main", ["--dataset", "esc50", "--root", "{d}", "--model", "tiny.en", "--out",
                                                 "{j}/x.h5", "--policy", "trim", "--clip-seconds", "1", "--frames",
                                                 "1000"], "--frames 1000"),
    ]
    return cases


@pytest.fixture(scope="module")
def refusable(tmp_path_factory):
    """Inputs of the refusals: a single-label cache of one class in 2 folds ({o}), one of 11 clips of 11
    classes ({t}), a one-clip-per-class ESC-50-layout dataset ({d}) and LibriSpeech-layout speech ({s})."""
    from wat.data.demo import make_demo
    root = tmp_path_factory.mktemp("refusable")
    x = np.random.default_rng(0).standard_normal((11, L, T, D)).astype(np.float32)
    one = synthetic_meta(vocab=Vocabulary.from_names(["only", "other"]), multilabel=False, n_layers=L, n_frames=T,
                         dim=D)
    write_synthetic_cache(root / "one.h5", one, x, [(0,)] * 11, folds=np.arange(11) % 2 + 1, shards=1,
                          shard_dir=root / "one")
    many = synthetic_meta(vocab=Vocabulary.from_names([f"c{i}" for i in range(11)]), multilabel=False, n_layers=L,
                          n_frames=T, dim=D)
    write_synthetic_cache(root / "tiny.h5", many, x, [(i,) for i in range(11)], shards=1, shard_dir=root / "tiny")
    demo = make_demo(root / "demo", clips_per_class=1)
    return {"o": root / "one.h5", "t": root / "tiny.h5", "d": demo,
            "s": Path(__file__).parent / "fixtures" / "librispeech"}


SWEEP = _sweep()


@pytest.mark.parametrize("prog,target,argv,needle", SWEEP, ids=[f"{p} {' '.join(a)}" for p, _, a, _ in SWEEP])
def test_error_paths_are_one_line(small, refusable, tmp_path, capsys, prog, target, argv, needle):
    import importlib
    feats, head = small
    junk = _junk(tmp_path)
    module, fn = target.split(":")
    main = getattr(importlib.import_module(module), fn)
    before = {p for p in junk.rglob("*")}
    code = run_main(main, [a.format(j=junk, c=feats, h=head, **refusable) for a in argv])
    one_error(capsys, code, prog, needle)
    made = {p for p in junk.rglob("*")} - before
    assert not [p for p in made if p.is_dir() and not any(p.iterdir())], made  # no empty folder left
    assert not [p for p in made if p.name in ("run", "p", "e", "r", "x.shards")], made  # refused: no output made


# ---------------------------------------------------------------- byte flips over every field

FL, FT, FD, FC = 2, 3, 8, 3
FLIP_SIZES = (6, 5)


def _flip_cache(folder: Path, storage: str) -> Path:
    """Two shards (6 + 5 clips) of a single-label cache with folds, durations and both optional
    columns, as wat-robust writes them: every kind of field the schema has."""
    from wat.data.cache import build_index, shard_path, write_shard
    rng = np.random.default_rng(1)
    n = sum(FLIP_SIZES)
    meta = synthetic_meta(vocab=Vocabulary.from_names(["a", "b", "c"]), multilabel=False, n_layers=FL, n_frames=FT,
                          dim=FD, storage=storage, columns=("snr", "utterance"))
    x = rng.standard_normal((n, FL, FT, FD)).astype(np.float32)
    paths, a = [], 0
    for s, k in enumerate(FLIP_SIZES):
        paths.append(shard_path(folder / "feats.shards", s))
        write_shard(paths[-1], meta, [f"clip{i:03d}" for i in range(a, a + k)], x[a:a + k],
                    [(i % FC,) for i in range(a, a + k)], folds=[i % 3 + 1 for i in range(a, a + k)],
                    durations=[1.0 + i / 10 for i in range(a, a + k)],
                    columns={"snr": [float(i) for i in range(a, a + k)], "utterance": [f"u{i}" for i in range(a, a + k)]})
        a += k
    build_index(folder / "feats.h5", paths)
    return folder / "feats.h5"


def _read_all(index: Path):
    """Everything a reader takes from a cache, through every reader: labels, folds, durations, columns,
    `Cache.read` of both fields, the training store of both, the dask view of `mean`."""
    from wat.data.cache import dask_view, open_cache
    from wat.data.cache.store import FeatureStore
    c = open_cache(index)
    out = {"ids": c.ids, "labels": c.label_matrix(), "folds": c.folds, "durations": c.durations,
           **{k: v for k, v in c.columns.items()}}
    for field in ("features", "mean"):
        out[f"read {field}"] = c.read(field, np.arange(len(c)))
        out[f"store {field}"] = FeatureStore(c, field, memory_budget=1 << 30).get(np.arange(len(c))).numpy()
    out["dask mean"] = dask_view(c, "mean").compute(scheduler="synchronous")
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _spans(path: Path, name: str) -> list[tuple[int, int]]:
    """(offset, length) of a dataset's bytes in the file (its storage; strings: their heap references)."""
    import h5py
    with h5py.File(path, "r") as f:
        d = f[name]
        if d.chunks is None:
            return [(d.id.get_offset(), d.id.get_storage_size())]
        return [(i.byte_offset, i.size) for i in (d.id.get_chunk_info(k) for k in range(d.id.get_num_chunks()))]


def _flip(path: Path, offset: int, n: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(n)
        f.seek(offset)
        f.write(bytes(x ^ 0x5A for x in b))


def _fields(folder: Path):
    """(file, dataset or '@NAME' attribute) of every field of the clean cache in `folder`."""
    import h5py
    out = []
    for path in [folder / "feats.h5", *sorted((folder / "feats.shards").glob("shard-*.h5"))]:
        with h5py.File(path, "r") as f:
            out += [(path.relative_to(folder), n) for n, d in f.items() if not d.is_virtual]
            out += [(path.relative_to(folder), "@" + n) for n in f.attrs]
    return out


def _change_attr(path: Path, name: str) -> None:
    import h5py
    with h5py.File(path, "r+") as f:
        v = f.attrs[name]
        if isinstance(v, str):
            f.attrs[name] = v[:-1] + chr(ord(v[-1]) ^ 1) if v else "x"   # one character, one bit
        elif isinstance(v, (bool, np.bool_)):
            f.attrs[name] = not v
        else:
            f.attrs[name] = v + 1


@pytest.fixture(scope="module", params=["fp16", "int8"])
def flip_cache(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"flip-{request.param}")
    index = _flip_cache(folder, request.param)
    return folder, _read_all(index)


def test_byte_flips_over_every_field_are_caught(flip_cache, tmp_path, capsys):
    """Every dataset (raw bytes flipped in the file: its storage, and for strings also a character in
    the heap) and every attribute (one character or bit changed) of the index and of a shard:
    `wat-cache verify` names the file and the field (exit 1, no traceback), and every reader either
    refuses with one CacheError line or reads exactly the clean values (the field is not one it uses)."""
    import shutil
    import h5py
    from wat.data.cache import CacheError, verify
    from wat.data.cache_cli import main as cache_main
    clean, want = flip_cache
    cases = []
    for rel, name in _fields(clean):
        if name.startswith("@"):
            cases.append((rel, name, "attr"))
            continue
        cases.append((rel, name, "storage"))
        with h5py.File(clean / rel, "r") as f:
            if h5py.check_string_dtype(f[name].dtype):
                cases.append((rel, name, "heap"))
    assert len(cases) > 60
    missed = []
    for k, (rel, name, how) in enumerate(cases):
        folder = tmp_path / f"case{k}"
        shutil.copytree(clean, folder)
        path = folder / rel
        if how == "attr":
            _change_attr(path, name[1:])
        elif how == "heap":  # the string's own bytes (a shard path also lies in the VDS mapping: not that)
            with h5py.File(path, "r") as f:
                first = f[name][0]
            data, at = path.read_bytes(), -1
            while (at := data.find(first, at + 1)) >= 0:
                _flip(path, at + len(first) - 1)
                with h5py.File(path, "r") as f:
                    if f[name][0] != first:
                        break
                _flip(path, at + len(first) - 1)  # not this copy: back as it was
            assert at >= 0, (rel, name)
        else:
            offset, length = _spans(path, name)[0]
            _flip(path, offset + length // 2)
        problems = verify(folder / "feats.h5")
        field = name.lstrip("@")
        named = [p for p in problems if str(rel.name) in p and (field in p or "attributes" in p)]
        if not named:
            missed.append((str(rel), name, how, problems[:2]))
        code = cache_main(["verify", str(folder / "feats.h5")])
        err = capsys.readouterr().err
        if code != 1 or "Traceback" in err or not err.strip().splitlines()[-1].startswith("wat-cache: error:"):
            missed.append((str(rel), name, how, f"wat-cache verify exit {code}: {err[-300:]}"))
        try:
            got = _read_all(folder / "feats.h5")
        except CacheError as e:
            if "\n" in str(e) or str(rel.name) not in str(e):
                missed.append((str(rel), name, how, f"reader: {e}"))
        else:
            if not _same(got, want):
                missed.append((str(rel), name, how, "read changed values silently"))
        shutil.rmtree(folder)
    assert not missed, "\n".join(map(str, missed))


# ---------------------------------------------------------------- resume checks the data

def test_resume_refuses_other_data_at_the_same_path(tmp_path):
    """--resume after the cache was re-extracted with another policy (same path, same options): refused
    naming the option, the field and both values; a relative spelling of the same path resumes."""
    import shutil
    from wat.train.loop import Interrupted, TrainError, TrainOptions, train
    y = np.arange(N) % C
    x = np.random.default_rng(0).standard_normal((N, L, T, D)).astype(np.float32)

    def cache(policy: str, folder: Path) -> Path:
        meta = synthetic_meta(vocab=Vocabulary.from_names([f"c{i}" for i in range(C)]), multilabel=False,
                              n_layers=L, n_frames=T, dim=D, policy=policy)
        write_synthetic_cache(folder / "feats.h5", meta, x, [(int(c),) for c in y], shards=2,
                              shard_dir=folder / "feats.shards")
        return folder / "feats.h5"

    feats = cache("trim", tmp_path / "c")
    kw = dict(out=str(tmp_path / "run"), head="wa-mlp", epochs=3, lr=1e-2, batch_size=8, progress=False)
    with pytest.raises(Interrupted):
        train(TrainOptions(features=str(feats), max_epochs_this_run=1, **kw))
    shutil.rmtree(tmp_path / "c")
    cache("pad30", tmp_path / "c")  # re-extracted another way, same path
    with pytest.raises(TrainError, match=r"other data .*--features policy: 'trim' -> 'pad30'.*--features content"):
        train(TrainOptions(features=str(feats), resume=True, **kw))
    shutil.rmtree(tmp_path / "c")
    cache("trim", tmp_path / "c")  # the same data again: resumes, also given as a relative path
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        train(TrainOptions(features="c/feats.h5", resume=True, **kw))
    finally:
        os.chdir(cwd)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["best"]["epoch"] == 3


# ---------------------------------------------------------------- inputs: clip windows, text, names

def test_the_clip_window_is_checked_after_it_is_cut(tmp_path):
    """6 s of silence then sound, cut to a 5 s window: a silent clip, recorded with its reason, not
    stored with its label; the same file cut to 8 s is a clip. NaN inside the window is refused too."""
    import soundfile as sf
    from wat.data.audio import AudioError, check_clip, clip_window
    from wat.data.datasets import Clip
    from wat.extract.pipeline import _ClipAudio
    sr = 16000
    audio = np.concatenate([np.zeros(6 * sr, np.float32), 0.1 * np.random.default_rng(0).standard_normal(2 * sr)])
    sf.write(tmp_path / "late.wav", audio.astype(np.float32), sr, subtype="FLOAT")
    k, window, reason, seconds = _ClipAudio([Clip("late", str(tmp_path / "late.wav"), (0,))], 5 * sr)[0]
    assert window is None and "silent" in reason and "clip window" in reason, reason
    k, window, reason, seconds = _ClipAudio([Clip("late", str(tmp_path / "late.wav"), (0,))], 8 * sr)[0]
    assert reason == "" and len(window) == 8 * sr and seconds == 8.0
    with pytest.raises(AudioError, match="non-finite"):
        clip_window(np.array([0.1, np.nan] + [0.1] * 1000, np.float32), 500, "x.wav")
    with pytest.raises(AudioError, match="too short"):
        check_clip(np.ones(10, np.float32), "x.wav")
    assert clip_window(np.ones(100_000, np.float32), 1000, "x.wav")[1] == 1000 / sr


def test_manifests_are_strict_utf8_or_the_given_encoding(tmp_path):
    """A latin-1 CSV: refused naming the line (its labels café and cafè were merged into one class
    caf\ufffd); with --encoding latin-1 two classes; a fold beyond int16 is a problem row naming its row."""
    import soundfile as sf
    from wat.data.datasets import DatasetError, load_dataset
    for name in ("a.wav", "b.wav", "c.wav"):
        sf.write(tmp_path / name, 0.1 * np.ones(1600, np.float32), 16000)
    m = tmp_path / "m.csv"
    m.write_bytes("path,labels,fold\na.wav,caf\u00e9,1\nb.wav,caf\u00e8,2\nc.wav,caf\u00e9,70000\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"m\.csv:2: not valid utf-8 \(byte 0xe9 at column 10\).*--encoding"):
        load_dataset("csv", m)
    ds = load_dataset("csv", m, encoding="latin-1")
    assert ds.vocab.names == ("caf\u00e8", "caf\u00e9") and [c.id for c in ds.clips] == ["a.wav", "b.wav"]
    assert ds.problems == [("m.csv:4", "malformed: fold 70000 outside 0..32767 (or -1: none)")]
    m.write_bytes("path,labels\na.wav,x\u2028y\n".encode("utf-8"))  # a line separator inside a field is no new row
    assert [c.labels for c in load_dataset("csv", m).clips] == [(0,)]


def test_transcripts_are_strict_utf8(tmp_path):
    import soundfile as sf
    from wat.robust.speech import SpeechError, load_speech
    folder = tmp_path / "1" / "2"
    folder.mkdir(parents=True)
    sf.write(folder / "1-2-0001.flac", 0.1 * np.ones(16000, np.float32), 16000)
    (folder / "1-2.trans.txt").write_bytes("1-2-0001 CAF\u00c9 OUVERT\n".encode("latin-1"))
    with pytest.raises(SpeechError, match=r"1-2\.trans\.txt:1: not valid utf-8"):
        load_speech(tmp_path)
    assert load_speech(tmp_path, encoding="latin-1").utterances[0].text == "CAF\u00c9 OUVERT"


def test_folder_datasets_keep_two_files_of_one_stem(tmp_path):
    """`dog/a.wav` and `dog/a.flac` were one clip (the second dropped as a duplicate id)."""
    import soundfile as sf
    from wat.data.datasets import load_dataset
    (tmp_path / "dog").mkdir()
    (tmp_path / "cat").mkdir()
    for name in ("dog/a.wav", "dog/a.flac", "cat/b.wav"):
        sf.write(tmp_path / name, 0.1 * np.ones(1600, np.float32), 16000)
    ds = load_dataset("folder", tmp_path)
    assert [c.id for c in ds.clips] == ["cat/b", "dog/a.flac", "dog/a.wav"] and not ds.problems

"""Dataset adapters on fixture trees built here, manifest-parser properties, and parent labels."""
import csv
import io
import json
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from wat.data.cli import main
from wat.data.datasets import DatasetError, index_audio, load_dataset, match_audio, parse_segment_row
from wat.data.labels import Vocabulary, audioset_ontology, audioset_vocabulary, expand_labels, parent_labels

AS = audioset_vocabulary()
_buf = io.BytesIO()
sf.write(_buf, np.full(160, 0.1, np.float32), 16_000, format="WAV")
WAV = _buf.getvalue()  # a real (tiny) wav; adapters only check that files exist


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(WAV)
    return path


def _reasons(ds):
    return {where: reason for where, reason in ds.problems}


# ---------------------------------------------------------------- ESC-50

def test_esc50(tmp_path):
    rows = [
        ("1-100-A-1.wav", 1, 1, "rooster"),
        ("2-100-A-0.wav", 2, 0, "dog"),
        ("3-100-A-2.wav", 3, 2, "pig"),
        ("4-100-A-0.wav", 4, 0, "dog"),
        ("5-100-A-1.wav", 5, 1, "rooster"),  # audio missing
        ("5-101-A-1.wav", "x", 1, "rooster"),  # bad fold
        ("5-102-A-1.wav", 5, 1, "cow"),  # target 1 is rooster
    ]
    (tmp_path / "meta").mkdir()
    with open(tmp_path / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for name, fold, target, cat in rows:
            w.writerow([name, fold, target, cat, "False", "100", "A"])
            if name != "5-100-A-1.wav":
                _touch(tmp_path / "audio" / name)
    ds = load_dataset("esc50", tmp_path)
    assert ds.vocab.names == ("dog", "rooster", "pig") and not ds.multilabel and ds.clip_seconds == 5
    assert [c.id for c in ds.clips] == ["1-100-A-1", "2-100-A-0", "3-100-A-2", "4-100-A-0"]
    assert [(c.labels, c.fold) for c in ds.clips] == [((1,), 1), ((0,), 2), ((2,), 3), ((0,), 4)]
    assert ds.clips[0].path == str(tmp_path / "audio" / "1-100-A-1.wav")
    problems = _reasons(ds)
    assert len(problems) == 3
    assert problems["esc50.csv:6"].startswith("no audio")
    assert problems["esc50.csv:7"].startswith("malformed") and problems["esc50.csv:8"].startswith("malformed")
    assert load_dataset("esc50", tmp_path, clip_seconds=3).clip_seconds == 3


def test_esc50_missing_meta_and_unknown_kind(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("esc50", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset kind"):
        load_dataset("esc500", tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("esc50", tmp_path / "nope")


# ---------------------------------------------------------------- AudioSet

HEADER = "# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=9, num_segs=9\n# YTID, start_seconds, end_seconds, positive_labels\n"


def _segments(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "".join(line + "\n" for line in lines))
    return path


def test_audioset_balanced_naming_variants_and_problems(tmp_path):
    _segments(tmp_path / "balanced_train_segments.csv", [
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"',   # plain YTID.wav, in a sub-folder
        'abcdefghijK, 0.000, 10.000, "/m/0jbk"',                # YYTID.flac
        'a_b-c_d-e_f, 30.000, 40.000, "/m/09x0r"',              # YTID_start.wav, ids with _ and -
        'AAAAAAAAAAA, 30.000, 40.000, "/m/09x0r"',              # YTID_start_end in milliseconds
        'BBBBBBBBBBB, 10.000, 20.000, "/m/0jbk,/m/09x0r"',      # YYTID_start_end.mp3
        'CCCCCCCCCCC, 30.000, 40.000, "/m/09x0r"',              # only a file for another segment
        'DDDDDDDDDDD, 30.000, 40.000, "/m/09x0r"',              # no audio at all
        'EEEEEEEEEEE, 30.000, 40.000, "/m/09x0r,/m/notamid"',   # unknown MID
        'FFFFFFFFFFF, 30.000, "/m/09x0r"',                      # too few fields
        'GGGGGGGGGGG, 30.000, 40.000, "/m/09x0r',               # unterminated quote
        'HHHHHHHHHHH, thirty, 40.000, "/m/09x0r"',              # bad start
        '--PJHxphWEs, 30.000, 40.000, "/m/0jbk"',               # duplicate id
    ])
    for name in ["x/y/--PJHxphWEs.wav", "YabcdefghijK.flac", "a_b-c_d-e_f_30.000.wav",
                 "AAAAAAAAAAA_30000_40000.wav", "z/YBBBBBBBBBBB_10.000_20.000.mp3",
                 "CCCCCCCCCCC_50.000.wav", "notes.txt", "GGGGGGGGGGG.wav", "HHHHHHHHHHH.wav"]:
        _touch(tmp_path / "audio" / name)
    ds = load_dataset("as20k", tmp_path)
    assert ds.name == "as20k" and ds.vocab is AS and ds.multilabel and ds.clip_seconds == 10
    assert [c.id for c in ds.clips] == sorted(["--PJHxphWEs", "abcdefghijK", "a_b-c_d-e_f", "AAAAAAAAAAA", "BBBBBBBBBBB"])
    by_id = {c.id: c for c in ds.clips}
    assert by_id["--PJHxphWEs"].labels == AS.parse("/m/09x0r,/t/dd00088")  # the first row wins
    assert by_id["--PJHxphWEs"].path.endswith("x/y/--PJHxphWEs.wav")
    assert by_id["abcdefghijK"].path.endswith("YabcdefghijK.flac")
    assert by_id["AAAAAAAAAAA"].path.endswith("AAAAAAAAAAA_30000_40000.wav")
    assert by_id["BBBBBBBBBBB"].labels == tuple(sorted([AS.index("/m/0jbk"), AS.index("/m/09x0r")]))
    assert all(c.offset == 0 and c.duration is None and c.fold == -1 for c in ds.clips)
    problems = _reasons(ds)
    assert problems["CCCCCCCCCCC"] == "no audio" and problems["DDDDDDDDDDD"] == "no audio"
    assert problems["balanced_train_segments.csv:11"].startswith("unknown label") and "/m/notamid" in problems["balanced_train_segments.csv:11"]
    for line in (12, 13, 14):
        assert problems[f"balanced_train_segments.csv:{line}"].startswith("malformed")
    assert problems["--PJHxphWEs"].startswith("duplicate id")
    assert len(ds.problems) == 7


def test_as2m_reads_both_csvs_and_aseval_its_own(tmp_path):
    meta = tmp_path / "csv"
    _segments(meta / "balanced_train_segments.csv", ['AAAAAAAAAAA, 0.000, 10.000, "/m/09x0r"'])
    _segments(meta / "unbalanced_train_segments.csv", ['BBBBBBBBBBB, 0.000, 10.000, "/m/0jbk"'])
    _segments(meta / "eval_segments.csv", ['CCCCCCCCCCC, 0.000, 10.000, "/m/0jbk"'])
    for ytid in "ABC":
        _touch(tmp_path / "wav" / f"{ytid * 11}.wav")
    assert [c.id for c in load_dataset("as2m", tmp_path, meta).clips] == ["AAAAAAAAAAA", "BBBBBBBBBBB"]
    assert [c.id for c in load_dataset("as20k", tmp_path, meta).clips] == ["AAAAAAAAAAA"]
    assert [c.id for c in load_dataset("aseval", tmp_path, meta).clips] == ["CCCCCCCCCCC"]
    one = load_dataset("as2m", tmp_path, meta / "unbalanced_train_segments.csv")  # a single file is accepted
    assert [c.id for c in one.clips] == ["BBBBBBBBBBB"] and one.name == "as2m"
    with pytest.raises(DatasetError, match="eval_segments.csv"):
        load_dataset("aseval", tmp_path)  # not in root


def test_audioset_without_any_audio_is_an_error_naming_why(tmp_path):
    _segments(tmp_path / "balanced_train_segments.csv", ['AAAAAAAAAAA, 0.000, 10.000, "/m/09x0r"'] * 1
              + ['BBBBBBBBBBB, 0.000, 10.000, "/m/09x0r"'])
    with pytest.raises(DatasetError, match="2 no audio"):
        load_dataset("as20k", tmp_path)


YTID = st.text(string.ascii_letters + string.digits + "-_", min_size=11, max_size=11)
START = st.integers(0, 36_000).map(lambda ds: ds / 10)


@settings(max_examples=40, deadline=None)
@given(ytid=YTID, start=START, naming=st.sampled_from(["{y}", "Y{y}", "{y}_{s:.3f}", "{y}_{s:.3f}_{e:.3f}",
                                                       "{y}_{ms}", "{y}_{ms}_{ems}", "Y{y}_{s:.3f}_{e:.3f}"]))
def test_every_naming_variant_matches_its_segment(ytid, start, naming):
    name = naming.format(y=ytid, s=start, e=start + 10, ms=round(start * 1000), ems=round(start * 1000) + 10_000)
    with tempfile.TemporaryDirectory() as d:
        _touch(Path(d) / "sub" / f"{name}.flac")
        index = index_audio(Path(d))
        assert match_audio(index, ytid, start) == str(Path(d) / "sub" / f"{name}.flac")
        if "{s" in naming or "{ms" in naming:  # a file named for one segment is not another's audio
            assert match_audio(index, ytid, start + 5) is None


MIDS = st.lists(st.sampled_from(AS.keys), min_size=1, max_size=6, unique=True)


@settings(max_examples=60, deadline=None)
@given(ytid=YTID, start=START, mids=MIDS, spaces=st.sampled_from(["", " ", "  "]))
def test_segment_row_round_trips_any_valid_mids(ytid, start, mids, spaces):
    line = f'{ytid},{spaces}{start:.3f},{spaces}{start + 10:.3f},{spaces}"{",".join(mids)}"'
    y, s, e, labels = parse_segment_row(line)
    assert (y, s, e) == (ytid, start, start + 10)
    assert AS.parse(labels) == tuple(sorted(AS.index(m) for m in mids))


@settings(max_examples=15, deadline=None)
@given(entries=st.dictionaries(st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8), MIDS,
                               min_size=1, max_size=6))
def test_json_manifest_round_trips_any_valid_mids(entries):
    with tempfile.TemporaryDirectory() as d:
        data = []
        for stem, mids in entries.items():
            _touch(Path(d) / "a" / f"{stem}.wav")
            data.append({"wav": f"a/{stem}.wav", "labels": ",".join(mids)})
        (Path(d) / "m.json").write_text(json.dumps({"data": data}))
        ds = load_dataset("json", Path(d) / "m.json")
        assert ds.vocab is AS and ds.multilabel and not ds.problems
        assert {c.id: c.labels for c in ds.clips} == {f"{s}.wav": tuple(sorted(AS.index(m) for m in mids)) for s, mids in entries.items()}


LABEL = st.text(string.ascii_letters + string.digits + " _-'", min_size=1, max_size=12).filter(lambda s: s.strip() == s)


@settings(max_examples=15, deadline=None)
@given(rows=st.lists(st.lists(LABEL, min_size=1, max_size=3, unique=True), min_size=1, max_size=6),
       sep=st.sampled_from([";", ","]))
def test_csv_manifest_round_trips_any_names(rows, sep):
    with tempfile.TemporaryDirectory() as d:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "labels", "fold"])
        for i, labels in enumerate(rows):
            _touch(Path(d) / f"c{i}.wav")
            w.writerow([f"c{i}.wav", sep.join(labels), i % 5 + 1])
        (Path(d) / "m.csv").write_text(buf.getvalue())
        ds = load_dataset("csv", Path(d) / "m.csv")
        assert ds.vocab.names == tuple(sorted({x for labels in rows for x in labels}))
        assert ds.multilabel == any(len(labels) > 1 for labels in rows)
        assert [(c.id, [ds.vocab.names[i] for i in c.labels], c.fold) for c in ds.clips] == \
            [(f"c{i}.wav", sorted(labels), i % 5 + 1) for i, labels in enumerate(rows)]


# ---------------------------------------------------------------- JSON, folder, CSV

def test_json_manifest_paths_problems_and_names(tmp_path):
    _touch(tmp_path / "audio" / "x.flac")
    _touch(tmp_path / "audio" / "y.wav")
    _touch(tmp_path / "other" / "x.wav")
    absolute = _touch(tmp_path / "elsewhere" / "z.wav")
    manifest = tmp_path / "lists" / "train.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"data": [
        {"wav": "../audio/x.flac", "labels": "/m/09x0r,/m/05zppz"},
        {"wav": str(absolute), "labels": "/m/0jbk"},
        {"wav": "../other/x.wav", "labels": "/m/0jbk"},       # same stem, other folder: another clip
        {"wav": "../audio/missing.wav", "labels": "/m/0jbk"},
        {"wav": "../audio/y.wav", "labels": "/m/09x0r,/m/zzzz"},
        {"labels": "/m/0jbk"},                                 # no wav
    ]}))
    ds = load_dataset("json", tmp_path, manifest)
    assert ds.vocab is AS and ds.multilabel
    assert [(c.id, c.labels) for c in ds.clips] == [("audio/x.flac", AS.parse("/m/09x0r,/m/05zppz")),
                                                     ("elsewhere/z.wav", (AS.index("/m/0jbk"),)),
                                                     ("other/x.wav", (AS.index("/m/0jbk"),))]
    assert ds.clips[0].path == str(tmp_path / "lists" / ".." / "audio" / "x.flac")
    problems = _reasons(ds)
    assert problems["train.json[3]"].startswith("no audio")
    assert problems["train.json[4]"].startswith("unknown label")
    assert problems["train.json[5]"].startswith("malformed")

    names = tmp_path / "names.json"
    names.write_text(json.dumps({"data": [{"wav": "audio/x.flac", "labels": "dog"}, {"wav": "audio/y.wav", "labels": "cat"}]}))
    ds = load_dataset("json", names)
    assert ds.vocab.names == ("cat", "dog") and not ds.multilabel
    assert [(c.id, c.labels) for c in ds.clips] == [("x.flac", (1,)), ("y.wav", (0,))]

    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset("json", tmp_path / "bad.json")
    with pytest.raises(DatasetError, match="not a file"):
        load_dataset("json", tmp_path)


def test_folder(tmp_path):
    for name in ["dog/a.wav", "dog/b.flac", "dog/deep/c.mp3", "cat/a.wav", "cat/readme.txt", "cat/.hidden.wav"]:
        _touch(tmp_path / name)
    (tmp_path / "empty_class").mkdir()
    ds = load_dataset("folder", tmp_path)
    assert ds.vocab.names == ("cat", "dog", "empty_class") and not ds.multilabel
    assert [(c.id, c.labels) for c in ds.clips] == [("cat/a", (0,)), ("dog/a", (1,)), ("dog/b", (1,)), ("dog/deep/c", (1,))]
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset("folder", tmp_path / "empty_class")
    (tmp_path / "nothing" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no usable clips"):
        load_dataset("folder", tmp_path / "nothing")

def test_csv_manifest(tmp_path):
    for name in ["a.wav", "b.wav", "c.wav", "d.wav", "e.wav"]:
        _touch(tmp_path / "clips" / name)
    (tmp_path / "m.csv").write_text(
        "path,labels,fold\n"
        'clips/a.wav,"dog;cat",1\n'
        'clips/b.wav,"dog,bird",2\n'
        "clips/c.wav,cat,x\n"          # bad fold
        'clips/d.wav,"cat,3\n'         # unterminated quote: must not swallow the next line
        "clips/e.wav,bird,\n"          # empty fold -> -1
        "clips/none.wav,dog,1\n"
        "clips/a.wav,dog,1\n"          # duplicate
    )
    ds = load_dataset("csv", tmp_path / "m.csv")
    assert ds.vocab.names == ("bird", "cat", "dog") and ds.multilabel
    assert [(c.id, c.labels, c.fold) for c in ds.clips] == [("a.wav", (1, 2), 1), ("b.wav", (0, 2), 2), ("e.wav", (0,), -1)]
    problems = _reasons(ds)
    assert problems["m.csv:4"].startswith("malformed") and problems["m.csv:5"].startswith("malformed")
    assert problems["m.csv:7"].startswith("no audio") and problems["a.wav"].startswith("duplicate id")

    # a spreadsheet-exported file: byte-order mark and CRLF line ends
    (tmp_path / "single.csv").write_bytes(b"\xef\xbb\xbfpath,labels\r\nclips/a.wav,dog\r\nclips/b.wav,cat\r\nclips/c.wav,\r\n")
    ds = load_dataset("csv", tmp_path, tmp_path / "single.csv")
    assert not ds.multilabel and [c.labels for c in ds.clips] == [(1,), (0,)]
    assert _reasons(ds) == {"single.csv:4": "no label"}  # single-label sets keep exactly one label per clip

    (tmp_path / "nohead.csv").write_text("file,label\na.wav,dog\n")
    with pytest.raises(DatasetError, match="missing column"):
        load_dataset("csv", tmp_path / "nohead.csv")


def test_esc50_folds_outside_1_to_5_are_problem_rows(tmp_path):
    """They used to be accepted silently (and wat-probe then switched to a seeded split)."""
    (tmp_path / "meta").mkdir()
    with open(tmp_path / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for name, fold in [("1-1-A-0.wav", 1), ("5-2-A-0.wav", 5), ("0-3-A-0.wav", 0), ("6-4-A-0.wav", 6), ("x.wav", -1)]:
            w.writerow([name, fold, 0, "dog", "False", "1", "A"])
            _touch(tmp_path / "audio" / name)
    ds = load_dataset("esc50", tmp_path)
    assert [c.fold for c in ds.clips] == [1, 5]
    assert _reasons(ds) == {"esc50.csv:4": "malformed: fold 0 outside 1..5", "esc50.csv:5": "malformed: fold 6 outside 1..5",
                            "esc50.csv:6": "malformed: fold -1 outside 1..5"}


def test_mostly_audioset_manifest_keeps_audioset_and_reports_the_stray_label(tmp_path):
    """The issue's case: 3 AudioSet MIDs and one "Dog" became a 4-class custom vocabulary, no problem row."""
    for name in "abcd":
        _touch(tmp_path / f"{name}.wav")
    (tmp_path / "m.json").write_text(json.dumps({"data": [
        {"wav": "a.wav", "labels": "/m/09x0r"}, {"wav": "b.wav", "labels": "/m/05zppz"},
        {"wav": "c.wav", "labels": "/m/0jbk"}, {"wav": "d.wav", "labels": "Dog"}]}))
    ds = load_dataset("json", tmp_path / "m.json")
    assert ds.vocab is AS and ds.multilabel and [c.id for c in ds.clips] == ["a.wav", "b.wav", "c.wav"]
    assert _reasons(ds) == {"m.json[3]": "unknown label: unknown label 'Dog' (not among the 527 classes)"}


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_same_stem_in_two_folders_is_two_clips(tmp_path, kind):
    """a/clip0.wav and b/clip0.wav: one of them used to be dropped as a duplicate id."""
    for folder in "ab":
        _touch(tmp_path / "audio" / folder / "clip0.wav")
    if kind == "json":
        (tmp_path / "m.json").write_text(json.dumps({"data": [
            {"wav": "audio/a/clip0.wav", "labels": "dog"}, {"wav": str(tmp_path / "audio/b/clip0.wav"), "labels": "cat"}]}))
    else:
        (tmp_path / "m.csv").write_text(f"path,labels\naudio/a/clip0.wav,dog\n{tmp_path / 'audio/b/clip0.wav'},cat\n")
    ds = load_dataset(kind, tmp_path / f"m.{kind}")
    assert not ds.problems and [(c.id, ds.vocab.names[c.labels[0]]) for c in ds.clips] == [("a/clip0.wav", "dog"),
                                                                                         ("b/clip0.wav", "cat")]


def test_csv_header_field_over_the_csv_limit_is_an_error_line(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("path,labels," + "x" * 140_000 + "\na.wav,dog,1\n")
    with pytest.raises(DatasetError, match="unreadable header line"):
        load_dataset("csv", tmp_path / "m.csv")
    assert main(["list", "--dataset", "csv", "--root", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wat-data: error:") and "\n" not in err and len(err) < 500


# ---------------------------------------------------------------- parent labels

def test_parent_labels_for_audioset():
    ext, ancestors = parent_labels(AS)
    assert ext.keys[:527] == AS.keys and ext.names[:527] == AS.names
    assert len(ext) == 527 + 30  # DESIGN.md said 29; the shipped ontology gives 30
    ontology = audioset_ontology()
    assert all(ext.names[i] == ontology[ext.keys[i]]["name"] for i in range(527, len(ext)))
    speech = AS.index("/m/09x0r")
    assert [ext.names[i] for i in ancestors[speech]] == ["Human sounds", "Human voice"]
    male = AS.index("/m/05zppz")
    assert set(ancestors[male]) == set(ancestors[speech]) | {speech}
    assert expand_labels((male,), ancestors) == tuple(sorted({male, speech, *ancestors[speech]}))
    # every listed ancestor really lies above its class, and every parent is listed
    children = {k: set(v["child_ids"]) for k, v in ontology.items()}
    for c, anc in enumerate(ancestors):
        for a in anc:
            assert _descends(AS.keys[c], ext.keys[a], children)
        for parent, kids in children.items():
            if AS.keys[c] in kids:
                assert ext.index(parent) in anc
    assert ancestors[AS.index("/m/04rlf")] == ()  # Music is a top-level node


def _descends(node, ancestor, children) -> bool:
    stack, seen = [ancestor], set()
    while stack:
        for kid in children[stack.pop()]:
            if kid == node:
                return True
            if kid not in seen:
                seen.add(kid)
                stack.append(kid)
    return False


def test_parent_labels_for_small_and_non_audioset_vocabularies():
    v = Vocabulary(("/m/05zppz",), ("Male speech",))
    ext, ancestors = parent_labels(v)
    assert ext.names == ("Male speech", "Human sounds", "Human voice", "Speech")  # ontology-file order
    assert ancestors == [(1, 2, 3)]
    names = Vocabulary.from_names(["dog", "cat"])
    assert parent_labels(names) == (names, [(), ()])


# ---------------------------------------------------------------- CLI

def test_cli_list_and_errors(tmp_path, capsys):
    _segments(tmp_path / "balanced_train_segments.csv", ['AAAAAAAAAAA, 0.000, 10.000, "/m/09x0r"',
                                                         'BBBBBBBBBBB, 0.000, 10.000, "/m/09x0r"'])
    _touch(tmp_path / "AAAAAAAAAAA.wav")
    assert main(["list", "--dataset", "as20k", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "as20k: 1 clips, 527 classes, multi-label" in out and "skipped 1 rows: 1 no audio" in out
    assert "BBBBBBBBBBB: no audio" in out
    assert main(["list", "--dataset", "esc50", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wat-data: error:") and err.count("\n") == 1

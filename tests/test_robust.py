"""wat-robust: mixing at a target SNR, noise assignment, corpus WER, speech loaders, one encoder pass
giving the transcript and the cache features, the whole run (bad rows, probe-able cache, resume
after kill -9) on the committed espeak-ng utterances and the synthetic demo noise."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import whisper

from wat.extract import EncoderPasses, encode_layers
from wat.robust import (MixError, RobustError, RobustOptions, assign_noise, corpus, errors, load_speech, mix,
                        normalize, run_robust, snr_db)
from wat.robust.asr import decode_batch, transcribe_long
from wat.robust.speech import SpeechError

FIXTURES = Path(__file__).parent / "fixtures"
LIBRI = FIXTURES / "librispeech"


# ---------------------------------------------------------------- mixing

@pytest.mark.parametrize("noise_len", [1000, 16000, 50000])  # looped, about equal, cropped
@pytest.mark.parametrize("snr", [20.0, 5.0, 0.0, -7.3, -10.0])
def test_mixture_has_the_target_snr(noise_len, snr):
    rng = np.random.default_rng(1)
    speech = (0.1 * rng.standard_normal(16000) * np.hanning(16000)).astype(np.float32)
    noise = (0.5 * rng.standard_normal(noise_len)).astype(np.float32)
    x = mix(speech, noise, snr)
    assert x.dtype == np.float32 and x.shape == speech.shape
    assert abs(snr_db(speech, x.astype(np.float64) - speech) - snr) < 0.1


def test_mixture_is_not_clipped():
    speech = np.full(1600, 0.9, np.float32)
    x = mix(speech, np.ones(100, np.float32), -10.0)   # noise 10 dB above a loud utterance
    assert np.abs(x).max() > 1.0 and abs(snr_db(speech, x - speech) + 10) < 0.1


def test_mixing_refuses_undefined_snr():
    with pytest.raises(MixError, match="silent"):
        mix(np.ones(100, np.float32), np.r_[np.zeros(200), np.ones(10)].astype(np.float32), 0.0)  # cropped to zeros
    with pytest.raises(MixError, match="empty utterance"):
        mix(np.zeros(0, np.float32), np.ones(10, np.float32), 0.0)
    with pytest.raises(MixError, match="silent utterance"):
        mix(np.zeros(10, np.float32), np.ones(10, np.float32), 0.0)


def test_assignment_is_seeded_and_class_balanced():
    labels = [k for k in range(5) for _ in range(4)]       # 5 classes x 4 clips
    a = assign_noise(13, labels, 5, per_utterance=2, seed=3)
    assert a == assign_noise(13, labels, 5, per_utterance=2, seed=3)
    assert a != assign_noise(13, labels, 5, per_utterance=2, seed=4)
    classes = [labels[x.noise] for x in a]
    counts = np.bincount(classes, minlength=5)
    assert counts.sum() == 26 and counts.max() - counts.min() <= 1
    for u in range(13):  # two different classes per utterance
        mine = [labels[x.noise] for x in a if x.utterance == u]
        assert len(mine) == 2 and len(set(mine)) == 2


# ---------------------------------------------------------------- WER

def test_corpus_wer_equals_jiwer():
    import jiwer

    pairs = [("The cat sat on the mat.", "the cat sat on a mat"),
             ("Hello world", ""),                               # empty hypothesis: all deletions
             ("one two three four five", "one too three for five six seven"),
             ("It's 7 o'clock", "it is seven o'clock")]          # normaliser: contractions, numbers
    refs = [normalize(r) for r, _ in pairs]
    hyps = [normalize(h) for _, h in pairs]
    total = corpus(pairs)
    assert total.wer == pytest.approx(jiwer.wer(refs, hyps))
    assert errors("Hello world", "") == type(total)(2, 2)
    assert errors("a b c", "a b c") .errors == 0
    assert errors("a b", "a x b y").errors == 2                # two insertions
    # corpus level, not the mean of per-utterance rates
    per = [errors(r, h).wer for r, h in pairs]
    assert total.wer != pytest.approx(np.mean(per))
    with pytest.raises(ValueError, match="empty"):
        errors("  ", "anything")


# ---------------------------------------------------------------- speech input

def test_librispeech_layout_and_bad_rows(tmp_path):
    speech = load_speech(LIBRI)
    assert len(speech.utterances) == 10 and not speech.problems
    assert speech.utterances[0].id == "100-10-0000" and speech.utterances[0].text.startswith("THE CHILDREN")

    d = tmp_path / "ls" / "7" / "8"
    d.mkdir(parents=True)
    for uid in ("7-8-0000", "7-8-0001", "7-8-0003"):
        (d / f"{uid}.flac").write_bytes((LIBRI / "100/10/100-10-0000.flac").read_bytes())
    (d / "7-8.trans.txt").write_text("7-8-0000 HELLO THERE\n7-8-0001\n7-8-0002 NO AUDIO HERE\n")
    speech = load_speech(tmp_path / "ls")
    assert [u.id for u in speech.utterances] == ["7-8-0000"]
    reasons = {i: r for i, _, r in speech.problems}
    assert reasons["7-8-0001"].startswith("empty transcript")
    assert reasons["7-8-0002"].startswith("no audio")
    assert reasons["7-8-0003"].startswith("no transcript")


def test_librispeech_audio_files_of_one_utterance_are_refused(tmp_path, capsys):
    """`X.wav` and `X.flac` beside a transcript line `X ...`: which one is utterance X is a guess
    (a stem-keyed folder used to keep one silently): refused, naming both files."""
    from wat.robust.cli import main

    d = tmp_path / "ls" / "7" / "8"
    d.mkdir(parents=True)
    for name in ("7-8-0000.flac", "7-8-0000.wav", "7-8-0001.flac"):
        (d / name).write_bytes((LIBRI / "100/10/100-10-0000.flac").read_bytes())
    (d / "7-8.trans.txt").write_text("7-8-0000 HELLO THERE\n7-8-0001 GOOD BYE\n")
    with pytest.raises(SpeechError) as e:
        load_speech(tmp_path / "ls")
    assert str(d / "7-8-0000.flac") in str(e.value) and str(d / "7-8-0000.wav") in str(e.value)
    assert main(["--speech", str(tmp_path / "ls"), "--noise-dataset", "esc50", "--noise-root", str(tmp_path),
                 "--model", "tiny.en", "--snr", "20,0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wat-robust: error: ") and "7-8-0000.wav" in err[0]


def test_csv_speech(tmp_path):
    (tmp_path / "a.flac").write_bytes((LIBRI / "100/10/100-10-0001.flac").read_bytes())
    (tmp_path / "s.csv").write_text('path,text\na.flac,"Please, close the window"\nmissing.flac,hi\na.flac,\n')
    speech = load_speech(tmp_path / "s.csv")
    assert [(u.id, u.text) for u in speech.utterances] == [("a", "Please, close the window")]
    assert sorted(r.split(":")[0] for _, _, r in speech.problems) == ["empty transcript", "no audio"]
    with pytest.raises(SpeechError, match="missing column"):
        (tmp_path / "bad.csv").write_text("file,words\n")
        load_speech(tmp_path / "bad.csv")


# ---------------------------------------------------------------- one encoder pass: text + features

def _clips(n):
    return [sf.read(p, dtype="float32")[0] for p in sorted(LIBRI.glob("100/10/*.flac"))[:n]]


def test_batch_decode_gives_transcribe_text_and_encode_layers_features(tiny_model):
    """The batch's single encoder pass yields, for EVERY committed utterance, (a) the text
    `model.transcribe` gives for the utterance alone at temperature 0 (the batch's windows are
    transcribe's own: log-mel padding, `pad30_input`), and (b) exactly the rows
    `encode_layers(..., policy="pad30")` gives. Apples to apples: decode_batch decodes without
    timestamp tokens, so transcribe is asked for the same (without_timestamps, no silence skip,
    no prompt from a previous window); with transcribe's defaults (timestamp tokens on) the text
    is also the same for these utterances, checked too. Before pad30 followed transcribe (zero
    samples instead of zero log-mel frames), 2 of the 10 differed."""
    clips = _clips(10)
    assert len(clips) == 10
    clips[1] = clips[1][: len(clips[1]) // 2 + 37]  # different lengths in one batch, not a multiple of 160
    with EncoderPasses(tiny_model) as passes:
        texts, feats = decode_batch(tiny_model, clips)
    assert passes.n == 1 and feats.shape == (10, 4, 25, 384)
    same = dict(temperature=0.0, language="en", fp16=False)
    for clip, text, row in zip(clips, texts, feats):
        alone = tiny_model.transcribe(clip, without_timestamps=True, condition_on_previous_text=False,
                                      no_speech_threshold=None, **same)
        default = tiny_model.transcribe(clip, **same)
        assert text and text == alone["text"].strip() == default["text"].strip()
        torch.testing.assert_close(row[None], encode_layers(tiny_model, clip[None], policy="pad30"),
                                   rtol=0, atol=1e-5)


def test_long_utterance_one_pass_per_window(tiny_model):
    clips = _clips(10)
    long = np.concatenate(clips)  # ~37 s: two windows
    assert len(long) > 30 * 16000
    with EncoderPasses(tiny_model) as passes:
        text, feats, n = transcribe_long(tiny_model, long)
    assert passes.n == n == 2 and feats.shape == (1, 4, 25, 384)
    assert "children" in text.lower() and "water" in text.lower()  # first and ninth sentences
    # the first window is the pad30 input of the whole utterance (normalised over all of it)
    torch.testing.assert_close(feats, encode_layers(tiny_model, long[None], policy="pad30"), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- the whole run

SNRS = (20.0, -10.0)


def _inputs(root: Path) -> tuple[Path, Path]:
    """A path,text CSV of 3 good utterances plus bad rows, and 11 demo noise classes x 2 clips."""
    from wat.data import make_demo

    noise = make_demo(root / "noise", clips_per_class=2, seed=0)
    sp = root / "speech"
    sp.mkdir()
    rows = [("path", "text")]
    for p in sorted(LIBRI.glob("100/10/*.flac"))[:3]:
        rows.append((str(p), dict(l.split(" ", 1) for l in (LIBRI / "100/10/100-10.trans.txt").read_text().splitlines())[p.stem]))
    (sp / "corrupt.flac").write_bytes(b"not audio at all" * 10)
    sf.write(sp / "empty.wav", np.zeros(0, np.float32), 16000)
    (sp / "dots.flac").write_bytes(p.read_bytes())
    rows += [("corrupt.flac", "A B C"), ("empty.wav", "D E F"), ("missing.flac", "G H"), ("dots.flac", "[NOISE] (laughs)")]
    with open(sp / "speech.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return sp / "speech.csv", noise


@pytest.fixture(scope="module")
def robust_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    speech, noise = _inputs(root)
    opts = RobustOptions(snrs=SNRS, chunk_size=2, batch_size=4, progress=False)
    summary = run_robust(speech, "esc50", noise, root / "out", opts, models={"tiny.en": tiny_model})
    return root, speech, noise, opts, summary


def test_run_outputs(robust_run, tiny_model):
    from wat.data import open_cache
    from wat.robust.run import _Audio, make_plan

    root, speech, noise, opts, summary = robust_run
    out = root / "out"
    for name in summary["files"]:
        assert (out / name).stat().st_size > 0
    with open(out / "problems.tsv", newline="") as f:
        problems = list(csv.DictReader(f, dialect="excel-tab"))
    reasons = " | ".join(f"{p['id']} {p['path']}: {p['reason']}" for p in problems)
    assert "missing.flac" in reasons and "no audio" in reasons                       # no file
    assert "empty transcript after normalisation" in reasons                         # "..."
    corrupt = [p for p in problems if p["path"].endswith("corrupt.flac")]
    empty = [p for p in problems if p["path"].endswith("empty.wav")]
    assert len(corrupt) == len(empty) == len(SNRS)                                    # one per mixture
    assert "empty" in empty[0]["reason"]

    m = summary["models"]["tiny.en"]
    assert m["mixtures_scored"] == 3 * len(SNRS) and m["mixtures_skipped"] == 2 * len(SNRS)
    # utterances: the 3 decoded, not the 5 planned; the two whose audio failed are named
    plan = make_plan(speech, "esc50", noise, None, opts)
    bad_audio = [u.id for u in plan.speech.utterances if u.path.endswith(("corrupt.flac", "empty.wav"))]
    assert len(bad_audio) == 2 and m["utterances_scored"] == 3
    assert summary["speech"] == {"kind": "csv", "utterances": 3, "utterances_planned": 5,
                                 "utterances_failed": bad_audio}
    assert json.loads((out / "summary.json").read_text())["speech"] == summary["speech"]
    assert m["encoder_passes"] == m["mixtures_scored"]                                # one pass per mixture
    # noise drowns the speech: WER at the lowest SNR is higher than at the highest, measured here
    assert m["wer"]["-10"] > m["wer"]["+20"]
    with open(out / "wer.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    overall = {float(r["snr"]): r for r in rows if r["noise_class"] == "all"}
    assert int(overall[20.0]["utterances"]) == 3
    assert float(overall[-10.0]["wer"]) == pytest.approx(int(overall[-10.0]["errors"]) / int(overall[-10.0]["words"]))

    # the cache: labels = noise class, snr + utterance columns, rows = encode_layers of the mixture
    cache = open_cache(out / "tiny.en" / "feats.h5")
    assert len(cache) == 6 and set(cache.columns["snr"]) == set(SNRS)
    by_id = {mx.id: mx for mx in plan.mixtures}
    i = 4
    mx = by_id[cache.ids[i]]
    assert cache.columns["utterance"][i] == plan.speech.utterances[mx.utterance].id
    assert cache.labels[i] == plan.noise.clips[mx.noise].labels
    x = _Audio(plan).mixture(mx)
    want = encode_layers(tiny_model, x[None], policy="pad30")[0].numpy().astype(np.float16)
    np.testing.assert_array_equal(cache.read("features", [i])[0], want)
    per_snr = open_cache(out / "tiny.en" / "feats_snr-10.h5")
    assert set(per_snr.columns["snr"]) == {-10.0} and len(per_snr) == 3


def test_report_page_is_self_contained_and_renders(robust_run, tmp_path):
    from test_report import check_renders, check_self_contained

    root, speech, noise, opts, summary = robust_run
    page = root / "out" / "report.html"
    assert "report.html" in summary["files"]
    text = page.read_text()
    assert "tiny.en (pad30)" in text and "esc50" in text and "corrupt.flac" in text    # labels, problem rows
    assert "3 utterances decoded of 5 (2 failed, see problems.tsv: " in text
    m = summary["models"]["tiny.en"]
    assert f"{100 * m['wer']['-10']:.4g}" in text and "WER per model, SNR and noise class" in text
    assert check_self_contained(page) == 3                                              # the three figures
    check_renders(page, tmp_path)


def test_wat_probe_reads_the_cache_unchanged(robust_run, tmp_path):
    from wat.eval.cli import probe_main

    root = robust_run[0]
    assert probe_main(["--features", str(root / "out" / "tiny.en" / "feats.h5"), "--fusion", "none",
                       "--jobs", "1", "--out", str(tmp_path / "probe")]) == 0
    assert (tmp_path / "probe" / "layers.csv").exists()


def test_resume_after_kill(robust_run, tiny_model, tmp_path):
    """kill -9 the CLI once its first chunk is written; the rerun keeps that chunk and ends with the
    same results as the uninterrupted run."""
    root, speech, noise, opts, summary = robust_run
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wat.robust.cli", "--speech", str(speech), "--noise-dataset", "esc50",
           "--noise-root", str(noise), "--model", "tiny.en", "--snr", "20,-10", "--chunk-size", "2",
           "--batch-size", "4", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "tiny.en" / "feats.shards" / "shard-00000.json"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # a second run on the same --out while the first is writing it: refused at once, nothing touched
    with pytest.raises(RobustError, match="is being written by another run"):
        run_robust(speech, "esc50", noise, out, opts, models={"tiny.en": tiny_model})
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists()
    kept = first.stat().st_mtime_ns
    assert not (out / "summary.json").exists()
    again = run_robust(speech, "esc50", noise, out, opts, models={"tiny.en": tiny_model})
    assert first.stat().st_mtime_ns == kept                       # finished work was not redone
    assert again["models"]["tiny.en"]["wer"] == summary["models"]["tiny.en"]["wer"]
    assert (out / "wer.csv").read_text() == (root / "out" / "wer.csv").read_text()


def test_a_damaged_shard_is_made_again_on_resume(robust_run, tiny_model, tmp_path, capsys):
    """A truncated mixture shard of a finished run: the rerun finds it (the full check wat-extract
    makes), makes that chunk again and ends with the same results; the other chunks are kept."""
    from wat.data.cache import verify

    root, speech, noise, opts, summary = robust_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    shards = out / "tiny.en" / "feats.shards"
    bad = sorted(shards.glob("shard-*.h5"))[1]
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.h5") if p != bad}
    size = bad.stat().st_size
    with open(bad, "r+b") as f:
        f.truncate(size // 2)
    again = run_robust(speech, "esc50", noise, out, opts, models={"tiny.en": tiny_model})
    assert f"wat-robust: {bad.name} is damaged, extracting it again" in capsys.readouterr().err
    assert bad.stat().st_size == size and verify(out / "tiny.en" / "feats.h5") == []
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.h5") if p != bad} == kept
    assert again["models"]["tiny.en"]["wer"] == summary["models"]["tiny.en"]["wer"]
    assert (out / "wer.csv").read_text() == (root / "out" / "wer.csv").read_text()


def test_cli_summary_lines(robust_run, monkeypatch, capsys):
    """What the CLI prints of a finished run: planned mixtures, utterances decoded of planned and
    the failed ones, problem rows, WER per SNR."""
    from wat.robust import cli, run

    root, speech, noise, opts, summary = robust_run
    monkeypatch.setattr(run, "run_robust", lambda *a, **k: summary)
    assert cli.main(["--speech", str(speech), "--noise-dataset", "esc50", "--noise-root", str(noise),
                     "--model", "tiny.en", "--snr", "20,-10", "--out", str(root / "out")]) == 0
    out = capsys.readouterr().out
    assert (f"{2 * 5} mixtures per model (5 utterances x 1 noise clip(s) x 2 SNRs); 3 utterances decoded of 5 "
            f"(2 failed, see problems.tsv: {', '.join(summary['speech']['utterances_failed'])}); "
            f"{summary['problems']} problem rows") in out
    assert "tiny.en: WER +20 dB " in out


def test_refused_model_leaves_no_out_folder(robust_run, capsys, tmp_path):
    from wat.robust.cli import main

    root, speech, noise, opts, summary = robust_run
    assert main(["--speech", str(speech), "--noise-dataset", "esc50", "--noise-root", str(noise), "--model",
                 "no-such-model", "--snr", "20,-10", "--out", str(tmp_path / "o" / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wat-robust: error: ") and "no-such-model" in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_errors(capsys, tmp_path):
    from wat.robust.cli import main

    base = ["--speech", str(LIBRI), "--noise-dataset", "esc50", "--noise-root", str(tmp_path), "--model", "tiny.en",
            "--out", str(tmp_path / "o")]
    for bad in (["--snr", "20,nan"], ["--snr", "20"], ["--snr", "20,-500"], ["--snr", "0,inf"], ["--snr", f"0,{10**12}"],
                ["--snr", "-1,-1"], ["--snr", "0"], ["--snr", ""], ["--snr", "0,,5"], ["--batch-size", "0"],
                ["--chunk-size", "-1"], ["--limit", "0"], ["--noise-per-utterance", "0"], ["--workers", "0"], ["--jobs", "0"], ["--batch-size", "nan"],
                ["--seed", "-1"], ["--device", "tpu"], ["--language", "klingon"]):
        with pytest.raises(SystemExit) as e:
            main(base + bad)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("wat-robust: error: ")
    assert main(base + ["--snr", "20,0"]) == 2                     # no ESC-50 under the noise root
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wat-robust: error: ") and "esc50.csv" in err[0]
    assert not (tmp_path / "o").exists()                           # a refused run leaves no empty --out

"""wat-extract end to end on demo data with tiny.en: shapes, values, errors, refusal, resume after kill -9."""
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from wat.data.audio import fit_length, load_audio
from wat.data.cache import open_cache
from wat.data.datasets import load_dataset
from wat.data.demo import make_demo
from wat.extract.cli import main
from wat.extract.layers import encode_layers
from wat.extract.pipeline import (ERRORS, WRITER_THREADS, ExtractError, ExtractOptions, extract_dataset,
                                  get_model, shard_dir_for)

# 2 s of each 5 s demo clip: the same code path at 40% of the encoder cost
OPTS = dict(model="tiny.en", policy="trim", clip_seconds=2.0, shard_size=8, batch_size=4, num_workers=1, progress=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small ESC-50-layout set (11 classes x 2 clips) with one clip replaced by garbage bytes."""
    root = tmp_path_factory.mktemp("demo")
    make_demo(root, clips_per_class=2, seed=0)
    ds = load_dataset("esc50", root)
    bad = ds.clips[5]
    Path(bad.path).write_bytes(b"RIFF\x10\x00\x00\x00WAVEthis is not audio" * 7)
    return root, bad


@pytest.fixture(scope="module")
def model():
    return get_model("tiny.en", "cpu").model  # the whisper.Whisper of the WhisperEncoder


@pytest.fixture(scope="module")
def reference(demo, model, tmp_path_factory):
    root, _ = demo
    out = tmp_path_factory.mktemp("ref") / "feats.h5"
    summary = extract_dataset(load_dataset("esc50", root), ExtractOptions(**OPTS), out, model=model)
    return out, summary


def test_cache_shapes_ids_and_labels(demo, reference):
    root, bad = demo
    out, summary = reference
    ds = load_dataset("esc50", root)
    cache = open_cache(out)
    want = [c for c in ds.clips if c.id != bad.id]
    assert len(cache) == summary.written == len(want) == 21
    assert list(cache.ids) == [c.id for c in want]
    assert cache.labels == [c.labels for c in want]
    assert list(cache.folds) == [c.fold for c in want]
    feats = cache.read("features", np.arange(len(cache)))
    assert feats.shape == (21, 4, 25, 384) and feats.dtype == np.float16
    assert np.isfinite(feats).all() and np.abs(feats).max() > 0
    assert cache.meta.policy == "trim" and cache.meta.model == "tiny.en" and cache.meta.n_frames == 25
    assert cache.meta.clip_seconds == 2.0 and np.allclose(cache.durations, 2.0)
    assert summary.shards == 3 and summary.resumed_shards == 0 and summary.processed == 22


def test_features_equal_encode_layers(demo, reference, model):
    root, _ = demo
    cache = open_cache(reference[0])
    ds = {c.id: c for c in load_dataset("esc50", root).clips}
    rows = [0, 9, 20]
    n = round(cache.meta.clip_seconds * 16000)
    audio = np.stack([fit_length(load_audio(ds[cache.ids[r]].path), n) for r in rows])
    with torch.inference_mode():
        want = encode_layers(model, torch.from_numpy(audio), frames=25, policy="trim").numpy()
    got = cache.read("features", np.array(rows)).astype(np.float32)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * scale)
    # the mean field is the time mean of the same features
    np.testing.assert_allclose(cache.read("mean", np.array(rows)).astype(np.float32), want.mean(2),
                               rtol=2e-3, atol=2e-3 * scale)


def test_summary_accounts_for_the_waits(reference):
    """The stall account: every figure >= 0, the main loop's waits within the wall time, the writer
    threads' busy time within theirs; printed as one line."""
    _, summary = reference
    st = asdict(summary.stalls)
    assert set(st) == {"audio", "device", "writer", "copies", "checksum", "write"}
    assert all(v >= 0 for v in st.values()), st
    assert st["audio"] + st["device"] + st["writer"] + st["copies"] <= summary.wall_s
    assert st["checksum"] + st["write"] <= WRITER_THREADS * summary.wall_s
    assert st["device"] > 0 and st["write"] > 0  # tiny.en ran on every batch; three shards were written
    assert "waits: audio " in str(summary) and "writer busy: checksum " in str(summary)


def test_shard_arrays_come_back_to_their_pools_and_shards_stay_intact(demo, model, tmp_path, monkeypatch):
    """11 shards reuse 4 arrays per field (a new one costs a page fault per page; `shard_pools`), and
    each shard is written intact: its arrays are refilled only after the writer thread has let go of
    it. The encoder is replaced by one that writes each clip's mean |sample| into all of its rows."""
    import wat.extract.pipeline as pipeline

    made, real = [], pipeline.shard_pools

    def counted(*args, **kw):
        pools = real(*args, **kw)
        for p in pools:
            p._new = lambda new=p._new: made.append(1) or new()
        return pools

    def encode(encoder, audio, options, lengths=None):
        v = audio.abs().mean(1)[:, None, None, None].expand(len(audio), encoder.n_layers, options.frames, encoder.dim)
        return v.half(), v[:, :, 0].half(), torch.ones(len(audio), dtype=torch.bool)

    monkeypatch.setattr(pipeline, "shard_pools", counted)
    monkeypatch.setattr(pipeline, "encode_batch", encode)
    root, bad = demo
    out = tmp_path / "f.h5"
    summary = extract_dataset(load_dataset("esc50", root), ExtractOptions(**{**OPTS, "shard_size": 2, "batch_size": 1}), out, model=model)
    assert summary.shards == 11 and summary.written == 21
    assert len(made) <= 2 * 4  # features and mean, 4 arrays each (not 11)
    cache, paths = open_cache(out), {c.id: c.path for c in load_dataset("esc50", root).clips}
    n = round(cache.meta.clip_seconds * 16000)
    want = np.array([np.abs(fit_length(load_audio(paths[i]), n)).mean() for i in cache.ids], np.float16)
    assert len(set(want.tolist())) == len(want)  # distinct clips, distinguishable rows
    feats, mean = cache.read("features", np.arange(len(cache))), cache.read("mean", np.arange(len(cache)))
    np.testing.assert_allclose(feats.astype(np.float32), np.broadcast_to(want[:, None, None, None], feats.shape), rtol=1e-3)
    np.testing.assert_allclose(mean.astype(np.float32), np.broadcast_to(want[:, None, None], mean.shape), rtol=1e-3)


def test_corrupt_clip_only_in_errors_file(demo, reference):
    root, bad = demo
    out, summary = reference
    lines = (shard_dir_for(out) / ERRORS).read_text().splitlines()
    assert lines[0] == "id\tpath\treason"
    assert len(lines) == 2
    cid, path, reason = lines[1].split("\t")
    assert (cid, path) == (bad.id, bad.path) and reason
    assert [e[0] for e in summary.errors] == [bad.id]
    assert bad.id not in set(open_cache(out).ids)
    assert "1 skipped" in str(summary)


def test_rerun_resumes_everything_and_other_policy_refuses(demo, reference, model, capsys):
    root, _ = demo
    out, first = reference
    again = extract_dataset(load_dataset("esc50", root), ExtractOptions(**OPTS), out, model=model)
    assert again.processed == 0 and again.resumed_shards == 3 and again.written == first.written
    with pytest.raises(ExtractError, match="policy: 'trim' -> 'pad30'"):
        extract_dataset(load_dataset("esc50", root), ExtractOptions(**{**OPTS, "policy": "pad30"}), out, model=model)
    argv = ["--dataset", "esc50", "--root", str(root), "--model", "tiny.en", "--out", str(out), "--shard-size", "8",
            "--clip-seconds", "2"]
    assert main(argv) == 2  # default policy pad30 into a trim cache
    err = capsys.readouterr().err.strip()
    assert err.startswith("wat-extract: error:") and "--overwrite" in err and "\n" not in err
    assert len(open_cache(out)) == first.written  # the refused run left the cache alone


def test_resume_after_kill_9(demo, reference, model, tmp_path):
    """Kill a real wat-extract process once its first shard is finished; a rerun completes the cache
    with exactly the ids and features of the uninterrupted reference run."""
    root, _ = demo
    out = tmp_path / "killed.h5"
    argv = ["--dataset", "esc50", "--root", str(root), "--model", "tiny.en", "--out", str(out), "--policy", "trim",
            "--clip-seconds", str(OPTS["clip_seconds"]), "--shard-size", "8", "--batch-size", "4", "--num-workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "wat.extract.cli", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = shard_dir_for(out) / "shard-00000.json"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert first.exists() and not out.exists()  # killed mid-run: a shard done, no index yet

    resumed = extract_dataset(load_dataset("esc50", root), ExtractOptions(**OPTS), out, model=model)
    assert 1 <= resumed.resumed_shards < 3 and resumed.processed < 22
    a, b = open_cache(reference[0]), open_cache(out)
    assert list(a.ids) == list(b.ids) and len(b) == 21
    np.testing.assert_array_equal(a.read("features", np.arange(len(a))), b.read("features", np.arange(len(b))))
    assert (shard_dir_for(out) / ERRORS).read_text() == (shard_dir_for(reference[0]) / ERRORS).read_text()
    assert not list(shard_dir_for(out).glob("*.partial"))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--dataset", "esc50", "--root", str(tmp_path / "nowhere"), "--model", "tiny.en",
                 "--out", str(tmp_path / "f.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wat-extract: error:") and "\n" not in err


def test_non_finite_outputs_are_errors_and_an_all_failed_shard_is_empty(demo, model, tmp_path):
    """NaNs injected into the 2nd encoder call (= shard 1, both clips): that shard has a record and no
    file, the index covers shards 0 and 2, and a rerun treats all three as finished."""
    root, _ = demo
    ds = load_dataset("esc50", root)
    ds.clips = ds.clips[6:12]  # past the corrupt clip
    opts = ExtractOptions(**{**OPTS, "shard_size": 2, "batch_size": 2, "clip_seconds": 1.0})
    calls = []

    def poison(module, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 2 else output

    handle = model.encoder.blocks[0].register_forward_hook(poison)
    try:
        summary = extract_dataset(ds, opts, tmp_path / "f.h5", model=model)
    finally:
        handle.remove()
    assert len(calls) == 3
    assert summary.written == 4 and [e[0] for e in summary.errors] == [c.id for c in ds.clips[2:4]]
    assert {e[2] for e in summary.errors} == {"non-finite encoder output"}
    shards = shard_dir_for(tmp_path / "f.h5")
    assert sorted(p.name for p in shards.glob("shard-*.h5")) == ["shard-00000.h5", "shard-00002.h5"]
    cache = open_cache(tmp_path / "f.h5")
    assert list(cache.ids) == [c.id for c in ds.clips[:2] + ds.clips[4:6]]
    again = extract_dataset(ds, opts, tmp_path / "f.h5", model=model)
    assert again.processed == 0 and again.resumed_shards == 3 and len(again.errors) == 2


def test_rerun_redoes_a_damaged_shard(demo, reference, model, tmp_path):
    """A truncated shard and a bit-flipped one (records intact) are found by the rerun, extracted again,
    and the cache ends up equal to the reference; untouched shards are kept."""
    import shutil

    from wat.data.cache import verify
    root, _ = demo
    out = tmp_path / "feats.h5"
    shutil.copy(reference[0], out)
    shutil.copytree(shard_dir_for(reference[0]), shard_dir_for(out))
    s0, s1 = (shard_dir_for(out) / f"shard-0000{i}.h5" for i in (0, 1))
    s0.write_bytes(s0.read_bytes()[: s0.stat().st_size // 2])
    data = bytearray(s1.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, in the middle of the features
    s1.write_bytes(bytes(data))
    again = extract_dataset(load_dataset("esc50", root), ExtractOptions(**OPTS), out, model=model)
    assert [d.split(":")[0] for d in again.damaged] == ["shard-00000.h5", "shard-00001.h5"], again.damaged
    assert again.resumed_shards == 1 and again.processed == 16 and "2 damaged shard(s)" in str(again)
    assert verify(out) == []
    a, b = open_cache(reference[0]), open_cache(out)
    np.testing.assert_array_equal(a.read("features", np.arange(len(a))), b.read("features", np.arange(len(b))))


def test_second_writer_is_refused_and_a_killed_holder_does_not_block(demo, reference, model, tmp_path, capsys):
    """One run per output (an OS lock on feats.shards/.lock): a second wat-extract is refused before it
    loads a model; a lock left by a kill -9'd process is gone with it."""
    from wat.data.files import output_lock
    from wat.extract import pipeline
    root, _ = demo
    out = tmp_path / "feats.h5"
    lock = shard_dir_for(out) / pipeline.LOCK
    lock.parent.mkdir(parents=True)
    argv = ["--dataset", "esc50", "--root", str(root), "--model", "tiny.en", "--out", str(out), "--policy", "trim",
            "--clip-seconds", "2", "--shard-size", "8", "--limit", "3"]
    with output_lock(lock, "test holder"):
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wat-extract: error:") and "another run" in err and "\n" not in err
    assert not out.exists() and not list(lock.parent.glob("shard-*"))
    # a real process holds the lock and is killed -9: the rerun is not blocked
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from wat.data.files import output_lock\n"
                               f"with output_lock({str(lock)!r}, 'x'):\n print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    summary = extract_dataset(load_dataset("esc50", root), ExtractOptions(**{**OPTS, "limit": 3}), out, model=model)
    assert summary.written == 3 and lock.exists()


def test_full_disk_is_an_error_line_not_a_crash(demo, model, tmp_path):
    """A file-size limit (the same write error as a full disk) while a shard is written: one error line,
    exit 2 (the process used to segfault in h5py's teardown, exit 139), no .partial left."""
    import resource
    root, _ = demo
    out = tmp_path / "feats.h5"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), like ENOSPC, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    argv = ["--dataset", "esc50", "--root", str(root), "--model", "tiny.en", "--out", str(out), "--policy", "trim",
            "--clip-seconds", "2", "--shard-size", "8", "--limit", "8", "--num-workers", "0"]
    proc = subprocess.run([sys.executable, "-m", "wat.extract.cli", *argv], preexec_fn=limit,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("wat-extract: error:") and "File too large" in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(shard_dir_for(out).glob("*.partial*")) and not list(shard_dir_for(out).glob("shard-*.h5"))


@pytest.mark.parametrize("option,value", [("--num-workers", "-1"), ("--decode-workers", "100000"), ("--frames", "0"),
                                          ("--frames", "100001"), ("--batch-size", "-1"), ("--batch-size", "nan"),
                                          ("--shard-size", "0"), ("--limit", "-1"), ("--limit", "0"),
                                          ("--clip-seconds", "nan"), ("--clip-seconds", "0"), ("--clip-seconds", "-5"),
                                          ("--clip-seconds", "inf"), ("--clip-seconds", "1e9"), ("--workers", "0")])
def test_bad_numbers_are_one_error_line_before_the_model_loads(tmp_path, capsys, monkeypatch, option, value):
    """--num-workers -1 used to fail only after the model had loaded (with a traceback)."""
    from wat.extract import pipeline
    monkeypatch.setattr(pipeline, "get_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "esc50", "--root", str(tmp_path), "--model", "tiny.en", "--out", str(tmp_path / "f.h5"),
              option, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("wat-extract: error: argument") and option in err[-1], err
    assert sum(line.startswith("wat-extract: error:") for line in err) == 1 and "Traceback" not in "".join(err)
    with pytest.raises(ExtractError, match="num_workers must be >= 0"):  # the library refuses it too
        ExtractOptions(num_workers=-1).check()


def test_what_the_encoder_cannot_give_is_refused_before_any_work(demo, model, tmp_path):
    """Whisper encodes 30 s (1500 frames): more frames or longer clips are refused once the encoder is
    known, before a shard folder exists; so is a policy the encoder does not take."""
    root, _ = demo
    ds = load_dataset("esc50", root)
    for opts, match in [(dict(frames=1501), "frames must be <= 1500 .the encoder frames of 30 s"),
                        (dict(clip_seconds=31.0), "at most 30 s for the whisper encoder 'tiny.en'")]:
        with pytest.raises(ExtractError, match=match):
            extract_dataset(ds, ExtractOptions(**{**OPTS, **opts}), tmp_path / "f.h5", model=model)
        assert not shard_dir_for(tmp_path / "f.h5").exists()



def test_pad30_rows_are_each_clip_alone_in_transcribe_windows(demo, model, tmp_path):
    """pad30 extraction in batches: every row is `encode_layers` of its clip alone (each clip's
    log-mel window on its own, never normalised with its batch), and the cache says so (schema 4)."""
    import dataclasses

    root, bad = demo
    ds = load_dataset("esc50", root)
    clips = [c for c in ds.clips if c.id != bad.id][::6][:4]  # 4 classes, one batch
    ds = dataclasses.replace(ds, clips=clips)
    out = tmp_path / "feats.h5"
    summary = extract_dataset(ds, ExtractOptions(**{**OPTS, "policy": "pad30", "clip_seconds": 1.3}), out, model=model)
    cache = open_cache(out)
    assert summary.written == 4 and cache.meta.policy == "pad30" and cache.meta.pad30_padding == "mel"
    n = round(1.3 * 16000)
    for r, c in enumerate(clips):
        want = encode_layers(model, fit_length(load_audio(c.path), n)[None], policy="pad30")[0].numpy()
        got = cache.read("features", np.array([r]))[0].astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_a_run_folder_of_sample_padded_pad30_is_not_resumed(tmp_path):
    """A pad30 run folder of a wat before cache schema 4 (its manifest has no pad30_padding: its
    shards hold sample-padded windows) is not continued with log-mel padded ones."""
    import json

    from wat.extract.pipeline import MANIFEST, prepare_output

    index = tmp_path / "feats.h5"
    new = {"model": "tiny.en", "policy": "pad30", "pad30_padding": "mel", "frames": 25}
    shard_dir_for(index).mkdir()
    (shard_dir_for(index) / MANIFEST).write_text(json.dumps({k: v for k, v in new.items() if k != "pad30_padding"}))
    with pytest.raises(ExtractError, match="pad30_padding: 'samples' -> 'mel'.*--overwrite"):
        prepare_output(index, new, overwrite=False)
    assert prepare_output(index, new, overwrite=True) == shard_dir_for(index)
    # trim has no padding: an older trim run folder still resumes
    trim = {"model": "tiny.en", "policy": "trim", "pad30_padding": "", "frames": 25}
    (shard_dir_for(index) / MANIFEST).write_text(json.dumps({k: v for k, v in trim.items() if k != "pad30_padding"}))
    assert prepare_output(index, trim, overwrite=False) == shard_dir_for(index)


def test_a_refused_run_leaves_no_shard_folder(demo, model, tmp_path, capsys):
    """Refused after it took its output (a model that does not load, a stray index file): the shard
    folder the run made is gone again; a folder that was there before stays."""
    root, _ = demo
    out = tmp_path / "new" / "feats.h5"
    argv = ["--dataset", "esc50", "--root", str(root), "--model", str(tmp_path / "missing.pt"), "--policy", "trim",
            "--limit", "2"]
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wat-extract: error:"), err
    assert not (tmp_path / "new").exists()
    stray = tmp_path / "stray.h5"
    stray.write_text("not a cache")
    with pytest.raises(ExtractError, match="not made by this extractor"):
        extract_dataset(load_dataset("esc50", root), ExtractOptions(**{**OPTS, "limit": 2}), stray, model=model)
    assert not shard_dir_for(stray).exists() and stray.read_text() == "not a cache"
    had = shard_dir_for(tmp_path / "had" / "feats.h5")
    had.mkdir(parents=True)
    assert main(argv + ["--out", str(tmp_path / "had" / "feats.h5")]) == 2
    assert had.is_dir()

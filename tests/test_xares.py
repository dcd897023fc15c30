"""wat.extract.xares through X-ARES itself (xares 0.1.3, installed by `make venv` without torchaudio):
its encoder check, its encoding and its MLP/kNN scoring, on a tiny task in its own format built here
from the demo clips (folds 1-5, ESC-50 layout), with tiny.en."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

xares = pytest.importorskip("wat.extract.xares")

MODEL, LAYER, POLICY = "tiny.en", -1, "trim"


@pytest.fixture(scope="module")
def xt():
    return xares.import_xares("xares.task")


@pytest.fixture(scope="module")
def encoder():
    return xares.encoder_class(MODEL, layer=LAYER, policy=POLICY, device="cpu")()


def write_task(env_root: Path, cache_path: Path, demo_data: Path) -> Path:
    """The demo clips as an X-ARES k-fold task: per fold, audio tars written by X-ARES's own
    `write_audio_tar` (16 kHz wav + a {"label": index} record), and the task's ready mark."""
    write_audio_tar = xares.import_xares("xares.audiowebdataset").write_audio_tar   # X-ARES's own writer

    from wat.data.audio import load_audio
    from wat.data.cache import open_cache

    cache = open_cache(cache_path)
    env = env_root / "toy"
    (env / "wav").mkdir(parents=True)
    by_fold = {}
    for clip_id, labels, fold in zip(cache.ids, cache.labels, cache.folds):
        name = Path(clip_id).name if Path(clip_id).suffix else f"{clip_id}.wav"   # ESC-50 ids: file stems
        wav = env / "wav" / name
        sf.write(wav, load_audio(demo_data / "audio" / name), 16000, subtype="FLOAT")   # the samples wat encoded
        by_fold.setdefault(int(fold), []).append((str(wav), {"label": int(labels[0])}))
    for fold, items in by_fold.items():
        write_audio_tar([p for p, _ in items], [l for _, l in items], str(env / f"wds-audio-fold-{fold}-*.tar"),
                        num_shards=1)
    (env / ".audio_tar_ready").touch()
    return env


def test_encoder_passes_xares_check_with_whisper_hop(encoder):
    from xares.audio_encoder_checker import check_audio_encoder

    assert check_audio_encoder(encoder)
    assert encoder.hop_size_in_ms == 20.0 and encoder.sampling_rate == 16000 and encoder.output_dim == 384
    assert type(encoder).__name__ == "WatTinyEnLastTrimEncoder"
    out = encoder(torch.randn(2, 16000))
    assert out.shape == (2, 50, 384)             # 1 s = 50 encoder frames of 20 ms


def test_padding_is_never_pooled(encoder):
    """A clip zero-padded in an X-ARES batch gives its own frames, then its mean frame: the row's mean
    is the mean of the clip encoded alone."""
    rng = np.random.default_rng(0)
    a, b = (torch.from_numpy(rng.normal(size=n).astype(np.float32) * 0.1) for n in (16000, 9600))
    batch = torch.zeros(2, 16000)
    batch[0], batch[1, :9600] = a, b
    out = encoder(batch)
    alone = encoder(b[None])
    assert alone.shape == (1, 30, 384)
    torch.testing.assert_close(out[1, :30], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1].mean(0), alone[0].mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[0], encoder(a[None])[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer, dim", [(0, 384), ("mean", 384), ("concat", 4 * 384)])
def test_layer_choices(layer, dim):
    enc = xares.encoder_class(MODEL, layer=layer, policy=POLICY, device="cpu")()
    x = torch.randn(1, 8000)
    assert enc.output_dim == dim and enc(x).shape == (1, 25, dim)
    full = enc.encoder.all_frames(x, policy=POLICY)                    # [1, 4, 25, 384]
    want = {0: full[:, 0], "mean": full.mean(1), "concat": full.permute(0, 2, 1, 3).reshape(1, 25, -1)}[layer]
    torch.testing.assert_close(enc(x), want)


def _npy_frames(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".npy"):
                    out[m.name.split(".")[0]] = np.load(io.BytesIO(t.extractfile(m).read()))
    return out


TASK_PY = """from xares.task import TaskConfig


def toy_config(encoder):
    return TaskConfig(name="toy", env_root={env!r}, k_fold_splits=[1, 2, 3, 4, 5], output_dim={n}, encoder=encoder,
                      label_processor=lambda x: x["label"], private=True, torch_num_threads=1)
"""


def test_xares_scores_an_exported_cache_and_agrees_with_the_encoder(encoder, demo_data, demo_cache_trim, tmp_path):
    """The demo clips as an X-ARES task; their wat cache exported as its embeddings (marked encoded)
    and scored by X-ARES's own stage 2 (`xares.run` through `wat-xares run`: MLP and kNN), without
    encoding anything; the exported frames average to what the adapter encodes from the audio.
    (X-ARES's own stage 1 cannot run here: it decodes audio with torchaudio, see README.)"""
    import subprocess
    import sys

    from wat.data.cache import open_cache
    from wat.extract.xares.cli import main

    n_classes = len(open_cache(demo_cache_trim).meta.vocab)
    env = tmp_path / "env"
    write_task(env, demo_cache_trim, demo_data)
    (tmp_path / "toy_task.py").write_text(TASK_PY.format(env=str(env), n=n_classes))
    assert main(["export", "--features", str(demo_cache_trim), "--task", str(tmp_path / "toy_task.py")]) == 0
    name = type(encoder).__name__
    folder = env / "toy" / "embeddings" / name
    assert (folder / ".encoded_tar_ready").exists() and len(list(folder.glob("wds-encoded-fold-*-000000.tar"))) == 5
    frames = _npy_frames(folder)
    assert len(frames) == 88 and all(v.shape == (25, 384) and v.dtype == np.float32 for v in frames.values())

    for key in sorted(frames)[:6]:   # the adapter on the 16 kHz audio X-ARES holds: same mean (fp16 cache)
        audio, _ = sf.read(env / "toy" / "wav" / f"{key}.wav", dtype="float32")
        direct = encoder(torch.from_numpy(audio)[None])[0].mean(0).numpy()
        np.testing.assert_allclose(frames[key].mean(0), direct, atol=2e-2, rtol=2e-2)

    assert main(["encoder", "--model", MODEL, "--layer", str(LAYER), "--policy", POLICY,
                 "--out", str(tmp_path / "enc.py")]) == 0
    # in a process whose start method is already chosen (xares.run.main sets spawn without force=:
    # 'context has already been set'), and left as the caller chose it
    script = ("import multiprocessing as mp, sys; mp.set_start_method('fork')\n"
              "from wat.extract.xares.cli import main\n"
              "code = main(['run', 'enc.py', 'toy_task.py', '--from-stage', '2'])\n"
              "print('start method', mp.get_start_method()); sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    scores = env / "toy" / "checkpoints" / name
    knn = float((scores / "knn_score.txt").read_text().split()[0])
    mlp = float((scores / "mlp_score.txt").read_text().split()[0])
    assert knn > 0.2 and 0 <= mlp <= 1          # 11 classes, chance 0.09 (tiny.en last layer: ~0.4)
    assert "Weighted Average KNN Score" in run.stdout and "start method fork" in run.stdout


def test_export_refusals(xt, demo_cache_trim, demo_data, tmp_path, capsys):
    from wat.extract.xares.cli import main

    env = tmp_path / "env"
    task_py = tmp_path / "toy_task.py"
    task_py.write_text("from xares.task import TaskConfig\n\n"
                       f"def toy_config(encoder):\n    return TaskConfig(name='toy', env_root={str(env)!r}, "
                       "k_fold_splits=[1, 2, 3, 4, 5], output_dim=11, encoder=encoder, private=True)\n")
    base = ["export", "--features", str(demo_cache_trim), "--task", str(task_py)]
    assert main(base) == 2                                          # no audio tars yet
    assert "no audio tars" in capsys.readouterr().err
    write_task(env, demo_cache_trim, demo_data)
    for bad in (["--layer", "7"], ["--layer", "-9"]):
        assert main(base + bad) == 2
        assert capsys.readouterr().err.startswith("wat-xares: error:")
    with pytest.raises(SystemExit):
        main(base + ["--layer", "middle"])
    assert main(base) == 0
    assert main(base) == 2 and "already holds" in capsys.readouterr().err
    assert main(base + ["--overwrite"]) == 0
    assert main(["export", "--features", str(demo_cache_trim), "--task", str(tmp_path / "nope.py")]) == 2


def test_encoder_file_for_xares_run(tmp_path, capsys):
    from wat.extract.xares.cli import main

    assert main(["encoder", "--model", MODEL, "--layer", "2", "--policy", "trim", "--out", str(tmp_path / "enc.py")]) == 0
    text = (tmp_path / "enc.py").read_text()
    assert "WatTinyEnL2TrimEncoder = xares.encoder_class('tiny.en', layer=2, policy='trim'" in text
    assert main(["encoder", "--out", str(tmp_path / "bad-name.py")]) == 2


def test_encoder_file_refuses_what_xares_run_could_not_build(tmp_path, capsys):
    """The encoder is built once before its file is written: a layer the model lacks, a policy its
    family does not take, a model that does not load are one line, and no file is left behind."""
    from wat.extract.xares.cli import main

    out = tmp_path / "enc.py"
    for argv, why in ((["--model", MODEL, "--layer", "9"], "not one of the blocks 0..3"),
                      (["--model", MODEL, "--layer", "-5"], "not one of the blocks 0..3"),
                      (["--model", "crepe-tiny", "--policy", "pad30"], "does not apply to the crepe encoder"),
                      (["--model", str(tmp_path / "nope")], "no such file"),
                      (["--model", MODEL, "--out", str(tmp_path / "no" / "enc.py")], "no folder")):
        assert main(["encoder", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("wat-xares: error:") and why in err[0], err
    assert list(tmp_path.iterdir()) == []
    # without --policy: the encoder's default, written out, so the class is named as an export of a
    # cache of that policy names its folder (it was 'Default', which no cache records)
    assert main(["encoder", "--model", MODEL, "--layer", "2", "--out", str(out)]) == 0
    assert "WatTinyEnL2Pad30Encoder = xares.encoder_class('tiny.en', layer=2, policy='pad30'" in out.read_text()
    assert xares.class_name(MODEL, 2, None) == "WatTinyEnL2Pad30Encoder"
    assert xares.class_name("crepe-tiny", -1, None) == "WatCrepeTinyLastTrimEncoder"


def test_export_and_run_refusals_are_one_line(demo_cache_trim, tmp_path, monkeypatch, capsys):
    from wat.extract.xares.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not python")
    (tmp_path / "five_task.py").write_text("def five_config(encoder):\n    return 5\n")
    (tmp_path / "toy_task.py").write_text(TASK_PY.format(env=str(tmp_path / "env"), n=11))
    (tmp_path / "enc.py").write_text(f"from wat.extract import xares\n\nWatTinyEncoder = xares.encoder_class({MODEL!r})\n")
    export = ["export", "--features", str(demo_cache_trim), "--task"]
    cases = [(export + ["notes.txt"], "a Python file"), (export + ["five_task.py"], "not a TaskConfig"),
             (export + ["toy_task.py", "--encoder-name", "../../xEncoder"], "an identifier ending in 'Encoder'"),
             (["run", "nope.py", "toy_task.py"], "nope.py: no such file"),
             (["run", str(tmp_path / "enc.py"), "toy_task.py"], "below the current folder"),
             (["run", "enc.py", "toy_task.py", "--from-stage", "2", "--to-stage", "1"], "nothing to run"),
             (["run", "enc.py", "toy_task.py", "--from-stage", "2"], "no embeddings of WatTinyEnLastPad30Encoder")]
    from wat.data.no_torchaudio import torchaudio_problem
    if torchaudio_problem():   # stage 1 would mark the task encoded with no clip in it
        cases.append((["run", "enc.py", "toy_task.py", "--from-stage", "1"], "cannot be imported here"))
    for argv, why in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("wat-xares: error:") and why in err[0], (argv, err)
    assert not (tmp_path / "env").exists() and not (tmp_path.parent / "xEncoder").exists()

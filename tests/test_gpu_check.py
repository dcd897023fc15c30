"""bench/gpu_check.sh on the CPU at tiny sizes (random tiny Whisper, tiny caches): the script, every
bench script it calls, their --json records and the one table stay runnable without a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(*args, timeout=480):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def test_gpu_check_tiny_on_cpu(tmp_path):
    out = tmp_path / "out"
    r = _run("--device", "cpu", "--tiny", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    table = r.stdout[r.stdout.index("GPU check on"):]
    for step in ("extraction, pad30", "extraction, trim", "extraction, HF speech", "training TL-Tr", "training WA-MLP",
                 "probing, AudioSet shape", "tagging overhead", "wat-robust vs paper"):
        assert step in table, step
    for what in ("pipeline/bare", "pipeline/official", "encoder TFLOP/s", "tl-tr tiny samples/s, end to end, streaming",
                 "wa-mlp tiny samples/s", "wat probe s/layer", "speed-up over sklearn", "transcribe_and_tag / transcribe"):
        assert what in table, what
    assert "FAILED" not in table and "Traceback" not in r.stdout
    pad30 = json.loads((out / "extract_pad30.json").read_text())
    assert pad30["policy"] == "pad30" and pad30["random_weights"] and pad30["model"] == "random-micro"
    assert pad30["pipeline"] > 0 and pad30["bare"] > 0 and pad30["peak_tflops"] is None   # no peak for a CPU
    trim = json.loads((out / "extract_trim.json").read_text())
    assert trim["null_encoder"] > 0 and trim["disk_write_mb_s"] > 0 and trim["stalls"]["write"] > 0   # --null-encoder
    assert "null-encoder pipeline / disk write" in table and "pipeline waits" in table
    assert trim["encoder_gflop_per_clip"] < pad30["encoder_gflop_per_clip"]     # 1 s of mel frames, not 30 s
    hf = json.loads((out / "extract_hf.json").read_text())
    assert hf["model"] == "random-micro" and hf["policy"] == "trim" and hf["pipeline"] > 0 and hf["bare"] > 0
    assert hf["peak_gpu_gb"] is None and "peak GPU memory" not in table   # a CPU run has no GPU memory
    probe = json.loads((out / "probe.json").read_text())
    assert probe["layers"] == 2 and len(probe["rows"]) == 2 and "sklearn_mAP_subset" in probe["rows"][1]
    tag = json.loads((out / "tag.json").read_text())
    assert tag["passes"] == {"plain": tag["passes"]["plain"], "tagged": tag["passes"]["plain"]}   # one shared pass


def test_gpu_table_marks_a_failed_step(tmp_path):
    """A step without its record is a FAILED row and exit 1; a missed target says MISSED."""
    (tmp_path / "tag.json").write_text(json.dumps({"device": "NVIDIA H200", "model": "random-large-v1",
                                                   "ratio": 1.02, "tagged_s": 1.02, "plain_s": 1.0}))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_table.py"), str(tmp_path), "--skip", "robust"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "GPU check on NVIDIA H200" in r.stdout and "MISSED" in r.stdout and "1.020" in r.stdout
    assert r.stdout.count("FAILED: no result") == 6 and "not run" in r.stdout


def test_gpu_check_only_some_steps(tmp_path):
    """--only runs the steps named (a rerun of what failed on a GPU box); the rest are "not run" rows,
    not failures; --random-weights always skips any weight download."""
    out = tmp_path / "out"
    r = _run("--device", "cpu", "--tiny", "--out", str(out), "--only", "train_wamlp", "--random-weights", "always")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in out.glob("*.json")) == ["train_wamlp.json"]
    table = r.stdout[r.stdout.index("GPU check on"):]
    assert table.count("not run") == 7 and "FAILED" not in table and "wa-mlp tiny samples/s" in table


@pytest.mark.parametrize("args", [["--device", "tpu"], ["--bogus"], ["--out"], ["--only", "bogus"], ["--only", ","],
                                  ["--random-weights", "never"], ["--random-weights"]])
def test_gpu_check_bad_arguments(args):
    r = _run(*args, timeout=60)
    assert r.returncode == 2 and "gpu_check.sh: error" in r.stderr or "usage:" in r.stderr
    assert r.returncode == 2

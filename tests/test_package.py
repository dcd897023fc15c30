"""The installed package: one `wat` namespace, no generic top-level names, all CLIs present."""
import configparser
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIS = ["wat-data", "wat-cache", "wat-extract", "wat-train", "wat-probe", "wat-eval", "wat-tag", "wat-robust", "wat-xares"]


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # -I: isolated mode, so neither the cwd nor PYTHONPATH can make the repo folders importable
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("generic", ["data", "extract", "train", "eval", "tag", "robust"])
def test_no_generic_top_level_package(generic, tmp_path):
    proc = _run_python(f"import {generic}", tmp_path)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


def test_parts_import_under_wat_namespace(tmp_path):
    code = "import wat.data.labels, wat.extract, wat.train, wat.eval, wat.tag, wat.robust; print(len(wat.data.labels.audioset_vocabulary()))"
    proc = _run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "527"


def test_console_scripts_declared_and_installed():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = [line.split("=")[0].strip() for line in cfg["options.entry_points"]["console_scripts"].split("\n") if line.strip()]
    assert sorted(declared) == sorted(CLIS)
    bindir = Path(sys.executable).parent
    for name in CLIS:
        assert (bindir / name).exists(), f"{name} not installed in {bindir}"


@pytest.mark.parametrize("name", CLIS)
def test_cli_help_exits_zero(name):
    proc = subprocess.run([str(Path(sys.executable).parent / name), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


def test_package_data_ships_label_files():
    from importlib import resources

    folder = resources.files("wat.data").joinpath("audioset")
    assert folder.joinpath("class_labels_indices.csv").is_file()
    assert folder.joinpath("ontology.json").is_file()
    assert "CC BY-SA 4.0" in folder.joinpath("README.md").read_text()


@pytest.mark.parametrize("app", ["tag", "robust"])
def test_application_has_one_import_name(app, tmp_path):
    # tag/ is wat.tag: wat.extract.APP (its name before it moved) is a deprecation alias holding the
    # same objects, never a second copy of a module (its own error classes, its own state)
    code = (f"import warnings\nimport wat.{app} as new\nwith warnings.catch_warnings(record=True) as w:\n"
            f"    warnings.simplefilter('always')\n    import wat.extract.{app} as old\n"
            "assert all(getattr(old, n) is getattr(new, n) for n in new.__all__)\n"
            "assert any(issubclass(x.category, DeprecationWarning) for x in w)\n"
            f"import wat.extract.{app}.cli")
    proc = _run_python(code, tmp_path)
    assert f"No module named 'wat.extract.{app}.cli'" in proc.stderr, proc.stderr

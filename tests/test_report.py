"""Figures and report.html: labels from cache metadata, axes that follow the data, self-contained
pages that render in a real browser (headless Chromium, the Debian package `make test` installs)."""
import base64
import html.parser
import json
import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from test_probe import write_synthetic_cache
from wat.data.report import figures
from wat.data.cache import open_cache
from wat.data.labels import Vocabulary
from wat.eval import probe as P
from wat.eval import report as R


# ---------------------------------------------------------------- figures

def _meta(model="base", n_layers=6, n_classes=16, dataset="esc50", policy="trim"):
    from wat.data.cache import CacheMeta
    vocab = Vocabulary(tuple(f"k{i}" for i in range(n_classes)), tuple(f"class {i}" for i in range(n_classes)))
    return CacheMeta(model=model, fingerprint="f" * 16, n_layers=n_layers, n_frames=25, dim=8, policy=policy,
                     pooling="mean:25", sample_rate=16000, clip_seconds=5.0, vocab=vocab, multilabel=False,
                     dataset=dataset)


def test_cache_metadata_says_how_pad30_windows_were_padded():
    """A schema <= 3 pad30 cache (sample padding) and a schema 4 one (transcribe's mel padding) hold
    different features: the report's cache table must tell them apart; trim has no padding."""
    from dataclasses import replace

    from wat.data.report.page import cache_metadata
    assert cache_metadata(_meta(policy="trim"))["input policy"] == "trim"
    pad = _meta(policy="pad30")
    assert cache_metadata(pad)["input policy"] == "pad30 (mel-padded)"
    assert cache_metadata(replace(pad, pad30_padding="samples"))["input policy"] == "pad30 (samples-padded)"


def _report(layer_scores: list[list[float]], metas, fusion=(), chance=1 / 16, path="xyz_out/feats.h5"):
    """A ProbeReport with given per-layer accuracies (5 folds around each value, std 0.004)."""
    results = []
    for c, scores in enumerate(layer_scores):
        for layer, s in enumerate(scores):
            folds = list(s + np.array([-0.004, 0.004, -0.004, 0.004, 0.0]))
            results.append(P.FeatureResult(P.Feature("layer", (c,), ((layer,),)), folds, folds,
                                           np.full(16, s), None))
    for kind, caches, s in fusion:
        layers = tuple(tuple(range(len(layer_scores[c]))) for c in caches)
        results.append(P.FeatureResult(P.Feature(kind, tuple(caches), layers), [s] * 5, [s] * 5, np.full(16, s), None))
    vocab = metas[0].vocab
    return P.ProbeReport(metric="accuracy", protocol="5-fold (cache folds)", n_folds=5,
                         caches=[path] * len(metas), eval_caches=[], keys=vocab.keys, names=vocab.names,
                         chance=chance, results=results, metas=list(metas), n_clips=400)


def test_layer_figure_follows_the_data_and_names_models_from_metadata(tmp_path):
    scores = [0.90, 0.91, 0.93, 0.94, 0.92, 0.915]
    rep = _report([scores], [_meta()], fusion=[("mean", (0,), 0.925), ("concat", (0,), 0.935)])
    shown = R.plot_layers(rep, tmp_path / "layers.png")
    lo, hi = shown["ylim"]
    assert 0.85 <= lo < 0.895 and 0.945 < hi <= 1.0          # not 0..1: the layer differences are visible
    text = " | ".join(shown["text"])
    assert "xyz_out" not in text and "feats" not in text       # never the folder or file name
    assert "base (trim)" in text and "esc50" in text and "400 clips" in text and "16 classes" in text
    assert "layer mean 0.925" in text and "layer concat 0.935" in text
    assert "chance 0.0625 ↓" in text                           # far below the data: named at the edge
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chance_inside_the_range_is_a_line_and_limits_stay_within_bounds():
    assert figures.data_limits([0.2, 0.3]) == pytest.approx((0.185, 0.315))
    assert figures.data_limits([0.99, 1.0], bounds=(0, 1))[1] == 1.0
    assert figures.data_limits([0.5, 0.5, np.nan])[1] - figures.data_limits([0.5])[0] >= 0.02   # flat data
    with pytest.raises(figures.FigureError):
        figures.data_limits([np.nan])
    plt = figures.pyplot()
    fig, ax = plt.subplots()
    ax.set_ylim(0, 1)
    figures.reference_line(ax, 0.5, "chance")
    figures.reference_line(ax, 2.0, "above")
    assert [l.get_label() for l in ax.get_lines()] == ["chance 0.5"]
    assert [t.get_text() for t in ax.texts] == ["above 2 ↑"]
    plt.close(fig)


def test_several_models_one_line_each(tmp_path):
    metas = [_meta("base", 6), _meta("tiny.en", 4)]
    rep = _report([[0.80, 0.85, 0.90, 0.92, 0.91, 0.88], [0.78, 0.84, 0.86, 0.83]], metas,
                  fusion=[("concat", (0, 1), 0.93)])
    plt = figures.pyplot()
    shown = R.plot_layers(rep, tmp_path / "layers.png")
    text = " | ".join(shown["text"])
    assert "base (trim)" in text and "tiny.en (trim)" in text and "concat_W1W2 0.93" in text   # the seed's name
    assert "W1 = base (trim), W2 = tiny.en (trim)" in " ".join(text.split())   # the caption's key to it
    assert "encoder layer" in text and "relative depth" not in text   # the layer index, as the paper
    assert [l["label"] for l in shown["lines"]][:2] == ["base (trim)", "tiny.en (trim)"]
    assert shown["ylim"][0] > 0.7
    text = " | ".join(R.plot_layers(rep, tmp_path / "rel.png", relative=True)["text"])
    assert "relative depth" in text             # 6 and 4 layers on one axis
    plt.close("all")

    # two caches of the same model and policy stay distinguishable
    assert figures.distinct_labels([_meta(dataset="a"), _meta(dataset="b")]) == ["base (trim), a", "base (trim), b"]
    assert figures.distinct_labels([_meta(), _meta()]) == ["base (trim) #1", "base (trim) #2"]


def test_best_layer_histogram_states_the_tie_rule(tmp_path):
    hist = [{"features": 0, "layers": [0, 1, 2], "classes_per_layer": [0.5, 0.5, 15.0], "classes_tied": 1,
             "classes_undefined": 0}]
    shown = R.plot_best_layer_hist(hist, tmp_path / "h.png", "F1", [_meta(n_layers=3)])
    text = " ".join(" ".join(shown["text"]).split())
    assert "Best probe layer per class (by F1)" in text and "features 0" not in text
    assert "tied across k layers adds 1/k to each" in text and "1 tied class" in text


def _robust_panel(meta):
    """One model's figure input for wat-robust: WER 12..49 % over 3 SNRs, 10 classes in range and one
    far above it, probe accuracies 0.85..0.94."""
    points = [{"class": f"class {i}", "f1": 0.4 + 0.05 * i, "wer_increase": 5.0 + 3 * i + (i % 3),
               "wer_high_snr": 0.1, "wer_low_snr": 0.1 + (5.0 + 3 * i) / 100} for i in range(10)]
    points.append({"class": "loud", "f1": 0.9, "wer_increase": 80.0, "wer_high_snr": 0.1, "wer_low_snr": 0.9})
    from wat.robust import report as RR
    return {"meta": meta, "name": "xyz_out", "wer": [(20.0, 0.12, 20), (0.0, 0.27, 20), (-10.0, 0.49, 20)],
            "points": points, "correlation": RR.correlation(points), "missing": 0,
            "layers": {20.0: ([0, 1, 2, 3], [0.90, 0.91, 0.93, 0.94], [0.01] * 4),
                       -10.0: ([0, 1, 2, 3], [0.85, 0.86, 0.88, 0.87], [0.01] * 4)},
            "chance": 1 / 11, "not_probed": {}, "protocol": "5-fold (cache folds)", "clips": {20.0: 20, -10.0: 20},
            "noise_alone": (3, 0.9)}


def test_robust_figures_follow_the_data_and_name_models_from_metadata(tmp_path):
    from wat.robust import report as RR
    meta = _meta("base", n_layers=4, n_classes=11, policy="pad30", dataset="robust:csv+esc50")
    panels = [_robust_panel(meta)]                      # "xyz_out": a folder name that must never show
    data = RR.data_label("csv", 10, _meta("base", n_classes=11, dataset="esc50"))
    out = tmp_path / "xyz_out"
    out.mkdir()

    wer = RR.plot_wer_vs_snr(panels, data, out / "wer_vs_snr.png")
    text = " ".join(" ".join(wer["text"]).split())
    assert "xyz_out" not in text
    assert "base (pad30)" in text and "esc50 noise" in text and "11 classes" in text and "10 utterances" in text
    assert "20 mixtures per SNR" in text and "+20" in text and "-10" in text
    assert 5 < wer["ylim"][0] < 12 and 49 < wer["ylim"][1] < 60          # WER 12..49 %: not 0..100

    cw = RR.plot_classwise(panels, (20.0, -10.0), data, out / "classwise.png")
    text = " ".join(" ".join(cw["text"]).split())
    c = panels[0]["correlation"]
    assert f"base (pad30), 11 classes: Pearson r = {c['pearson_r']:.2f}, p = {c['p_value']:.2g}" in text
    assert "xyz_out" not in text
    assert "above +50 points (not drawn; in the line and r): loud +80" in text    # listed apart, not drawn
    assert not any(t == "loud" for t in cw["text"]) and "class 9" in cw["text"]
    assert cw["ylim"][1] < 50 and cw["ylim"][0] > -5                   # the in-range classes, 5..34
    assert RR.y_cap(np.array([60.0, 70.0, 10.0])) is None               # most above: all drawn

    ly = RR.plot_layers(panels, data, out / "layers.png")
    text = " ".join(" ".join(ly["text"]).split())
    assert "base (pad30)" in text and "+20 dB" in text and "-10 dB" in text and "xyz_out" not in text
    assert 0.8 < ly["ylim"][0] < 0.85 and 0.94 < ly["ylim"][1] < 1.0    # accuracies 0.85..0.94: not 0..1
    assert "chance 0.0909 ↓" in text and "noise alone (layer 3) 0.9" in text
    assert "20 mixtures of each SNR" in text

    # two models: one line (panel) each, labelled by model and policy from their caches
    two = [panels[0], _robust_panel(_meta("tiny.en", n_layers=4, n_classes=11, policy="pad30"))]
    text = " ".join(RR.plot_wer_vs_snr(two, data, out / "w2.png")["text"])
    assert "base (pad30)" in text and "tiny.en (pad30)" in text
    text = " ".join(RR.plot_layers(two, data, out / "l2.png")["text"])
    assert "base (pad30)" in text and "tiny.en (pad30)" in text


# ---------------------------------------------------------------- report.html

class _Refs(html.parser.HTMLParser):
    """Every src/href in a page."""

    def __init__(self):
        super().__init__()
        self.refs, self.imgs = [], []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href"):
                self.refs.append(v)
                if tag == "img":
                    self.imgs.append(v)


def _valid_png(data: bytes) -> bool:
    """PNG signature, then chunks whose CRCs match, IHDR first and IEND last."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    i, names = 8, []
    while i < len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        name, body, crc = data[i + 4:i + 8], data[i + 8:i + 8 + n], data[i + 8 + n:i + 12 + n]
        if len(crc) != 4 or zlib.crc32(name + body) != int.from_bytes(crc, "big"):
            return False
        names.append(name)
        i += 12 + n
    return names[0] == b"IHDR" and names[-1] == b"IEND"


def check_self_contained(page: Path) -> int:
    """No network reference anywhere; every image a data: URI holding a valid PNG. Returns #images."""
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), "a network reference"
    p = _Refs()
    p.feed(text)
    assert all(r.startswith("data:") for r in p.refs), [r[:40] for r in p.refs if not r.startswith("data:")]
    for src in p.imgs:
        head, _, b64 = src.partition(",")
        assert head == "data:image/png;base64" and _valid_png(base64.b64decode(b64, validate=True))
    return len(p.imgs)


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

# appended to a copy of the page: after load, record broken images, fetched resources and whether
# clicking a numeric column header sorts the table, where --dump-dom shows them
_PROBE_JS = """<script>window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images), sorted = null;
  var t = document.querySelector("table.sortable"), col = -1;
  if (t && t.tBodies[0].rows.length > 1) {
    var cells = t.tBodies[0].rows[0].cells;
    for (var i = 0; i < cells.length; i++) if (cells[i].dataset.v !== undefined) { col = i; break; }
    if (col >= 0) {
      t.tHead.rows[0].cells[col].click();
      var v = Array.prototype.map.call(t.tBodies[0].rows, function (r) { return parseFloat(r.cells[col].dataset.v); });
      sorted = v.every(function (x, i) { return i === 0 || isNaN(x) || isNaN(v[i - 1]) || v[i - 1] <= x; });
    }
  }
  document.body.setAttribute("data-wat-check", JSON.stringify({
    images: imgs.length,
    broken: imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length,
    resources: performance.getEntriesByType("resource").map(function (e) { return e.name; }),
    sorted: sorted}));
});</script>"""


def render(page: Path, tmp: Path) -> tuple[dict, Path]:
    """Render a copy of the page in headless Chromium: (in-page check results, screenshot path).
    Fails on any console message (errors included) the page produces."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (make test installs the Debian package `chromium` when it runs "
                    "as root with apt-get; elsewhere install it to run this test)")
    copy = tmp / f"render-{page.parent.name}.html"
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE_JS + "</body>"), encoding="utf-8")
    shot = tmp / f"{page.parent.name}.png"
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        f"--user-data-dir={tmp / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
                        "--virtual-time-budget=3000", "--window-size=1100,1400", f"--screenshot={shot}",
                        "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=120,
                       # Chromium keeps its crash-report settings in $XDG_CONFIG_HOME/chromium and a cache
                       # in $XDG_CACHE_HOME whatever --user-data-dir says: both under the test's folder
                       env=dict(os.environ, XDG_CONFIG_HOME=str(tmp / "xdg-config"),
                                XDG_CACHE_HOME=str(tmp / "xdg-cache")))
    assert r.returncode == 0, r.stderr[-2000:]
    console = [l for l in r.stderr.splitlines() if ":CONSOLE" in l]
    assert not console, console
    m = re.search(r'data-wat-check="([^"]*)"', r.stdout)
    assert m, "the page did not finish loading"
    return json.loads(html.unescape(m.group(1))), shot


def check_renders(page: Path, tmp: Path) -> None:
    n = check_self_contained(page)
    got, shot = render(page, tmp)
    assert got["images"] == n and got["broken"] == 0 and got["resources"] == [] and got["sorted"] is not False
    import matplotlib.image
    img = matplotlib.image.imread(shot)
    assert img.shape[0] >= 1000 and img[..., :3].std() > 0.05    # a page was drawn, not a blank screen


def test_probe_report_is_self_contained_and_renders(tmp_path):
    feats = write_synthetic_cache(tmp_path / "xyz_out", n_layers=4, informative=2)
    rep = P.probe([feats], None, P.ProbeOptions(jobs=1, folds=5))
    R.write_probe(rep, tmp_path / "probe", {"--features": [str(feats)], "--note": "<b>&"})
    page = tmp_path / "probe" / "report.html"
    text = page.read_text()
    assert "&lt;b&gt;&amp;" in text and "<b>&" not in text                    # run text is escaped
    assert "Headline" in text and "class 4" in text and "synthetic (trim)" in text
    check_renders(page, tmp_path)


def test_eval_report_is_self_contained_and_renders(tmp_path):
    from test_eval import fit_head
    from wat.eval.evaluate import EvalOptions, evaluate
    kw = dict(n_classes=4, centers_seed=2, scale=0.6)
    train = write_synthetic_cache(tmp_path / "tr", seed=2, **kw)
    test = write_synthetic_cache(tmp_path / "xyz_out", seed=3, n=80, ids=[f"t{i:03d}" for i in range(80)], **kw)
    r = evaluate(test, fit_head(train, tmp_path / "wa.pt", epochs=60), tmp_path / "ev", EvalOptions(device="cpu"))
    page = tmp_path / "ev" / "report.html"
    assert check_self_contained(page) == 2                                   # per_class.png, confusion.png
    text = page.read_text()
    assert f"{r['accuracy']:.4g}" in text and "wa-mlp" in text and "class 3" in text
    shown = R.plot_per_class([0.9, 0.95, None, 0.92], ["a", "b", "c", "d"], tmp_path / "pc.png", metric="AP",
                             overall=0.923, title=("t", figures.cache_label(open_cache(test).meta, 80)))
    assert "xyz_out" not in " ".join(shown["text"]) and "80 clips" in " ".join(shown["text"])
    check_renders(page, tmp_path)


# ---------------------------------------------------------------- wat-train: curves, report, TensorBoard

def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    # by step: a resumed run writes a second event file, and the reader orders files by name
    # (time to the second, then host and pid), not by when they were written
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag)) for tag in acc.Tags()["scalars"]}


def test_train_report_curves_and_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (make test installs it)")
    from wat.train.cli import main
    from wat.train.loop import Interrupted, TrainOptions, train
    feats = write_synthetic_cache(tmp_path / "xyz_out", n=100, n_classes=4, informative=1, scale=1.0)
    run, tb = tmp_path / "run", tmp_path / "tb"
    opts = dict(features=str(feats), out=str(run), head="wa-mlp", folds=5, epochs=4, lr=3e-3, batch_size=16,
                progress=False, tensorboard=str(tb))
    with pytest.raises(Interrupted):     # interrupted and resumed: every epoch still logged exactly once
        train(TrainOptions(**opts, max_epochs_this_run=2))
    final = train(TrainOptions(**opts, resume=True))
    hist = json.loads((run / "metrics.json").read_text())["epochs"]

    assert sorted(p.name for p in tb.iterdir()) == ["fold1", "fold2", "fold3", "fold4", "fold5", "mean"]
    fold1, mean = _scalars(tb / "fold1"), _scalars(tb / "mean")
    assert [s for s, _ in fold1["train/loss"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in fold1["train/loss"]], [h["folds"]["fold1"]["train_loss"] for h in hist],
                               rtol=1e-6)
    np.testing.assert_allclose([v for _, v in fold1["heldout/accuracy"]], [h["folds"]["fold1"]["score"] for h in hist],
                               rtol=1e-6)
    np.testing.assert_allclose([v for _, v in mean["heldout/accuracy"]], [h["score"] for h in hist], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in mean["train/lr"]], [h["lr"] for h in hist], rtol=1e-6)
    # the running weight average over epochs 3-4 (the second half): its last value is wa.pt's score
    assert [s for s, _ in mean["heldout/accuracy_weight_avg"]] == [3, 4]
    assert mean["heldout/accuracy_weight_avg"][-1][1] == pytest.approx(final["wa"], rel=1e-6)

    page = run / "report.html"
    assert check_self_contained(page) == 1
    text = page.read_text()
    assert "5-fold cross-validation" in text and "fold5" in text and "class 3" in text and "Per epoch" in text
    assert f"{final['best']:.4g}" in text
    check_renders(page, tmp_path)

    # the curves are labelled from the cache's metadata, scaled to the data
    from wat.train.outputs import plot_curves
    shown = plot_curves(tmp_path, hist, True, "accuracy", title=("t", figures.cache_label(open_cache(feats).meta, 100)),
                        chance=0.25, wa=final["wa"], wa_epochs=(3, 4), best_epoch=final["best_epoch"])
    assert "xyz_out" not in " ".join(shown["text"]) and "100 clips" in " ".join(shown["text"])

    # bad --tensorboard: one error line, exit 2, before any training
    (tmp_path / "file").write_text("x")
    argv = ["--features", str(feats), "--folds", "5", "--head", "wa-mlp", "--epochs", "1", "--out", str(tmp_path / "r2")]
    for bad in (str(tmp_path / "file"), str(tmp_path / "file" / "sub")):
        assert main(argv + ["--tensorboard", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("wat-train: error: --tensorboard")
    with pytest.raises(SystemExit) as e:   # an empty one at parse time (usage, then the error line)
        main(argv + ["--tensorboard", ""])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == \
        "wat-train: error: argument --tensorboard: an empty folder"
    assert not (tmp_path / "r2").exists()

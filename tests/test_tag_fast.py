"""wat.tag at speed: batched transcript + tags, tags only (Whisper and other encoder families), the
faster-whisper backend; each checked against the one-by-one openai-whisper path it must equal."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import whisper
from whisper.audio import pad_or_trim
from whisper.tokenizer import get_tokenizer

from wat.data.heads import HeadInfo, build_head, save_head
from wat.data.labels import Vocabulary
from wat.extract import EncoderPasses
from wat.extract.decode import decode_features, encode_pad30
from wat.extract.layers import pad30_input
from wat.robust.wer import corpus
from wat.tag.batch import _BatchDecode, _windows, tag_only, tag_only_encoder, transcribe_batch
from wat.tag.cli import main
from wat.tag.tagging import Tagger, TagError, transcribe_and_tag

from test_tag import assert_one_error_line

SR = 16000
UTTERANCES = sorted((Path(__file__).parent / "fixtures" / "librispeech" / "100" / "10").glob("*.flac"))


def _noise(seconds, seed=0, level=0.05):
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * level).astype(np.float32)


def _head(model, classes=("tone", "noise", "speech")):
    d = model.dims
    torch.manual_seed(0)
    head = build_head("wa-mlp", d.n_audio_layer, d.n_audio_state, len(classes)).eval()
    return head, HeadInfo("wa-mlp", d.n_audio_layer, d.n_audio_state, len(classes),
                          vocab_json=Vocabulary.from_names(classes).to_json(), model="tiny.en")


def _same_tags(a, b, atol=1e-5):
    """Same windows, same tag names in the same order, probabilities equal to float rounding."""
    assert [(w["start"], w["end"]) for w in a] == [(w["start"], w["end"]) for w in b]
    for x, y in zip(a, b):
        assert [n for n, _ in x["tags"]] == [n for n, _ in y["tags"]]
        np.testing.assert_allclose([p for _, p in x["tags"]], [p for _, p in y["tags"]], atol=atol)


@pytest.fixture(scope="module")
def clips(speech_audio):
    return [sf.read(p, dtype="float32")[0] for p in UTTERANCES[:3]] + [speech_audio, _noise(7.3)]


def test_batch_equals_each_file_transcribed_alone(tiny_model, clips):
    """One encoder pass and one decode for the batch's first windows; every result (text, timed
    segments, tags) is transcribe's for the file alone, fall-back rules and later windows included."""
    tagger = Tagger(tiny_model, _head(tiny_model), time_res=2.0, keep_scores=None)
    opts = dict(temperature=(0.0, 0.2, 0.4), beam_size=None, best_of=5, fp16=False, language=None)
    with EncoderPasses(tiny_model) as passes:
        batch = transcribe_batch(tiny_model, tagger, clips, **opts)
    assert "decode" not in vars(tiny_model)
    later = 0  # encoder passes transcribe makes for a file's windows after its first, alone
    for got, clip in zip(batch, clips):
        with EncoderPasses(tiny_model) as alone_passes:
            alone = transcribe_and_tag(tiny_model, tagger, clip, **opts)
        later += alone_passes.n - 1
        _same_tags(got.pop("audio_tags"), alone.pop("audio_tags"))
        assert got.pop("audio_classes") == alone.pop("audio_classes")
        assert got["text"] == alone["text"] and got["language"] == alone["language"] == "en"
        assert len(got["segments"]) == len(alone["segments"])
        for s, t in zip(got["segments"], alone["segments"]):
            assert s["tokens"] == t["tokens"] and (s["start"], s["end"], s["seek"]) == (t["start"], t["end"], t["seek"])
            assert s["avg_logprob"] == pytest.approx(t["avg_logprob"], abs=1e-4)
    assert passes.n == 1 + later
    begin = get_tokenizer(False).timestamp_begin  # timed segments, as transcribe makes them alone
    assert all(r["segments"][0]["tokens"][0] >= begin for r in batch if r["segments"])
    assert "singing" in batch[3]["text"]


def test_batch_decodes_a_later_window_alone(tiny_model, clips):
    """A window other than the file's pad30 one (transcribe seeking on) is decoded as whisper
    decodes it, with an encoder pass of its own."""
    mel, features = encode_pad30(tiny_model, [torch.as_tensor(c) for c in clips[:2]])
    server = _BatchDecode(tiny_model, mel, features)
    options = whisper.DecodingOptions(temperature=0.0, language="en", fp16=False)
    later = pad_or_trim(mel[1][:, 200:], 3000)
    with EncoderPasses(tiny_model) as passes:
        got = server.decode(1, later, options)
    assert passes.n == 1 and got.tokens == whisper.decode(tiny_model, later, options).tokens
    fallback = whisper.DecodingOptions(temperature=0.0, beam_size=2, language="en", fp16=False)
    with EncoderPasses(tiny_model) as passes:  # transcribe's fall-back re-sends the same window
        got = server.decode(1, later, fallback)
    assert passes.n == 0 and got.tokens == whisper.decode(tiny_model, later, fallback).tokens
    with EncoderPasses(tiny_model) as passes:
        first = server.decode(1, mel[1], options)
    assert passes.n == 0 and first.tokens == whisper.decode(tiny_model, mel[1], options).tokens


def test_batch_without_timestamps(tiny_model, clips):
    """without_timestamps=True passes through: one segment per file, as transcribe alone gives."""
    tagger = Tagger(tiny_model, _head(tiny_model))
    opts = dict(temperature=0.0, beam_size=None, fp16=False, without_timestamps=True)
    with EncoderPasses(tiny_model) as passes:
        batch = transcribe_batch(tiny_model, tagger, clips[:3], **opts)
    assert passes.n == 1
    for got, clip in zip(batch, clips):
        alone = transcribe_and_tag(tiny_model, tagger, clip, **opts)
        assert got["text"] == alone["text"] and len(got["segments"]) == 1


def test_beam_search_decodes_a_batch_in_one_task(tiny_model, clips, monkeypatch):
    """Beam search over several audios in one DecodingTask (whisper alone cannot): each audio's
    tokens, log-probability and no-speech probability are those of decoding it alone."""
    _, features = encode_pad30(tiny_model, [torch.as_tensor(c) for c in clips[:3]])
    options = whisper.DecodingOptions(temperature=0.0, beam_size=3, language="en", fp16=False)
    alone = [whisper.decode(tiny_model, f, options) for f in features]
    runs = []
    run = whisper.decoding.DecodingTask.run
    monkeypatch.setattr(whisper.decoding.DecodingTask, "run", lambda task, mel: runs.append(len(mel)) or run(task, mel))
    got = decode_features(tiny_model, features, options)
    assert runs == [3]
    for a, b in zip(alone, got):
        assert a.tokens == b.tokens and a.text == b.text
        assert a.avg_logprob == pytest.approx(b.avg_logprob, abs=1e-4)
        assert a.no_speech_prob == pytest.approx(b.no_speech_prob, abs=1e-4)


def test_batch_with_beam_search_shares_the_encoder_pass(tiny_model, clips):
    tagger = Tagger(tiny_model, _head(tiny_model))
    with EncoderPasses(tiny_model) as passes:
        batch = transcribe_batch(tiny_model, tagger, clips[:2], temperature=0.0, beam_size=3, fp16=False)
    assert passes.n == 1
    for got, clip in zip(batch, clips):
        alone = transcribe_and_tag(tiny_model, tagger, clip, temperature=0.0, beam_size=3, fp16=False)
        assert got["text"] == alone["text"]


def test_tags_only_are_the_tags_of_transcription(tiny_model, clips):
    """Up to 30 s: the same window as transcription, so the same tags; windows batched across files."""
    tagger = Tagger(tiny_model, _head(tiny_model), time_res=1.5, keep_scores=3)
    with EncoderPasses(tiny_model) as passes:
        only = list(tag_only(tiny_model, tagger, clips, batch_size=2))
    assert passes.n == 3 and len(only) == len(clips)
    for got, clip in zip(only, clips):
        full = transcribe_and_tag(tiny_model, tagger, clip, temperature=0.0, fp16=False)
        _same_tags(got["audio_tags"], full["audio_tags"])
        assert set(got) == {"audio_tags", "audio_classes"}
    # the first window of any file is THE pad30 input
    long = _noise(47.0, seed=3)
    windows = list(_windows(tiny_model, long))
    assert [(s, n) for s, n, _ in windows] == [(0, 3000), (3000, 1700)]
    assert torch.equal(windows[0][2], pad30_input([torch.as_tensor(long)])[0][0])
    short = list(_windows(tiny_model, clips[0]))
    assert len(short) == 1 and torch.equal(short[0][2], pad30_input([torch.as_tensor(clips[0])])[0][0])
    tags, = tag_only(tiny_model, tagger, [long], batch_size=8)
    assert len(tags["audio_tags"]) == 32 and all(w["tags"] for w in tags["audio_tags"])


def test_tags_only_with_another_encoder_family(toy_encoder, tmp_path):
    """Each tag window is a clip of its own, pooled as the family pools cache clips."""
    enc = toy_encoder("toy-b")
    torch.manual_seed(0)
    head = build_head("wa-mlp", 2, 3, 2).eval()
    info = HeadInfo("wa-mlp", 2, 3, 2, n_frames=8, vocab_json=Vocabulary.from_names(("hi", "lo")).to_json(),
                    model="toy-b", fingerprint="f" * 64, policy="trim", encoder="toy")
    tagger = Tagger(None, (head, info), time_res=1.0, keep_scores=None)
    audios = [_noise(2.5, seed=1), _noise(0.005, seed=2), _noise(1.0, seed=3)]
    got = list(tag_only_encoder(enc, tagger, audios, batch_size=2))
    assert [len(r["audio_tags"]) for r in got] == [3, 1, 1]
    assert got[1]["audio_tags"][0]["tags"] == []  # 80 samples: shorter than the encoder's 160
    with torch.inference_mode():
        x = enc.pooled([audios[0][16000:32000]], frames=8, policy="trim")
        p = torch.sigmoid(head(x))[0]
    assert got[0]["audio_tags"][1]["scores"] == pytest.approx(dict(zip(("hi", "lo"), p.tolist())), abs=1e-6)

    path = tmp_path / "toy.pt"
    save_head(path, head, info)
    wav = tmp_path / "a.wav"
    sf.write(wav, audios[0], SR)
    assert main([str(wav), "--model", "toy-b", "--head", str(path), "--task", "tag", "-o", str(tmp_path / "out"),
                 "--progress", "none"]) == 0
    out = json.loads((tmp_path / "out" / "a.json").read_text())
    assert set(out) == {"audio_tags", "audio_classes"} and len(out["audio_tags"]) == 1
    assert (tmp_path / "out" / "a.tags.tsv").is_file() and not (tmp_path / "out" / "a.txt").exists()


def test_cli_batched_and_tags_only(tiny_model, tmp_path, capsys):
    head, info = _head(tiny_model)
    save_head(tmp_path / "h.pt", head, info)
    folder = tmp_path / "in"
    folder.mkdir()
    for p in UTTERANCES[:3]:
        sf.write(folder / (p.stem + ".wav"), sf.read(p, dtype="float32")[0], SR)
    (folder / "bad.wav").write_bytes(b"not audio")
    long = np.concatenate([sf.read(p, dtype="float32")[0] for p in UTTERANCES])  # > 30 s: the window loop
    assert len(long) > 30 * SR
    sf.write(folder / "long.wav", long, SR)
    names = sorted(p.stem for p in folder.iterdir() if p.stem != "bad")
    common = [str(folder), "--model", "tiny.en", "--head", str(tmp_path / "h.pt"), "--progress", "none"]
    assert main(common + ["--batch-size", "2", "--beam_size", "1"]) == 1
    cap = capsys.readouterr()
    rows = [json.loads(line) for line in cap.out.splitlines()]
    assert [Path(r["file"]).stem for r in rows] == names
    assert "bad.wav" in cap.err and "1 of 5 files failed" in cap.err
    one = [transcribe_and_tag(tiny_model, tmp_path / "h.pt", folder / f"{n}.wav", beam_size=1) for n in names]
    assert [r["text"] for r in rows] == [r["text"] for r in one]
    assert [[(s["start"], s["end"], s["tokens"]) for s in r["segments"]] for r in rows] == [
        [(s["start"], s["end"], s["tokens"]) for s in r["segments"]] for r in one]
    assert main(common + ["--task", "tag", "-f", "all", "-o", str(tmp_path / "tags")]) == 1
    assert sorted(p.name for p in (tmp_path / "tags").iterdir()) == sorted(
        f"{n}{s}" for n in names for s in (".json", ".tags.tsv"))


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-3"], "--batch-size"),
    (["--batch-size", "nan"], "--batch-size"), (["--batch-size", "1e9"], "--batch-size"),
    (["--batch-size", "99999999"], "--batch-size"), (["--batch-size", "1e12"], "--batch-size"),
    (["--batch-size", ""], "--batch-size"), (["--compute_type", "bogus"], "--compute_type"),
    (["--vad_filter", "-1"], "--vad_filter"),
    (["--backend", "ctranslate"], "--backend"), (["--compute_type", "int3"], "--compute_type"),
    (["--vad_filter", "nan"], "--vad_filter"), (["--vad_filter", "True"], "needs --backend faster-whisper"),
    (["--compute_type", "int8"], "needs --backend faster-whisper"), (["--task", "tags"], "--task"),
    (["--task", "tag", "-f", "srt"], "--task tag writes tags only"),
    (["--task", "tag", "--backend", "faster-whisper"], "--task tag runs no decoder"),
])
def test_cli_bad_options_are_one_error_line(args, message, capsys):
    assert_one_error_line(args, message, capsys)


def test_cli_faster_whisper_not_installed(monkeypatch, capsys):
    """Without the extra: one error line naming it, before any model loads."""
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # import faster_whisper -> ImportError
    with pytest.raises(SystemExit) as e:
        main(["x.wav", "--model", "no-such-model", "--head", "h.pt", "--backend", "faster-whisper"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines()[-1].startswith("wat-tag: error: --backend faster-whisper needs")
    assert "[faster]" in err and "Traceback" not in err


# ---------------------------------------------------------------- faster-whisper backend

@pytest.fixture(scope="module")
def faster_tiny(tiny_model):
    pytest.importorskip("faster_whisper")
    from wat.tag.faster import load_faster
    return load_faster("tiny.en", tiny_model)


def test_faster_whisper_tags_equal_and_transcripts_close(tiny_model, faster_tiny, speech_audio, clips):
    """Tags from the same encoder: equal to the openai-whisper backend's; transcripts: WER between the
    backends on the committed utterances within the usual precision differences."""
    from wat.tag.faster import transcribe_and_tag_faster

    tagger = Tagger(tiny_model, _head(tiny_model), time_res=2.0)
    audio = _noise(35.0, level=0.002)
    audio[16000:16000 + len(speech_audio)] += speech_audio
    audio[27 * SR:27 * SR + len(speech_audio)] += speech_audio
    opts = dict(temperature=0.0, beam_size=5, language="en")
    with EncoderPasses(tiny_model) as passes:
        fast = transcribe_and_tag_faster(faster_tiny, tiny_model, tagger, audio, **opts)
    slow = transcribe_and_tag(tiny_model, tagger, audio, fp16=False, **opts)
    assert [s["seek"] for s in fast["segments"]] == [s["seek"] for s in slow["segments"]]
    assert passes.n == len({s["seek"] for s in slow["segments"]})  # one pass per window, the decoder's too
    assert fast["audio_tags"] == slow["audio_tags"]  # exactly: the same encoder on the same windows
    refs, hyps = [], []
    for clip in clips[:4]:
        refs.append(transcribe_and_tag(tiny_model, tagger, clip, fp16=False, **opts)["text"])
        hyps.append(transcribe_and_tag_faster(faster_tiny, tiny_model, tagger, clip, **opts)["text"])
    assert corpus(zip(refs, hyps)).wer <= 0.05, (refs, hyps)


def test_faster_whisper_vad_and_word_timestamps(tiny_model, faster_tiny, speech_audio):
    from wat.tag.faster import transcribe_and_tag_faster

    tagger = Tagger(tiny_model, _head(tiny_model), time_res=2.0)
    audio = np.concatenate([_noise(4.0, level=0.001), speech_audio, _noise(3.0, level=0.001)])
    out = transcribe_and_tag_faster(faster_tiny, tiny_model, tagger, audio, vad_filter=True,
                                    word_timestamps=True, temperature=0.0, language="en")
    words = [w for s in out["segments"] for w in s["words"]]
    assert "singing" in out["text"] and 3.5 < words[0]["start"] < 5.0  # times of the file, not of the speech
    only, = tag_only(tiny_model, tagger, [audio])
    assert out["audio_tags"] == only["audio_tags"]
    # without VAD the alignment reads the encoder output wat served: words, and the tags of the one pass
    with EncoderPasses(tiny_model) as passes:
        out = transcribe_and_tag_faster(faster_tiny, tiny_model, tagger, audio, word_timestamps=True,
                                        temperature=0.0, language="en")
    words = [w for s in out["segments"] for w in s["words"]]
    assert passes.n == 1 and "singing" in out["text"] and 3.5 < words[0]["start"] < 5.0
    assert out["audio_tags"] == transcribe_and_tag(tiny_model, tagger, audio, temperature=0.0, fp16=False)["audio_tags"]


def test_faster_whisper_cli(tiny_model, faster_tiny, speech_wav, tmp_path, capsys):
    head, info = _head(tiny_model)
    save_head(tmp_path / "h.pt", head, info)
    assert main([str(speech_wav), "--model", "tiny.en", "--head", str(tmp_path / "h.pt"), "--backend",
                 "faster-whisper", "-f", "all", "-o", str(tmp_path / "out"), "--progress", "none"]) == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"speech_en{s}" for s in (".json", ".srt", ".tags.tsv", ".tsv", ".txt", ".vtt")]
    assert "singing" in (tmp_path / "out" / "speech_en.srt").read_text()
    assert main([str(speech_wav), "--model", str(tmp_path), "--head", str(tmp_path / "h.pt"), "--backend",
                 "faster-whisper"]) == 2
    assert "wat-tag: error:" in capsys.readouterr().err

"""wat.tag: transcript unchanged, tags from the same encoder passes, windows on the absolute grid."""
import json
import os

import numpy as np
import pytest
import torch
import whisper

from wat.data.labels import Vocabulary, audioset_vocabulary
from wat.extract import EncoderPasses
from wat.tag import TagError, WindowPool, check_head, resolve_classes, select_tags, transcribe_and_tag
from wat.tag.cli import main
from wat.tag.tagging import SharedEncoder
from wat.data.heads import HeadInfo, build_head, save_head

SR = 16000


def _noise(seconds, seed=0, level=0.05):
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * level).astype(np.float32)


def _tone(seconds, freq=440.0, level=0.5):
    return (level * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def _speech_over_noise(speech, seconds, starts):
    audio = _noise(seconds, level=0.01)
    for s in starts:
        i = int(s * SR)
        audio[i:i + len(speech)] += speech[: len(audio) - i]
    return audio


def _random_head(model, classes=("tone", "noise", "speech"), **info):
    d = model.dims
    torch.manual_seed(0)
    head = build_head("wa-mlp", d.n_audio_layer, d.n_audio_state, len(classes)).eval()
    vocab = Vocabulary.from_names(classes)
    return head, HeadInfo("wa-mlp", d.n_audio_layer, d.n_audio_state, len(classes),
                          vocab_json=vocab.to_json(), model="tiny.en", **info)


# ---------------------------------------------------------------- filtering and classes

def test_filtering_order_classes_then_threshold_then_top_k():
    names = ["a", "b", "c", "d", "e"]
    probs = np.array([0.9, 0.8, 0.7, 0.3, 0.6])
    assert select_tags(probs, names, top_k=2) == [("a", 0.9), ("b", 0.8)]
    # restriction first: "a" (the overall best) is not a candidate for the single slot
    assert select_tags(probs, names, top_k=1, classes=[1, 3, 4]) == [("b", 0.8)]
    # threshold before top-k: two slots but only one restricted class reaches 0.5
    assert select_tags(probs, names, top_k=2, threshold=0.5, classes=[3, 4]) == [("e", 0.6)]
    assert select_tags(probs, names, top_k=None, threshold=0.65) == [("a", 0.9), ("b", 0.8), ("c", 0.7)]
    assert select_tags(probs, names, top_k=3, threshold=0.95) == []


def test_resolve_classes_names_keys_and_commas_inside_names():
    vocab = audioset_vocabulary()
    got = resolve_classes(vocab, "Male speech, man speaking,music,/m/01j3sz")
    assert got == sorted([vocab.names.index("Male speech, man speaking"), vocab.names.index("Music"),
                          vocab.keys.index("/m/01j3sz")])
    assert resolve_classes(vocab, ["Laughter", "Music"]) == sorted(
        [vocab.names.index("Laughter"), vocab.names.index("Music")])
    with pytest.raises(TagError, match="Laughtr.*did you mean laughter"):
        resolve_classes(vocab, "Laughtr")


# ---------------------------------------------------------------- absolute time grid

def _call_feats(seek, size, call_id):
    # per frame: [absolute start in seconds, call id], as a fake [n, L=1, D=2] block output
    n = -(-size // 2)
    starts = (seek + 2 * torch.arange(n)).float() / 100
    return torch.stack([starts, torch.full((n,), float(call_id))], 1)[:, None, :]


@pytest.mark.parametrize("res,n_windows", [(10, 5), (4, 12)])
def test_grid_windows_cover_45s_with_overlapping_calls(res, n_windows):
    pool = WindowPool(4500, 45.0, res, 25)
    assert pool.n_windows == n_windows
    bounds = [pool.bounds(k) for k in range(n_windows)]
    assert bounds == [(float(k * res), float(min((k + 1) * res, 45))) for k in range(n_windows)]
    # whisper-like seeks: 0, then a timestamp inside a window (26.01 s, odd frame), then the rest
    out = pool.add_call(0, 3000, _call_feats(0, 3000, 1))
    assert out == []
    out += pool.add_call(2601, 1899, _call_feats(2601, 1899, 2))
    assert [k for k, _ in out] == [k for k in range(n_windows) if (k + 1) * res <= 26.01]
    out += pool.close()
    assert [k for k, _ in out] == list(range(n_windows))
    for k, x in out:
        assert x.shape == (1, 25, 2)
        start, end = bounds[k]
        part = (end - start) / 25
        times, calls = x[0, :, 0].numpy(), x[0, :, 1].numpy()
        # frames kept: the first call's up to where the second starts, then all of the second's
        starts = np.concatenate([np.arange(0, 2601, 2), np.arange(2601, 4500, 2)]) / 100
        for t in range(25):
            lo, hi = start + t * part, start + (t + 1) * part
            inside = starts[(starts >= lo - 1e-9) & (starts < hi - 1e-9)]
            assert times[t] == pytest.approx(inside.mean(), abs=1e-4)
            # the overlap [26.01, 30) comes from the later call only
            assert calls[t] == pytest.approx(np.mean(np.where(inside >= 26.01 - 1e-9, 2.0, 1.0)))
        assert x[0, :, 0].min() >= start - 1e-6 and x[0, :, 0].max() < end


def test_grid_short_window_pools_like_extraction_and_partial_windows_stretch():
    pool = WindowPool(20, 0.2, 0.2, 25)  # 10 encoder frames for 25 parts
    (k, x), = pool.add_call(0, 20, _call_feats(0, 20, 1)) + pool.close()
    times = x[0, :, 0].numpy()
    # fewer frames than parts: the parts extraction makes of a 0.2 s clip (adaptive_avg_pool1d's
    # windows; a part between two frames is their mean), no longer a nearest-frame stretch
    expect = torch.nn.functional.adaptive_avg_pool1d(torch.arange(10.0)[None, None] * 0.02, 25)[0, 0]
    np.testing.assert_allclose(times, expect.numpy(), atol=1e-6)
    assert (np.diff(times) >= 0).all() and times[0] == 0 and times[-1] == pytest.approx(0.18)
    # a window only partly covered (clip_timestamps): its 1 s of frames fill all 25 parts in order
    pool = WindowPool(500, 5.0, 5.0, 25)
    (k, x), = pool.add_call(0, 100, _call_feats(0, 100, 1)) + pool.close()
    times = x[0, :, 0].numpy()
    assert (np.diff(times) >= 0).all()
    assert times[0] == pytest.approx(0.09) and times[-1] == pytest.approx(0.89)  # means of 10 frames
    assert len(set(times.round(4).tolist())) == 5  # the five 0.2 s parts that have frames, each used


def test_grid_rejects_tiny_resolution():
    with pytest.raises(ValueError, match="at least"):
        WindowPool(4500, 45.0, 0.01)


# ---------------------------------------------------------------- one pass, same transcript

def _block_outputs(model, mel_segment):
    # every block's output for one whisper segment [n_mels, 3000]: [1500, L, D]
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o[0])) for b in model.encoder.blocks]
    with torch.no_grad():
        model.encoder(mel_segment[None])
    for h in hooks:
        h.remove()
    return torch.stack(outs, 1)


def test_transcript_identical_and_tags_from_the_same_passes(tiny_model, speech_audio):
    audio = _speech_over_noise(speech_audio, 32.0, [1, 25.5])
    head = _random_head(tiny_model)
    seen = []
    hook = head[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    opts = dict(fp16=False, temperature=0.0, language="en")
    with EncoderPasses(tiny_model) as plain_passes:
        plain = tiny_model.transcribe(audio, **opts)
    with EncoderPasses(tiny_model) as tag_passes:
        tagged = transcribe_and_tag(tiny_model, head, audio, time_res=4.0, **opts)
    hook.remove()
    windows = tagged.pop("audio_tags")
    assert tagged == plain
    assert plain["text"].lower().count("singing") == 2
    seeks = sorted({s["seek"] for s in plain["segments"]})
    assert len(seeks) == 2 and seeks[1] % 400 != 0  # the second 30 s window starts inside a tag window
    assert tag_passes.n == plain_passes.n == 2
    assert tiny_model.encoder.__class__.__name__ == "AudioEncoder"  # restored
    assert len(windows) == 8 and windows[-1]["end"] == 32.0

    # the head saw, per 4 s window, 25 means of 8 encoder frames on the absolute grid, each frame
    # taken from the latest 30 s window that holds it, never from padding
    mel = whisper.log_mel_spectrogram(audio, 80, padding=whisper.audio.N_SAMPLES)
    content = len(audio) // 160
    frames = {}
    for seek in seeks:
        size = min(3000, content - seek)
        outs = _block_outputs(tiny_model, whisper.pad_or_trim(mel[:, seek:seek + size], 3000))
        for j in range(-(-size // 2)):
            frames[seek + 2 * j] = outs[j]  # later windows overwrite the overlap
    got = torch.cat(seen)
    assert got.shape == (8, 4, 25, 384)
    for k in range(8):
        for t in range(25):
            lo = 400 * k + 16 * t
            expect = torch.stack([frames[a] for a in sorted(frames) if lo <= a < lo + 16]).mean(0)
            torch.testing.assert_close(got[k, :, t], expect, atol=1e-5, rtol=1e-5)


def test_encoder_calls_outside_transcribe_are_placed_by_searching_the_mel(tiny_model, speech_audio):
    audio = np.concatenate([_noise(3.0, seed=7), speech_audio, _noise(3.0, seed=8)])
    mel = whisper.log_mel_spectrogram(audio, 80, padding=whisper.audio.N_SAMPLES)
    calls = []
    with SharedEncoder(tiny_model.encoder, audio, lambda *call: calls.append(call)) as shared:
        with torch.no_grad():
            shared(whisper.pad_or_trim(mel[:, 123:123 + 777], 3000)[None])
            with pytest.raises(TagError, match="could not place"):
                shared(whisper.pad_or_trim(mel[:, 123:123 + 777] + 0.5, 3000)[None])
    (seek, size, feats), = calls
    assert (seek, size) == (123, 777)
    assert feats.shape == (389, 4, 384)


def _same_transcript(a, b):
    # tokens, text and timings exactly; float scores to 1e-5 (CPU kernels may differ in the last
    # bits between two runs of the same model in one process)
    assert a["text"] == b["text"] and a["language"] == b["language"]
    assert len(a["segments"]) == len(b["segments"])
    for x, y in zip(a["segments"], b["segments"]):
        assert x.keys() == y.keys()
        for key in x:
            if key in ("avg_logprob", "compression_ratio", "no_speech_prob"):
                assert x[key] == pytest.approx(y[key], rel=1e-5)
            else:
                assert x[key] == y[key], key


def test_fallbacks_reuse_the_encoder_pass(tiny_model, speech_audio):
    head = _random_head(tiny_model)
    # logprob_threshold=0 makes every decode "fail", so all temperatures run
    opts = dict(fp16=False, temperature=(0.0, 0.5, 1.0), logprob_threshold=0.0)
    torch.manual_seed(1)
    with EncoderPasses(tiny_model) as plain_passes:
        plain = tiny_model.transcribe(speech_audio, **opts)
    torch.manual_seed(1)
    with EncoderPasses(tiny_model) as tag_passes:
        tagged = transcribe_and_tag(tiny_model, head, speech_audio, **opts)
    tags = tagged.pop("audio_tags")
    _same_transcript(tagged, plain)
    assert plain["segments"][0]["temperature"] == 1.0
    assert plain_passes.n == 3  # one per temperature
    assert tag_passes.n == 1
    assert len(tags) == 1 and tags[0]["end"] == pytest.approx(len(speech_audio) / SR)
    assert len(tags[0]["tags"]) == 3


def test_45s_gives_windows_on_the_absolute_grid(tiny_model):
    # (res 10 -> 5 windows is checked on WindowPool above; one transcription keeps this test short)
    out = transcribe_and_tag(tiny_model, _random_head(tiny_model), _noise(45.0, seed=3), time_res=4.0,
                             top_k=2, fp16=False, temperature=0.0)
    windows = out["audio_tags"]
    assert [(w["start"], w["end"]) for w in windows] == [(k * 4.0, min(k * 4.0 + 4.0, 45.0)) for k in range(12)]
    assert windows[-1]["end"] == 45.0
    # every window got frames (none is left without tags), probabilities are probabilities
    assert all(len(w["tags"]) == 2 and 0 < w["tags"][1][1] <= w["tags"][0][1] < 1 for w in windows)


def test_tone_is_tagged_in_the_right_windows(tiny_model, demo_head_pad30):
    # white noise, then a loud steady tone from 15 s. The demo head saw only 2 noisy clips per class
    # (the demo is hard on purpose), so this checks where "tone" rises, not that every window is right.
    audio = np.concatenate([_noise(15.0, seed=5, level=0.1), _tone(15.0, freq=1500.0, level=0.4)])
    out = transcribe_and_tag(tiny_model, demo_head_pad30, audio, time_res=5.0, top_k=None,
                             fp16=False, temperature=0.0)["audio_tags"]
    tone = [dict(w["tags"])["tone"] for w in out]
    top = [max(w["tags"], key=lambda t: t[1])[0] for w in out]
    assert len(out) == 6 and min(tone[3:]) > 2 * max(tone[:3]), out
    assert "tone" not in top[:3] and top[3:].count("tone") >= 2, out
    # classes, then threshold: a threshold between the two groups keeps exactly the tone windows
    cut = (min(tone[3:]) + max(tone[:3])) / 2
    only_tone = transcribe_and_tag(tiny_model, demo_head_pad30, audio, time_res=5.0, classes="tone",
                                   threshold=cut, fp16=False, temperature=0.0)["audio_tags"]
    assert [[name for name, _ in w["tags"]] for w in only_tone] == [[]] * 3 + [["tone"]] * 3, only_tone


# ---------------------------------------------------------------- heads that do not fit

def test_mismatched_heads_are_refused(tiny_model):
    _, info = _random_head(tiny_model)
    check_head(tiny_model, info)
    wrong_layers = HeadInfo("wa-mlp", 6, 384, 3, model="base")
    with pytest.raises(TagError, match="6 encoder layers of width 384.*4 layers of width 384"):
        check_head(tiny_model, wrong_layers)
    wrong_width = HeadInfo("wa-mlp", 4, 512, 3)
    with pytest.raises(TagError, match="width 512"):
        check_head(tiny_model, wrong_width)
    trim = HeadInfo("wa-mlp", 4, 384, 3, policy="trim")
    with pytest.raises(TagError, match="'trim' features.*allow-policy-mismatch"):
        check_head(tiny_model, trim)
    check_head(tiny_model, trim, allow_policy_mismatch=True)
    with pytest.raises(TagError, match="trim"):
        transcribe_and_tag(tiny_model, (_random_head(tiny_model)[0], trim), _noise(1.0))
    # a head trained on a pad30 cache from before schema 4 (sample padding; its info has no field)
    old = HeadInfo.from_dict({k: v for k, v in info.to_dict().items() if k != "pad30_padding"})
    with pytest.raises(TagError, match="samples padding.*re-extract.*allow-policy-mismatch"):
        check_head(tiny_model, old)
    check_head(tiny_model, old, allow_policy_mismatch=True)


def test_official_whisper_at_heads(tiny_model, speech_audio, tmp_path):
    # official checkpoints keep the TL-Tr head as `at_model.*` with 527 AudioSet outputs
    torch.manual_seed(0)
    tiny_head = build_head("tl-tr", 4, 384, 527)
    torch.save({f"at_model.{k}": v for k, v in tiny_head.state_dict().items()}, tmp_path / "tiny.pth")
    out = transcribe_and_tag(tiny_model, tmp_path / "tiny.pth", speech_audio, top_k=3, fp16=False,
                             temperature=0.0, classes="Speech,Music,Male speech, man speaking")
    names = {"Speech", "Music", "Male speech, man speaking"}
    assert len(out["audio_tags"]) == 1 and {n for n, _ in out["audio_tags"][0]["tags"]} == names
    base_head = build_head("tl-tr", 6, 512, 527, proj_dim=512)
    torch.save({f"at_model.{k}": v for k, v in base_head.state_dict().items()}, tmp_path / "base.pth")
    with pytest.raises(TagError, match="6 encoder layers of width 512 .trained on whisper-at:base."):
        transcribe_and_tag(tiny_model, tmp_path / "base.pth", speech_audio)


# ---------------------------------------------------------------- CLI

def test_cli_skips_undecodable_file_and_outputs_the_others(tiny_model, speech_wav, tmp_path, capsys):
    head, info = _random_head(tiny_model)
    head_path = tmp_path / "head.pt"
    save_head(head_path, head, info)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    code = main([str(speech_wav), str(bad), "--model", "tiny.en", "--head", str(head_path),
                 "--time-res", "2", "--top-k", "2", "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "broken.wav" in err and "Traceback" not in err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["file"] == str(speech_wav)
    assert "weather" in doc["text"].lower()
    assert [(w["start"], w["end"]) for w in doc["audio_tags"]] == [(0.0, 2.0), (2.0, 4.0), (4.0, 77829 / SR)]
    assert all(len(w["tags"]) == 2 for w in doc["audio_tags"])

    # srt on stdout: the transcript as whisper's own writer prints it (tags go to json/txt/tags.tsv)
    code = main([str(speech_wav), "--model", "tiny.en", "--head", str(head_path), "--format", "srt",
                 "--classes", "speech", "--top-k", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    cues = out.strip().split("\n\n")
    assert cues[0].splitlines()[0] == "1" and "-->" in cues[0].splitlines()[1]
    assert any("weather" in c.lower() for c in cues)


def test_cli_output_format_all_writes_whispers_files_plus_tags(tiny_model, speech_wav, tmp_path, capsys):
    """Two inputs of the same stem in different folders: distinct outputs, nothing overwritten."""
    head, info = _random_head(tiny_model)
    save_head(tmp_path / "head.pt", head, info)
    a, b = tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(speech_wav.read_bytes())
    out_dir = tmp_path / "out"
    code = main([str(a), str(b), "--model", "tiny.en", "--head", str(tmp_path / "head.pt"), "--time-res", "2",
                 "--top-k", "2", "--output_format", "all", "--output_dir", str(out_dir), "--beam_size", "1"])
    assert code == 0, capsys.readouterr().err
    for stem in ("a/x", "b/x"):  # the inputs' sub-folders below their common parent, mirrored
        for ext in ("txt", "vtt", "srt", "tsv", "json", "tags.tsv"):
            assert (out_dir / f"{stem}.{ext}").is_file(), f"{stem}.{ext}"
    assert "weather" in (out_dir / "a/x.txt").read_text().lower()
    assert (out_dir / "a/x.vtt").read_text().startswith("WEBVTT")
    doc = json.loads((out_dir / "b/x.json").read_text())
    assert "weather" in doc["text"].lower() and len(doc["audio_tags"]) == 3
    # raw scores of every class kept by default, highest first, consistent with the tags
    w = doc["audio_tags"][0]
    assert set(w["scores"]) == {"tone", "noise", "speech"} and doc["audio_classes"] == ["tone", "noise", "speech"]
    assert [list(t) for t in w["tags"]] == [[n, p] for n, p in list(w["scores"].items())[:2]]
    rows = (out_dir / "b/x.tags.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["start", "end", "rank", "tag", "probability"] and len(rows) == 1 + 3 * 2


def test_parse_at_label_matches_whisper_at_output_shape(tiny_model, speech_audio):
    """Same arguments and output shape as whisper-at's parse_at_label: a list with one
    {"time": {"start", "end"}, "audio tags": [(name, value), ...]} per window."""
    from wat.tag import parse_at_label
    head, info = _random_head(tiny_model)
    result = transcribe_and_tag(tiny_model, (head, info), speech_audio, time_res=2.0, keep_scores=None,
                                fp16=False, temperature=0.0)
    out = parse_at_label(result, language="follow_asr", top_k=2, p_threshold=-1)
    assert isinstance(out, list) and len(out) == len(result["audio_tags"]) == 3
    for entry, window in zip(out, result["audio_tags"]):
        assert set(entry) == {"time", "audio tags"} and set(entry["time"]) == {"start", "end"}
        assert (entry["time"]["start"], entry["time"]["end"]) == (window["start"], window["end"])
        assert all(isinstance(n, str) and isinstance(p, float) for n, p in entry["audio tags"])
        assert len(entry["audio tags"]) == 2
    # class filter before top-k (documented difference): only class 2 can be reported
    assert all([n for n, _ in e["audio tags"]] == ["speech"] for e in parse_at_label(result, include_class_list=[2]))
    # thresholds are probabilities
    assert parse_at_label(result, p_threshold=1.0) == [{"time": e["time"], "audio tags": []} for e in out]
    with pytest.warns(UserWarning, match="zh label names"):
        parse_at_label(result, language="zh")
    with pytest.raises(TagError, match="keep_scores=None"):
        parse_at_label(transcribe_and_tag(tiny_model, (head, info), speech_audio, time_res=2.0, fp16=False,
                                          temperature=0.0))


@pytest.mark.parametrize("args, message", [
    (["--language", "xx"], "unknown language"),
    (["--time-res", "nan"], "--time-res"), (["--time-res", "0"], "--time-res"), (["--time-res", "1e30"], "--time-res"),
    (["--top-k", "0"], "--top-k"), (["--top-k", "-1"], "--top-k"), (["--threshold", "nan"], "--threshold"),
    (["--threshold", "1.5"], "--threshold"), (["--beam_size", "0"], "--beam_size"), (["--best_of", "-1"], "--best_of"),
    (["--temperature", "nan"], "--temperature"), (["--temperature", "-1"], "--temperature"),
    (["--keep-scores", "-1"], "--keep-scores"), (["--fp16", "maybe"], "--fp16"),
    (["--output_format", "docx"], "--output_format"), (["--device", "tpu"], "--device"),
])
def test_cli_bad_options_are_one_error_line(args, message, tmp_path, capsys):
    assert_one_error_line(args, message, capsys)


def assert_one_error_line(args, message, capsys):
    """wat-tag with `args` added ends with exit 2 and one error line (its last) holding `message`
    (also used by test_tag_fast for the batch/backend options)."""
    with pytest.raises(SystemExit) as e:
        main(["x.wav", "--model", "tiny.en", "--head", "h.pt", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [err.splitlines()[-1]]


def test_cli_output_dir_that_is_a_file_or_read_only(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["x.wav", "--model", "tiny.en", "--head", "h.pt", "--output_dir", str(tmp_path / "file")])
    assert e.value.code == 2 and "wat-tag: error: --output_dir" in capsys.readouterr().err
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root ignores permission bits
        pytest.skip("running as root: a read-only folder is still writable")
    with pytest.raises(SystemExit) as e:
        main(["x.wav", "--model", "tiny.en", "--head", "h.pt", "--output_dir", str(locked)])
    assert e.value.code == 2


def test_cli_errors_are_one_line(tiny_model, speech_wav, tmp_path, capsys):
    head_path = tmp_path / "head.pt"
    save_head(head_path, build_head("wa-mlp", 6, 512, 3), HeadInfo("wa-mlp", 6, 512, 3, model="base"))
    code = main([str(speech_wav), "--model", "tiny.en", "--head", str(head_path)])
    err = capsys.readouterr().err
    assert code == 2 and "6 encoder layers" in err and "Traceback" not in err
    code = main([str(speech_wav), "--model", "tiny.en", "--head", str(tmp_path / "missing.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.pt" in err
    # a head trained on sample-padded pad30 features (before cache schema 4): refused, the fix named
    head, info = _random_head(tiny_model)
    old = {k: v for k, v in info.to_dict().items() if k != "pad30_padding"}
    torch.save({"format": "wat-head", "version": 1, "info": old, "state_dict": head.state_dict()}, tmp_path / "old.pt")
    code = main([str(speech_wav), "--model", "tiny.en", "--head", str(tmp_path / "old.pt"), "-o", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("wat-tag: error:") and "\n" not in err
    assert "re-extract" in err and "--allow-policy-mismatch" in err


def test_cli_refusal_leaves_no_output_folder(tiny_model, tmp_path, capsys):
    """--output_dir is created early (a bad one fails before any model loads); a run refused later
    (model, head, classes) or that wrote nothing (every file undecodable) removes the folders it
    made, and never a folder that existed before or that holds a file."""
    head, info = _random_head(tiny_model)
    save_head(tmp_path / "head.pt", head, info)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    out = tmp_path / "new" / "out"
    for args in (["--model", "no-such-model"], ["--model", "tiny.en", "--head", str(tmp_path / "missing.pt")],
                 ["--model", "tiny.en", "--classes", "Klingon"], ["--model", "tiny.en", "-f", "all"]):
        code = main([str(bad), "--head", str(tmp_path / "head.pt"), *args, "-o", str(out)])
        err = capsys.readouterr().err
        assert code == (1 if "-f" in args else 2) and "wat-tag: error:" in err, (args, err)
        assert not (tmp_path / "new").exists(), args
    (tmp_path / "mine").mkdir()
    assert main([str(bad), "--model", "tiny.en", "--head", str(tmp_path / "head.pt"), "-o", str(tmp_path / "mine")]) == 1
    assert (tmp_path / "mine").is_dir()                          # existed before: kept, even empty
    (out / "sub").mkdir(parents=True)
    assert main([str(bad), "--model", "nope", "--head", str(tmp_path / "head.pt"), "-o", str(out / "sub" / "x")]) == 2
    assert (out / "sub").is_dir() and not (out / "sub" / "x").exists()
    capsys.readouterr()


def test_extraction_and_tagging_pool_a_7_3_s_clip_identically(tiny_model):
    """365 encoder frames into 25 parts (14.6 frames each): the cache's pooling (LayerTaps, as
    encode_layers runs it) and wat-tag's window pooling see the same parts of the same frames."""
    from wat.extract import LayerTaps
    from wat.extract.layers import time_parts
    audio = _noise(7.3)
    content = len(audio) // 160                     # 730 mel frames
    n_valid = -(-content // 2)                      # 365 encoder frames, as pad30_input counts them
    mel = whisper.log_mel_spectrogram(audio, 80, padding=whisper.audio.N_SAMPLES)
    segment = whisper.pad_or_trim(mel[:, :content], 3000)
    per_frame = []
    hooks = [b.register_forward_hook(lambda m, i, o: per_frame.append(o[0])) for b in tiny_model.encoder.blocks]
    with torch.no_grad(), LayerTaps(tiny_model.encoder, 25, n_valid=n_valid) as taps:
        tiny_model.encoder(segment[None])
    for h in hooks:
        h.remove()
    cache_pooled = taps.pooled[0]                                   # [L, 25, D]
    pool = WindowPool(content, len(audio) / 16000, 10.0, 25)
    (k, tag_pooled), = pool.add_call(0, content, torch.stack(per_frame, 1)[:n_valid]) + pool.close()
    assert k == 0 and tag_pooled.shape == cache_pooled.shape
    torch.testing.assert_close(tag_pooled, cache_pooled, atol=1e-5, rtol=1e-5)
    # the parts overlap by a frame where 25 does not divide 365, as in adaptive_avg_pool1d
    start, end = time_parts(365, 25)
    assert (start[0], end[0], start[1], end[1]) == (0, 15, 14, 30)


def test_tag_features_of_a_short_file_are_its_pad30_cache_features(tiny_model, speech_audio):
    """A <= 30 s file: the features the head is given during transcription (one tag window over
    the whole file, one encoder pass) equal `encode_layers(..., policy="pad30")` of the file, which
    a cache stores: pad30 is transcribe's own window (log-mel padding, content frames). 7 s + 100
    samples: 350 encoder frames of content (the old sample-padded pad30 counted 351)."""
    from wat.extract import encode_layers
    audio = np.concatenate([speech_audio, _noise(3.0, seed=3)])[: 7 * SR + 100]
    head, info = _random_head(tiny_model)
    seen = []
    hook = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        with EncoderPasses(tiny_model) as passes:
            out = transcribe_and_tag(tiny_model, (head, info), audio, time_res=30.0, fp16=False,
                                     temperature=0.0, language="en")
    finally:
        hook.remove()
    assert passes.n == 1 and len(out["audio_tags"]) == 1 and len(seen) == 1
    cache_row = encode_layers(tiny_model, audio[None], policy="pad30")
    assert seen[0].shape == cache_row.shape == (1, 4, 25, 384)
    torch.testing.assert_close(seen[0], cache_row, atol=1e-5, rtol=1e-5)

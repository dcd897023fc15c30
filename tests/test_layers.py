"""Layer taps on tiny.en: shapes, per-clip independence, pad30 vs trim, pad30 = the window
`whisper.transcribe` feeds the encoder, pooling = window means of the block outputs before ln_post,
and LayerTaps on a plain encoder call."""
import math

import numpy as np
import pytest
import torch
import whisper

from wat.extract import LayerTaps, ShortClipError, encode_layers, encoder_frames, hear, log_mel
from wat.extract.layers import MIN_SAMPLES, pad30_input

SR = 16000


def clip(speech, seconds):
    out = np.zeros(int(seconds * SR), np.float32)
    n = min(len(speech), len(out))
    out[:n] = speech[:n]
    return out


def loud_tone(n, hz=1000.0):
    # a pure tone puts its energy in few mel bins: a much higher log-mel maximum than speech
    return (0.9 * np.sin(2 * np.pi * hz * np.arange(n) / SR)).astype(np.float32)


def test_log_mel_is_per_clip(speech_audio):
    a = torch.from_numpy(clip(speech_audio, 5))
    b = torch.from_numpy(loud_tone(len(a)))
    mel = log_mel(torch.stack([a, b]), 80)
    assert mel.shape == (2, 80, len(a) // 160)
    assert torch.equal(mel[0], whisper.log_mel_spectrogram(a, 80))
    # a batched call would clamp the quiet clip against the loud one's maximum
    assert not torch.equal(mel[0], whisper.log_mel_spectrogram(torch.stack([a, b]), 80)[0])


@pytest.mark.parametrize("samples", [320 * k + r for k in (1, 25) for r in (0, 1, 159, 160, 161, 319)]
                         + [201, 30 * SR - 1, 30 * SR, 31 * SR + 100])
def test_encoder_frames_is_what_the_conv_stem_gives(tiny_model, samples):
    """`encoder_frames` against the encoder's conv stem on the clip's own log-mel (trim; whisper's
    STFT needs over 200 samples): samples // 160 mel frames, conv2 (stride 2) -> ceil of half; only
    the first 30 s are encoded."""
    x = torch.from_numpy(loud_tone(samples))[None, :30 * SR]
    mel = log_mel(x, 80)
    with torch.no_grad():
        stem = tiny_model.encoder.conv2(tiny_model.encoder.conv1(mel))
    assert mel.shape[-1] == min(samples, 30 * SR) // 160
    assert stem.shape[-1] == encoder_frames(samples) == pad30_input([x[0]], 80)[1][0]


def test_shapes_and_frames(tiny_model, speech_audio):
    for seconds in (5, 10):
        for policy in ("pad30", "trim"):
            x = clip(speech_audio, seconds)[None]
            f = encode_layers(tiny_model, x, policy=policy)
            assert f.shape == (1, 4, 25, 384) and f.dtype == torch.float32, (seconds, policy)
            assert torch.isfinite(f).all() and f.abs().max() > 0.1
    x = torch.from_numpy(np.stack([clip(speech_audio, 3)] * 3))
    assert encode_layers(tiny_model, x, frames=5, policy="trim").shape == (3, 4, 5, 384)


def test_batch_independence(tiny_model, speech_audio):
    a = clip(speech_audio, 5)
    for policy in ("pad30", "trim"):
        alone = encode_layers(tiny_model, a[None], policy=policy)
        batched = encode_layers(tiny_model, np.stack([a, loud_tone(len(a))]), policy=policy)
        assert (alone[0] - batched[0]).abs().max() < 1e-4, policy
        assert (batched[0] - batched[1]).abs().max() > 1.0


def test_pad30_and_trim_differ(tiny_model, speech_audio):
    x = clip(speech_audio, 10)[None]
    pad, trim = encode_layers(tiny_model, x, policy="pad30"), encode_layers(tiny_model, x, policy="trim")
    assert pad.shape == trim.shape == (1, 4, 25, 384)
    assert (pad - trim).abs().max() > 0.05
    # but they describe the same audio: per-layer time means stay strongly correlated
    r = np.corrcoef(pad.mean(2).flatten().numpy(), trim.mean(2).flatten().numpy())[0, 1]
    assert r > 0.9
    assert tiny_model.encoder.positional_embedding.shape == (1500, 384)  # trim restored it


def _transcribe_window(x: np.ndarray) -> tuple[torch.Tensor, int]:
    """The encoder input `whisper.transcribe` builds for the first 30 s of x, spelled out with
    whisper's functions as transcribe.py does (mel of x + 30 s of zero samples, content frames,
    slice, pad_or_trim in log-mel space), and the encoder frames of its content."""
    mel = whisper.log_mel_spectrogram(torch.from_numpy(x), 80, padding=whisper.audio.N_SAMPLES)
    content = mel.shape[-1] - whisper.audio.N_FRAMES
    segment = whisper.pad_or_trim(mel[:, :min(content, 3000)], whisper.audio.N_FRAMES)
    return segment, math.ceil(min(content, 3000) / 2)


def test_pooling_is_window_means_of_block_outputs(tiny_model, speech_audio):
    """pad30 = transcribe's window: 10 s -> 500 encoder frames of content, 25 windows of 20 frames,
    pre-ln_post; the padding is zero log-mel frames (not the log-mel of zero samples)."""
    x = clip(speech_audio, 10)
    segment, n_valid = _transcribe_window(x)
    assert n_valid == 500 and segment.shape == (80, 3000)
    assert (segment[:, 1000:] == 0).all() and not (segment[:, 999] == 0).all()
    enc = tiny_model.encoder
    full = []
    hooks = [b.register_forward_hook(lambda m, i, o: full.append(o.detach().clone())) for b in enc.blocks]
    try:
        with torch.no_grad():
            enc(segment[None])
    finally:
        for h in hooks:
            h.remove()
    want = torch.stack([o[:, :500].reshape(1, 25, 20, 384).mean(2) for o in full], 1)
    got = encode_layers(tiny_model, x[None])
    assert torch.allclose(got, want, atol=1e-5)
    # the last layer is before ln_post: its mean is not ~0 per frame as after a LayerNorm would be
    assert got[0, -1].mean(-1).abs().max() > 0.05


@pytest.mark.parametrize("samples", [7 * SR + 100, 3 * SR + 170, 150, 30 * SR, 31 * SR + 5])
def test_pad30_is_the_transcribe_window(tiny_model, speech_audio, samples):
    """`pad30_input` (the one pad30 definition) against the window spelled out from transcribe.py,
    and encode_layers against the encoder on that window; lengths where the old sample padding
    counted ceil(samples / 320) frames (7 s + 100: 351 vs 350), under 10 ms (no content frame),
    exactly 30 s, and over 30 s (normalised over the whole clip, as transcribe's first window)."""
    x = np.resize(speech_audio, samples).astype(np.float32)
    x[-min(samples, 4000):] += loud_tone(min(samples, 4000))  # the loudest part last: the max-8 clamp moves
    segment, n_valid = _transcribe_window(x)
    n_valid = max(1, n_valid)
    mel, valid = pad30_input([torch.from_numpy(x), torch.from_numpy(loud_tone(len(x)))], 80)
    assert torch.equal(mel[0], segment) and valid[0] == n_valid
    if samples < MIN_SAMPLES["pad30"]:   # no content frame: the window is padding only, encode_layers refuses it
        with pytest.raises(ShortClipError):
            encode_layers(tiny_model, x[None])
        return
    with torch.no_grad(), LayerTaps(tiny_model.encoder, frames=25, n_valid=n_valid) as taps:
        tiny_model.encoder(segment[None])
    torch.testing.assert_close(encode_layers(tiny_model, x[None]), taps.pooled, atol=1e-5, rtol=1e-5)


def test_pad30_input_is_what_transcribe_feeds_the_encoder(tiny_model, speech_audio):
    """The encoder's input in a real `model.transcribe` call is bit-equal to `pad30_input`'s."""
    class Seen(Exception):
        pass

    def stop(module, args):
        raise Seen(args[0].clone())

    for samples in (len(speech_audio) + 77, 31 * SR):
        x = np.resize(speech_audio, samples).astype(np.float32)
        handle = tiny_model.encoder.register_forward_pre_hook(stop)
        try:
            with pytest.raises(Seen) as seen:
                tiny_model.transcribe(x, temperature=0.0, fp16=False, language="en")
        finally:
            handle.remove()
        mel, _ = pad30_input([torch.from_numpy(x)], 80)
        assert torch.equal(seen.value.args[0], mel), samples


def test_layer_taps_on_plain_encoder_calls(tiny_model, speech_audio):
    x = clip(speech_audio, 5)
    y = loud_tone(len(x))
    mel, valid = pad30_input(torch.from_numpy(np.stack([x, y])), 80)
    assert valid == [250, 250]
    with torch.no_grad(), LayerTaps(tiny_model.encoder, frames=25, n_valid=250) as taps:
        tiny_model.encoder(mel[:1])
        first = taps.pooled
        tiny_model.encoder(mel[1:])
        second = taps.pooled
    assert [r.shape for r in (first, second)] == [(1, 4, 25, 384), (1, 4, 25, 384)]
    assert torch.allclose(first, encode_layers(tiny_model, x[None]), atol=1e-5)
    assert torch.allclose(second, encode_layers(tiny_model, y[None]), atol=1e-5)
    # the hooks are gone after the block
    with torch.no_grad():
        tiny_model.encoder(mel[:1])
    assert taps.pooled is second


def test_bad_inputs(tiny_model):
    with pytest.raises(ValueError, match="unknown policy"):
        encode_layers(tiny_model, np.zeros((1, 16000), np.float32), policy="crop")
    with pytest.raises(ValueError, match=r"\[batch, samples\]"):
        encode_layers(tiny_model, np.zeros(16000, np.float32))


@pytest.mark.parametrize("samples", [1, 100, 159, 160, 200, 201, 400])
def test_short_clips(tiny_model, speech_audio, samples):
    """Whole clips of a few samples, given as arrays (file readers refuse < 400): a typed
    `ShortClipError` below `MIN_SAMPLES`, never torch's RuntimeError; at and above it, real frames.
    trim's bound is whisper's own: its log-mel of the clip alone fails up to 200 samples. pad30's:
    under 160 samples the window is padding only, the same whatever the clip."""
    x = torch.from_numpy(np.resize(speech_audio[8000:], samples).astype(np.float32))
    if samples <= 200:
        with pytest.raises(RuntimeError):
            whisper.log_mel_spectrogram(x)
    else:
        assert whisper.log_mel_spectrogram(x).shape[-1] == samples // 160
    if samples < 160:
        assert torch.equal(pad30_input([x], 80)[0], pad30_input([torch.ones(samples)], 80)[0])
    for policy in ("trim", "pad30"):
        m = hear.WhisperHEAR(tiny_model, layers=[0, 3], policy=policy)
        if samples < MIN_SAMPLES[policy]:
            with pytest.raises(ShortClipError, match=f"{samples} samples.*{policy}.*at least {MIN_SAMPLES[policy]}"):
                encode_layers(tiny_model, x[None], policy=policy)
            with pytest.raises(ShortClipError):
                hear.get_timestamp_embeddings(x[None], m)
            continue
        f = encode_layers(tiny_model, x[None], policy=policy)
        assert f.shape == (1, 4, 25, 384) and torch.isfinite(f).all()
        emb, ts = hear.get_timestamp_embeddings(x[None], m)
        assert emb.shape == (1, encoder_frames(samples), 384) and ts[0].tolist() == [10.0]
        torch.testing.assert_close(emb[0, 0], f[0, [0, 3], 0].mean(0))   # one frame: every part is it
    assert MIN_SAMPLES == {"trim": 201, "pad30": 160}


def test_time_parts_are_adaptive_avg_pool_windows():
    """The one partition (extraction and tagging) is the window set of the kernel extraction pools with."""
    import torch.nn.functional as F

    from wat.extract.layers import pool_frames, time_parts
    for n in [1, 7, 10, 24, 25, 26, 250, 365, 499, 500, 1500]:
        for parts in [1, 10, 25, 60]:
            x = torch.randn(1, n, 3)
            start, end = time_parts(n, parts)
            manual = torch.stack([x[0, a:b].mean(0) for a, b in zip(start, end)])
            torch.testing.assert_close(pool_frames(x, parts, None)[0], manual, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(F.adaptive_avg_pool1d(x.transpose(1, 2), parts).transpose(1, 2)[0], manual,
                                       atol=1e-6, rtol=1e-6)
    # official cases: 10 s / 5 s clips and 30 s windows split evenly, no frame shared
    for n in (500, 250, 1500):
        start, end = time_parts(n, 25)
        assert (end - start == n // 25).all() and (start[1:] == end[:-1]).all()


def test_resident_window_gives_whispers_log_mel_bit_for_bit():
    """On CUDA the log-mel runs inside `_ResidentWindow` (whisper's per-call window copy would sync
    the stream); the mode must hand out exactly whisper's window. Checked here on the CPU device."""
    from wat.extract.layers import _ResidentWindow

    audio = torch.from_numpy(loud_tone(8000))
    plain = whisper.log_mel_spectrogram(audio, 80, padding=1000)
    with _ResidentWindow(torch.device("cpu")):
        resident = whisper.log_mel_spectrogram(audio, 80, padding=1000)
        again = whisper.log_mel_spectrogram(audio, 80)
    assert torch.equal(plain, resident) and torch.equal(again, whisper.log_mel_spectrogram(audio, 80))
    assert torch.equal(_ResidentWindow._windows[(400, "cpu")], torch.hann_window(400))

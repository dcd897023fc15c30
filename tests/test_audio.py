"""Audio decoding: good files in every common format decode right; every bad kind is a typed AudioError."""
import struct

import av
import numpy as np
import pytest
import soundfile as sf

from wat.data.audio import SAMPLE_RATE, AudioError, fit_length, load_audio


def _noise(seconds=1.0, rate=44_100, channels=1, seed=0):
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, (int(seconds * rate), channels)).astype(np.float32)
    return x if channels > 1 else x[:, 0]


def _tone(seconds=1.0, rate=44_100, f=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * f * t)).astype(np.float32)


def _write_av(path, x, rate, codec):
    """Encode mono float audio with PyAV (for formats libsndfile cannot write here, e.g. aac)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def _reason(path, **kw):
    with pytest.raises(AudioError) as err:
        load_audio(path, **kw)
    assert err.value.path == str(path) and str(err.value).startswith(str(path))
    return err.value.reason


def test_wav_resampled_to_16k_with_right_length_and_content(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(2.0), 44_100, subtype="PCM_16")
    y = load_audio(tmp_path / "a.wav")
    assert y.dtype == np.float32 and y.ndim == 1 and len(y) == 2 * SAMPLE_RATE
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(y) - 440) < 1.0  # the tone survived resampling
    assert abs(np.abs(y[1000:-1000]).max() - 0.5) < 0.01


@pytest.mark.parametrize("ext,subtype", [("flac", "PCM_16"), ("ogg", "VORBIS"), ("mp3", "MPEG_LAYER_III")])
def test_compressed_formats_decode(tmp_path, ext, subtype):
    path = tmp_path / f"a.{ext}"
    sf.write(path, _tone(1.0), 44_100, subtype=subtype)
    y = load_audio(path)
    # lossy codecs may add an encoder delay of a few ms; the length is still about one second
    assert abs(len(y) - SAMPLE_RATE) < 0.06 * SAMPLE_RATE
    assert 0.4 < np.abs(y).max() < 0.6


def test_m4a_aac_through_pyav(tmp_path):
    path = tmp_path / "a.m4a"
    _write_av(path, _tone(1.0, 48_000), 48_000, "aac")
    y = load_audio(path)
    assert abs(len(y) - SAMPLE_RATE) < 0.1 * SAMPLE_RATE
    assert np.argmax(np.abs(np.fft.rfft(y[2000:14000]))) * SAMPLE_RATE / 12000 == pytest.approx(440, abs=3)


def test_stereo_is_mixed_down(tmp_path):
    left, right = _tone(1.0, 16_000, 300), _tone(1.0, 16_000, 700)
    sf.write(tmp_path / "s.wav", np.stack([left, right], 1), 16_000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav"), (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("ext", ["wav", "mp3"])
def test_offset_and_duration_select_the_segment(tmp_path, ext):
    x = _noise(3.0, 16_000, seed=1)
    sf.write(tmp_path / f"n.{ext}", x, 16_000)
    whole = load_audio(tmp_path / f"n.{ext}")
    part = load_audio(tmp_path / f"n.{ext}", offset=1.25, duration=0.5)
    assert len(part) == 8000
    start = 20_000
    np.testing.assert_allclose(part, whole[start : start + 8000], atol=1e-6)
    assert len(load_audio(tmp_path / f"n.{ext}", offset=2.5)) == pytest.approx(8000, abs=1200)


def test_offset_past_end(tmp_path):
    sf.write(tmp_path / "a.wav", _noise(1.0, 16_000), 16_000)
    assert "past the end" in _reason(tmp_path / "a.wav", offset=2.0)


def test_missing_and_empty_files(tmp_path):
    assert _reason(tmp_path / "nope.wav") == "file not found"
    (tmp_path / "zero.wav").write_bytes(b"")
    assert "empty" in _reason(tmp_path / "zero.wav")
    sf.write(tmp_path / "nosamples.wav", np.zeros((0, 1), np.float32), 16_000)
    assert "0 samples" in _reason(tmp_path / "nosamples.wav")


def test_truncated_wav(tmp_path):
    sf.write(tmp_path / "a.wav", _noise(1.0), 44_100, subtype="PCM_16")
    data = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "t.wav").write_bytes(data[: len(data) // 2])
    assert "truncated" in _reason(tmp_path / "t.wav")


def test_truncated_flac_and_mp3_and_random_bytes(tmp_path):
    sf.write(tmp_path / "a.flac", _noise(2.0), 44_100)
    data = (tmp_path / "a.flac").read_bytes()
    (tmp_path / "t.flac").write_bytes(data[:200])  # header survives, audio frames do not
    assert "corrupt" in _reason(tmp_path / "t.flac")
    sf.write(tmp_path / "a.mp3", _noise(2.0), 44_100)  # LAME writes a Xing header with the length
    data = (tmp_path / "a.mp3").read_bytes()
    (tmp_path / "t.mp3").write_bytes(data[: len(data) // 2])
    assert "truncated" in _reason(tmp_path / "t.mp3")
    for ext in ("wav", "mp3", "flac"):
        (tmp_path / f"r.{ext}").write_bytes(np.random.default_rng(0).bytes(4096))
        assert "not a recognised" in _reason(tmp_path / f"r.{ext}") or "cannot decode" in _reason(tmp_path / f"r.{ext}")


def test_zero_channel_wav(tmp_path):
    sf.write(tmp_path / "a.wav", _noise(0.5), 16_000, subtype="PCM_16")
    data = bytearray((tmp_path / "a.wav").read_bytes())
    struct.pack_into("<H", data, 22, 0)  # fmt chunk: channel count
    (tmp_path / "zc.wav").write_bytes(bytes(data))
    assert _reason(tmp_path / "zc.wav") == "no audio channels"


def test_silent_file(tmp_path):
    sf.write(tmp_path / "s.wav", np.zeros(16_000, np.float32), 16_000)
    assert "silent" in _reason(tmp_path / "s.wav")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_float_wav(tmp_path, bad):
    x = _noise(0.5, 16_000)
    x[100] = bad
    sf.write(tmp_path / "n.wav", x, 16_000, subtype="FLOAT")
    assert "non-finite" in _reason(tmp_path / "n.wav")


@pytest.mark.parametrize("ext", ["wav", "mp3"])
def test_too_long_is_refused_before_decoding(tmp_path, ext):
    sf.write(tmp_path / f"l.{ext}", _noise(3.0, 16_000), 16_000)
    assert "too long" in _reason(tmp_path / f"l.{ext}", max_seconds=2)
    assert len(load_audio(tmp_path / f"l.{ext}", max_seconds=2, duration=1.5)) == 24_000


def test_fit_length():
    x = np.arange(5, dtype=np.float32) + 1
    np.testing.assert_array_equal(fit_length(x, 3), [1, 2, 3])
    np.testing.assert_array_equal(fit_length(x, 7), [1, 2, 3, 4, 5, 0, 0])
    assert fit_length(x, 7).dtype == np.float32


@pytest.mark.parametrize("frames,rate", [(1, 44_100), (2, 8_000), (300, 16_000), (1000, 44_100)])
def test_too_short_once_resampled_is_an_error(tmp_path, frames, rate):
    """A 1-sample 44.1 kHz file resampled to nothing used to become 5 s of silence with a label."""
    sf.write(tmp_path / "s.wav", np.full(frames, 0.3, np.float32), rate, subtype="FLOAT")
    assert _reason(tmp_path / "s.wav").startswith(f"too short: {frames} sample(s) at {rate} Hz give ")


def test_shortest_accepted_audio_is_one_analysis_window(tmp_path):
    sf.write(tmp_path / "ok.wav", _noise(0.03), 44_100, subtype="FLOAT")  # 30 ms -> 480 samples
    assert len(load_audio(tmp_path / "ok.wav")) == 480

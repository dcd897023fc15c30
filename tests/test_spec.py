"""FeatureSpec and Policy (wat.data.spec): the one record of what features are, embedded by cache
metadata and head info, with the one compatibility rule; Whisper files stay as they were."""
import numpy as np
import pytest

from synthetic_cache import synthetic_meta
from wat.data.cache import CacheError, CacheMeta, open_cache, shard_path, write_shard
from wat.data.cache import meta as meta_module
from wat.data.heads import Features, HeadError, HeadInfo, head_problems
from wat.data.labels import Vocabulary
from wat.data.spec import FeatureSpec, Policy

VOCAB = Vocabulary.from_names(["a", "b"])


@pytest.mark.parametrize("policy,padding,want", [
    ("pad30", "mel", Policy.PAD30), ("pad30", "samples", Policy.PAD30_SAMPLES), ("pad30", "", Policy.PAD30_SAMPLES),
    ("pad30", None, Policy.PAD30_SAMPLES), ("trim", "", Policy.TRIM), ("trim", None, Policy.TRIM),
    ("pad30-samples", None, Policy.PAD30_SAMPLES), (Policy.PAD30, "samples", Policy.PAD30)])
def test_policy_of_a_recorded_pair(policy, padding, want):
    got = Policy.of(policy, padding)
    assert got is want and got == want.value
    assert (got.recorded, got.padding) == {Policy.PAD30: ("pad30", "mel"), Policy.PAD30_SAMPLES: ("pad30", "samples"),
                                           Policy.TRIM: ("trim", "")}[want]


@pytest.mark.parametrize("policy,padding", [("pad30", "zeros"), ("crop", None), ("", None)])
def test_policy_of_refuses_what_wat_never_writes(policy, padding):
    with pytest.raises(ValueError):
        Policy.of(policy, padding)
    with pytest.raises(CacheError):
        synthetic_meta(vocab=VOCAB, multilabel=False, n_layers=2, n_frames=3, dim=4, policy=policy, pad30_padding=padding)


def _meta(**kw) -> CacheMeta:
    return synthetic_meta(vocab=VOCAB, multilabel=False, n_layers=2, n_frames=3, dim=4, **kw)


def test_cache_meta_embeds_the_spec_and_keeps_its_names():
    m = _meta(policy="pad30", storage="int8", layers=(3, 5))
    s = m.spec
    assert s == FeatureSpec(model="synthetic", fingerprint="0" * 16, policy=Policy.PAD30, n_layers=2, layers=(3, 5),
                            dim=4, n_frames=3, pooling=m.pooling, sample_rate=m.sample_rate, storage="int8")
    assert (s.encoder, m.encoder, m.policy, m.pad30_padding) == ("whisper", "whisper", "pad30", "mel")
    again = CacheMeta.of(s, clip_seconds=m.clip_seconds, vocab=m.vocab, multilabel=False, dataset=m.dataset)
    assert again == m and again.digest() == m.digest()


def test_whisper_caches_are_written_as_before_and_other_encoders_bump_the_schema(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 2, 3, 4)).astype(np.float32)
    whisper = _meta(policy="trim")
    assert "encoder" not in whisper.to_attrs() and whisper.to_attrs()["schema_version"] == 2
    assert "encoder" not in _meta(policy="pad30").to_attrs() and _meta(policy="pad30").to_attrs()["schema_version"] == 4
    hf = _meta(encoder="hf", model="facebook/hubert-large-ls960-ft")
    attrs = hf.to_attrs()
    assert attrs["encoder"] == "hf" and attrs["schema_version"] == 5
    assert whisper.digest() != _meta(policy="trim", encoder="hf").digest()
    write_shard(shard_path(tmp_path, 0), hf, ["a", "b", "c"], x, [(0,), (1,), (0,)])
    got = open_cache(shard_path(tmp_path, 0)).meta
    assert got == hf and got.spec.encoder == "hf"


def test_an_older_reader_refuses_a_non_whisper_cache(tmp_path, monkeypatch):
    x = np.zeros((1, 2, 3, 4), np.float32) + 1
    write_shard(shard_path(tmp_path, 0), _meta(encoder="crepe"), ["a"], x, [(0,)])
    monkeypatch.setattr(meta_module, "READABLE_VERSIONS", (1, 2, 3, 4))  # a wat before schema 5
    with pytest.raises(CacheError, match="schema version 5"):
        open_cache(shard_path(tmp_path, 0))


def test_the_one_rule_for_caches():
    a = _meta(policy="trim")
    assert a.incompatibilities(_meta(policy="trim", storage="int8")) == []
    assert a.incompatibilities(_meta(policy="trim", storage="int8"), same_cache=True) == ["storage: 'fp16' != 'int8'"]
    bad = a.incompatibilities(_meta(policy="trim", encoder="hf"))
    assert len(bad) == 1 and bad[0].startswith("encoder: whisper != hf")
    assert a.incompatibilities(_meta(policy="trim", encoder="hf")) == a.spec.incompatibilities(
        _meta(policy="trim", encoder="hf").spec)
    old = _meta(policy="pad30", pad30_padding="samples")
    assert [p[:31] for p in _meta(policy="pad30").incompatibilities(old)] == ["pad30_padding: mel != samples ("]


def _info(**kw) -> HeadInfo:
    return HeadInfo("wa-mlp", 2, 4, 2, None, 3, VOCAB.to_json(), "synthetic", "f" * 16, "trim", False, **kw)


def test_head_info_embeds_the_spec_and_whisper_head_files_stay_as_they_were():
    info = _info()
    assert "encoder" not in info.to_dict() and info.spec.encoder == "whisper"
    assert info.spec.n_frames is None  # a head of the time mean takes any frame count
    hf = _info(encoder="hf")
    assert hf.to_dict()["encoder"] == "hf" and HeadInfo.from_dict(hf.to_dict()) == hf
    assert HeadInfo.from_dict(info.to_dict()) == info
    with pytest.raises(HeadError, match="unknown input policy"):
        HeadInfo.from_dict({**info.to_dict(), "policy": "crop"})


def test_a_head_of_another_encoder_family_is_refused_with_the_fix():
    meta = _meta(policy="trim", fingerprint="f" * 16)
    assert head_problems(_info(), Features.of_cache(meta)) == []
    bad = head_problems(_info(encoder="hf"), Features.of_cache(meta))
    assert len(bad) == 1 and bad[0].startswith("encoder: head trained on hf features") and "extract with" in bad[0]
    assert head_problems(_info(encoder="hf"), Features.of_cache(_meta(policy="trim", fingerprint="f" * 16,
                                                                      encoder="hf"))) == []


def test_the_weights_line_says_whisper_only_for_two_whisper_sides():
    """Different weights are named "Whisper weights" only between Whisper features; a head of one
    family on another's features (or two HF checkpoints) speaks of "encoder weights"."""
    def spec(encoder, model, fingerprint):
        return FeatureSpec(encoder=encoder, model=model, fingerprint=fingerprint, policy="trim", n_layers=2, dim=4,
                           n_frames=25, pooling="mean:25", sample_rate=16000)

    hubert, wav2vec2 = spec("hf", "facebook/hubert-base", "a" * 16), spec("hf", "facebook/wav2vec2-base", "c" * 16)
    whisper, small = spec("whisper", "base", "b" * 16), spec("whisper", "small", "d" * 16)

    def weights(head, feats):
        return [p for p in head.incompatibilities(feats, head=True) if "weights" in p]

    assert weights(hubert, whisper) == ["encoder weights: head trained on facebook/hubert-base (aaaaaaaaaaaa), "
                                        "features from base (bbbbbbbbbbbb)"]
    assert weights(whisper, hubert)[0].startswith("encoder weights: head trained on base")
    assert weights(hubert, wav2vec2)[0].startswith("encoder weights: head trained on facebook/hubert-base")
    assert weights(whisper, small)[0].startswith("Whisper weights: head trained on base")
    assert not any("Whisper" in p for p in hubert.incompatibilities(whisper, head=True))

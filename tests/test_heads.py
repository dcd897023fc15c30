import re

import pytest
import torch

from wat.data.heads import (Features, HeadError, HeadInfo, build_head, head_problems, load_head, n_parameters,
                             official_to_state_dict, save_head)


def block(d):  # whisper ResidualAttentionBlock: q,k(no bias),v,out + 2 LN + 4x MLP
    return 12 * d * d + 12 * d


def classifier(d, c=527):
    return 2 * d + d * c + c


# (L, D, dim) -> exact count from the official architecture, and the paper's rounded figure (M)
TLTR = [
    ((32, 1280, None), 2 * block(1280) + classifier(1280), 40.0),
    ((32, 1280, 512), 2 * 1280 + 1280 * 512 + 512 + 2 * block(512) + classifier(512), 7.2),
    ((32, 1280, 128), 2 * 1280 + 1280 * 128 + 128 + 2 * block(128) + classifier(128), 0.6),
    ((32, 1280, 256), 2 * 1280 + 1280 * 256 + 256 + 2 * block(256) + classifier(256), 2.1),
    ((32, 1280, 768), 2 * 1280 + 1280 * 768 + 768 + 2 * block(768) + classifier(768), 15.6),
    ((4, 384, None), 2 * block(384) + classifier(384), 3.8),
    ((6, 512, None), 2 * block(512) + classifier(512), 6.6),
    ((12, 768, None), 2 * block(768) + classifier(768), 14.6),
    ((24, 1024, None), 2 * block(1024) + classifier(1024), 25.8),
]


@pytest.mark.parametrize("shape,exact,paper", TLTR)
def test_tltr_parameter_counts(shape, exact, paper):
    with torch.device("meta"):  # no allocation: counts only
        n = n_parameters(build_head("tl-tr", *shape[:2], 527, shape[2]))
    assert n == exact
    # the paper's table rounds loosely: 256 -> 2.045M printed 2.1, medium 25.73M printed 25.8
    assert abs(n / 1e6 - paper) < 0.07


def test_mlp_and_wa_tr_parameter_counts():
    with torch.device("meta"):
        wa_mlp, last_mlp, wa_tr = (n_parameters(build_head(k, 32, 1280, 527)) for k in ("wa-mlp", "last-mlp", "wa-tr"))
    assert wa_mlp == 32 + classifier(1280) and abs(wa_mlp / 1e6 - 0.7) < 0.05
    assert last_mlp == classifier(1280)
    assert wa_tr == 32 + block(1280) + classifier(1280)


@pytest.mark.parametrize("kind,dim", [("last-mlp", None), ("wa-mlp", None), ("wa-tr", None), ("wa-tr", 16),
                                      ("tl-tr", None), ("tl-tr", 16)])
def test_forward_shapes(kind, dim):
    torch.manual_seed(0)
    head = build_head(kind, 3, 24, 7, dim)
    x = torch.randn(5, 3, 4, 24, dtype=torch.float16)
    assert head(x).shape == (5, 7)
    if kind.endswith("mlp"):  # time-mean input gives the same logits
        torch.testing.assert_close(head(x.float().mean(2)), head(x.float()), rtol=1e-5, atol=1e-5)
    with pytest.raises(HeadError, match="L=3"):
        head(torch.randn(5, 2, 4, 24))


def test_wa_mlp_is_weighted_layer_average():
    head = build_head("wa-mlp", 2, 4, 3)
    with torch.no_grad():
        head.layer_weight.copy_(torch.tensor([3.0, 1.0]))
    x = torch.randn(2, 2, 5, 4)
    want = head.mlp_layer((3 * x[:, 0].mean(1) + x[:, 1].mean(1)) / 4)
    torch.testing.assert_close(head(x), want)


def test_bad_kind_and_dim():
    with pytest.raises(HeadError, match="unknown head"):
        build_head("cnn", 2, 8, 3)
    with pytest.raises(HeadError, match="no projection"):
        build_head("wa-mlp", 2, 8, 3, proj_dim=16)
    with pytest.raises(HeadError, match="multiple of 8"):
        build_head("tl-tr", 2, 8, 3, proj_dim=12)


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    head = build_head("tl-tr", 3, 16, 5, 8)
    info = HeadInfo("tl-tr", 3, 16, 5, 8, 4, '{"keys": [], "names": []}', "tiny.en", "f00d", "trim", False,
                    thresholds=[0.5] * 5)
    save_head(tmp_path / "h.pt", head, info)
    raw = torch.load(tmp_path / "h.pt", weights_only=True)  # plain types only
    assert raw["info"]["fingerprint"] == "f00d"
    head2, info2 = load_head(tmp_path / "h.pt")
    assert info2 == info
    x = torch.randn(2, 3, 4, 16)
    assert torch.equal(head.eval()(x), head2(x))
    with pytest.raises(HeadError, match="3-layer features"):
        load_head(tmp_path / "h.pt", n_layers=4)


def _official(head, prefix="at_model."):
    """The state dict of an official Whisper-AT head, spelled out with the official key names."""
    sd = head.state_dict()
    names = ["time_tr", "layer_tr"]
    keys = [f"{b}.{k}" for b in names for k in (
        "attn.query.weight", "attn.query.bias", "attn.key.weight", "attn.value.weight", "attn.value.bias",
        "attn.out.weight", "attn.out.bias", "attn_ln.weight", "attn_ln.bias", "mlp.0.weight", "mlp.0.bias",
        "mlp.2.weight", "mlp.2.bias", "mlp_ln.weight", "mlp_ln.bias")]
    keys += ["mlp_layer.0.weight", "mlp_layer.0.bias", "mlp_layer.1.weight", "mlp_layer.1.bias"]
    if head.down_layer is not None:
        keys += ["down_layer.0.weight", "down_layer.0.bias", "down_layer.1.weight", "down_layer.1.bias"]
    assert sorted(keys) == sorted(sd)
    return {prefix + k: sd[k].clone() for k in keys}


@pytest.mark.parametrize("dim_in,n_layers,dim", [(384, 4, None), (512, 6, 64)])
def test_official_checkpoint(tmp_path, dim_in, n_layers, dim):
    torch.manual_seed(2)
    head = build_head("tl-tr", n_layers, dim_in, 527, dim).eval()
    torch.save(_official(head), tmp_path / "official.pth")
    loaded, info = load_head(tmp_path / "official.pth")
    assert (info.kind, info.n_layers, info.dim_in, info.proj_dim, info.n_classes) == ("tl-tr", n_layers, dim_in, dim, 527)
    assert info.multilabel and '"/m/09x0r"' in info.vocab_json
    # trained on whisper-at's transcribe windows: what this wat's pad30 is
    assert (info.policy, info.pad30_padding) == ("pad30", "mel")
    x = torch.randn(2, n_layers, 25, dim_in)
    assert torch.equal(head(x), loaded(x))
    with pytest.raises(HeadError, match=f"{n_layers}-layer features"):
        load_head(tmp_path / "official.pth", n_layers=32)
    # DataParallel training checkpoints use module. instead of at_model.
    assert official_to_state_dict(_official(head, "module.")).keys() == head.state_dict().keys()


def test_not_a_head(tmp_path):
    torch.save({"foo": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(HeadError, match="not a wat head"):
        load_head(tmp_path / "x.pt")
    (tmp_path / "y.pt").write_bytes(b"garbage")
    with pytest.raises(HeadError, match="cannot read"):
        load_head(tmp_path / "y.pt")


@pytest.mark.parametrize("n_head,dtype", [(1, torch.float32), (8, torch.float32), (8, torch.bfloat16)])
def test_block_equals_whisper_block(n_head, dtype):
    """Our ResidualAttentionBlock is whisper.model's (same names, same logits): official
    at_model.* checkpoints load into it and give identical outputs."""
    from whisper.model import ResidualAttentionBlock as WhisperBlock

    from wat.data.heads import ResidualAttentionBlock
    torch.manual_seed(0)
    theirs = WhisperBlock(64, n_head)
    ours = ResidualAttentionBlock(64, n_head)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 7, 64).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_head_module_does_not_import_whisper(tmp_path):
    # the schema is read by every train/eval process: whisper.model would drag transcribe, numba
    # and tiktoken in with it
    import subprocess
    import sys
    code = ("import sys, wat.data.heads, wat.train.loop, wat.eval.evaluate\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('whisper', 'numba', 'tiktoken')))")
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("head_model, feats_model, problem", [
    ("whisper-at:large", "large-v2", None),
    ("whisper-at:large", "large-v1", None),
    # openai-whisper's (and wat's) "large" is large-v3; whisper-at's large heads are v1/v2
    ("whisper-at:large", "large", r"whisper-at:large \(large-v1 or large-v2\), features from large \(large-v3\)"),
    ("whisper-at:large", "openai/whisper-large-v3", r"features from openai/whisper-large-v3 \(large-v3\)"),
    ("whisper-at:large", "turbo", r"\(large-v3-turbo\)"),
    ("whisper-at:large", "/models/my-finetune", None),        # unknown names: nothing to compare
    ("whisper-at:large", "distil-whisper/distil-large-v3", None),
    ("whisper-at:base", "base.en", None),
    ("whisper-at:base", "openai/whisper-small", r"\(a base model\), features from openai/whisper-small \(a small model\)"),
    ("large-v3", "large", None),
    ("large-v2", "openai/whisper-large-v2", None),
])
def test_release_names_without_fingerprints(head_model, feats_model, problem):
    """Without fingerprints on both sides (official heads have none) the release names decide."""
    info = HeadInfo("tl-tr", 32, 1280, 527, model=head_model)
    problems = [p for p in head_problems(info, Features(32, 1280, feats_model, "", "pad30"))
                if p.startswith("Whisper weights")]
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and re.search(problem, problems[0]), problems
    # fingerprints, when both sides have one, decide alone
    same = Features(32, 1280, feats_model, "ab" * 32, "pad30")
    assert head_problems(HeadInfo("tl-tr", 32, 1280, 527, model=head_model, fingerprint="ab" * 32), same) == []


def _bad_info(info: dict, state: dict):
    return [
        ("vocab not JSON", {**info, "vocab_json": "{not json"}, state),
        ("vocab of numbers", {**info, "vocab_json": '{"keys": [1, 2], "names": [1, 2]}'}, state),
        ("vocab too long", {**info, "vocab_json": '{"keys": ["a"] , "names": ["a", "b"]}'}, state),
        ("vocab without keys", {**info, "vocab_json": '{"names": []}'}, state),
        ("info missing", None, state),
        ("info a list", [1, 2], state),
        ("n_layers missing", {k: v for k, v in info.items() if k != "n_layers"}, state),
        ("n_layers a string", {**info, "n_layers": "3"}, state),
        ("n_classes zero", {**info, "n_classes": 0}, state),
        ("kind unknown", {**info, "kind": "resnet"}, state),
        ("kind a number", {**info, "kind": 7}, state),
        ("multilabel an int", {**info, "multilabel": 1}, state),
        ("proj_dim not a multiple", {**info, "proj_dim": 7}, state),
        ("thresholds too few", {**info, "thresholds": [0.5]}, state),
        ("state a list", info, [torch.zeros(1)]),
        ("state of strings", info, {"a": "b"}),
        ("state missing", info, None),
    ]


_INFO = HeadInfo("tl-tr", 3, 16, 5, 8, 4, '{"keys": [], "names": []}').to_dict()


@pytest.mark.parametrize("case", range(17))
def test_malformed_head_file_is_a_head_error(tmp_path, case):
    # a head file is user input: every malformed one is one HeadError (wat-eval and wat-tag print it
    # as one error line), never a KeyError/TypeError traceback
    state = build_head("tl-tr", 3, 16, 5, 8).state_dict()
    what, info, sd = _bad_info(_INFO, state)[case]
    obj = {"format": "wat-head", "version": 1, "state_dict": sd}
    if info is not None:
        obj["info"] = info
    torch.save(obj, tmp_path / "h.pt")
    with pytest.raises(HeadError):
        load_head(tmp_path / "h.pt")


def test_list_instead_of_a_checkpoint(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "h.pt")
    with pytest.raises(HeadError, match="not a head checkpoint"):
        load_head(tmp_path / "h.pt")
    torch.save({"layer_tr.attn.query.weight": [1], "mlp_layer.1.weight": 2}, tmp_path / "o.pt")
    with pytest.raises(HeadError, match="named tensors"):
        load_head(tmp_path / "o.pt")


def test_heads_trained_on_sample_padded_pad30_are_told_apart(tmp_path):
    """A head saved before pad30 followed transcribe (no pad30_padding in its info) was trained on
    sample-padded features: it fits those caches, not the log-mel padded ones (nor transcription)."""
    head = build_head("wa-mlp", 4, 384, 3)
    info = HeadInfo("wa-mlp", 4, 384, 3, model="tiny.en", fingerprint="ab" * 32)
    old = {k: v for k, v in info.to_dict().items() if k != "pad30_padding"}
    torch.save({"format": "wat-head", "version": 1, "info": old, "state_dict": head.state_dict()}, tmp_path / "old.pt")
    _, loaded = load_head(tmp_path / "old.pt")
    assert loaded.pad30_padding == "samples" and info.pad30_padding == "mel"
    new_feats = Features(4, 384, "tiny.en", "ab" * 32, "pad30")
    old_feats = Features(4, 384, "tiny.en", "ab" * 32, "pad30", pad30_padding="samples")
    assert head_problems(loaded, old_feats) == [] and head_problems(info, new_feats) == []
    bad, = head_problems(loaded, new_feats)
    assert bad.startswith("input policy: head pad30 with samples padding, features pad30 with mel padding")
    assert "re-extract" in bad
    assert head_problems(info, old_feats) != []
    trim = HeadInfo("wa-mlp", 4, 384, 3, policy="trim")
    assert trim.pad30_padding == "" and head_problems(trim, Features(4, 384, "", "", "trim")) == []
    with pytest.raises(HeadError, match="pad30_padding"):
        HeadInfo.from_dict({**info.to_dict(), "pad30_padding": "wav"})


@pytest.mark.parametrize("kind,proj_dim", [("tl-tr", 7), ("wa-mlp", 64)])
def test_bad_proj_dim_in_a_head_file_names_the_file_not_the_option(tmp_path, kind, proj_dim):
    """The message used to say `--proj-dim must be ...`, an option the user of wat-eval/wat-tag never gave."""
    state = build_head("tl-tr", 3, 16, 5, 8).state_dict()
    torch.save({"format": "wat-head", "version": 1, "state_dict": state,
                "info": {**_INFO, "kind": kind, "proj_dim": proj_dim}}, tmp_path / "h.pt")
    with pytest.raises(HeadError) as e:
        load_head(tmp_path / "h.pt")
    assert str(e.value).startswith(f"{tmp_path / 'h.pt'}: head info proj_dim {proj_dim}: ") and "--proj-dim" not in str(e.value)
    with pytest.raises(HeadError, match="--proj-dim 12: "):  # the option keeps its own name
        build_head("tl-tr", 3, 16, 5, 12)

"""The head checkpoint format: `HeadInfo` (what a head is and what it was trained on), `save_head`
and `load_head` (ours, and the official Whisper-AT `at_model.*` state dicts)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn

from ..cache import PAD30_PADDING, PAD30_PADDINGS
from ..spec import WHISPER, FeatureSpec, Policy, padding_of
from ..files import load_torch_dict, save_torch
from ..labels import Vocabulary
from .kinds import HeadError, build_head


# encoder width -> (layers, size name): official heads carry no per-layer parameter, so an
# official checkpoint's layer count is known only through its width
WHISPER_WIDTHS = {384: (4, "tiny"), 512: (6, "base"), 768: (12, "small"), 1024: (24, "medium"), 1280: (32, "large")}
FORMAT = "wat-head"


@dataclass
class HeadInfo:
    """Everything needed to rebuild a head and to check it is fed the features it was trained on."""

    kind: str
    n_layers: int
    dim_in: int
    n_classes: int
    proj_dim: int | None = None  # projection width of WA-Tr / TL-Tr heads (None: the encoder width dim_in)
    n_frames: int = 25
    vocab_json: str = ""        # wat.data.labels.Vocabulary.to_json() of the head's outputs
    model: str = ""             # Whisper model the cache came from, e.g. "tiny.en"
    fingerprint: str = ""       # that model's encoder-weights fingerprint ("" = unknown)
    policy: str = "pad30"       # input policy of the features ("pad30" | "trim")
    multilabel: bool = True     # sigmoid outputs (True) or softmax over classes (False)
    primary_classes: int | None = None  # --parent-labels: the first N outputs are the real vocabulary
    thresholds: list[float] | None = None  # optional per-class decision thresholds (set by eval)
    layers: list[int] | None = None  # encoder block of each input layer (a --layers cache); None = 0..n_layers-1
    pad30_padding: str = PAD30_PADDING  # pad30 features: "mel" (transcribe's window) | "samples" (a cache of
                                        # schema <= 3; head files without the field); "" for trim
    encoder: str = WHISPER      # encoder family of the features (head files without the field: Whisper)

    def __post_init__(self):
        self.pad30_padding = padding_of(self.policy, self.pad30_padding)

    @property
    def blocks(self) -> tuple[int, ...]:
        """The encoder blocks the head reads, in its input order."""
        return tuple(self.layers) if self.layers is not None else tuple(range(self.n_layers))

    @property
    def spec(self) -> FeatureSpec:
        """The features the head was trained on (`n_frames` None: a head that reads the time mean
        takes any frame count). The one rule: `spec.incompatibilities(features, head=True)`."""
        from .kinds import head_field

        return FeatureSpec(encoder=self.encoder, model=self.model, fingerprint=self.fingerprint,
                           policy=Policy.of(self.policy, self.pad30_padding), n_layers=self.n_layers,
                           layers=self.blocks, dim=self.dim_in,
                           n_frames=self.n_frames if head_field(self.kind) == "features" else None,
                           pooling=f"mean:{self.n_frames}", sample_rate=16000)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.encoder == WHISPER:  # absent: Whisper (head files stay byte-identical)
            del d["encoder"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadInfo":
        """The info of a saved head; a missing, wrongly-typed or inconsistent field is a HeadError
        (a head file is user input: it must never become a traceback or a silently wrong head)."""
        if not isinstance(d, dict):
            raise HeadError(f"head info is a {type(d).__name__}, not a dict")
        if "dim" in d and "proj_dim" not in d:  # checkpoints written before the rename
            d = {**d, "proj_dim": d["dim"]}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise HeadError(f"head info lacks {', '.join(missing)}")
        # a head saved before the field existed was trained on sample-padded pad30 features
        info = cls(**{k: v for k, v in {**d, "pad30_padding": d.get("pad30_padding", "")}.items() if k in _INFO_TYPES})
        for k, want in _INFO_TYPES.items():
            v = getattr(info, k)
            if not (isinstance(v, want) and not (isinstance(v, bool) and bool not in want)):
                raise HeadError(f"head info {k} = {v!r} is not {' or '.join(t.__name__ for t in want)}")
        if info.policy == "pad30" and info.pad30_padding not in PAD30_PADDINGS:
            raise HeadError(f"head info: pad30_padding {info.pad30_padding!r} is not one of {', '.join(PAD30_PADDINGS)}")
        try:
            Policy.of(info.policy, info.pad30_padding)
        except ValueError as e:
            raise HeadError(f"head info: {e}") from None
        if min(info.n_layers, info.dim_in, info.n_classes, info.n_frames) < 1:
            raise HeadError("head info: n_layers, dim_in, n_classes and n_frames must be at least 1")
        if info.thresholds is not None and (len(info.thresholds) != info.n_classes
                                            or not all(isinstance(t, (int, float)) for t in info.thresholds)):
            raise HeadError(f"head info: thresholds must be {info.n_classes} numbers")
        if info.layers is not None and (
                len(info.layers) != info.n_layers or not all(type(b) is int and b >= 0 for b in info.layers)
                or any(b <= a for a, b in zip(info.layers, info.layers[1:]))):
            raise HeadError(f"head info: layers must be {info.n_layers} increasing encoder blocks >= 0")
        if info.vocab_json:
            try:
                vocab = Vocabulary.from_json(info.vocab_json)
            except (ValueError, KeyError, TypeError) as e:
                raise HeadError(f"head info: unreadable vocabulary ({type(e).__name__}: {e})") from None
            if not all(isinstance(t, str) for t in vocab.keys + vocab.names):
                raise HeadError("head info: the vocabulary's keys and names must be strings")
            if len(vocab.keys) != len(vocab.names) or len(vocab.keys) > info.n_classes:
                raise HeadError(f"head info: a vocabulary of {len(vocab.keys)} keys and {len(vocab.names)} names "
                                f"does not fit {info.n_classes} outputs")
        return info


# the type each HeadInfo field must have in a loaded file (bool is refused where an int is meant)
_INFO_TYPES = {"kind": (str,), "n_layers": (int,), "dim_in": (int,), "n_classes": (int,),
               "proj_dim": (int, type(None)), "n_frames": (int,), "vocab_json": (str,), "model": (str,),
               "fingerprint": (str,), "policy": (str,), "multilabel": (bool,),
               "primary_classes": (int, type(None)), "thresholds": (list, type(None)),
               "layers": (list, type(None)), "pad30_padding": (str,), "encoder": (str,)}


def head_from_info(info: HeadInfo) -> nn.Module:
    return build_head(info.kind, info.n_layers, info.dim_in, info.n_classes, info.proj_dim, what="head info proj_dim")


def save_head(path, head: nn.Module, info: HeadInfo) -> None:
    """Atomic, durable write of `{format, info (plain dict), state_dict}`; loads with weights_only=True."""
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    save_torch(path, {"format": FORMAT, "version": 1, "info": info.to_dict(), "state_dict": state})


def official_to_state_dict(state: dict) -> dict:
    """Official Whisper-AT names -> ours: drop `at_model.` (inference package) or `module.`
    (DataParallel training checkpoints); the submodule names are identical."""
    out = {}
    for k, v in state.items():
        for prefix in ("at_model.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


def _official_info(state: dict) -> HeadInfo:
    if "layer_tr.attn.query.weight" not in state or "mlp_layer.1.weight" not in state:
        raise HeadError("not a wat head nor an official Whisper-AT TL-Tr head "
                        "(expected at_model.time_tr/layer_tr/mlp_layer keys)")
    n_classes, width = state["mlp_layer.1.weight"].shape
    if "down_layer.1.weight" in state:
        proj_dim, dim_in = state["down_layer.1.weight"].shape
    else:
        proj_dim, dim_in = None, width
    if dim_in not in WHISPER_WIDTHS:
        raise HeadError(f"official head with width {dim_in} matches no Whisper size")
    n_layers, size = WHISPER_WIDTHS[dim_in]
    from ..labels import audioset_vocabulary
    vocab = audioset_vocabulary()
    if n_classes != len(vocab):
        raise HeadError(f"official head has {n_classes} outputs, expected the {len(vocab)} AudioSet classes")
    return HeadInfo("tl-tr", n_layers, dim_in, n_classes, proj_dim, 25, vocab.to_json(),
                    model=f"whisper-at:{size}", fingerprint="", policy="pad30", multilabel=True,
                    pad30_padding=PAD30_PADDING)  # trained on whisper-at's transcribe windows: log-mel padding


def load_head(path, n_layers: int | None = None, map_location="cpu") -> tuple[nn.Module, HeadInfo]:
    """Load one of our heads or an official Whisper-AT head (`at_model.*`, modes `tl_tr_1_8` and
    `tl_down_tr_512_1_8`; logits over the 527 AudioSet classes). `n_layers`: the layer count of
    the features it will see; a different one is a HeadError."""
    obj = load_torch_dict(path, HeadError, "a head checkpoint", map_location)
    try:
        if obj.get("format") == FORMAT:
            info, state = HeadInfo.from_dict(obj.get("info")), obj.get("state_dict")
        else:
            info, state = None, obj
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                  for k, v in state.items()):
            raise HeadError(f"its state_dict is not a dict of named tensors (a {type(state).__name__})")
        if info is None:
            state = official_to_state_dict(state)
            info = _official_info(state)
        head = head_from_info(info)
    except HeadError as e:
        raise HeadError(f"{path}: {e}") from None
    except (ValueError, TypeError, KeyError) as e:  # a field build_head cannot use
        raise HeadError(f"{path}: head info does not describe a buildable head ({e})") from None
    if n_layers is not None and n_layers != info.n_layers:
        raise HeadError(f"{path}: head expects {info.n_layers}-layer features "
                        f"(width {info.dim_in}), the features have {n_layers} layers")
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HeadError(f"{path}: weights do not fit a {info.kind} head: {e}") from None
    return head.eval(), info

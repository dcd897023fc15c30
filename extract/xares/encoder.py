"""An X-ARES encoder (xares 0.1.3) for any wat encoder and layer choice.

X-ARES's contract (`xares.audio_encoder_checker.check_audio_encoder`): an `nn.Module` whose class
name ends in "Encoder", with `sampling_rate`, `output_dim` and `hop_size_in_ms`, and
`forward(audio [B, T]) -> [B, T', output_dim]`. X-ARES batches clips of different lengths by padding
them with zero samples at the end (`collate_with_lengths_wds`), keeps every frame the encoder returns
and later averages a clip's stored frames (`masked_mean` over the whole stored row).

What this adapter does about that, where X-ARES's own Whisper example does otherwise:
- the encoder's true hop: `hop_size_in_ms` = 1000 / frame_rate (Whisper: 20 ms encoder frames);
- its native frames (`Encoder.all_frames`): Whisper under pad30 keeps only the frames of the clip
  inside the 30 s window `whisper.transcribe` encodes (never the padding), audio over 30 s is encoded
  window by window;
- no pooling over padding: a row's trailing zero samples are taken as X-ARES's batch padding, the
  clip before them is encoded alone, and the frames of the output beyond the clip's own carry the
  clip's mean frame, so any mean over the stored row is the mean over the clip's frames (a clip
  whose audio really ends in digital silence loses that silence; `strip_padding=False` keeps it);
- batching as wat's extractor: clips of equal length are encoded together, in batches of
  `batch_size`, a clip's result never depends on its batch mates.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..encoders.base import encoder_class as encoder_class_of
from ..encoders.base import equal_length_groups, family_of, load_encoder
from .layers import LayerChoice, layer_name, output_dim, reduce_layers, resolve_layer


class XaresEncoder(torch.nn.Module):
    """X-ARES encoder over a wat encoder (`load_encoder(model)`): the output of one block, the mean
    over every block, or every block concatenated along features (`layer`)."""

    def __init__(self, model: str = "base", layer: LayerChoice = -1, policy: str | None = None, *,
                 device: str | None = None, batch_size: int = 16, strip_padding: bool = True):
        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")   # what XaresTask picks too
        self.encoder = load_encoder(model, device)
        if isinstance(getattr(self.encoder, "model", None), torch.nn.Module):
            self.net = self.encoder.model        # a submodule: X-ARES's `.to(device)` moves the weights
        self.policy = self.encoder.policy_for(policy)
        self.layer = layer
        self.blocks = resolve_layer(layer, self.encoder.n_layers)   # encoder blocks read
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.strip_padding = batch_size, strip_padding
        self.sampling_rate = self.encoder.sample_rate
        self.output_dim = output_dim(layer, len(self.blocks), self.encoder.dim)
        self.hop_size_in_ms = 1000.0 / self.encoder.frame_rate

    def clip_lengths(self, audio: torch.Tensor) -> list[int]:
        """Samples of each row before its trailing zeros (X-ARES's padding); a row of zeros keeps its
        length, and no clip is cut below the encoder's shortest clip."""
        n = audio.shape[-1]
        if not self.strip_padding:
            return [n] * len(audio)
        nonzero = audio != 0
        last = n - torch.flip(nonzero, dims=[1]).int().argmax(dim=1)        # one past the last non-zero
        last = torch.where(nonzero.any(dim=1), last, torch.full_like(last, n))
        floor = min(n, self.encoder.min_samples(self.policy))
        return [max(int(v), floor) for v in last.tolist()]

    @torch.inference_mode()
    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        audio = torch.as_tensor(audio).float()
        if audio.ndim == 1:
            audio = audio[None]
        frames = self.encoder.native_frames(audio.shape[-1], self.policy)
        lengths = self.clip_lengths(audio)
        out = None
        for group in equal_length_groups(lengths):
            for a in range(0, len(group), self.batch_size):
                rows = group[a:a + self.batch_size]
                clips = audio[rows, :lengths[rows[0]]].to(self.encoder.device)
                x = self.encoder.all_frames(clips, policy=self.policy, layers=self.blocks)  # [b, L, t, D]
                x = reduce_layers(x, self.layer)                                           # [b, t, D']
                if out is None:
                    out = torch.empty((len(audio), frames, x.shape[-1]), dtype=torch.float32, device=x.device)
                t = min(x.shape[1], frames)
                out[rows, :t] = x[:, :t]
                if t < frames:   # beyond the clip: its mean frame, so a mean over the row is the clip's
                    out[rows, t:] = x.mean(dim=1, keepdim=True)
        return out


def class_name(model: str, layer: LayerChoice, policy: str | None) -> str:
    """The class (and X-ARES embedding folder) name of an encoder choice, e.g.
    `WatBaseL5Pad30Encoder`, `WatOpenaiWhisperLargeV3LayerMeanTrimEncoder`."""
    model = str(model).rstrip("/")
    if policy is None:   # the encoder's default, by name: an export names a cache by the policy it recorded
        policy = encoder_class_of(family_of(model)).policies[0]
    words = re.split(r"[^A-Za-z0-9]+", Path(model).name if Path(model).exists() else model)   # a folder: its name
    camel = "".join(w[:1].upper() + w[1:] for w in words if w)
    return f"Wat{camel}{layer_name(layer)}{policy.capitalize()}Encoder"


def encoder_class(model: str = "base", layer: LayerChoice = -1, policy: str | None = None, *,
                  name: str | None = None, **options) -> type[XaresEncoder]:
    """An `XaresEncoder` subclass that X-ARES can build without arguments (`xares.run` calls the
    one class of an encoder file whose name ends in "Encoder"), bound to this choice:

        # whisper_base_l5_encoder.py, run as: python -m xares.run whisper_base_l5_encoder.py src/tasks/esc50_task.py
        from wat.extract import xares
        WatBaseL5Pad30Encoder = xares.encoder_class("base", layer=5, policy="pad30")

    `name` (default `class_name(...)`) is also the folder X-ARES keeps its embeddings and scores in;
    `options`: device, batch_size, strip_padding."""
    name = name or class_name(model, layer, policy)
    if not name.isidentifier() or not name.endswith("Encoder"):
        raise ValueError(f"an X-ARES encoder class name is an identifier ending in 'Encoder', not {name!r}")

    def __init__(self):
        XaresEncoder.__init__(self, model, layer, policy, **options)

    return type(name, (XaresEncoder,), {"__init__": __init__, "__doc__": f"X-ARES encoder: {model}, layer "
                                        f"{layer!r}, policy {policy or 'default'} (wat.extract.xares)."})

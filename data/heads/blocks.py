"""Whisper's residual attention block, without whisper: a small copy of openai-whisper's
`ResidualAttentionBlock` (pre-LN attention + 4x GELU MLP) with the same parameter names and the
same arithmetic: importing `whisper.model` would pull whisper's transcription, numba and tiktoken
into every training and evaluation process."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class _LayerNorm(nn.LayerNorm):
    # whisper.model.LayerNorm: normalise in fp32, return the input dtype
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class _Linear(nn.Linear):
    # whisper.model.Linear: weights cast to the input dtype
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class _SelfAttention(nn.Module):
    """whisper.model.MultiHeadAttention without the cross-attention, mask and kv-cache paths."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = _Linear(n_state, n_state)
        self.key = _Linear(n_state, n_state, bias=False)
        self.value = _Linear(n_state, n_state)
        self.out = _Linear(n_state, n_state)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (t.view(*t.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
                   for t in (self.query(x), self.key(x), self.value(x)))
        a = F.scaled_dot_product_attention(q, k, v)
        return self.out(a.permute(0, 2, 1, 3).flatten(start_dim=2))


class ResidualAttentionBlock(nn.Module):
    """whisper.model.ResidualAttentionBlock (encoder form): same parameter names, same numerics."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = _SelfAttention(n_state, n_head)
        self.attn_ln = _LayerNorm(n_state)
        self.mlp = nn.Sequential(_Linear(n_state, 4 * n_state), nn.GELU(), _Linear(4 * n_state, n_state))
        self.mlp_ln = _LayerNorm(n_state)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))

"""Causal self-attention with rotary positions, and its decoding cache.

Attention variants of the architecture lab (SSA, CAT, ...) are subclasses of
`CausalSelfAttention` registered in `ATTENTION_VARIANTS`; a recipe picks one by
name and passes its `options`. A variant usually overrides one hook:
- `qkv(x, positions, state)`: queries, keys and values from the layer input
  (per-token/per-position scaling, convolutions over the input, ...). Inputs at
  padding positions are zero, so a causal convolution over a left-padded row
  sees what an unpadded row would see after zero-padding;
- `attend(q, k, v, attn_mask)`: scores, scale and softmax;
- `new_state(...)`: extra per-row decoding state next to "k" and "v" (e.g. the
  last kernel-1 inputs of a convolution), stored batch-first so the sampler can
  copy and drop rows without knowing what it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from thinkling.errors import ThinklingError


def rope_table(max_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[max_len, head_dim/2]` of the rotary angles pos / base^(2i/d)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[i], x[i + d/2]) of `x [B, H, T, d]` by the angles of `cos, sin [B, 1, T, d/2]`."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


@dataclass
class KVCache:
    """Preallocated attention state for incremental decoding.

    `layers[i]` is layer i's state (at least "k" and "v" `[B, H, capacity, d]`);
    `mask [B, capacity]` is True on slots that hold a real token; `length` slots
    are filled, the same number for every row (rows are left-padded instead).
    """

    layers: list[dict[str, torch.Tensor]]
    mask: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache of the given rows (repeat a row to share a prefix, omit it to drop it)."""
        layers = [{name: t.index_select(0, rows) for name, t in layer.items()} for layer in self.layers]
        return KVCache(layers, self.mask.index_select(0, rows), self.length)


class CausalSelfAttention(nn.Module):
    """Multi-head causal softmax attention with RoPE on queries and keys."""

    options: ClassVar[dict[str, Any]] = {}  # option name -> default, for variants that take options

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def new_state(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        shape = (batch, self.n_heads, capacity, self.head_dim)
        return {"k": torch.zeros(shape, dtype=dtype, device=device), "v": torch.zeros(shape, dtype=dtype, device=device)}

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, ...]:
        """q, k, v `[B, T, d_model]` for inputs `x [B, T, d_model]` at `positions [B, T]`."""
        return self.qkv_proj(x).chunk(3, dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention output `[B, H, T, d]`; a None mask means plain causal (or all keys for one query)."""
        causal = attn_mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None,
        state: dict[str, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Attend from the T inputs `x` to themselves and, with `state`, to the `start` cached slots before them.

        `attn_mask [B, 1, T, start+T]` (True = may attend) is None only when every
        key is a real token and the plain causal mask is right (start == 0 or T == 1).
        """
        B, T, D = x.shape
        q, k, v = (t.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in self.qkv(x, positions, state))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if state is not None:
            state["k"][:, :, start : start + T] = k
            state["v"][:, :, start : start + T] = v
            k, v = state["k"][:, :, : start + T], state["v"][:, :, : start + T]
        y = self.attend(q, k, v, attn_mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


ATTENTION_VARIANTS: dict[str, type[CausalSelfAttention]] = {"standard": CausalSelfAttention}


def check_attention(name: str, options: dict) -> type[CausalSelfAttention]:
    """The variant class for `name`, after checking that it takes every key of `options`."""
    if name not in ATTENTION_VARIANTS:
        raise ThinklingError(f"attention: unknown variant {name!r} (known: {', '.join(sorted(ATTENTION_VARIANTS))})")
    cls = ATTENTION_VARIANTS[name]
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ThinklingError(
            f"attention_options: unknown key {unknown[0]!r} for attention {name!r} "
            f"(known: {', '.join(sorted(cls.options)) or 'none'})"
        )
    return cls


def build_attention(name: str, options: dict, d_model: int, n_heads: int) -> CausalSelfAttention:
    cls = check_attention(name, options)
    return cls(d_model, n_heads, **{**cls.options, **options})

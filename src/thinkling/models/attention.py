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

Decoding G rows from one prompt reads the prompt's keys once for all of them
(`SharedPrefix`), scoring them as `attend` does; a variant that overrides
`attend` decodes from copies of the prompt's slots instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar

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


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of one query per row `q [B, H, 1, d]` as two batched matmuls.

    What SDPA computes, to float rounding (~1e-7 here). Why: SDPA's CPU kernel has a fixed cost
    per (row, head) that at small head sizes and one query exceeds the products themselves; a
    decode step of the tiny model spent half its time there.
    """
    return torch.matmul(_attention_weights(torch.matmul(q, k.transpose(-1, -2)), q.shape[-1], attn_mask), v)


def _attention_weights(scores: torch.Tensor, head_dim: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(scores / √d) over the keys `attn_mask` allows (all when None); scales `scores` in place."""
    scores.mul_(head_dim**-0.5)
    if attn_mask is not None:
        scores.masked_fill_(~attn_mask, float("-inf"))
    return scores.softmax(dim=-1)


@dataclass
class SharedPrefix:
    """Keys and values of prompts that several cache rows continue, held once per prompt.

    `layers[i]` = layer i's (k, v) `[U, H, P, d]` for U distinct prompts, `mask [U, P]` their
    real slots; row b continues prompt `owner[b]`. Why: the G rollouts of a prompt attend to
    the same prompt keys; read once for all G queries, their memory traffic (most of a tiny
    model's decode step) falls G-fold.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    owner: torch.Tensor

    def __post_init__(self):
        # Row b is query `place[b]` of the prompts' [U, width] block of queries.
        same = self.owner[:, None] == self.owner[None, :]
        slot = torch.tril(same, diagonal=-1).sum(dim=1)  # earlier rows of the same prompt
        self.width = int(slot.max()) + 1 if len(slot) else 1
        self.place = self.owner * self.width + slot
        self.row_mask = self.mask.index_select(0, self.owner)  # [B, P]: each row's real prompt slots
        self.dense = len(self.mask) * self.width == len(self.owner) and bool(
            (self.place == torch.arange(len(self.owner), device=self.owner.device)).all())

    def select(self, rows: torch.Tensor) -> SharedPrefix:
        return SharedPrefix(self.layers, self.mask, self.owner.index_select(0, rows))

    def layer(self, i: int) -> Callable:
        """Layer i's `attention(q, k, v, attn_mask)`."""
        return partial(self.attention, i)

    def _group(self, x: torch.Tensor) -> torch.Tensor:
        """Rows `[B, H, n]` -> the prompts' query blocks `[U, H, width, n]` (zeros where no row)."""
        if not self.dense:
            x = x.new_zeros(len(self.mask) * self.width, *x.shape[1:]).index_copy_(0, self.place, x)
        return x.view(len(self.mask), self.width, *x.shape[1:]).transpose(1, 2)

    def _ungroup(self, x: torch.Tensor) -> torch.Tensor:
        """`_group`'s inverse: `[U, H, width, n]` -> `[B, H, n]`."""
        x = x.transpose(1, 2).reshape(-1, *x.shape[1:2], x.shape[-1])
        return x if self.dense else x.index_select(0, self.place)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attn_mask: torch.Tensor | None) -> torch.Tensor:
        """`decode_attention` of `q [B, H, 1, d]` over this prefix followed by the rows' own keys
        `k, v [B, H, L, d]`; `attn_mask [B, 1, 1, P + L]`. One softmax over all keys."""
        pk, pv = self.layers[layer]
        shared = self._ungroup(torch.matmul(self._group(q[:, :, 0]), pk.transpose(-1, -2)))
        scores = torch.cat((shared[:, :, None], torch.matmul(q, k.transpose(-1, -2))), dim=-1)
        p_shared, p_own = _attention_weights(scores, q.shape[-1], attn_mask).split((pk.shape[2], k.shape[2]), dim=-1)
        out = self._ungroup(torch.matmul(self._group(p_shared[:, :, 0]), pv))
        return torch.matmul(p_own, v).add_(out[:, :, None])


@dataclass
class KVCache:
    """Preallocated attention state for incremental decoding.

    `layers[i]` is layer i's state (at least "k" and "v" `[B, H, capacity, d]`);
    `mask [B, capacity]` is True on slots that hold a real token; `length` slots
    are filled, the same number for every row (rows are left-padded instead).
    With `prefix`, every row's slots continue its shared prompt (`SharedPrefix`).
    """

    layers: list[dict[str, torch.Tensor]]
    mask: torch.Tensor
    length: int = 0
    prefix: SharedPrefix | None = None

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache of the given rows (repeat a row to share a prefix, omit it to drop it)."""
        layers = [{name: t.index_select(0, rows) for name, t in layer.items()} for layer in self.layers]
        prefix = None if self.prefix is None else self.prefix.select(rows)
        return KVCache(layers, self.mask.index_select(0, rows), self.length, prefix)

    def branch(self, rows: torch.Tensor, capacity: int) -> KVCache:
        """A cache of `rows` continuing this one's filled slots, which become their shared prefix
        (held once), with `capacity` slots of their own. For caches without a prefix."""
        shared = SharedPrefix([(layer["k"][:, :, : self.length], layer["v"][:, :, : self.length])
                               for layer in self.layers], self.mask[:, : self.length], rows)
        layers = []
        for layer in self.layers:
            own = {name: t.index_select(0, rows) for name, t in layer.items() if name not in ("k", "v")}
            for name in ("k", "v"):
                t = layer[name]
                own[name] = t.new_zeros(len(rows), t.shape[1], capacity, t.shape[3])
            layers.append(own)
        return KVCache(layers, self.mask.new_zeros(len(rows), capacity), 0, shared)


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
        return {name: torch.zeros(shape, dtype=dtype, device=device) for name in ("k", "v")}

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, ...]:
        """q, k, v `[B, T, d_model]` for inputs `x [B, T, d_model]` at `positions [B, T]`."""
        return self.qkv_proj(x).chunk(3, dim=-1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention output `[B, H, T, d]`; a None mask means plain causal (or all keys for one query)."""
        if q.shape[2] == 1 and q.device.type == "cpu":
            return decode_attention(q, k, v, attn_mask)
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
        shared: Callable | None = None,
    ) -> torch.Tensor:
        """Attend from the T inputs `x` to themselves and, with `state`, to the `start` cached slots before them.

        `attn_mask [B, 1, T, start+T]` (True = may attend) is None only when every
        key is a real token and the plain causal mask is right (start == 0 or T == 1).
        `shared` (a `SharedPrefix.layer`, one query per row): the cached slots continue a shared
        prompt's, which come first in `attn_mask`.
        """
        B, T, D = x.shape
        q, k, v = (t.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in self.qkv(x, positions, state))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if state is not None:
            state["k"][:, :, start : start + T] = k
            state["v"][:, :, start : start + T] = v
            k, v = state["k"][:, :, : start + T], state["v"][:, :, : start + T]
        y = self.attend(q, k, v, attn_mask) if shared is None else shared(q, k, v, attn_mask)
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


def _check_flags(variant: str, **flags) -> None:
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ThinklingError(f"attention_options {key!r}: must be true or false for attention {variant!r} (got {value!r})")


class SelectiveSelfAttention(CausalSelfAttention):
    """SSA (arXiv 2411.12892): per-token, per-position temperatures on queries and values.

    `Attn = softmax((τ_q ⊙ Q)Kᵀ/√d)·(τ_v ⊙ V)` per head, with
    `τ_q = tanh(u_qᵀ q) + 1 + σ(α)·ln i` and `τ_v = 1 + tanh(u_vᵀ v)`. The token
    part reads the head's own query (value) vector, so it shares the projection
    with the attention weights and costs one head_dim vector per head: 2·d_model
    + n_heads parameters per layer. The position part (queries only) sharpens
    attention as the number of keys grows, countering the ln i dilution of the
    softmax. `u` starts at zero and `α` low, so training starts from (almost)
    standard attention; these parameters carry `lr_scale` for their own
    learning rate, as in the reference code.
    """

    options: ClassVar[dict[str, Any]] = {"query": True, "value": True, "position": True, "lr_scale": 10.0}
    POSITION_INIT = -4.0  # σ(-4) ≈ 0.018: τ_pos ≈ 1.08 at i = 100

    def __init__(self, d_model: int, n_heads: int, query: bool, value: bool, position: bool, lr_scale: float):
        super().__init__(d_model, n_heads)
        _check_flags("ssa", query=query, value=value, position=position)
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or lr_scale <= 0:
            raise ThinklingError(f"attention_options 'lr_scale': must be a number > 0 for attention 'ssa' (got {lr_scale!r})")
        zeros = lambda: nn.Parameter(torch.zeros(n_heads, self.head_dim))
        self.query_temp = zeros() if query else None
        self.value_temp = zeros() if value else None
        self.position_temp = nn.Parameter(torch.full((n_heads,), self.POSITION_INIT)) if position else None
        for p in self.parameters(recurse=False):
            p.lr_scale = float(lr_scale)

    def qkv(self, x, positions, state):
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim) for t in super().qkv(x, positions, state))
        tau_q = torch.ones(B, T, self.n_heads, dtype=x.dtype, device=x.device)
        if self.query_temp is not None:
            tau_q = tau_q + torch.tanh((q * self.query_temp).sum(-1))
        if self.position_temp is not None:
            log_i = torch.log1p(positions.to(x.dtype))[..., None]  # positions are 0-based: ln i with i = pos + 1
            tau_q = tau_q + torch.sigmoid(self.position_temp) * log_i
        q = q * tau_q[..., None]
        if self.value_temp is not None:
            v = v * (1 + torch.tanh((v * self.value_temp).sum(-1)))[..., None]
        return q.flatten(2), k.flatten(2), v.flatten(2)


class ConvolutionAugmentedAttention(CausalSelfAttention):
    """CAT (arXiv 2407.05591): causal depthwise 1-D convolutions on the Q, K, V inputs.

    `Q = (X ∗ F_q)W_q`, `K = (X ∗ F_k)W_k`, `V = (X ∗ F_v)W_v`, each `F` a
    `kernel_size`-tap filter per channel over the current and previous inputs,
    then causal softmax attention. A key that mixes in the previous token lets
    one layer match "the token after the query" (associative recall, copying),
    which plain attention needs two layers for. Filters start as running sums
    (every tap 1) so each lag gets gradient from the first step; identity
    filters (standard attention) learned the useful lags far more slowly on
    recall. `rope: false` leaves order to the convolutions, which helps length
    generalisation. Decoding keeps the last kernel_size-1 inputs in the layer
    state ("conv") so the cache path sees the same windows.
    """

    options: ClassVar[dict[str, Any]] = {"kernel_size": 4, "query": True, "key": True, "value": True, "rope": True}
    PROJECTIONS = ("query", "key", "value")

    def __init__(self, d_model: int, n_heads: int, kernel_size: int, query: bool, key: bool, value: bool, rope: bool):
        super().__init__(d_model, n_heads)
        _check_flags("cat", query=query, key=key, value=value, rope=rope)
        self.rope = rope
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ThinklingError(f"attention_options 'kernel_size': must be an integer >= 1 for attention 'cat' (got {kernel_size!r})")
        self.kernel_size = kernel_size
        enabled = dict(zip(self.PROJECTIONS, (query, key, value)))
        self.filters = nn.ParameterDict(  # [d_model, kernel]; the last tap multiplies the current input
            {n: nn.Parameter(torch.ones(d_model, kernel_size)) for n in self.PROJECTIONS if enabled[n]}
        )

    def forward(self, x, rope, positions, attn_mask, state=None, start=0, shared=None):
        if not self.rope:  # angle 0 everywhere: the convolutions are the only source of order
            rope = (torch.ones_like(rope[0]), torch.zeros_like(rope[1]))
        return super().forward(x, rope, positions, attn_mask, state, start, shared)

    def new_state(self, batch, capacity, dtype, device):
        state = super().new_state(batch, capacity, dtype, device)
        width = self.qkv_proj.in_features
        state["conv"] = torch.zeros(batch, self.kernel_size - 1, width, dtype=dtype, device=device)
        return state

    def qkv(self, x, positions, state):
        B, _, D = x.shape
        past = state["conv"] if state is not None else x.new_zeros(B, self.kernel_size - 1, D)
        window = torch.cat((past, x), dim=1)  # [B, kernel-1+T, D]
        if state is not None:
            state["conv"] = window[:, window.shape[1] - (self.kernel_size - 1) :]
        out = []
        for name, w in zip(self.PROJECTIONS, self.qkv_proj.weight.chunk(3)):
            inp = x
            if name in self.filters:
                kernel = self.filters[name].to(x.dtype)[:, None, :]
                inp = F.conv1d(window.transpose(1, 2), kernel, groups=D).transpose(1, 2)
            out.append(F.linear(inp, w))
        return tuple(out)


ATTENTION_VARIANTS["ssa"] = SelectiveSelfAttention
ATTENTION_VARIANTS["cat"] = ConvolutionAugmentedAttention

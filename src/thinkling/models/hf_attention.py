"""The training forward's attention for Hugging Face models on a CPU in bf16 / fp16.

transformers' "sdpa" path copies each key head for its query heads when a padding mask is
present (every RL update has one), and SDPA's CPU flash kernel is slow backwards at the update's
small shapes: on SmolLM2-135M's update (16 rows x 64 queries x ~100 keys, 9 query heads over 3
key heads) its forward + backward took 1.8-1.9x as long as two batched matmuls and a softmax
(`benchmarks/attention_update.py`). So below a size where the scores fit comfortably in memory,
`attention_forward` computes them explicitly: query heads folded onto their key head (no copies),
scores in float32 as the flash kernel keeps them, probabilities rounded to the value dtype for the
second product as the flash kernel does. Larger problems, float32, other devices and features
it does not cover (dropout, soft-capping, position bias, attention sinks, one query) go to
transformers' own SDPA function unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "thinkling_sdpa"
# Largest batch x heads x queries x keys scored explicitly: the float32 scores and the saved
# probabilities of one layer stay under ~50 MB (backward keeps them for every layer it has not
# reached, unless the layers are checkpointed).
MAX_SCORES = 1 << 22


def explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                       scaling: float) -> torch.Tensor:
    """softmax(q kᵀ · scaling + mask) v for `query [B, H, T, d]`, `key, value [B, KV, S, d]` (H a
    multiple of KV), `mask` bool `[B or 1, 1, T, S]` (True: may attend) or None for causal (the
    queries are the last T of the S positions, so one query sees every key). Returns
    `[B, H, T, d]` in the value dtype. A query with no key allowed gets equal weights (finite, like
    transformers' eager path), not NaN: it is a padding position, which no loss reads.

    The training forward calls it through `attention_forward`; the rollout engine for its decode
    steps (one query per row, float32 keys, bf16 or float32 values) wherever its C twin
    (`cpu_kernels`, 2.4-2.7x faster on a CPU) does not apply. There it is 1.1-1.7x faster in bf16
    than an SDPA call per key head, whose CPU kernel pays a fixed cost per (row, key head), and
    closer to float32 attention (`benchmarks/decode_attention.py`)."""
    B, H, T, d = query.shape
    KV, S = key.shape[1], key.shape[2]
    rep = H // KV
    with torch.autocast(query.device.type, enabled=False):
        q = query.float().reshape(B, KV, rep * T, d)
        scores = torch.matmul(q, key.float().transpose(-1, -2)).view(B, KV, rep, T, S).mul_(scaling)
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T) if T > 1 else None
        else:
            mask = mask[:, :, None]  # [B, 1, 1, T, S]: the same for every head
        if mask is not None:
            scores.masked_fill_(~mask, torch.finfo(torch.float32).min)
        probs = scores.softmax(dim=-1).to(value.dtype).view(B, KV, rep * T, S)
        return torch.matmul(probs, value).view(B, H, T, d)


def _explicit_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      causal: bool, dropout: float, kwargs: dict) -> bool:
    # Under CPU autocast, Llama's rotary embedding hands over float32 queries and keys, bf16 values.
    low = (torch.bfloat16, torch.float16)
    B, H, T, _ = query.shape
    S = key.shape[2]
    if mask is None:
        shape_ok = causal and T == S
    else:
        shape_ok = mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1
    return (shape_ok and query.device.type == "cpu" and (value.dtype in low or torch.is_autocast_enabled("cpu"))
            and dropout == 0.0 and T > 1 and H % key.shape[1] == 0 and B * H * T * S <= MAX_SCORES
            and all(kwargs.get(name) is None for name in ("softcap", "position_bias", "s_aux", "sinks")))


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: `explicit_attention` where it applies, else SDPA."""
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[2]]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not _explicit_applies(query, key, value, attention_mask, causal, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = explicit_attention(query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_for(model: torch.nn.Module) -> None:
    """Switch a model that attends with transformers' SDPA to `attention_forward` (same masks)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)

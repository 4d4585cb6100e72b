"""A fast sampler for Hugging Face Llama-family causal LMs, built for RL rollouts.

`HFPolicy.generate` uses it; `HFPolicy.generate_reference` (transformers'
`generate`) is the reference it is tested against. The decode loop is
`sampling.decode` (shared prompts prefilled once, finished rows dropped, one
sampling call per step); this module is the model side. Why it is faster on a CPU:

- The KV cache is two preallocated tensors `[layers, rows, kv_heads,
  capacity, head_dim]` (keys in float32, values in the engine's dtype): a
  decode step writes one slot in place (no concatenation) and attends over a
  view of the filled slots; no attention mask is built at all when the prompts
  have equal lengths. On a CPU, decode attention is a C kernel (`cpu_kernels`,
  built on first use) that reads the slots straight from the cache; elsewhere,
  or without a C compiler, `hf_attention.explicit_attention`, the same computation.
- The forward pass is written here over the model's own weights (in float32
  the parameters themselves, no copy). With `dtype=torch.bfloat16` the weights
  are cast to bf16 and prepacked for oneDNN, while the residual stream, norms,
  RoPE, logits and sampling stay float32: bf16 matmuls are 3-10x faster than
  fp32 on this AVX-512-bf16 CPU, but the sampled distribution then differs
  slightly from the fp32 policy (docs/performance.md measures how much), so it
  is an opt-in.

Weights are re-read lazily: the bf16 copy (or LoRA-folded weights) is rebuilt
only when a parameter changed (`Tensor._version` moves on every in-place
optimizer step), so repeated `generate` calls between updates (evaluation) pay
nothing. LoRA (peft) layers are folded into the weights, so adapters need no
special path.

Supported: Llama, Mistral, Qwen2 and Qwen3 layouts (`model_type`) without
sliding-window attention. `unsupported_reason(model)` says why another model is
not, and the caller then uses transformers' `generate`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from thinkling.errors import ThinklingError
from thinkling.models.base import Sample, SamplingParams, pad_batch
from thinkling.models.cpu_kernels import decode_attention_kernel
from thinkling.models.hf_attention import explicit_attention
from thinkling.models.sampling import decode

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class Unsupported(Exception):
    """The model's layout is not one the engine reimplements."""


# ------------------------------------------------------------------ weights


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Effective (weight, bias) of a linear layer, folding in active LoRA adapters."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(module, "get_delta_weight"):
        raise Unsupported(f"layer {type(module).__name__} is not a linear or LoRA-linear layer")
    weight, bias = _linear(base)
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return weight, bias
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(name) or getattr(module, "lora_bias", {}).get(name):
            raise Unsupported("DoRA / LoRA-bias adapters are not folded by the engine")
        weight = weight + module.get_delta_weight(name)
    return weight, bias


def unsupported_reason(model: nn.Module) -> str | None:
    """None when the engine can run `model`, else why not (the caller falls back to `generate`)."""
    try:
        base = _base_model(model)
        config = base.config
        if config.model_type not in SUPPORTED_TYPES:
            return f"model_type {config.model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})"
        if getattr(config, "hidden_act", "silu") != "silu":
            return f"hidden_act {config.hidden_act!r}"
        for layer in base.model.layers:
            if getattr(layer.self_attn, "sliding_window", None):
                return "sliding-window attention"
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                _linear(getattr(layer.self_attn, proj))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                _linear(getattr(layer.mlp, proj))
        _linear(base.lm_head)
        if not isinstance(base.model.embed_tokens, nn.Embedding):
            return f"embedding {type(base.model.embed_tokens).__name__}"
    except Unsupported as e:
        return str(e)
    except AttributeError as e:
        return f"unexpected module layout ({e})"
    return None


def _norm_weight(norm: nn.Module) -> tuple[torch.Tensor, float]:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return norm.weight.detach().float(), float(eps)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(dtype).contiguous()


class _Linear:
    """`x @ weight.T + bias`; a bf16 weight is prepacked for oneDNN when possible.

    oneDNN's prepacked bf16 GEMM (what torch.compile's CPU backend uses after
    freezing) is ~3x faster than `F.linear` on bf16 tensors at 1-64 rows on this
    CPU and ~10x faster than fp32. It is a private torch op, so `can_pack`
    checks it once against `F.linear`. (MKL's packed fp32 GEMM gained nothing
    measurable here and would copy the weights, so fp32 runs `F.linear` on the
    parameters themselves.)
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool):
        self.weight, self.bias, self.packed, self.dtype = weight, bias, None, weight.dtype
        if pack and weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and can_pack():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # batch hint 1 suits any batch
            self.weight = None  # the packed copy is all a call reads: no second bf16 copy of the model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


@functools.cache
def can_pack() -> bool:
    """Whether oneDNN's prepacked bf16 linear exists here and agrees with F.linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(48, 40, generator=g).bfloat16(), torch.randn(48, generator=g).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        for rows in (1, 5, 33):
            x = torch.randn(2, rows, 40, generator=g).bfloat16()
            got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
            if not torch.allclose(got.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2):
                return False
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@dataclass
class _Layer:
    attn_norm: tuple[torch.Tensor, float]
    q: _Linear
    k: _Linear
    v: _Linear
    q_norm: tuple[torch.Tensor, float] | None  # Qwen3 normalises q and k per head
    k_norm: tuple[torch.Tensor, float] | None
    o: _Linear
    mlp_norm: tuple[torch.Tensor, float]
    gate: _Linear
    up: _Linear
    down: _Linear


class _ShiftedHead:
    """A bfloat16 LM head whose logits keep float32-like precision where it matters.

    A bf16 GEMM accumulates in fp32 but rounds its output to bf16, whose error
    grows with the magnitude (±0.06 at a logit of 16): that alone adds more
    divergence from the fp32 policy than all bf16 layers below it. So each row
    first gets an offset c near its top logit, then the head runs with an extra
    input column -c against a weight column of ones, which yields `logits - c`
    — small, hence precise, near the top — and c is added back in fp32.

    c is the row's top logit over the vocabulary's first `frequent` ids only: a
    BPE vocabulary lists its most frequent tokens first, so that is usually the
    top itself (SmolLM2-135M: 95 % of rows with 8 192 of 49 152 ids; 99 % within
    2 of it) and costs a sixth of a full pass instead of a whole one. When the top
    lies further out, the tokens near it are rounded with an error of (top - c)
    x 2^-9, still no worse than a plain bf16 head. Small vocabularies take c from
    a full pass.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool, frequent: int = 8192):
        ones = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        full = _cast(torch.cat([weight, ones], dim=1), torch.bfloat16)
        self.linear = _Linear(full, None, pack)
        self.probe = _Linear(full[:frequent], None, pack) if len(full) > 2 * frequent else self.linear
        self.bias = _cast(bias, torch.float32)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], 1)], dim=1).to(torch.bfloat16)
        top = self.probe(x).amax(dim=-1, keepdim=True)
        x[:, -1:] = -top
        logits = self.linear(x) + top.float()  # promotes to float32 in the same pass
        return logits if self.bias is None else logits + self.bias


class _Weights:
    """The model's weights as decoding uses them (cast, LoRA folded, packed): rebuilt when parameters change."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, head_dtype: torch.dtype, pack: bool):
        base = _base_model(model)
        config, core = base.config, base.model
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.rotary = core.rotary_emb
        self.embed = core.embed_tokens.weight.detach()
        self.norm = _norm_weight(core.norm)
        head, head_bias = _linear(base.lm_head)
        if head_dtype == torch.bfloat16:
            self.head = _ShiftedHead(head.detach(), head_bias, pack)
        else:
            self.head = _Linear(_cast(head, head_dtype), _cast(head_bias, head_dtype), pack)

        def linear(module: nn.Module) -> _Linear:
            weight, bias = _linear(module)
            return _Linear(_cast(weight, dtype), _cast(bias, dtype), pack)

        self.layers = []
        for layer in core.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    attn_norm=_norm_weight(layer.input_layernorm),
                    q=linear(attn.q_proj),
                    k=linear(attn.k_proj),
                    v=linear(attn.v_proj),
                    q_norm=_norm_weight(attn.q_norm) if hasattr(attn, "q_norm") else None,
                    k_norm=_norm_weight(attn.k_norm) if hasattr(attn, "k_norm") else None,
                    o=linear(attn.o_proj),
                    mlp_norm=_norm_weight(layer.post_attention_layernorm),
                    gate=linear(mlp.gate_proj),
                    up=linear(mlp.up_proj),
                    down=linear(mlp.down_proj),
                )
            )
        self.scale = float(getattr(core.layers[0].self_attn, "scaling", self.head_dim**-0.5))


def _weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter is replaced or modified in place."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


# ------------------------------------------------------------------- engine


def _rms(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm[0], norm[1])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class RolloutEngine:
    """Batched sampling from a Llama-family transformers model (see the module docstring).

    `dtype` is the dtype of decoding's weights and value cache (float32
    reproduces the fp32 model; bfloat16 is faster and approximate). `head_dtype` is that of
    the LM head (default: `dtype`; a bf16 head is offset-compensated, see
    `_ShiftedHead`). The residual stream, norms, RoPE, queries, cached keys,
    attention scores, logits and sampling are float32 whatever the dtype.
    `share_prefixes=False` prefills every row, `pack=False` uses plain
    `F.linear` and `c_kernels=False` attends in PyTorch instead of `cpu_kernels`
    while decoding (all three for tests and benchmarks).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eos_id: int,
        pad_id: int,
        dtype: torch.dtype = torch.float32,
        head_dtype: torch.dtype | None = None,
        share_prefixes: bool = True,
        pack: bool = True,
        c_kernels: bool = True,
    ):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ThinklingError(f"the rollout engine does not support this model: {reason}")
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.dtype, self.head_dtype = dtype, head_dtype or dtype
        self.share_prefixes, self.pack, self.c_kernels = share_prefixes, pack, c_kernels
        self._weights: _Weights | None = None
        self._key: tuple | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def weights(self) -> _Weights:
        key = _weights_key(self.model)
        if self._weights is None or key != self._key:
            self._weights = None  # free the old copy before building the new one
            with torch.no_grad():
                self._weights = _Weights(self.model, self.dtype, self.head_dtype, self.pack)
            self._key = key
        return self._weights

    def release(self) -> None:
        """Free the decoding copy of the weights; the next `generate` rebuilds it."""
        self._weights = self._key = None

    # ------------------------------------------------------------- forward
    def _forward(self, w: _Weights, ids, positions, kv, start: int, mask) -> torch.Tensor:
        """Run `ids [B, T]` at `positions [B, T]`, writing their keys and values into slots
        `start..start+T` of the caches `kv = (keys, values)`; attend over slots `< start+T`
        (`mask [B, 1, T|1, start+T]` of allowed keys, or None for plain causal). Returns the
        final-normed last hidden state `[B, D]`."""
        B, T = ids.shape
        H, KV, hd = w.n_heads, w.n_kv, w.head_dim
        key_cache, value_cache = kv
        x = F.embedding(ids, w.embed).float()
        cos, sin = w.rotary(x, positions)
        cos, sin = cos.float()[:, None], sin.float()[:, None]
        end = start + T
        causal = mask is None and T > 1
        kernel = decode_attention_kernel() if self.c_kernels and T == 1 else None
        if kernel is not None and not kernel.supports(H, KV, hd, value_cache):
            kernel = None
        for i, layer in enumerate(w.layers):
            h = _rms(x, layer.attn_norm).to(self.dtype)
            q, k, v = layer.q(h).view(B, T, H, hd), layer.k(h).view(B, T, KV, hd), layer.v(h).view(B, T, KV, hd)
            if layer.q_norm is not None:
                q, k = _rms(q.float(), layer.q_norm), _rms(k.float(), layer.k_norm)
            q = _rotate(q.transpose(1, 2).float(), cos, sin)
            key_cache[i, :, :, start:end] = _rotate(k.transpose(1, 2).float(), cos, sin)
            value_cache[i, :, :, start:end] = v.transpose(1, 2)
            keys, values = key_cache[i, :, :, :end], value_cache[i, :, :, :end]
            if kernel is not None:  # decode in C: the same computation as the next branch's
                allowed = None if mask is None else mask[:, 0, 0]
                a = kernel(q.reshape(B, H, hd), key_cache[i], value_cache[i], allowed, end, w.scale).reshape(B, T, H * hd)
            elif T == 1:  # decode: float32 scores over the float32 keys, the query heads folded onto their key head
                a = explicit_attention(q, keys, values, mask, w.scale).reshape(B, T, H * hd)
            else:  # prefill, in float32 (the values as cached, so decoding reads the same numbers)
                a = F.scaled_dot_product_attention(q, keys, values.float(), attn_mask=mask, is_causal=causal,
                                                   scale=w.scale, enable_gqa=KV != H)
                a = a.transpose(1, 2).reshape(B, T, H * hd)
            x = x + layer.o(a).float()
            h = _rms(x, layer.mlp_norm).to(self.dtype)
            x = x + layer.down(F.silu(layer.gate(h)) * layer.up(h)).float()
        return _rms(x[:, -1], w.norm)

    @staticmethod
    def _logits(w: _Weights, hidden: torch.Tensor) -> torch.Tensor:
        return w.head(hidden).float()

    # ------------------------------------------------------------ generate
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        return [s.ids for s in self.sample(prompts, params)]

    @torch.inference_mode()
    def sample(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """One completion per prompt, ending with eos if it was emitted, with the sampler's
        per-token log-probs (`sampling.decode`)."""
        for i, p in enumerate(prompts):
            if not p:
                raise ThinklingError(f"generate: prompt {i} is empty")
        return decode(prompts, params, self._prefill, eos_id=self.eos_id, pad_id=self.pad_id,
                      share_prompts=self.share_prefixes)

    def _prefill(self, prompts: list[list[int]], steps: int) -> tuple[_EngineState, torch.Tensor]:
        """Prefill the (distinct) prompts left-padded into a cache with room for `steps` more tokens."""
        w, device = self.weights(), self.device
        ids, valid = pad_batch(prompts, self.pad_id, left=True)
        ids, valid = ids.to(device), valid.to(device).bool()
        width = ids.shape[1]
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        mask = None
        if not bool(valid.all()):  # causal over real keys; a padding query sees itself so its softmax is defined
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            mask = ((causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device))[:, None]
        shape = (len(w.layers), len(prompts), w.n_kv, width + steps, w.head_dim)
        kv = (torch.empty(shape, dtype=torch.float32, device=device),  # keys: scores are float32 (`explicit_attention`)
              torch.empty(shape, dtype=self.dtype, device=device))
        hidden = self._forward(w, ids, positions, kv, 0, mask)
        keys = torch.ones((len(prompts), width + steps), dtype=torch.bool, device=device)
        keys[:, :width] = valid
        state = _EngineState(self, w, kv, keys, positions[:, -1] + 1, slot=width, padded=not bool(valid.all()))
        return state, self._logits(w, hidden)


class _EngineState:
    """The engine's `sampling.DecodeState`: the KV cache, the mask of real key slots, each row's
    next position, and the cache slot the next token goes to (the same for every row)."""

    def __init__(self, engine: RolloutEngine, w: _Weights, kv, keys, next_pos, *, slot: int, padded: bool):
        self.engine, self.w, self.kv, self.keys, self.next_pos = engine, w, kv, keys, next_pos
        self.slot, self.padded = slot, padded

    def select(self, rows: torch.Tensor) -> _EngineState:
        """The state of `rows`, copying only the cache slots written so far."""
        kv = []
        for cache in self.kv:
            kept = cache.new_empty((cache.shape[0], len(rows), *cache.shape[2:]))
            kept[:, :, :, : self.slot] = cache[:, rows, :, : self.slot]
            kv.append(kept)
        return _EngineState(self.engine, self.w, kv, self.keys[rows], self.next_pos[rows], slot=self.slot,
                            padded=self.padded)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = self.keys[:, None, None, : self.slot + 1] if self.padded else None
        hidden = self.engine._forward(self.w, tokens[:, None], self.next_pos[:, None], self.kv, self.slot, mask)
        self.slot += 1
        self.next_pos = self.next_pos + 1
        return self.engine._logits(self.w, hidden)

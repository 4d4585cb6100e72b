"""A fast sampler for Hugging Face Llama-family causal LMs, built for RL rollouts.

`HFPolicy.generate` uses it; `HFPolicy.generate_reference` (transformers'
`generate`) is the reference it is tested against. Why it is faster on a CPU:

- GRPO asks for G completions of each prompt. Each distinct prompt (or BREAD
  prompt + anchor prefix) is prefilled once and its KV rows are copied to its
  G duplicates.
- The KV cache is one preallocated tensor `[layers, 2, rows, kv_heads,
  capacity, head_dim]`: a decode step writes one slot in place (no
  concatenation) and attends over a view of the filled slots; no attention mask
  is built at all when the prompts have equal lengths.
- Finished rows stop costing compute: when a quarter of the batch has finished,
  the cache and the per-row state are compacted to the live rows (one gather).
- The forward pass is written here over the model's own weights (in float32
  the parameters themselves, no copy). With `dtype=torch.bfloat16` the weights
  are cast to bf16 and prepacked for oneDNN, while the residual stream, norms,
  RoPE, logits and sampling stay float32: bf16 matmuls are 3-10x faster than
  fp32 on this AVX-512-bf16 CPU, but the sampled distribution then differs
  slightly from the fp32 policy (docs/performance.md measures how much), so it
  is an opt-in.
- Sampling draws one uniform per row and inverts the float64 CDF, which is the
  same distribution as `torch.multinomial` but several times cheaper over a
  49k vocabulary (multinomial's exponential draws dominated a decode step).

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
from thinkling.models.base import SamplingParams

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
COMPACT_FRACTION = 0.25  # compact the batch once this share of its rows has finished


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
        self.weight, self.bias, self.packed = weight, bias, None
        if pack and weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and can_pack():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # batch hint 1 suits any batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
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
    divergence from the fp32 policy than all bf16 layers below it. So the head
    runs twice: once to find each row's top logit c, then with an extra input
    column -c against a weight column of ones, which yields `logits - c` —
    small, hence precise, near the top — and c is added back in fp32. Two bf16
    passes still cost a third of one fp32 pass.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool):
        ones = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        self.linear = _Linear(_cast(torch.cat([weight, ones], dim=1), torch.bfloat16), None, pack)
        self.bias = _cast(bias, torch.float32)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = torch.cat([hidden, hidden.new_zeros(hidden.shape[0], 1)], dim=1).to(torch.bfloat16)
        top = self.linear(x).amax(dim=-1, keepdim=True)
        x[:, -1:] = -top
        logits = self.linear(x).float() + top.float()
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


# ------------------------------------------------------------------ sampling


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row of `logits [B, V]`: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top-p nucleus (the smallest set of
    most likely tokens with mass >= top_p, renormalised).

    The draw inverts the CDF with one uniform per row: the same distribution as
    `torch.multinomial`, whose exponential draws over a 49k vocabulary cost more
    than a decode step's attention.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    probs = torch.softmax(logits if temperature == 1 else logits / temperature, dim=-1)
    order = None
    if top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True)
        probs[(probs.cumsum(dim=-1) - probs) >= top_p] = 0
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator, device=probs.device)
    tokens = _invert_cdf(probs, u)
    return tokens if order is None else order.gather(1, tokens[:, None]).squeeze(1)


def _invert_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The token whose CDF interval holds `u * total mass`, per row.

    Two levels, in float64: pick the block of `block` tokens from the cumulative
    block masses, then the token inside it. A float64 cumsum over the whole
    vocabulary costs ~10x more (it is sequential); a float32 one would shift
    rare tokens' probabilities by ~1e-5.
    """
    B, V = probs.shape
    blocks = F.pad(probs, (0, -V % block)).view(B, -1, block)
    mass = blocks.sum(dim=-1, dtype=torch.float64)
    ends = mass.cumsum(dim=-1)
    target = u * ends[:, -1:]
    b = torch.searchsorted(ends, target, right=True).clamp(max=ends.shape[1] - 1)
    start = ends.gather(1, b) - mass.gather(1, b)
    inside = blocks[torch.arange(B, device=probs.device), b.squeeze(1)].double().cumsum(dim=-1) + start
    i = torch.searchsorted(inside, target, right=True).clamp(max=block - 1)
    tokens = (b * block + i).squeeze(1)
    # float rounding at an interval edge can land on a zero-probability token: take the mode instead
    bad = (tokens >= V) | (probs.gather(1, tokens.clamp(max=V - 1)[:, None]).squeeze(1) == 0)
    if bool(bad.any()):
        tokens[bad] = probs[bad].argmax(dim=-1)
    return tokens


# ------------------------------------------------------------------- engine


def _rms(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), norm[0], norm[1])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class RolloutEngine:
    """Batched sampling from a Llama-family transformers model (see the module docstring).

    `dtype` is the weight/KV-cache dtype of decoding (float32 reproduces the
    fp32 model; bfloat16 is faster and approximate). `head_dtype` is that of
    the LM head (default: `dtype`; a bf16 head is offset-compensated, see
    `_ShiftedHead`). The residual stream, norms, RoPE, logits and sampling are
    float32 whatever the dtype.
    `share_prefixes=False` prefills every row and `pack=False` uses plain
    `F.linear` (both for tests and benchmarks).
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
    ):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ThinklingError(f"the rollout engine does not support this model: {reason}")
        self.model, self.eos_id, self.pad_id = model, eos_id, pad_id
        self.dtype, self.head_dtype = dtype, head_dtype or dtype
        self.share_prefixes, self.pack = share_prefixes, pack
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
        """Run `ids [B, T]` at `positions [B, T]`, writing their keys/values into cache slots
        `start..start+T`; attend over slots `< start+T` (`mask [B, 1, T|1, start+T]` of allowed
        keys, or None for plain causal). Returns the final-normed last hidden state `[B, D]`."""
        B, T = ids.shape
        H, KV, hd = w.n_heads, w.n_kv, w.head_dim
        x = F.embedding(ids, w.embed).float()
        cos, sin = w.rotary(x, positions)
        cos, sin = cos.float()[:, None], sin.float()[:, None]
        end = start + T
        causal = mask is None and T > 1
        for i, layer in enumerate(w.layers):
            h = _rms(x, layer.attn_norm).to(self.dtype)
            q, k, v = layer.q(h).view(B, T, H, hd), layer.k(h).view(B, T, KV, hd), layer.v(h).view(B, T, KV, hd)
            if layer.q_norm is not None:
                q, k = _rms(q.float(), layer.q_norm), _rms(k.float(), layer.k_norm)
            q = _rotate(q.transpose(1, 2).float(), cos, sin).to(self.dtype)
            kv[i, 0, :, :, start:end] = _rotate(k.transpose(1, 2).float(), cos, sin)
            kv[i, 1, :, :, start:end] = v.transpose(1, 2)
            a = F.scaled_dot_product_attention(
                q, kv[i, 0, :, :, :end], kv[i, 1, :, :, :end], attn_mask=mask, is_causal=causal,
                scale=w.scale, enable_gqa=KV != H,
            )
            x = x + layer.o(a.transpose(1, 2).reshape(B, T, H * hd)).float()
            h = _rms(x, layer.mlp_norm).to(self.dtype)
            x = x + layer.down(F.silu(layer.gate(h)) * layer.up(h)).float()
        return _rms(x[:, -1], w.norm)

    @staticmethod
    def _logits(w: _Weights, hidden: torch.Tensor) -> torch.Tensor:
        return w.head(hidden).float()

    def _pick(self, logits, history, params: SamplingParams, generator) -> torch.Tensor:
        if params.logits_processor is not None:
            logits = params.logits_processor(logits, history)
        return sample_tokens(logits, params.temperature, params.top_p, generator)

    # ------------------------------------------------------------ generate
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """One completion per prompt: generated ids, ending with eos if it was emitted.

        Distinct prompts are left-padded and prefilled once; every row then
        decodes into the same cache slot per step. Rows that finish are fed
        padding until a quarter of the batch has finished, then dropped.
        """
        params.validate()
        for i, p in enumerate(prompts):
            if not p:
                raise ThinklingError(f"generate: prompt {i} is empty")
        steps = params.max_new_tokens
        if not prompts or steps == 0:
            return [[] for _ in prompts]
        w, device = self.weights(), self.device
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)

        kv, keys, logits, next_pos, width = self._prefill(w, prompts, steps)
        padded = not bool(keys.all())
        origin = torch.arange(len(prompts), device=device)  # prompt index of each batch row
        history = torch.full((len(prompts), steps), self.pad_id, dtype=torch.long, device=device)
        alive = torch.ones(len(prompts), dtype=torch.bool, device=device)
        out: list[list[int]] = [[] for _ in prompts]

        for t in range(steps):
            if bool(alive.all()):
                tokens = self._pick(logits, history[:, :t], params, generator)
            else:
                live = alive.nonzero().squeeze(1)
                tokens = torch.full_like(origin, self.pad_id)
                tokens[live] = self._pick(logits[live], history[live, :t], params, generator)
            history[:, t] = tokens
            finished = alive & (tokens == self.eos_id) if t + 1 < steps else alive
            if bool(finished.any()):
                for r in finished.nonzero().squeeze(1).tolist():
                    out[int(origin[r])] = history[r, : t + 1].tolist()
                alive &= ~finished
                n_alive = int(alive.sum())
                if n_alive == 0:
                    break
                if (len(alive) - n_alive) >= COMPACT_FRACTION * len(alive):
                    keep = alive.nonzero().squeeze(1)
                    kv = self._compact(kv, keep, width + t)
                    origin, history, next_pos, tokens, alive, keys = (
                        x[keep] for x in (origin, history, next_pos, tokens, alive, keys)
                    )
            slot = width + t
            mask = keys[:, None, None, : slot + 1] if padded else None
            hidden = self._forward(w, tokens[:, None], next_pos[:, None], kv, slot, mask)
            logits = self._logits(w, hidden)
            next_pos += 1
        return out

    def _prefill(self, w: _Weights, prompts: list[list[int]], steps: int):
        """Prefill each distinct prompt once (left-padded) and copy its cache rows to its duplicates.

        Returns the cache `[layers, 2, rows, kv_heads, width + steps, head_dim]`, the mask of
        real key slots `[rows, width + steps]`, first-token logits, next positions, and the
        padded prompt width (the slot of the first generated token).
        """
        device = self.device
        row_of: dict = {}
        unique, first = [], []
        for i, p in enumerate(prompts):
            key = tuple(p) if self.share_prefixes else i
            if key not in row_of:
                row_of[key] = len(unique)
                unique.append(p)
            first.append(row_of[key])
        width = max(len(p) for p in unique)
        ids = torch.full((len(unique), width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(unique), width), dtype=torch.bool)
        for r, p in enumerate(unique):
            ids[r, width - len(p) :] = torch.tensor(p)
            valid[r, width - len(p) :] = True
        ids, valid = ids.to(device), valid.to(device)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        mask = None
        if not bool(valid.all()):  # causal over real keys; a padding query sees itself so its softmax is defined
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            mask = ((causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device))[:, None]
        shape = (len(w.layers), 2, len(unique), w.n_kv, width, w.head_dim)
        cache = torch.empty(shape, dtype=self.dtype, device=device)
        hidden = self._forward(w, ids, positions, cache, 0, mask)

        rows = torch.tensor(first, device=device)
        kv = torch.empty((*shape[:2], len(prompts), w.n_kv, width + steps, w.head_dim), dtype=self.dtype, device=device)
        kv[:, :, :, :, :width] = cache.index_select(2, rows)
        keys = torch.ones((len(prompts), width + steps), dtype=torch.bool, device=device)
        keys[:, :width] = valid.index_select(0, rows)
        logits = self._logits(w, hidden).index_select(0, rows)
        return kv, keys, logits, positions[:, -1].index_select(0, rows) + 1, width

    @staticmethod
    def _compact(kv: torch.Tensor, keep: torch.Tensor, filled: int) -> torch.Tensor:
        """The cache rows `keep`, copying only the `filled` slots written so far."""
        new = kv.new_empty((kv.shape[0], kv.shape[1], len(keep), *kv.shape[3:]))
        new[:, :, :, :, :filled] = kv[:, :, keep, :, :filled]
        return new

"""A tiny decoder-only transformer trained from scratch, and its policy.

Laptop mode trains these on synthetic reasoning tasks, so the model is small
and plain (pre-norm blocks, RMSNorm, RoPE, SwiGLU, tied embeddings) and the
sampler is built for RL rollouts: batched with left padding, a preallocated
KV cache, one prefill per distinct prompt, finished rows dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from thinkling.errors import ThinklingError
from thinkling.files import read_json
from thinkling.models.attention import (
    CausalSelfAttention,
    KVCache,
    build_attention,
    check_attention,
    rope_table,
)
from thinkling.models.base import Sample, SamplingParams, pad_batch
from thinkling.models.sampling import decode, keyed_uniforms, sample_tokens
from thinkling.models.tokenizer import CharTokenizer

MLP_KINDS = ("swiglu", "gelu")


@dataclass
class TinyConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int | None = None  # None -> 4 * d_model
    max_seq_len: int = 256
    rope_base: float = 10000.0
    attention: str = "standard"  # a key of attention.ATTENTION_VARIANTS
    attention_options: dict = field(default_factory=dict)
    mlp: str = "swiglu"  # or "gelu"
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ThinklingError(f"model config {name!r}: must be a positive integer (got {value!r})")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ThinklingError(
                f"model config 'n_heads': d_model={self.d_model} must split into {self.n_heads} heads of even size"
            )
        if not isinstance(self.rope_base, (int, float)) or isinstance(self.rope_base, bool) or self.rope_base <= 1:
            raise ThinklingError(f"model config 'rope_base': must be a number > 1 (got {self.rope_base!r})")
        if self.mlp not in MLP_KINDS:
            raise ThinklingError(f"model config 'mlp': must be one of {', '.join(MLP_KINDS)} (got {self.mlp!r})")
        if not isinstance(self.tie_embeddings, bool):
            raise ThinklingError(f"model config 'tie_embeddings': must be true or false (got {self.tie_embeddings!r})")
        if not isinstance(self.attention_options, dict):
            raise ThinklingError("model config 'attention_options': must be a mapping")
        check_attention(self.attention, self.attention_options)

    @classmethod
    def from_dict(cls, d: dict) -> TinyConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ThinklingError(f"model config: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        if "vocab_size" not in d:
            raise ThinklingError("model config: missing key 'vocab_size'")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, kind: str):
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(d_model, 2 * d_ff if kind == "swiglu" else d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, h = h.chunk(2, dim=-1)
            return self.down(F.silu(gate) * h)
        return self.down(F.gelu(h))


class Block(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.attn = build_attention(config.attention, config.attention_options, config.d_model, config.n_heads)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.mlp = MLP(config.d_model, config.d_ff, config.mlp)

    def forward(self, x, rope, positions, attn_mask, token_mask, state, start, shared=None):
        h = self.attn_norm(x)
        if token_mask is not None:  # variants that mix neighbouring inputs must see zeros at padding
            h = h * token_mask
        x = x + self.attn(h, rope, positions, attn_mask, state, start, shared)
        return x + self.mlp(self.mlp_norm(x))


def _attention_mask(keys: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """`[B, 1, T, start+T]`: causal over cache slots and real keys only; every query
    also sees itself, so a padding query never has an empty (NaN) softmax."""
    q = torch.arange(start, start + T, device=keys.device)[:, None]
    k = torch.arange(start + T, device=keys.device)[None, :]
    return (((k <= q) & keys[:, None, :]) | (k == q))[:, None]


class TinyTransformer(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_table(config.max_seq_len, config.d_model // config.n_heads, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: shrink the projections that write into the residual stream with depth
        for name, p in self.named_parameters():
            if name.endswith(("attn.out_proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied matrix is counted once

    @property
    def shares_prompt_keys(self) -> bool:
        """Whether decoding may read a shared prompt's keys once for all its rows (`KVCache.branch`):
        not when an attention variant scores keys its own way (`attend`)."""
        return all(type(block.attn).attend is CausalSelfAttention.attend for block in self.blocks)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        w = self.embed.weight
        layers = [blk.attn.new_state(batch, capacity, w.dtype, w.device) for blk in self.blocks]
        return KVCache(layers, torch.zeros(batch, capacity, dtype=torch.bool, device=w.device))

    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None):
        """Logits `[B, T, V]`; see `hidden`."""
        h = self.hidden(
            input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache
        )
        return self.lm_head(h)

    def hidden(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states `[B, T, d_model]`.

        Tokens are `input_ids [B, T]` or `inputs_embeds [B, T, d]` (continuous
        chain of thought feeds mixtures of embeddings). `attention_mask [B, T]`
        marks real tokens (any padding side); `position_ids` default to the count
        of real tokens before each one. With `cache`, the T inputs are appended
        after its `length` filled slots and attend to them.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ThinklingError("model: pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        valid = None if attention_mask is None else attention_mask.bool()
        start, keys, before = 0, valid, 0  # before: the shared prompt's slots ahead of the cache's own
        prefix = None if cache is None else cache.prefix
        if cache is not None:
            start = cache.length
            if start + T > cache.capacity:
                raise ThinklingError(f"model: KV cache of {cache.capacity} slots cannot take {T} more after {start}")
            cache.mask[:, start : start + T] = True if valid is None else valid
            keys = cache.mask[:, : start + T]
            if prefix is not None:
                if T != 1:
                    raise ThinklingError("model: a KV cache with a shared prefix takes one token per row at a time")
                before = prefix.mask.shape[1]
                keys = torch.cat((prefix.row_mask, keys), dim=1)
        if position_ids is None:
            if keys is None:
                position_ids = torch.arange(T, device=x.device).expand(B, T)
            else:
                position_ids = (keys.long().cumsum(1) - 1).clamp(min=0)[:, before + start :]
        if int(position_ids.max()) >= self.config.max_seq_len:
            raise ThinklingError(f"model: sequence is longer than max_seq_len={self.config.max_seq_len}")
        plain = keys is None or ((before + start == 0 or T == 1) and bool(keys.all()))
        attn_mask = None if plain else _attention_mask(keys, before + start, T)
        token_mask = None if valid is None or bool(valid.all()) else valid[..., None].to(x.dtype)
        rope = tuple(t[position_ids].unsqueeze(1).to(x.dtype) for t in (self.rope_cos, self.rope_sin))
        for i, block in enumerate(self.blocks):
            state = None if cache is None else cache.layers[i]
            shared = None if prefix is None else prefix.layer(i)
            x = block(x, rope, position_ids, attn_mask, token_mask, state, start, shared)
        if cache is not None:
            cache.length = start + T
        return self.norm(x)


FILES = ("policy.json", "config.json", "tokenizer.json", "model.safetensors")


class _TinyDecodeState:
    """The tiny model's `sampling.DecodeState`: its KV cache and each row's next position."""

    def __init__(self, model: TinyTransformer, cache: KVCache, next_pos: torch.Tensor, limit: int):
        self.model, self.cache, self.next_pos, self.limit = model, cache, next_pos, limit

    def select(self, rows: torch.Tensor) -> _TinyDecodeState:
        """After the prefill, the prompts' slots become the rows' shared prefix (`KVCache.branch`)."""
        cache = self.cache
        if cache.prefix is None and cache.length > 0 and self.model.shares_prompt_keys:
            cache = cache.branch(rows, cache.capacity - cache.length)
        else:
            cache = cache.select(rows)
        return _TinyDecodeState(self.model, cache, self.next_pos[rows], self.limit)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model(tokens[:, None], position_ids=self.next_pos[:, None], cache=self.cache)[:, -1]
        # A row past its budget is fed padding until compaction: keep its position inside the RoPE table.
        self.next_pos = (self.next_pos + 1).clamp(max=self.limit - 1)
        return logits.float()


class TinyPolicy:
    """The `Policy` of a tiny transformer with a character tokenizer."""

    def __init__(self, model: TinyTransformer, tokenizer: CharTokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.sharded = False  # FSDP shards (train.sharding): no prefix pass outside the model's forward
        self.eos_id, self.pad_id, self.bos_id = tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id

    @classmethod
    def create(cls, config: dict | TinyConfig, seed: int = 0) -> TinyPolicy:
        """A freshly initialised model; the same config and seed give the same weights."""
        tokenizer = CharTokenizer()
        if isinstance(config, dict):
            config = TinyConfig.from_dict({"vocab_size": tokenizer.vocab_size, **config})
        if not isinstance(config, TinyConfig):
            raise ThinklingError(f"model config: expected a mapping (got {type(config).__name__})")
        if config.vocab_size != tokenizer.vocab_size:
            raise ThinklingError(
                f"model config 'vocab_size': must be {tokenizer.vocab_size} for the character tokenizer "
                f"(got {config.vocab_size})"
            )
        with torch.random.fork_rng(devices=[]):  # deterministic, and the caller's RNG stream is untouched
            torch.manual_seed(seed)
            model = TinyTransformer(config)
        return cls(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    @property
    def context_length(self) -> int:
        return self.model.config.max_seq_len

    def encode_prompt(self, prompt: str) -> list[int]:
        return [self.bos_id] + self.tokenizer.encode(prompt)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_from: int = 0) -> torch.Tensor:
        """Next-token logits of positions `keep_from..T-1` `[B, T - keep_from, V]` of a right-padded batch.

        Under a causal mask a real token only sees tokens before it, which right
        padding never is, so the mask is checked and the plain causal kernel runs.
        """
        if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ThinklingError("policy.logits: the batch must be right-padded (attention_mask 1...1 0...0)")
        return self.model(input_ids.to(self.device))[:, keep_from:]

    def prefix_sharing(self) -> bool:
        """Whether `prefix_shared_logits` can run: always (the KV cache works with gradients), except
        on a sharded model, whose prefix pass would run outside its forward (train.sharding)."""
        return not self.sharded

    def prefix_shared_logits(self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, owner: torch.Tensor,
                             input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits `[B, T, V]` of right-padded rows `input_ids`, row b continuing prefix `owner[b]` of the
        left-padded `prefix_ids [N, P]`: each prefix runs once (with gradient) into a KV cache
        whose rows are then selected per row (`models.logprobs.shared_prefix_logprobs`)."""
        model = self.model
        cache = model.new_cache(len(prefix_ids), prefix_ids.shape[1] + input_ids.shape[1])
        model.hidden(prefix_ids, attention_mask=prefix_mask, cache=cache)
        return model(input_ids, attention_mask=attention_mask, cache=cache.select(owner))

    def _budgets(self, prompts: list[list[int]], params: SamplingParams) -> list[int]:
        """New tokens each prompt may get: max_new_tokens, capped by max_seq_len."""
        params.validate()
        limit = self.model.config.max_seq_len
        for i, p in enumerate(prompts):
            if not 0 < len(p) <= limit:
                raise ThinklingError(f"generate: prompt {i} has {len(p)} tokens (need 1..max_seq_len={limit})")
            if min(p) < 0 or max(p) >= self.model.config.vocab_size:
                raise ThinklingError(f"generate: prompt {i} has a token id outside the vocabulary")
        return [min(params.max_new_tokens, limit - len(p)) for p in prompts]

    def generate(self, prompts: list[list[int]], params: SamplingParams, share_prompts: bool = True) -> list[list[int]]:
        return [s.ids for s in self.sample(prompts, params, share_prompts)]

    @torch.inference_mode()
    def sample(self, prompts: list[list[int]], params: SamplingParams, share_prompts: bool = True) -> list[Sample]:
        """One completion per prompt (ending with eos if emitted), sampled in one batch by
        `sampling.decode`: each distinct prompt is prefilled once (left-padded, so every row
        writes its next token into the same cache slot), finished rows are dropped.
        `share_prompts=False` prefills every row."""
        model, limit = self.model, self.model.config.max_seq_len

        def prefill(unique: list[list[int]], steps: int):
            ids, valid = pad_batch(unique, self.pad_id, left=True)
            ids, valid = ids.to(self.device), valid.to(self.device)
            cache = model.new_cache(len(unique), ids.shape[1] + steps)
            positions = (valid.cumsum(1) - 1).clamp(min=0)
            hidden = model.hidden(ids, attention_mask=valid, position_ids=positions, cache=cache)
            return _TinyDecodeState(model, cache, positions[:, -1] + 1, limit), model.lm_head(hidden[:, -1]).float()

        return decode(prompts, params, prefill, eos_id=self.eos_id, pad_id=self.pad_id,
                      budgets=self._budgets(prompts, params), share_prompts=share_prompts)

    @torch.inference_mode()
    def generate_reference(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """`generate` without any of its speed-ups: every step recomputes the whole
        right-padded batch of unfinished sequences. Tests compare the two."""
        budgets = self._budgets(prompts, params)
        keys = torch.tensor(params.row_keys(len(prompts)))
        out: list[list[int]] = [[] for _ in prompts]
        active = [i for i, b in enumerate(budgets) if b > 0]
        while active:
            ids, mask = pad_batch([prompts[i] + out[i] for i in active], self.pad_id)
            logits = self.logits(ids, mask)[torch.arange(len(active)), mask.sum(1) - 1].float()
            history = torch.tensor([out[i] for i in active], dtype=torch.long, device=self.device)
            if params.logits_processor is not None:
                logits = params.logits_processor(logits, history.view(len(active), -1))
            u = None if params.seed is None else keyed_uniforms(params.seed, keys[active], history.shape[-1])
            tokens = sample_tokens(logits, params.temperature, params.top_p, uniforms=u).tolist()
            for i, tok in zip(active, tokens):
                out[i].append(tok)
            active = [i for i in active if out[i][-1] != self.eos_id and len(out[i]) < budgets[i]]
        return out

    backend = "tiny"  # policy.json's backend; a subclass with another model names its own

    def config_dict(self) -> dict:
        """What config.json holds: enough for `model_from_config` to rebuild the model."""
        return self.model.config.to_dict()

    @classmethod
    def model_from_config(cls, saved: dict, tokenizer: CharTokenizer) -> nn.Module:
        """A fresh model of a saved config.json (its weights are loaded after)."""
        return TinyTransformer(TinyConfig.from_dict(saved))

    def save(self, directory: str) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(self.config_dict(), indent=2))
        (d / "tokenizer.json").write_text(json.dumps(self.tokenizer.to_dict(), indent=2))
        (d / "policy.json").write_text(json.dumps({"backend": self.backend}, indent=2))

    @classmethod
    def load(cls, directory: str) -> TinyPolicy:
        d = Path(directory)
        for name in FILES:
            if not (d / name).is_file():
                raise ThinklingError(f"{d / name}: missing (not a saved {cls.backend} policy)")
        if read_json(d / "policy.json").get("backend") != cls.backend:
            raise ThinklingError(f"{d / 'policy.json'}: backend is not '{cls.backend}'")
        try:
            saved = read_json(d / "config.json")
            tokenizer = CharTokenizer.from_dict(read_json(d / "tokenizer.json"))
            with torch.random.fork_rng(devices=[]):  # weights are overwritten; leave the caller's RNG alone
                model = cls.model_from_config(saved, tokenizer)
        except ThinklingError as e:
            raise ThinklingError(f"{d}: {e}") from None
        load_weights(model, d / "model.safetensors")
        return cls(model, tokenizer)


def load_weights(model: nn.Module, file: Path) -> None:
    """Fill `model` from a safetensors file; any failure is one error naming the file."""
    try:
        load_model(model, str(file), strict=True)
    except Exception as e:  # safetensors, shape and key errors all mean a bad file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ThinklingError(f"{file}: cannot load weights ({reason})") from None

"""A Hugging Face causal LM behind the `Policy` protocol.

Any `AutoModelForCausalLM` works; LoRA comes from peft. The trainers never see
transformers: they get ids in, logits and completion ids out.

`save(directory)` writes the model (or only its LoRA adapters), the tokenizer
and `policy.json`, which holds what `HFPolicy.load(directory)` needs to rebuild
the same policy (for adapters: where their base model comes from).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers

from thinkling.errors import ThinklingError
from thinkling.files import read_json
from thinkling.models import hf_attention, vllm_backend
from thinkling.models.base import LogitsProcessor, Sample, SamplingParams, pad_batch
from thinkling.models.hf_engine import RolloutEngine, unsupported_reason
from thinkling.models.registry import gguf_load_kwargs, load_from_hub, resolve_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Attention and MLP projections of Llama-family models (Llama, Qwen2, Mistral, SmolLM2, Gemma).
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": None}
# Model types whose logits are the plain output layer of the final hidden states (`output_head`).
HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class _CompletionOnlyProcessor(transformers.LogitsProcessor):
    """Adapts our `LogitsProcessor` to transformers' interface.

    transformers passes the whole sequence (left-padded prompt + completion) for
    every row, including rows that already emitted eos; our processors want only
    the completion ids of the rows still generating.
    """

    def __init__(self, fn: LogitsProcessor, prompt_len: int, eos_id: int):
        self.fn, self.prompt_len, self.eos_id = fn, prompt_len, eos_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        completion = input_ids[:, self.prompt_len :]
        active = ~(completion == self.eos_id).any(dim=1)
        if not active.any():
            return scores
        scores = scores.clone()
        scores[active] = self.fn(scores[active], completion[active])
        return scores


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ThinklingError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}, auto")
    return DTYPES[dtype]


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run natively here (CUDA with bf16, or a CPU with AVX512-BF16 / AMX).

    Elsewhere bf16 is emulated and far slower than float32: on an AVX2-only CPU a SmolLM2-135M
    forward was ~8x slower and its backward ~60x slower in bf16 (benchmarks/MEMORY_FINDINGS.md).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`auto` -> bfloat16 where it is native (`native_bf16`), else float32; a named dtype is kept,
    with a warning when bfloat16 is asked for on a CPU that only emulates it."""
    if dtype == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    _check_dtype(dtype)
    if dtype == "bfloat16" and device.type == "cpu" and not native_bf16(device):
        from thinkling.progress import console

        console.print("[yellow]warning:[/] bfloat16 on a CPU without AVX512-BF16/AMX is emulated and many times "
                      "slower than float32 (training ~10-60x); use dtype: float32 or auto")
    return dtype


def _lora_config(lora: dict, model: torch.nn.Module) -> dict:
    """Fill defaults; targets default to the Llama projections the model has, else every linear layer."""
    unknown = set(lora) - set(LORA_DEFAULTS)
    if unknown:
        raise ThinklingError(f"unknown lora key {sorted(unknown)[0]!r}; allowed: {', '.join(LORA_DEFAULTS)}")
    cfg = {**LORA_DEFAULTS, **lora}
    if cfg["target_modules"] is None:
        linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        cfg["target_modules"] = [p for p in LLAMA_PROJECTIONS if p in linear] or "all-linear"
    return cfg


def _apply_lora(model: torch.nn.Module, cfg: dict) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg["r"],
        lora_alpha=cfg["alpha"],
        lora_dropout=cfg["dropout"],
        target_modules=cfg["target_modules"],
        modules_to_save=cfg.get("modules_to_save"),  # trained in full and saved with the adapters
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


class _RecordingCache(transformers.DynamicCache):
    """Keeps each layer's keys and values of a prefix pass and stores nothing else: a layer replayed
    by gradient checkpointing sees the same (empty) past and records again."""

    def __init__(self):
        super().__init__()
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = (key_states, value_states)
        return key_states, value_states


class _PrefixCache(transformers.DynamicCache):
    """Prefix keys and values `[(k, v)]` per layer; `update` returns them followed by the new ones
    without storing these, so a layer replayed by gradient checkpointing sees the same."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        for i, (k, v) in enumerate(kv):  # stored once, so the masks count the prefix as the past
            super().update(k, v, i)
        self.prefix = kv

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.prefix[layer_idx]
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)


class HFPolicy:
    """A transformers causal LM (optionally LoRA-wrapped) with its tokenizer."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        chat_template: bool = True,
        system_prompt: str | None = None,
        source: dict | None = None,
    ):
        """`source` records how the base model was loaded ({"base", "gguf_file",
        "trust_remote_code"}): LoRA adapters are saved without their base, so
        `load` needs to find it again."""
        self.model = model
        hf_attention.use_for(_base_model(model))
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.source = source or {}
        self.lora: dict | None = None
        # Generation: the rollout engine when it supports the model (see `generate`).
        self.use_engine = True
        self.rollout_dtype = _dtype_name(model)  # "bfloat16" trades exactness for ~2x faster rollouts on CPU
        self._engine = self._engine_skip = None
        self.sharded = False  # FSDP shards (train.sharding): no fast paths that read weights outside forward
        self.vllm = None  # a VLLMGenerator after `use_vllm()`: GPU rollouts
        self._vllm_stale = False  # the trained weights moved since vLLM last got them
        if tokenizer.eos_token_id is None:
            raise ThinklingError("the tokenizer has no eos token; set tokenizer.eos_token before building the policy")
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        # The checkpoint's own sampling defaults (top_k, repetition_penalty, ...)
        # must not leak into generation: SamplingParams is the only source.
        model.generation_config = transformers.GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=self.eos_id, pad_token_id=self.pad_id
        )

    @property
    def gradient_checkpointing(self) -> bool:
        """Activation checkpointing of the transformer layers in training mode: backward keeps
        each layer's input only and recomputes the layer (one more forward pass), so the
        activations of a batch cost ~D floats per token and layer instead of ~30 D."""
        base = _base_model(self.model)
        if hasattr(type(base), "is_activation_checkpointing"):  # transformers >= 5
            return bool(base.is_activation_checkpointing)
        return bool(getattr(base, "is_gradient_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        base = _base_model(self.model)
        if on:
            if not getattr(base, "supports_gradient_checkpointing", False):
                raise ThinklingError(f"{type(base).__name__} does not support gradient checkpointing")
            # non-reentrant checkpointing: gradients reach LoRA adapters inside the layers as they are
            enable = getattr(base, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers >= 5
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif self.gradient_checkpointing:
            disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
            disable()

    # ----------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        dtype: str | None = None,
        lora: dict | None = None,
        trust_remote_code: bool = False,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        gguf_file: str | None = None,
        device: str | None = None,
    ) -> HFPolicy:
        """Load an alias, a local folder, a GGUF, a hub id, or a folder written by `save`.

        For a saved policy, arguments left at None take the saved value. `device`
        defaults to CUDA when available. `dtype="auto"` is bfloat16 where it is native, else float32.
        """
        path = resolve_model(name_or_path)
        meta_file = Path(path) / "policy.json"
        meta = read_json(meta_file) if meta_file.is_file() else {}
        if meta and meta.get("backend") != "hf":
            raise ThinklingError(f"{meta_file}: backend is {meta.get('backend')!r}, not 'hf'")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = resolve_dtype(dtype or meta.get("dtype", "float32"), torch.device(device))
        torch_dtype = _check_dtype(dtype)
        chat_template = meta.get("chat_template", True) if chat_template is None else chat_template
        system_prompt = meta.get("system_prompt") if system_prompt is None else system_prompt
        if meta.get("trust_remote_code") and not trust_remote_code:
            # Only the user may run a folder's Python code: a saved folder cannot switch it on by itself.
            raise ThinklingError(f"{meta_file} asks to run the model's own code (trust_remote_code); if you trust "
                                 "it, set model.trust_remote_code: true in the recipe")
        gguf_file = gguf_file or meta.get("gguf_file")
        adapters = meta.get("lora")
        if adapters and lora:
            raise ThinklingError(f"{path} already holds LoRA adapters; load it without lora=")

        # Adapters are saved without their base: it is reloaded from where it came from.
        base = meta["base"] if adapters else name_or_path
        source = {"base": base, "gguf_file": gguf_file, "trust_remote_code": trust_remote_code}
        model = _from_pretrained(
            transformers.AutoModelForCausalLM,
            resolve_model(base) if adapters else path,
            gguf_file,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
        )
        # A saved policy folder has its own tokenizer files; a GGUF carries its tokenizer.
        tokenizer_gguf = None if meta else gguf_file
        tokenizer = _from_pretrained(
            transformers.AutoTokenizer, path, tokenizer_gguf, trust_remote_code=trust_remote_code
        )
        model.to(device)
        if adapters:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path, is_trainable=True)
        elif lora is not None:
            adapters = _lora_config(lora, model)
            model = _apply_lora(model, adapters)
        # peft leaves its wrapper in train mode, transformers in eval mode: hand
        # out one state (trainers switch to train() themselves).
        model.eval()
        policy = cls(model, tokenizer, chat_template=chat_template, system_prompt=system_prompt, source=source)
        policy.lora = adapters
        return policy

    # -------------------------------------------------------------- tokenizing

    def encode_prompt(self, prompt: str) -> list[int]:
        """The chat template's user turn + assistant header when the tokenizer has one, else BOS + text."""
        if self.chat_template and self.tokenizer.chat_template:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": prompt})
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            # transformers 5 returns a BatchEncoding here, 4.x a plain list.
            return list(out["input_ids"] if isinstance(out, Mapping) else out)
        bos = self.tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + self.encode_text(prompt)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------- model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The most positions the model was built for (None when its config does not say)."""
        config = getattr(self.model, "config", None)
        return getattr(config, "max_position_embeddings", None)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep_from: int = 0) -> torch.Tensor:
        """Logits of positions `keep_from..T-1` `[B, T - keep_from, V]` in the model's dtype; positions
        count real tokens only. The output layer runs on the kept positions only."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            logits_to_keep=input_ids.shape[1] - keep_from if keep_from > 0 else 0,
        )
        return out.logits

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states `[B, T, D]` that the output layer maps to logits."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = _base_model(self.model).model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def prefix_sharing(self) -> bool:
        """Whether `prefix_shared_hidden` can run now: Llama-family layouts with a plain output
        layer (`output_head`). Under gradient checkpointing (training, with gradients) transformers
        drops the KV cache from checkpointed layers unless the layer may keep a cache it only reads
        (`_can_checkpoint_with_cache`, recent transformers): ours are never written during the
        pass, so a replayed layer sees the same keys and values."""
        if self.output_head() is None:
            return False
        if not (self.model.training and torch.is_grad_enabled() and self.gradient_checkpointing):
            return True
        return all(hasattr(layer, "_can_checkpoint_with_cache") for layer in _base_model(self.model).model.layers)

    def prefix_shared_hidden(self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, owner: torch.Tensor,
                             input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states `[B, T, D]` of right-padded rows `input_ids`, row b continuing prefix
        `owner[b]` of the left-padded `prefix_ids [N, P]` (see `models.logprobs.shared_prefix_logprobs`)."""
        return self._on_prefixes(_base_model(self.model).model, prefix_ids, prefix_mask, owner, input_ids,
                                 attention_mask).last_hidden_state

    def _on_prefixes(self, module, prefix_ids, prefix_mask, owner, input_ids, attention_mask):
        """Run each prefix once (with gradient), recording its keys and values, then every row on its
        prefix's (selected per row: backward sums the rows' gradients into the prefix)."""
        if not self.prefix_sharing():
            raise ThinklingError("prefix sharing: needs a Llama-family model (and a newer transformers under "
                                 "gradient checkpointing)")
        # transformers 5 renamed `past_key_values` to `cache`
        name = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
        layers = _base_model(self.model).model.layers
        before = [layer.__dict__.get("_can_checkpoint_with_cache") for layer in layers]
        for layer in layers:  # the caches below are only read: a checkpointed layer may keep them
            layer._can_checkpoint_with_cache = True
        try:
            recorder = _RecordingCache()
            module(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=False, **{name: recorder},
                   position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0))
            cache = _PrefixCache([(k.index_select(0, owner), v.index_select(0, owner))
                                  for _, (k, v) in sorted(recorder.kv.items())])
            keys = torch.cat([prefix_mask.index_select(0, owner), attention_mask], dim=1)
            positions = (keys.cumsum(-1) - 1).clamp(min=0)[:, prefix_ids.shape[1] :]
            return module(input_ids=input_ids, attention_mask=keys, position_ids=positions, use_cache=False,
                          **{name: cache})
        finally:
            for layer, value in zip(layers, before):
                if value is None:
                    del layer._can_checkpoint_with_cache  # back to the class's value
                else:
                    layer._can_checkpoint_with_cache = value

    def output_head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) of the output layer when logits are exactly `hidden_states @ weight.T + bias`
        (Llama-family layouts, no logit scaling or soft-capping), else None. The trainers then
        score tokens from the hidden states a chunk at a time (`models.logprobs.head_logprobs`)
        instead of materialising `[B, T, V]` logits."""
        if self.sharded:  # the head's weight is a shard outside the model's forward (train.sharding)
            return None
        base = _base_model(self.model)
        head = getattr(base, "lm_head", None)
        config = base.config
        if (config.model_type not in HEAD_TYPES or type(head) is not torch.nn.Linear
                or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None)):
            return None
        return head.weight, head.bias

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        return [s.ids for s in self.sample(prompts, params)]

    def sample(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """One completion per prompt, ending at the first eos (kept), with the sampler's log-probs.

        Runs the rollout engine (thinkling.models.hf_engine: shared prompt
        prefill, preallocated KV cache, finished rows dropped) when it supports
        the model, else transformers' `generate` (`generate_reference`, no log-probs).
        Both sample the same distribution; `rollout_dtype = "bfloat16"` makes the
        engine decode with bf16 weights (faster on CPUs with AVX-512-bf16, approximate:
        the log-probs then are the bf16 sampler's, which the trainer can correct for).
        With `use_vllm()`, vLLM generates, except under a per-step logits processor
        (budget forcing, temperature-scaled stopping), which vLLM does not run.
        """
        if self.vllm is not None and params.logits_processor is None:
            if self._vllm_stale:
                self.vllm.sync_weights(self.plain_state_dict())
                self._vllm_stale = False
            return self.vllm.sample(prompts, params)
        engine = self.rollout_engine()
        if engine is None:
            return [Sample(ids) for ids in self.generate_reference(prompts, params)]
        return engine.sample(prompts, params)

    def rollout_engine(self):
        """The engine for the current model and settings, or None when it cannot run this model."""
        if not self.use_engine:
            return None
        dtype = _check_dtype(self.rollout_dtype)
        engine = self._engine
        if engine is not None and engine.model is self.model and engine.dtype == dtype:
            return engine
        if self._engine_skip is self.model:  # already found unsupported
            return None
        if unsupported_reason(self.model) is not None:
            self._engine, self._engine_skip = None, self.model
            return None
        self._engine = RolloutEngine(self.model, eos_id=self.eos_id, pad_id=self.pad_id, dtype=dtype)
        return self._engine

    @torch.no_grad()
    def generate_reference(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """transformers' `generate` with left padding: the reference the engine is tested against."""
        params.validate()
        if not prompts:
            return []
        input_ids, attention_mask = pad_batch(prompts, self.pad_id, left=True)
        width = input_ids.shape[1]
        kwargs: dict[str, Any] = {"do_sample": params.temperature > 0, **self.generation_options()}
        if params.temperature > 0:
            # top_k=0: transformers otherwise applies its global default top_k=50.
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.logits_processor is not None:
            kwargs["logits_processor"] = transformers.LogitsProcessorList(
                [_CompletionOnlyProcessor(params.logits_processor, width, self.eos_id)]
            )
        was_training = self.model.training
        self.model.eval()
        device = self.device
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                out = self.model.generate(
                    **self.model_inputs(input_ids),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=params.max_new_tokens,
                    eos_token_id=self.eos_id,
                    pad_token_id=self.pad_id,
                    **kwargs,
                )
        finally:
            self.model.train(was_training)
        completions = []
        for row in out[:, width:].tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
            completions.append(row)
        return completions

    def model_inputs(self, input_ids: torch.Tensor) -> dict[str, Any]:
        """The model's inputs for prompt ids, on its device (a VLM adds its images here)."""
        return {"input_ids": input_ids.to(self.device)}

    def generation_options(self) -> dict[str, Any]:
        """Extra `model.generate` settings (a VLM bans its image tokens from completions)."""
        return {}

    # ------------------------------------------------------------------ saving

    def use_vllm(self, **engine_kwargs) -> HFPolicy:
        """Generate rollouts with vLLM (Linux + CUDA GPU): the current weights, LoRA merged,
        are written once to a temporary folder for vLLM to load; `weights_changed` keeps them in step."""
        vllm_backend._require_vllm()  # fail before writing anything
        folder = tempfile.mkdtemp(prefix="thinkling-vllm-")
        self.save(folder, merge=True)
        self.vllm = vllm_backend.VLLMGenerator(folder, dtype=_dtype_name(self.model), **engine_kwargs)
        return self

    def release_generation_memory(self) -> None:
        """Drop the rollout engine's copy of the weights (bf16 / LoRA-folded, ~0.4 GB for SmolLM2-135M).
        The RL trainer calls this before an update, which changes the weights anyway (the engine
        would rebuild the copy at the next `generate`), so the copy does not sit in memory
        through the update's peak."""
        if self._engine is not None:
            self._engine.release()

    def weights_changed(self) -> None:
        """Called by the trainers after optimizer steps; vLLM gets the new weights at the next
        `generate` (once, however many steps came in between)."""
        self._vllm_stale = self.vllm is not None

    def plain_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under plain transformers names, LoRA folded in (this policy keeps its adapters)."""
        if self.lora is None:
            return self.model.state_dict()
        self.model.merge_adapter()
        try:
            prefix = "base_model.model."
            return {k.removeprefix(prefix).replace(".base_layer.", "."): v.detach().clone()
                    for k, v in self.model.state_dict().items() if "lora_" not in k}
        finally:
            self.model.unmerge_adapter()

    def merge_lora(self) -> HFPolicy:
        """Fold the LoRA adapters into the base weights (in place) for export.

        The model object changes: an optimizer built on the old parameters must be rebuilt.
        """
        if self.lora is not None:
            self.model = self.model.merge_and_unload()
            self.lora = None
        return self

    def save(self, directory: str, *, merge: bool = False) -> None:
        """Write weights, tokenizer and policy.json.

        With LoRA, only the adapters are written (the base is found again from
        `source`), unless `merge=True`, which writes a plain merged model and
        leaves this policy's adapters untouched.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        adapters = self.lora is not None and not merge
        if adapters:
            if not self.source.get("base"):
                raise ThinklingError(
                    f"cannot save LoRA adapters to {directory}: the base model has no path; use save(..., merge=True)"
                )
            self.model.save_pretrained(out)
        elif self.lora is not None:
            copy.deepcopy(self.model).merge_and_unload().save_pretrained(out)
        else:
            self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        meta = {
            "backend": "hf",
            "dtype": _dtype_name(self.model),
            "chat_template": self.chat_template,
            "system_prompt": self.system_prompt,
            "trust_remote_code": bool(self.source.get("trust_remote_code")),
            "lora": self.lora if adapters else None,
            "base": _portable(self.source.get("base")) if adapters else None,
            "gguf_file": self.source.get("gguf_file") if adapters else None,
        }
        (out / "policy.json").write_text(json.dumps(meta, indent=2) + "\n")


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _dtype_name(model: torch.nn.Module) -> str:
    dtype = next(model.parameters()).dtype
    return next((name for name, d in DTYPES.items() if d == dtype), "float32")


def _portable(base: str | None) -> str | None:
    """Local bases are stored as absolute paths so the saved folder can move; aliases and hub ids as given."""
    return os.path.abspath(base) if base and os.path.exists(base) else base


def _from_pretrained(auto: Any, name: str, gguf_file: str | None, **kwargs: Any) -> Any:
    """`auto.from_pretrained` for a local folder, a GGUF in a folder, or a hub id."""
    if gguf_file:
        gguf = gguf_load_kwargs(gguf_file)
        kwargs.update(gguf if auto is transformers.AutoModelForCausalLM else {"gguf_file": gguf_file})
    if os.path.isdir(name):
        try:
            return auto.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as e:
            raise ThinklingError(f"cannot load model from {name}: {str(e).strip().splitlines()[0]}") from e
    return load_from_hub(auto.from_pretrained, name, **kwargs)

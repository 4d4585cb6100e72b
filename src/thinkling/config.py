"""Recipes: YAML files + dotted command-line overrides -> one validated config.

Every section is a dataclass; `build(cls, data)` walks it and rejects unknown
keys and wrong types with a message naming the dotted key, so a typo in a
recipe fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from thinkling.errors import ThinklingError
from thinkling.files import read_text


def _name(where: str, key: str) -> str:
    """How an error names a key: dotted under a recipe section, as a flag for the CLI (`where` = "--")."""
    if where == "--":
        return "--" + {"size": "limit", "name": "task"}.get(key, key).replace("_", "-")
    return f"{where}.{key}" if where else key


def _check(where: str, key: str, ok: bool, rule: str, value) -> None:
    if not ok:
        raise ThinklingError(f"config key '{_name(where, key)}': must be {rule}, got {value!r}")


def _at_least(obj, where: str, low, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        _check(where, key, value is None or value >= low, f">= {low}", value)


@dataclass
class ModelConfig:
    backend: str = "tiny"  # tiny | tiny_vlm (tiny + image encoder, docs/vlm.md) | hf | hf_vlm (docs/vlm-hf.md)
    init: str | None = None  # a saved policy folder to start from (e.g. an SFT checkpoint)
    name: str | None = None  # hf, hf_vlm: alias (smollm2-135m), local path or hub id
    tiny: dict = field(default_factory=dict)  # TinyConfig fields for a fresh tiny model (tiny_vlm: + vision: {...})
    dtype: str = "float32"  # float32 | bfloat16 | auto (hf weights; auto = bf16 only where it is native); tiny trains fp32
    lora: dict | None = None  # hf, hf_vlm (language model only): {r, alpha, dropout, target_modules}
    train_vision: bool = False  # hf_vlm full fine-tuning: train the vision encoder too (frozen by default)
    tinyalign: dict | None = None  # hf_vlm: a TinyAlign connector {top_k, bank_size} (tiny_vlm: model.tiny.tinyalign)
    chat_template: bool = True
    system_prompt: str | None = None
    trust_remote_code: bool = False
    generator: str = "engine"  # hf rollouts: engine (thinkling's, falls back to HF generate) | vllm (CUDA GPU)
    rollout_dtype: str | None = None  # hf engine weights: float32 | bfloat16 (~2x faster on AVX-512-bf16 CPUs, approximate); default dtype
    fsdp: bool = False  # shard weights, gradients and AdamW states over the launched processes (FSDP2; docs/scale.md)
    gradient_checkpointing: bool = False  # hf: keep only each layer's input for backward, recompute the rest (less memory, ~+30 % update time)

    def validate(self, where: str = "model") -> None:
        _check(where, "backend", self.backend in ("tiny", "tiny_vlm", "hf", "hf_vlm"), "tiny, tiny_vlm, hf or hf_vlm",
               self.backend)
        _check(where, "train_vision", isinstance(self.train_vision, bool), "true or false", self.train_vision)
        _check(where, "train_vision", not self.train_vision or self.backend == "hf_vlm",
               "false unless model.backend is hf_vlm", self.train_vision)
        _check(where, "tinyalign", self.tinyalign is None or self.backend == "hf_vlm",
               "null unless model.backend is hf_vlm (a tiny VLM takes model.tiny.tinyalign)", self.tinyalign)
        _check(where, "tinyalign", self.tinyalign is None or not self.init,
               "null with model.init (a saved policy keeps its own TinyAlign connector, or none)", self.tinyalign)
        _check(where, "dtype", self.dtype in DTYPES, " or ".join(DTYPES), self.dtype)
        _check(where, "rollout_dtype", self.rollout_dtype in (None, "float32", "bfloat16"), "float32 or bfloat16",
               self.rollout_dtype)
        _check(where, "generator", self.generator in ("engine", "vllm"), "engine or vllm", self.generator)
        _check(where, "fsdp", isinstance(self.fsdp, bool), "true or false", self.fsdp)
        _check(where, "fsdp", not (self.fsdp and self.generator == "vllm"),
               "false with model.generator: vllm (an in-process engine needs the whole model; use "
               "rl.rollout_backend: vllm-server)", self.fsdp)
        _check(where, "name", bool(self.name) or bool(self.init) or self.backend not in ("hf", "hf_vlm"),
               f"an alias, a local path or a hub id for backend {self.backend}", self.name)


DTYPES = ("float32", "bfloat16", "auto")  # auto: bfloat16 where the CPU / GPU runs it natively, else float32


INJECT_MODES = ("none", "tag", "bow")  # prompt-time solution templates (tasks.templates.inject_templates)


@dataclass
class TaskConfig:
    """Which problems: a task by name, its options, how many, how hard, and the generator seed."""

    name: str = "chain"
    options: dict = field(default_factory=dict)
    size: int | None = 1000  # None = the whole benchmark
    difficulty: Any = None  # int, list of ints, or None
    seed: int = 0  # generator seed (train and eval sets use different seeds)
    inject_template: str = "none"  # put a solution template in each prompt: none | tag | bow (tasks.templates)

    def validate(self, where: str = "train") -> None:
        _at_least(self, where, 1, "size")
        _check(where, "inject_template", self.inject_template in INJECT_MODES, " or ".join(INJECT_MODES),
               self.inject_template)
        d = self.difficulty
        levels = d if isinstance(d, list) else [d]
        _check(where, "difficulty", d is None or (bool(levels) and all(_is_number(x) for x in levels)),
               "a number, a non-empty list of numbers, or null", d)


@dataclass
class EvalConfig(TaskConfig):
    """The held-out problems (the task keys) and how to evaluate them."""

    size: int | None = 200
    seed: int = 1
    every: int = 0  # steps between evaluations during training (0 = only at the end)
    max_new_tokens: int = 64
    samples: int = 1  # k samples per problem for pass@k (besides the greedy pass)
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 256
    ts_alpha: float = 1.0  # temperature-scaled stopping factor (1 = off)
    budget: int | None = None  # budget forcing: force end-of-thinking after this many tokens
    wait: int = 0  # budget forcing: up to this many early stops become wait_text (s1's "Wait"), thinking on
    wait_text: str = "Wait"

    def validate(self, where: str = "eval") -> None:
        super().validate(where)
        _at_least(self, where, 0, "wait")
        _check(where, "wait", not self.wait or self.budget is not None, "0 without a budget (it extends thinking "
               "up to the budget)", self.wait)
        _check(where, "wait_text", not self.wait or bool(self.wait_text), "a non-empty text", self.wait_text)
        _at_least(self, where, 0, "every", "temperature")
        _at_least(self, where, 1, "max_new_tokens", "samples", "batch_size", "budget")
        _check(where, "top_p", 0 < self.top_p <= 1, "in (0, 1]", self.top_p)
        _check(where, "ts_alpha", self.ts_alpha > 0, "> 0", self.ts_alpha)


ANNEALS = ("none", "linear", "cosine")


@dataclass
class OptimizerConfig:
    """The AdamW and schedule keys of every training section (sft, rl, dpo), defined and checked
    once; a section inherits them (its keys stay `sft.lr`, `rl.grad_clip`, ...) and may change a default."""

    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def validate_optimizer(self, where: str) -> None:
        _at_least(self, where, 0, "warmup_steps", "weight_decay")
        _check(where, "lr", self.lr > 0, "> 0", self.lr)
        _check(where, "grad_clip", self.grad_clip > 0, "> 0", self.grad_clip)


@dataclass
class SFTConfig(OptimizerConfig):
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    log_every: int = 25
    save_every: int = 500
    bf16: bool = False  # autocast the forward in bfloat16
    micro_batch_size: int | None = None  # rows per forward/backward pass, gradients accumulated (less memory, same step); None = the whole batch
    template_weight: float = 1.0  # SST: loss weight of plan and step-boundary tokens (the task's `template` option)
    template_weight_anneal: str = "none"  # none | linear | cosine: the weight goes to 1.0 by the last step

    def validate(self, where: str = "sft") -> None:
        _check(where, "template_weight", self.template_weight > 0, "> 0", self.template_weight)
        _check(where, "template_weight_anneal", self.template_weight_anneal in ANNEALS, " or ".join(ANNEALS),
               self.template_weight_anneal)
        _at_least(self, where, 1, "steps", "batch_size", "log_every", "save_every", "micro_batch_size")
        self.validate_optimizer(where)
        _check(where, "min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]", self.min_lr_ratio)


@dataclass
class BreadConfig:
    enabled: bool = False
    max_probes: int | None = None  # None = ceil(log2 n) + 1
    remember_anchors: bool = True  # start the next search below the last anchor
    early_stop: bool = False  # stop sampling a probe group once none of its samples can succeed (same result)

    def validate(self, where: str = "rl.bread") -> None:
        _at_least(self, where, 1, "max_probes")
        _check(where, "early_stop", isinstance(self.early_stop, bool), "true or false", self.early_stop)


@dataclass
class RLConfig(OptimizerConfig):
    algorithm: str = "grpo"  # preset: grpo | dr_grpo | dapo | clgrpo; explicit keys below override it
    steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8
    ppo_epochs: int = 1  # μ: updates per batch of rollouts with π_old frozen
    minibatches: int = 1
    micro_batch_size: int | None = None  # rows per forward/backward pass, gradients accumulated (less memory, same update); None = a whole minibatch
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    advantage: str | None = None
    loss: str | None = None  # per-token surrogate (algorithms.POLICY_LOSSES): clip
    eps_low: float | None = None
    eps_high: float | None = None
    beta: float | None = None
    kl_estimator: str | None = None
    entropy_coef: float | None = None
    aggregation: str | None = None
    dynamic_sampling: bool | None = None
    resample_rounds: int = 0  # dynamic sampling: extra rounds to refill dropped groups
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.0})
    bread: BreadConfig = field(default_factory=BreadConfig)
    log_every: int = 1
    save_every: int = 25
    samples_every: int = 10  # write sample generations every n steps
    bf16: bool = False  # bf16 autocast for the update's forward passes; weights, grads and AdamW stay fp32
    kl_to_start: bool = True  # log KL(π‖π_start) each step (runs the frozen starting policy on the samples)
    tis_cap: float | None = None  # truncated importance sampling for off-policy rollouts (bf16, vLLM): weight cap
    rollout_backend: str = "local"  # local: this process's policy generates | vllm-server: a `thinkling vllm-serve` process
    vllm_url: str | None = None  # vllm-server: where it listens, e.g. http://gpu-host:8000
    share_prompt: bool = False  # update: run each group's prompt (+ BREAD anchor) once for its G completions (same numbers)

    def validate(self, where: str = "rl") -> None:
        _at_least(self, where, 1, "steps", "prompts_per_step", "ppo_epochs", "minibatches", "max_new_tokens",
                  "save_every", "log_every", "micro_batch_size")
        self.validate_optimizer(where)
        _at_least(self, where, 0, "resample_rounds", "samples_every")
        _check(where, "group_size", self.group_size >= 2, ">= 2 (group-relative advantages need a group)",
               self.group_size)
        _check(where, "temperature", self.temperature > 0, "> 0 (RL samples its rollouts)", self.temperature)
        _check(where, "top_p", 0 < self.top_p <= 1, "in (0, 1]", self.top_p)
        _check(where, "tis_cap", self.tis_cap is None or self.tis_cap >= 1, ">= 1 (or null: off)", self.tis_cap)
        _check(where, "rollout_backend", self.rollout_backend in ("local", "vllm-server"), "local or vllm-server",
               self.rollout_backend)
        _check(where, "vllm_url", self.rollout_backend != "vllm-server" or (
            isinstance(self.vllm_url, str) and self.vllm_url.startswith(("http://", "https://"))),
            "an http(s):// URL for rl.rollout_backend: vllm-server", self.vllm_url)


@dataclass
class DPOConfig(OptimizerConfig):
    """Rollout DPO (`train.dpo`): pairs of the policy's own right and wrong completions."""

    steps: int = 100
    prompts_per_round: int = 16  # prompts sampled per rollout round
    group_size: int = 8  # completions per prompt, split into right and wrong by the verifier
    pairs_per_prompt: int = 4  # most (correct, incorrect) pairs one prompt gives
    refresh_every: int = 1  # steps per rollout round (1 = online: fresh pairs every step)
    batch_size: int | None = None  # pairs per update; None = every pair of the round
    micro_batch_size: int | None = None  # pairs per forward/backward pass, gradients accumulated; None = all
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0  # conservative DPO's ε (sigmoid only)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    bf16: bool = False
    log_every: int = 1
    save_every: int = 25
    samples_every: int = 10  # write a few of the round's pairs every n steps

    def validate(self, where: str = "dpo") -> None:
        _at_least(self, where, 1, "steps", "prompts_per_round", "pairs_per_prompt", "refresh_every", "batch_size",
                  "micro_batch_size", "max_new_tokens", "log_every", "save_every")
        self.validate_optimizer(where)
        _at_least(self, where, 0, "samples_every")
        _check(where, "group_size", self.group_size >= 2, ">= 2 (a pair needs two completions)", self.group_size)
        _check(where, "beta", self.beta > 0, "> 0", self.beta)
        _check(where, "label_smoothing", 0 <= self.label_smoothing < 0.5, "in [0, 0.5)", self.label_smoothing)
        _check(where, "label_smoothing", self.label_smoothing == 0 or self.loss == "sigmoid",
               "0 with loss ipo", self.label_smoothing)
        _check(where, "temperature", self.temperature > 0, "> 0 (pairs need sampled completions)", self.temperature)
        _check(where, "top_p", 0 < self.top_p <= 1, "in (0, 1]", self.top_p)


CURRICULA = ("uniform", "ordered", "filter", "bandit", "lfr")


@dataclass
class CurriculumConfig:
    """Which training problems each step draws (`data.curriculum`); `uniform` is the plain random draw."""

    sampler: str = "uniform"  # uniform | ordered | filter | bandit | lfr
    difficulty_file: str | None = None  # JSONL of measured difficulties (`thinkling difficulty`) replacing the task's
    buckets: int = 3  # difficulty clusters (ordered, bandit): equal-count splits, equal difficulties kept together
    window: int = 2  # filter: skip a problem whose last `window` groups were all right (or all wrong)
    temperature: float = 0.1  # bandit: softmax temperature over the clusters' learning progress
    explore: float = 0.1  # bandit: share of picks spread evenly over the clusters
    review_every: int = 5  # lfr: every n-th step re-draws from the problems already solved

    def validate(self, where: str = "curriculum") -> None:
        _check(where, "sampler", self.sampler in CURRICULA, " or ".join(CURRICULA), self.sampler)
        _at_least(self, where, 1, "buckets", "window", "review_every")
        _check(where, "temperature", self.temperature > 0, "> 0", self.temperature)
        _check(where, "explore", 0 <= self.explore <= 1, "in [0, 1]", self.explore)


@dataclass
class RunConfig:
    output_dir: str = "runs/run"
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None = 1 for the tiny backend (fastest), torch's default otherwise
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TaskConfig = field(default_factory=TaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    def validate(self, where: str = "") -> None:
        _at_least(self, where, 1, "threads")
        _check(where, "output_dir", bool(self.output_dir), "a folder name", self.output_dir)


# ---------------------------------------------------------------- validation


def build(cls, data: Any, where: str = ""):
    """Instantiate dataclass `cls` from plain data, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ThinklingError(f"config key '{where or '<root>'}': expected a mapping, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ThinklingError(f"unknown config key '{key}' (allowed here: {', '.join(sorted(names))})")
    values = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:  # nested sections validated themselves when they were built
        validate(where)
    return obj


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v) -> str:
    return type(v).__name__


def _coerce(tp, value, key):
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ThinklingError as e:
                errors.append(str(e))
        raise ThinklingError(errors[0] if len(errors) == 1 else f"config key '{key}': bad value {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ThinklingError(f"config key '{key}': must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
    else:
        raise TypeError(f"unsupported config type {tp} at {key}")
    expected = getattr(tp, "__name__", str(tp))
    raise ThinklingError(f"config key '{key}': expected {expected}, got {_kind(value)} {value!r}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ThinklingError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ThinklingError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        raise ThinklingError(f"{path}: the recipe is empty (a recipe file says at least what to train)")
    if not isinstance(data, dict):
        raise ThinklingError(f"{path}: a recipe must be a mapping of keys")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings; values are parsed as YAML scalars/lists."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ThinklingError(f"override '{item}' must look like key=value (e.g. rl.steps=50)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def load_recipe(path: str | Path | None, overrides: list[str] = (), cls=RunConfig):
    data = load_yaml(path) if path else {}
    return build(cls, apply_overrides(data, list(overrides)))

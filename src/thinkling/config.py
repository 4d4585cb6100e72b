"""Recipes: YAML files + dotted command-line overrides -> one validated config.

Every section is a dataclass; `build(cls, data)` walks it and rejects unknown
keys and wrong types with a message naming the dotted key, so a typo in a
recipe fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from thinkling.errors import ThinklingError


@dataclass
class ModelConfig:
    backend: str = "tiny"  # tiny | hf
    init: str | None = None  # a saved policy folder to start from (e.g. an SFT checkpoint)
    name: str | None = None  # hf: alias (smollm2-135m), local path or hub id
    tiny: dict = field(default_factory=dict)  # TinyConfig fields for a fresh tiny model
    dtype: str = "float32"  # float32 | bfloat16 | auto (hf weights; auto = bf16 only where it is native); tiny trains fp32
    lora: dict | None = None  # hf: {r, alpha, dropout, target_modules}
    chat_template: bool = True
    system_prompt: str | None = None
    trust_remote_code: bool = False
    generator: str = "engine"  # hf rollouts: engine (thinkling's, falls back to HF generate) | vllm (CUDA GPU)
    rollout_dtype: str | None = None  # hf engine weights: float32 | bfloat16 (~2x faster on AVX-512-bf16 CPUs, approximate); default dtype
    gradient_checkpointing: bool = False  # hf: keep only each layer's input for backward, recompute the rest (less memory, ~+30 % update time)


@dataclass
class TaskConfig:
    name: str = "chain"
    options: dict = field(default_factory=dict)
    size: int | None = 1000  # None = the whole benchmark
    difficulty: Any = None  # int, list of ints, or None
    seed: int = 0  # generator seed (train and eval sets use different seeds)


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations during training (0 = only at the end)
    max_new_tokens: int = 64
    samples: int = 1  # k samples per problem for pass@k (besides the greedy pass)
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 256
    ts_alpha: float = 1.0  # temperature-scaled stopping factor (1 = off)
    budget: int | None = None  # budget forcing: force end-of-thinking after this many tokens


@dataclass
class SFTConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 25
    save_every: int = 500
    bf16: bool = False  # autocast the forward in bfloat16
    micro_batch_size: int | None = None  # rows per forward/backward pass, gradients accumulated (less memory, same step); None = the whole batch


@dataclass
class BreadConfig:
    enabled: bool = False
    max_probes: int | None = None  # None = ceil(log2 n) + 1
    remember_anchors: bool = True  # start the next search below the last anchor


@dataclass
class RLConfig:
    algorithm: str = "grpo"  # preset: grpo | dr_grpo | dapo | clgrpo; explicit keys below override it
    steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8
    ppo_epochs: int = 1  # μ: updates per batch of rollouts with π_old frozen
    minibatches: int = 1
    micro_batch_size: int | None = None  # rows per forward/backward pass, gradients accumulated (less memory, same update); None = a whole minibatch
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    advantage: str | None = None
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


@dataclass
class RunConfig:
    output_dir: str = "runs/run"
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None = 1 for the tiny backend (fastest), torch's default otherwise
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TaskConfig = field(default_factory=TaskConfig)
    eval: TaskConfig = field(default_factory=lambda: TaskConfig(size=200, seed=1))
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)


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
    return cls(**values)


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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
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
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ThinklingError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
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

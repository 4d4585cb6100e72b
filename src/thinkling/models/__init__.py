"""Model backends behind one `Policy` interface (see `base.py`)."""

from __future__ import annotations

import json
from pathlib import Path

from thinkling.errors import ThinklingError
from thinkling.models.base import Policy, SamplingParams

__all__ = ["Policy", "SamplingParams", "build_policy", "load_policy"]


def load_policy(directory: str | Path) -> Policy:
    """Load a policy saved by `Policy.save` (a run folder means its final policy)."""
    path = Path(directory)
    if (path / "final" / "policy.json").exists():
        path = path / "final"
    meta_file = path / "policy.json"
    if not meta_file.exists():
        raise ThinklingError(f"{path}: not a saved policy (no policy.json); pass a run folder or a checkpoint's policy folder")
    try:
        backend = json.loads(meta_file.read_text())["backend"]
    except (ValueError, KeyError):
        raise ThinklingError(f"{meta_file}: corrupt policy.json") from None
    if backend == "tiny":
        from thinkling.models.tiny import TinyPolicy

        return TinyPolicy.load(str(path))
    if backend == "hf":
        from thinkling.models.hf import HFPolicy

        return HFPolicy.load(str(path))
    raise ThinklingError(f"{meta_file}: unknown backend '{backend}'")


def build_policy(cfg, seed: int) -> Policy:
    """The policy a run starts from: a saved one (`model.init`), a fresh tiny model, or an HF model."""
    if cfg.generator not in ("engine", "vllm"):
        raise ThinklingError(f"config key 'model.generator': unknown generator '{cfg.generator}' (engine | vllm)")
    if cfg.generator == "vllm":
        from thinkling.models.vllm_backend import _require_vllm

        _require_vllm()  # before loading any weights
    if cfg.rollout_dtype not in (None, "float32", "bfloat16"):
        raise ThinklingError(f"config key 'model.rollout_dtype': must be float32 or bfloat16, got {cfg.rollout_dtype!r}")
    return configure_policy(_build(cfg, seed), cfg)


def configure_policy(policy: Policy, cfg) -> Policy:
    """Apply the run-time settings of the `model` section that a saved policy does not record
    (rollout dtype, gradient checkpointing, vLLM); a resumed run calls it on its checkpoint."""
    if cfg.rollout_dtype is not None:
        if not hasattr(policy, "rollout_dtype"):
            raise ThinklingError("config key 'model.rollout_dtype' applies to hf models (model.backend: hf)")
        policy.rollout_dtype = cfg.rollout_dtype
    if cfg.gradient_checkpointing:
        if not hasattr(policy, "gradient_checkpointing"):
            raise ThinklingError("config key 'model.gradient_checkpointing' applies to hf models (model.backend: hf)")
        policy.gradient_checkpointing = True
    if cfg.generator == "vllm":
        if not hasattr(policy, "use_vllm"):
            raise ThinklingError("config key 'model.generator': vllm needs an hf model (model.backend: hf)")
        policy.use_vllm()
    return policy


def _build(cfg, seed: int) -> Policy:
    if cfg.init:
        return load_policy(cfg.init)
    if cfg.backend == "tiny":
        from thinkling.models.tiny import TinyPolicy

        return TinyPolicy.create(dict(cfg.tiny), seed=seed)
    if cfg.backend == "hf":
        from thinkling.models.hf import HFPolicy

        if not cfg.name:
            raise ThinklingError("config key 'model.name' is required for model.backend=hf (an alias, a local path or a hub id)")
        return HFPolicy.load(
            cfg.name,  # aliases resolve inside; saved adapters keep the portable name
            dtype=cfg.dtype,
            lora=cfg.lora,
            trust_remote_code=cfg.trust_remote_code,
            chat_template=cfg.chat_template,
            system_prompt=cfg.system_prompt,
        )
    raise ThinklingError(f"config key 'model.backend': unknown backend '{cfg.backend}' (tiny | hf)")

"""Model backends behind one `Policy` interface (see `base.py`)."""

from __future__ import annotations

from pathlib import Path

from thinkling.config import ModelConfig
from thinkling.errors import ThinklingError
from thinkling.files import read_json
from thinkling.models import vllm_backend
from thinkling.models.base import Policy, SamplingParams
from thinkling.models.tiny import TinyPolicy
from thinkling.models.tiny_vlm import TinyVLMPolicy

__all__ = ["Policy", "SamplingParams", "build_policy", "load_policy", "open_policy"]


def load_policy(directory: str | Path, trust_remote_code: bool = False) -> Policy:
    """Load a policy saved by `Policy.save` (a run folder means its final policy).
    `trust_remote_code` is the user's permission to run a saved HF model's own Python code."""
    path = Path(directory)
    if (path / "final" / "policy.json").exists():
        path = path / "final"
    meta_file = path / "policy.json"
    if not meta_file.exists():
        raise ThinklingError(f"{path}: not a saved policy (no policy.json); pass a run folder or a checkpoint's policy folder")
    backend = read_json(meta_file).get("backend")
    if backend == "tiny":
        return TinyPolicy.load(str(path))
    if backend == "tiny_vlm":
        return TinyVLMPolicy.load(str(path))
    if backend == "hf":
        return _hf().load(str(path), trust_remote_code=trust_remote_code)
    if backend == "hf_vlm":
        from thinkling.models.hf_vlm import HFVLMPolicy

        return HFVLMPolicy.load(str(path), trust_remote_code=trust_remote_code)
    raise ThinklingError(f"{meta_file}: unknown backend '{backend}'")


def build_policy(cfg, seed: int) -> Policy:
    """The policy a run starts from: a saved one (`model.init`), a fresh tiny model, or an HF model.
    `cfg` is a validated ModelConfig (`ModelConfig.validate`)."""
    if cfg.generator == "vllm":
        vllm_backend._require_vllm()  # before loading any weights
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
        return load_policy(cfg.init, cfg.trust_remote_code)
    if cfg.backend == "tiny":
        return TinyPolicy.create(dict(cfg.tiny), seed=seed)
    if cfg.backend == "tiny_vlm":
        return TinyVLMPolicy.create(dict(cfg.tiny), seed=seed)
    if cfg.backend == "hf":
        return _hf().load(
            cfg.name,  # aliases resolve inside; saved adapters keep the portable name
            dtype=cfg.dtype,
            lora=cfg.lora,
            trust_remote_code=cfg.trust_remote_code,
            chat_template=cfg.chat_template,
            system_prompt=cfg.system_prompt,
        )
    if cfg.backend == "hf_vlm":
        from thinkling.models.hf_vlm import HFVLMPolicy

        return HFVLMPolicy.load(cfg.name, dtype=cfg.dtype, lora=cfg.lora, trust_remote_code=cfg.trust_remote_code,
                                chat_template=cfg.chat_template, system_prompt=cfg.system_prompt,
                                train_vision=cfg.train_vision, tinyalign=cfg.tinyalign, seed=seed)
    raise ThinklingError(f"config key 'model.backend': unknown backend '{cfg.backend}' (tiny | tiny_vlm | hf | hf_vlm)")


def open_policy(model: str, dtype: str | None = None, trust_remote_code: bool = False) -> Policy:
    """What `thinkling eval --model` takes: a saved policy / run folder, or an alias / hub id
    loaded as an HF model in `dtype`."""
    if Path(model).exists():
        if dtype is not None:
            raise ThinklingError("--dtype applies to model aliases and hub ids; a saved policy keeps its own")
        return load_policy(model, trust_remote_code)
    if _looks_local(model):
        raise ThinklingError(f"--model {model}: no such folder")
    try:
        return build_policy(ModelConfig(backend="hf", name=model, dtype=dtype or "float32",
                                        trust_remote_code=trust_remote_code), seed=0)
    except ThinklingError as e:
        if "/" not in model:
            raise
        raise ThinklingError(f"--model {model}: no such folder here, and as a hub id: {e}") from None


def _looks_local(model: str) -> bool:
    """A path the user meant as a folder: explicit (./, ../, /, ~) or under an existing folder
    (runs/x when runs/ exists). Hub ids are `owner/name` with no such folder."""
    first = Path(model).parts[0] if Path(model).parts else ""
    return model.startswith((".", "/", "~")) or ("/" in model and Path(first).is_dir())


def _hf():
    """HFPolicy, imported on first use: transformers takes seconds to import, and tiny-model runs never need it."""
    from thinkling.models.hf import HFPolicy

    return HFPolicy

"""Optional vLLM generation for GPU users.

In GRPO-style RL most of a step is generation; on a GPU, vLLM's paged KV cache
and continuous batching make it many times faster than HF `generate`. The
trainer keeps the HF model for the loss and, after each optimizer step, copies
its weights into the vLLM engine with `sync_weights`.

vLLM needs Linux and a CUDA GPU and is not a dependency of thinkling; this
module imports it lazily and fails with a ThinklingError otherwise.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch

from thinkling.errors import ThinklingError
from thinkling.models.base import Sample, SamplingParams


def _require_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ThinklingError(
            "the vllm generation backend needs vLLM (Linux + CUDA GPU): pip install vllm; or use backend 'hf'"
        ) from e
    if not torch.cuda.is_available():
        raise ThinklingError("the vllm generation backend needs a CUDA GPU and none is visible; use backend 'hf'")
    return vllm


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside a vLLM worker (V1 engine, via `collective_rpc`)."""
    worker.model_runner.model.load_weights(weights=weights)


class VLLMGenerator:
    """Generates completions for token-id prompts with a vLLM engine.

    `model_path` is a folder written by `HFPolicy.save(..., merge=True)` (or any
    HF model folder/hub id). LoRA must be merged: vLLM serves plain weights.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.4,
        max_model_len: int | None = None,
        seed: int = 0,
        **engine_kwargs: Any,
    ):
        vllm = _require_vllm()
        self._vllm = vllm
        # Keep the V1 engine core in this process so sync_weights can reach the
        # model without pickling the weights to another process (vLLM >= 0.8).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = vllm.LLM(
            model=model_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            **engine_kwargs,
        )
        self.eos_id = self.llm.get_tokenizer().eos_token_id

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        return [s.ids for s in self.sample(prompts, params)]

    def sample(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """One completion per prompt, ending at the first eos (kept), like `HFPolicy.sample`.

        The log-probs are vLLM's for each sampled token (`logprobs=0`). vLLM's V1 engine reports
        them before temperature and top-p unless it was started with
        `logprobs_mode="processed_logprobs"` (pass it through `use_vllm(**engine_kwargs)`);
        at temperature 1 and top_p 1 the two agree."""
        params.validate()
        if params.logits_processor is not None:
            raise ThinklingError(
                "the vllm backend does not run per-step logits processors (budget forcing, temperature-scaled "
                "stopping); use backend 'hf' for those"
            )
        from vllm.inputs import (
            TokensPrompt,  # vLLM >= 0.5; replaces generate(prompt_token_ids=...)
        )

        # One SamplingParams per prompt: a shared seed would make the copies of a
        # prompt in a GRPO group sample identical completions.
        sampling = [
            self._vllm.SamplingParams(
                n=1,
                temperature=params.temperature,  # 0 is greedy in vLLM too
                top_p=params.top_p if params.temperature > 0 else 1.0,
                max_tokens=params.max_new_tokens,
                seed=None if params.seed is None else params.seed + key,  # the prompt's stream, as locally
                logprobs=0,
                detokenize=False,
            )
            for key in params.row_keys(len(prompts))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling_params=sampling, use_tqdm=False
        )
        completions = []
        for out in outputs:
            ids = list(out.outputs[0].token_ids)
            per_token = getattr(out.outputs[0], "logprobs", None)
            logprobs = [float(step[tok].logprob) for tok, step in zip(ids, per_token)] if per_token else None
            if self.eos_id in ids:
                n = ids.index(self.eos_id) + 1
                ids, logprobs = ids[:n], None if logprobs is None else logprobs[:n]
            completions.append(Sample(ids, logprobs))
        return completions

    def sync_weights(self, state_dict: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load trained weights (plain HF parameter names, LoRA merged) into the engine."""
        weights = list(state_dict.items() if isinstance(state_dict, dict) else state_dict)
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None)
        if executor is not None and hasattr(executor, "driver_worker"):
            # V0 engine (vLLM <= 0.9): the model lives in this process.
            executor.driver_worker.model_runner.model.load_weights(weights=weights)
        else:
            # V1 engine (vLLM >= 0.8): run the load on every worker.
            self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
        # Cached prefixes hold KV computed with the old weights.
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

"""Workload of benchmarks/versions.py: SmolLM2-135M bf16 rollouts (or $DTYPE: float32), 32 new tokens (or
$NEW_TOKENS), batch 64 and the GRPO step's batch of 16 (4 prompts x G=4) (tokens per CPU second)."""

import os
import time

import torch

torch.set_num_threads(1)
from thinkling.models.base import SamplingParams
from thinkling.models.hf import HFPolicy
from thinkling.rollout.prompts import prompt_text
from thinkling.tasks import get_task

policy = HFPolicy.load("smollm2-135m", device="cpu")
dtype = os.environ.get("DTYPE", "bfloat16")
policy.rollout_dtype = dtype
tag = "bf16" if dtype == "bfloat16" else "fp32"
prompts = [policy.encode_prompt(prompt_text(p)) for p in get_task("chain").problems(64, seed=0, difficulty=[3, 4, 5, 6])]
def ban(logits, history):
    logits[:, policy.eos_id] = -float("inf"); return logits
new_tokens = int(os.environ.get("NEW_TOKENS", 32))
params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0, logits_processor=ban)
policy.generate(prompts[:4], SamplingParams(max_new_tokens=2, seed=0))
for r in range(2):
    c = time.process_time(); out = policy.generate(prompts, params); c = time.process_time() - c
    print(f"RESULT {tag}-b64-rep{r} {64 * new_tokens / c:.2f} {hash(tuple(map(tuple, out)))}", flush=True)
grpo = [p for p in prompts[:4] for _ in range(4)]  # the GRPO step's batch: 4 prompts x G=4
for r in range(2):
    c = time.process_time(); out = policy.generate(grpo, params); c = time.process_time() - c
    print(f"RESULT {tag}-b16-rep{r} {16 * new_tokens / c:.2f} {hash(tuple(map(tuple, out)))}", flush=True)

"""Workload of benchmarks/versions.py: the tiny sampler on the demo's batches (CPU seconds per batch).

TINY_INIT: the tiny SFT checkpoint (default runs/experiments/quickstart-seeds/sft/final).
"""

import os
import time

import torch

torch.set_num_threads(1)
from thinkling.models.base import SamplingParams
from thinkling.models.tiny import TinyPolicy
from thinkling.rollout.groups import branch_prefix
from thinkling.rollout.prompts import prompt_ids
from thinkling.tasks import get_task

policy = TinyPolicy.load(os.environ.get("TINY_INIT", "runs/experiments/quickstart-seeds/sft/final"))
probs = get_task("chain").problems(64, seed=2, difficulty=[8])
batches = {"grpo": [prompt_ids(policy, p, None) for p in probs[:16] for _ in range(8)],
           "probes": [branch_prefix(policy, p, None, 1 + i % 7)[0] for i, p in enumerate(probs[16:42]) for _ in range(8)],
           "probes-5": [branch_prefix(policy, p, None, 1 + i % 7)[0] for i, p in enumerate(probs[42:47]) for _ in range(8)]}
params = SamplingParams(max_new_tokens=80, temperature=1.0, seed=1)
policy.sample(batches["grpo"][:16], params)
for name, b in batches.items():
    c = time.process_time(); out = policy.sample(b, params); c = time.process_time() - c
    print(f"RESULT {name} {c:.4f} {hash(tuple(tuple(s.ids) for s in out))}", flush=True)

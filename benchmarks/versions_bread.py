"""Workload of benchmarks/versions.py: 8 BREAD RL steps of the demo's setting (CPU seconds).

Strict chain verifier, 8-step problems, 16 prompts x G=8, 80 new tokens, rl.share_prompt, anchors
remembered, from the tiny SFT checkpoint TINY_INIT (default runs/demo/sft/final, made by `make demo`).
Prints the CPU seconds of the probe rounds and of the whole steps, and the steps' generation time
(rollouts + probes, the trainer's wall-clock `time/generate_s`); the hash is the steps'
generated-token count (same tokens -> same count).
"""

import os
import time

import torch

torch.set_num_threads(1)
import thinkling.rollout.bread as bread_module
from thinkling.config import BreadConfig, RLConfig
from thinkling.models.tiny import TinyPolicy
from thinkling.tasks import get_task
from thinkling.train.common import make_optimizer
from thinkling.train.rl import RLTrainer, resolve_knobs

task = get_task("chain", strict=True)
problems = task.problems(2000, seed=2, difficulty=[8])
policy = TinyPolicy.load(os.environ.get("TINY_INIT", "runs/demo/sft/final"))
rl = RLConfig(algorithm="grpo", prompts_per_step=16, group_size=8, lr=1e-4, max_new_tokens=80,
              rewards={"accuracy": 1.0, "format": 0.0}, share_prompt=True,
              bread=BreadConfig(enabled=True, remember_anchors=True))
trainer = RLTrainer(policy, task, problems, rl, resolve_knobs(rl), make_optimizer(policy.model, rl.lr, rl.weight_decay),
                    seed=0)
sample_groups, probes = bread_module.sample_groups, [0.0]


def timed(*args, **kw):
    c = time.process_time()
    try:
        return sample_groups(*args, **kw)
    finally:
        probes[0] += time.process_time() - c


bread_module.sample_groups = timed
start, generate, tokens = time.process_time(), 0.0, 0
for step in range(8):
    metrics, _ = trainer.step(step, 40)
    generate += metrics["time/generate_s"]
    tokens += metrics["generated_tokens"]
print(f"RESULT probes {probes[0]:.3f} {tokens}")
print(f"RESULT generate {generate:.3f} {tokens}")
print(f"RESULT step_total {time.process_time() - start:.3f} {tokens}")

"""Workload of benchmarks/versions.py: the RL update of benchmarks/grpo_step.py's configuration.

SmolLM2-135M (offline alias), 4 prompts x G=4, 64 new tokens, bf16 rollouts and a bf16-autocast
update, rl.share_prompt; three steps, the first unmeasured. Prints the CPU seconds of the last two
updates (user + system), their system seconds alone, and their minor page faults; the hash is the
steps' generated-token count.
"""

import argparse
import os
import resource
import sys
import time

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpo_step import ArithmeticTask, thinkling_trainer  # noqa: E402

from thinkling.models.registry import resolve_model  # noqa: E402

args = argparse.Namespace(prompts=4, group=4, lr=1e-6, max_new_tokens=64)
task = ArithmeticTask()
trainer = thinkling_trainer(resolve_model("smollm2-135m"), task, task.problems(64, seed=0, difficulty=[2, 3]), args,
                            "bfloat16", bf16_update=True, share_prompt=True)
update, totals, tokens = trainer.update, {"cpu": 0.0, "sys": 0.0, "faults": 0}, 0


def measured(groups, step, total):
    if step == 0:
        return update(groups, step, total)
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    try:
        return update(groups, step, total)
    finally:
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        totals["cpu"] += time.process_time() - c0
        totals["sys"] += r1.ru_stime - r0.ru_stime
        totals["faults"] += r1.ru_minflt - r0.ru_minflt


trainer.update = measured
for step in range(3):
    tokens += trainer.step(step, 10)[0]["generated_tokens"]
print(f"RESULT update_cpu {totals['cpu']:.3f} {tokens}")
print(f"RESULT update_sys {totals['sys']:.3f} {tokens}")
print(f"RESULT update_faults {totals['faults']} {tokens}")

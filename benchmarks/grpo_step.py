"""Seconds per GRPO step: thinkling (HFPolicy + RLTrainer) vs TRL's GRPOTrainer.

    python benchmarks/grpo_step.py                      # SmolLM2-135M (alias smollm2-135m, offline cache)
    python benchmarks/grpo_step.py --model tiny         # a tiny random Llama built here
    python benchmarks/grpo_step.py --with-bf16-rollouts # add thinkling with bf16 rollouts (fp32 update)
    python benchmarks/grpo_step.py --with-bf16          # add thinkling with bf16 rollouts and a bf16-autocast update
    python benchmarks/grpo_step.py --bf16               # both sides in bf16 mixed precision
    python benchmarks/grpo_step.py --bf16 --with-shared-prompt   # + thinkling with rl.share_prompt

One configuration for both: the same fp32 model and chat-template prompts,
P prompts x G completions per step, max completion length, μ = 1 (one update
per batch), β = 0, temperature 1, top-p 1, AdamW at the same learning rate,
gradient clipping 1, no gradient checkpointing (TRL's default is on; it would
only slow TRL down), the "grpo" loss (per-sequence token mean) on both sides,
and the same reward function: the answer check (last number of the completion)
plus a tiny length term so that every step has a learning signal (see `bench_reward`).

TRL drives the loop: `trainer.train()` runs the measured steps and a callback
runs one thinkling step next to each TRL step, before or after it in turn, so
the sides alternate under the same machine load. Generation is the time in
TRL's `_generate_and_score_completions` / thinkling's `collect` (both include
scoring); update is the rest of the step. Needs `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time

import torch
from _common import Recorder, footer, header, release_memory, rotate, table

from thinkling.config import RLConfig
from thinkling.models.hf import HFPolicy
from thinkling.models.registry import resolve_model
from thinkling.tasks.base import Problem, Verdict
from thinkling.tasks.chain import ChainTask
from thinkling.train.common import make_optimizer
from thinkling.train.rl import RLTrainer, resolve_knobs

_NUMBER = re.compile(r"-?\d+")


class ArithmeticTask(ChainTask):
    """The chain task with an instruction a chat model understands, scored on the last number written."""

    def problems(self, n, seed, difficulty=None):
        return [Problem(p.id, f"Compute {p.prompt}. Answer with the result.", p.answer, p.steps, p.difficulty, p.tags)
                for p in super().problems(n, seed, difficulty)]

    def verify(self, problem, completion):
        numbers = _NUMBER.findall(completion)
        got = numbers[-1] if numbers else None
        return Verdict(correct=got == problem.answer, extracted=got)

    def format_ok(self, completion):
        return bool(_NUMBER.search(completion))


def bench_reward(task, problem, text: str) -> float:
    """1 for the right answer, plus a small length term so that groups (almost) never tie.

    Without it a model that is never right gives all-equal rewards: thinkling
    then skips the update (no learning signal) while TRL still runs it, which
    would flatter thinkling. Both sides use this same function.
    """
    return float(task.verify(problem, text).correct) + 1e-4 * len(text)


class BenchTrainer(RLTrainer):
    def _rewards(self, grp):
        return [bench_reward(self.task, grp.problem, c.text) for c in grp.completions]


def tiny_model_dir(tokenizer_from: str) -> str:
    """A random 2-layer Llama with SmolLM2's tokenizer, saved so TRL can load it by path."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_from)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    path = tempfile.mkdtemp(prefix="thinkling-bench-tiny-")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def thinkling_trainer(path: str, task, problems, args, rollout_dtype: str, bf16_update: bool = False,
                      share_prompt: bool = False):
    """`model.rollout_dtype`, `rl.bf16` and `rl.share_prompt` of a recipe, set directly."""
    policy = HFPolicy.load(path, dtype="float32", device="cpu")
    policy.rollout_dtype = rollout_dtype
    rl = RLConfig(algorithm="grpo", prompts_per_step=args.prompts, group_size=args.group, ppo_epochs=1, beta=0.0,
                  lr=args.lr, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, grad_clip=1.0,
                  rewards={"accuracy": 1.0, "format": 0.0}, bf16=bf16_update, share_prompt=share_prompt)
    optimizer = make_optimizer(policy.model, rl.lr, rl.weight_decay)
    return BenchTrainer(policy, task, problems, rl, resolve_knobs(rl), optimizer, seed=0)


def trl_trainer(path: str, task, problems, args, total_steps: int, callback):
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from thinkling.rollout.prompts import prompt_text

    by_id = {p.id: p for p in problems}

    def reward(completions, pid, **_):
        return [bench_reward(task, by_id[i], c[-1]["content"]) for c, i in zip(completions, pid)]

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": prompt_text(p)}], "pid": p.id} for p in problems])
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="thinkling-bench-trl-"), use_cpu=True, bf16=args.bf16, fp16=False,
        per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
        gradient_accumulation_steps=1, num_iterations=1, beta=0.0, loss_type="grpo", scale_rewards="group",
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=1.0, gradient_checkpointing=False, max_steps=total_steps, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, padding_side="left")
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[callback])
    return trainer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="alias/path, or 'tiny' for a random 2-layer Llama")
    ap.add_argument("--steps", type=int, default=4, help="measured steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured first steps per side")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    ap.add_argument("--with-bf16-rollouts", action="store_true", help="add thinkling with rollout_dtype=bfloat16")
    ap.add_argument("--with-bf16", action="store_true",
                    help="add thinkling with model.rollout_dtype=bfloat16 and rl.bf16 (autocast update)")
    ap.add_argument("--bf16", action="store_true",
                    help="both sides in bf16 mixed precision (fp32 weights): TRL bf16=True; thinkling bf16 rollouts "
                         "and its update under bf16 autocast")
    ap.add_argument("--with-shared-prompt", action="store_true",
                    help="add the main thinkling side with rl.share_prompt (each prompt runs once in the update)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    header("GRPO step: thinkling vs TRL GRPOTrainer", ["benchmarks/grpo_step.py", *sys.argv[1:]])
    path = tiny_model_dir(resolve_model("smollm2-135m")) if args.model == "tiny" else resolve_model(args.model)
    print(f"model={args.model} prompts={args.prompts} G={args.group} max_new_tokens={args.max_new_tokens} "
          f"steps={args.steps} (+{args.warmup} warm-up) weights=float32 "
          f"{'bf16 mixed precision' if args.bf16 else 'fp32 compute'} μ=1 β=0\n")

    task = ArithmeticTask()
    problems = task.problems(64, seed=0, difficulty=[2, 3])
    if args.bf16:
        ours = {"thinkling": thinkling_trainer(path, task, problems, args, "bfloat16", bf16_update=True)}
    else:
        ours = {"thinkling": thinkling_trainer(path, task, problems, args, "float32")}
    if args.with_bf16_rollouts and not args.bf16:
        ours["thinkling-bf16-rollouts"] = thinkling_trainer(path, task, problems, args, "bfloat16")
    if args.with_bf16 and not args.bf16:
        ours["thinkling-bf16"] = thinkling_trainer(path, task, problems, args, "bfloat16", bf16_update=True)
    if args.with_shared_prompt:
        ours["thinkling-shared-prompt"] = thinkling_trainer(path, task, problems, args, "bfloat16" if args.bf16 else "float32",
                                                            bf16_update=args.bf16, share_prompt=True)
    sides = ["trl", *ours]
    total = args.warmup + args.steps
    rec = Recorder()
    trl_state = {"gen": 0.0, "tokens": 0}

    def run_ours(name: str, step: int):
        with rec.measure(name) as m:
            metrics, _ = ours[name].step(step, total)
        release_memory()
        if step >= args.warmup:
            row = str(step - args.warmup)
            rec.add("step", name, "total", m["seconds"])
            rec.add("step", name, "generate", metrics["time/generate_s"])
            rec.add("step", name, "update", m["seconds"] - metrics["time/generate_s"])
            rec.add("step", name, "tokens", metrics["generated_tokens"])
            print(f"  step {row} {name:24s} {m['seconds']:6.1f} s (generate {metrics['time/generate_s']:.1f} s, "
                  f"{metrics['generated_tokens']} tokens)", flush=True)

    import transformers

    class Alternate(transformers.TrainerCallback):
        """Runs our side(s) around each TRL step, rotating the order, and times TRL's step."""

        def on_step_begin(self, a, state, control, **kw):
            order = rotate(sides, state.global_step)
            for name in order[: order.index("trl")]:
                run_ours(name, state.global_step)
            trl_state.update(gen=0.0, tokens=0)
            release_memory()
            self.mem = rec.measure("trl")
            self.box = self.mem.__enter__()

        def on_step_end(self, a, state, control, **kw):
            self.mem.__exit__(None, None, None)
            release_memory()
            step = state.global_step - 1
            if step >= args.warmup:
                seconds = self.box["seconds"]
                rec.add("step", "trl", "total", seconds)
                rec.add("step", "trl", "generate", trl_state["gen"])
                rec.add("step", "trl", "update", seconds - trl_state["gen"])
                rec.add("step", "trl", "tokens", trl_state["tokens"])
                print(f"  step {step - args.warmup} {'trl':24s} {seconds:6.1f} s (generate {trl_state['gen']:.1f} s, "
                      f"{trl_state['tokens']} tokens)", flush=True)
            order = rotate(sides, step)
            for name in order[order.index("trl") + 1 :]:
                run_ours(name, step)

    trl = trl_trainer(path, task, problems, args, total, Alternate())
    generate_and_score = trl._generate_and_score_completions

    def timed(batch):
        t0 = time.perf_counter()
        out = generate_and_score(batch)
        trl_state["gen"] += time.perf_counter() - t0
        trl_state["tokens"] += int(out["completion_mask"].sum())
        return out

    trl._generate_and_score_completions = timed
    trl.train()

    rows = []
    base = rec.median("step", "trl", "total")
    for name in sides:
        med = {k: rec.median("step", name, k) for k in ("total", "generate", "update", "tokens")}
        rows.append([name, f"{med['total']:.2f}", rec.spread("step", name, "total"), f"{med['generate']:.2f}",
                     f"{med['update']:.2f}", f"{med['tokens']:.0f}", f"{base / med['total']:.2f}x"])
    print()
    print(table(["side", "s/step (median)", "min–max", "generate s", "update s", "tokens/step", "speed-up vs trl"], rows))
    gen = {n: rec.median("step", n, "generate") for n in sides}
    upd = {n: rec.median("step", n, "update") for n in sides}
    for name in ours:
        print(f"{name}: generation {gen['trl'] / gen[name]:.2f}x, update {upd['trl'] / upd[name]:.2f}x faster than trl")
    footer(rec)
    if args.model == "tiny":
        import shutil

        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()

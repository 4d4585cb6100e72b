"""Seconds per RL step on 1 and on 2 data-parallel processes (gloo on CPU, nccl on GPUs).

    python benchmarks/scaling.py                       # the quick-start's tiny model, 16 prompts x G=8
    python benchmarks/scaling.py --steps 6 --prompts 32
    python benchmarks/scaling.py --bread               # BREAD on: probes, anchor sharing

Both sides are kept alive for the whole run (their start-up is not measured) and take
the same steps from the same weights, so they do the same work and reach the same
weights (`tests/test_distributed_rl.py`). They run in turn, never at once, and which
goes first rotates every step. A step's time is the slowest process's (the step ends
when its last process ends); each process also reports its split:

  generate  sampling, scoring and BREAD probes, without communication
  update    log-probs, loss, backward and the optimizer step, without communication
  comm      all-reduces and gathers, including the wait for the slower process

The task is chain problems scored by a die the completion's characters throw (about one
completion in three is "correct"), so an untrained model has a learning signal in most
groups and every step takes an update, as in real training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp
from _common import Recorder, header, rotate, table

from thinkling.config import BreadConfig, RLConfig
from thinkling.tasks.base import Verdict
from thinkling.tasks.chain import ChainTask
from thinkling.train.distributed import free_port

TINY = {"d_model": 96, "n_layers": 3, "n_heads": 4, "max_seq_len": 192}  # recipes/quickstart/sft.yaml's model
SIDES = {"1 process": 1, "2 processes": 2}


class DiceChain(ChainTask):
    """Chain problems (expert steps included, for BREAD) scored by a die: a learning signal without training."""

    def verify(self, problem, completion):
        return Verdict(correct=sum(map(ord, completion)) % 3 == 0, extracted=None)


def worker(rank: int, world: int, port: int, args, commands, results) -> None:
    """One process of a side: build the trainer, then run the step each command names."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS=str(args.threads))
    torch.set_num_threads(args.threads)
    from thinkling.models.tiny import TinyPolicy
    from thinkling.train.common import make_optimizer
    from thinkling.train.distributed import DataParallel
    from thinkling.train.rl import RLTrainer, resolve_knobs

    dp = DataParallel.from_env()
    task = DiceChain()
    problems = task.problems(2000, seed=2, difficulty=[args.difficulty])
    policy = TinyPolicy.create(TINY, seed=0)
    cfg = RLConfig(algorithm="grpo", prompts_per_step=args.prompts, group_size=args.group, lr=1e-4,
                   max_new_tokens=args.max_new_tokens, kl_to_start=False, bread=BreadConfig(enabled=args.bread))
    trainer = RLTrainer(policy, task, problems, cfg, resolve_knobs(cfg), make_optimizer(policy.model, cfg.lr, 0.0),
                        seed=0, data_parallel=dp)
    results.put(("ready", rank))
    while (step := commands.get()) is not None:
        if dp.enabled:
            dp.barrier()  # start together: the step's time is not the others' start-up lag
        t0 = time.perf_counter()
        metrics, _ = trainer.step(step, args.warmup + args.steps)
        results.put((rank, time.perf_counter() - t0, metrics))
    if dp.enabled:
        torch.distributed.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="measured steps per side")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--difficulty", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--bread", action="store_true", help="BREAD on (probes for groups that all fail)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args(argv)
    header("Data-parallel RL: seconds per step on 1 and 2 processes", ["benchmarks/scaling.py", *sys.argv[1:]])
    print(f"tiny model {TINY}, dice-scored chain problems (difficulty {args.difficulty}), {args.prompts} prompts "
          f"x G={args.group}, {args.max_new_tokens} new tokens, BREAD {'on' if args.bread else 'off'}, "
          f"{args.threads} thread(s) per process, steps={args.steps} (+{args.warmup} warm-up)\n")

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    sides = {}
    for name, world in SIDES.items():
        commands = [ctx.Queue() for _ in range(world)]
        port = free_port()
        procs = [ctx.Process(target=worker, args=(r, world, port, args, commands[r], results)) for r in range(world)]
        for p in procs:
            p.start()
        sides[name] = (world, commands, procs)
    for _ in range(sum(SIDES.values())):
        results.get(timeout=600)  # every process built its trainer

    rec = Recorder()
    total = args.warmup + args.steps
    for step in range(total):
        for name in rotate(list(sides), step):
            world, commands, _ = sides[name]
            for q in commands:
                q.put(step)
            per_rank = sorted(results.get(timeout=600) for _ in range(world))
            wall = max(seconds for _, seconds, _ in per_rank)
            if step < args.warmup:
                continue
            rec.add("step", name, "total", wall)
            for rank, seconds, m in per_rank:
                for key in ("generate", "update", "comm"):
                    rec.add(f"rank {rank}", name, key, m.get(f"time/{key}_s", 0.0))
            splits = "; ".join(f"rank {r}: gen {m['time/generate_s']:.2f} upd {m.get('time/update_s', 0):.2f} "
                               f"comm {m['time/comm_s']:.2f}" for r, _, m in per_rank)
            print(f"  step {step} {name:11s} {wall:5.2f} s ({splits}; reward {per_rank[0][2].get('reward_mean', 0):.2f})",
                  flush=True)
    for world, commands, procs in sides.values():
        for q in commands:
            q.put(None)
        for p in procs:
            p.join(timeout=60)

    rows = []
    for name, world in SIDES.items():
        for rank in range(world):
            rows.append([name if rank == 0 else "", f"{rec.median('step', name, 'total'):.2f}" if rank == 0 else "",
                         rec.spread("step", name, "total") if rank == 0 else "", rank,
                         *(f"{rec.median(f'rank {rank}', name, k):.2f}" for k in ("generate", "update", "comm"))])
    print()
    print(table(["side", "s/step (median)", "min–max", "rank", "generate s", "update s", "comm s"], rows))
    one, two = (statistics.median(rec.values[("step", name)]["total"]) for name in SIDES)
    print(f"speed-up of 2 processes over 1: {one / two:.2f}x (ideal 2x; {os.cpu_count()} CPUs on this machine)")
    print(f"load after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

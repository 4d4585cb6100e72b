"""Peak memory and time per phase of one SFT step and one RL step of a real HF model.

    python benchmarks/memory.py sft --mode full              # SmolLM2-135M, fp32 weights, batch 8 x 256 tokens
    python benchmarks/memory.py sft --mode lora              # LoRA r=16 on bf16 weights (recipes/smollm2/sft-gsm8k.yaml)
    python benchmarks/memory.py rl --mode lora               # 4 prompts x G=4 x 128 new tokens, LoRA r=16, bf16 weights
    python benchmarks/memory.py rl --mode full --dtype float32 --rollout-dtype bfloat16 --autocast
    python benchmarks/memory.py rl --mode lora --beta 0.04   # adds the frozen reference model and its log-probs
    python benchmarks/memory.py rl --mode lora --dtype float32 --micro-batch 4 --set gradient_checkpointing=True

One configuration per process, so the process's peak resident memory is that
configuration's. Every phase is timed and its peak RSS recorded by a thread
polling /proc/self/statm every millisecond (it can miss spikes shorter than
that; the process maximum from getrusage, which misses nothing, is printed too). Each phase
shows wall seconds and, in parentheses, this process's CPU seconds (user + system): on a
shared machine the wall time grows with the other jobs' load, the CPU time much less.

The library's own code paths run unchanged: `train_sft` for SFT and
`RLTrainer.step` for RL. Phases are delimited by wrapping what they call:
  load       HFPolicy.load (+ building the optimizer)
  generate   RLTrainer.collect (sampling + scoring)
  logp       RLTrainer._logp (π_old / reference log-probs, no grad)
  forward    the loss: SFT's forward + cross-entropy, RL's minibatch_loss
  backward   Tensor.backward
  optimizer  clip_grad_norm_ + optimizer.step
  other      everything else in a step (batching, logging)
`--saved-tensors` also reports what autograd keeps for the backward pass of
the first step, split into logit-sized tensors (last dim = vocabulary) and the rest.

RL completions are forced to their full length (eos banned while sampling,
`--allow-eos` to let the model stop) and rewarded with a small length term so
that every group has a learning signal: the measured step is the worst case of
its size, and never a skipped update.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**30


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Phases:
    """Wall time and peak RSS per named phase; one phase is current at a time."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.current = "other"
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self):
        r = rss_gb()
        with self.lock:
            self.peak[self.current] = max(self.peak.get(self.current, 0.0), r)

    def switch(self, name: str) -> str:
        """Make `name` the current phase; returns the previous one."""
        self._sample()
        now, cpu = time.perf_counter(), time.process_time()
        with self.lock:
            prev = self.current
            self.seconds[prev] = self.seconds.get(prev, 0.0) + now - self.t0
            self.cpu[prev] = self.cpu.get(prev, 0.0) + cpu - self.c0
            self.current, self.t0, self.c0 = name, now, cpu
        self._sample()
        return prev

    @contextmanager
    def phase(self, name: str):
        prev = self.switch(name)
        try:
            yield
        finally:
            self.switch(prev)

    def wrap(self, fn, name: str):
        """`fn` runs in phase `name`; what follows it is "other" until the next phase starts."""
        def wrapped(*a, **kw):
            self.switch(name)
            try:
                return fn(*a, **kw)
            finally:
                self.switch("other")

        return wrapped

    def reset(self):
        self.switch(self.current)
        with self.lock:
            self.seconds, self.cpu, self.peak = {}, {}, {}

    def stop(self):
        self.switch(self.current)
        self._stop.set()
        self._thread.join()


class SavedTensors:
    """Bytes autograd saves for backward while active (distinct storages), by kind."""

    def __init__(self, vocab: int):
        self.vocab, self.seen, self.bytes = vocab, set(), {"logits": 0, "other": 0}

    def pack(self, t: torch.Tensor):
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            return t
        if key not in self.seen and not isinstance(t, torch.nn.Parameter):
            self.seen.add(key)
            kind = "logits" if t.dim() >= 1 and t.shape[-1] == self.vocab else "other"
            self.bytes[kind] += key[1]
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def instrument_common(ph: Phases, optimizer):
    """backward and optimizer phases (both trainers call these the same way)."""
    backward = torch.Tensor.backward
    torch.Tensor.backward = lambda self, *a, **kw: ph.wrap(backward, "backward")(self, *a, **kw)
    clip = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = ph.wrap(clip, "optimizer")
    optimizer.step = ph.wrap(optimizer.step, "optimizer")


def load_policy(args, ph: Phases):
    from thinkling.models.hf import HFPolicy

    with ph.phase("load"):
        lora = {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.05} if args.mode == "lora" else None
        policy = HFPolicy.load(args.model, dtype=args.dtype, lora=lora, device="cpu")
        if args.rollout_dtype:
            policy.rollout_dtype = args.rollout_dtype
        for key, value in args.model_set:
            setattr(policy, key, value)
    return policy


def report(ph: Phases, steps: list[dict], args, extra: str = ""):
    order = ["load", "generate", "logp", "forward", "backward", "optimizer", "other"]
    print(f"\n# {args.what} {args.mode}: {extra}")
    print(f"command: python benchmarks/memory.py {' '.join(sys.argv[1:])}")
    print(f"machine: torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load avg {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    head = "| step | " + " | ".join(f"{p} s (cpu s) / peak GB" for p in order) + " | step s (cpu s) |"
    print(head)
    print("|" + "---|" * (len(order) + 2))
    for s in steps:
        cells = []
        for p in order:
            cells.append(f"{s['seconds'][p]:.1f} ({s['cpu'][p]:.1f}) / {s['peak'][p]:.2f}" if p in s["seconds"] else "-")
        total = sum(v for k, v in s["seconds"].items() if k != "load")
        cpu = sum(v for k, v in s["cpu"].items() if k != "load")
        print(f"| {s['name']} | " + " | ".join(cells) + f" | {total:.1f} ({cpu:.1f}) |")
    print(f"process peak RSS (getrusage): {max_rss_gb():.2f} GB")


def snapshot(ph: Phases, name: str) -> dict:
    ph.switch(ph.current)
    with ph.lock:
        out = {"name": name, "seconds": dict(ph.seconds), "cpu": dict(ph.cpu), "peak": dict(ph.peak)}
    ph.reset()
    return out


# ---------------------------------------------------------------------- SFT
def run_sft(args):
    from thinkling.config import SFTConfig
    from thinkling.tasks import get_task
    from thinkling.train import sft as sft_mod
    from thinkling.train.common import make_optimizer

    ph = Phases()
    steps = []
    policy = load_policy(args, ph)
    with ph.phase("load"):
        optimizer = make_optimizer(policy.model, 1e-5, 0.0)
    steps.append(snapshot(ph, "load"))
    instrument_common(ph, optimizer)

    task = get_task("gsm8k", skip=200)
    problems = task.problems(64, seed=0)
    examples = [e for e in sft_mod.sft_examples(policy, task, problems)]
    fixed = []  # every example exactly seq_len real tokens: append the next example's tokens as targets
    for i, e in enumerate(examples):
        ids, w = list(e.ids), list(e.weights)
        j = i + 1
        while len(ids) < args.seq_len:
            nxt = examples[j % len(examples)]
            ids += nxt.ids
            w += [1.0] * len(nxt.ids)
            j += 1
        fixed.append(sft_mod.Example(ids[: args.seq_len], w[: args.seq_len]))

    cfg = SFTConfig(steps=1, batch_size=args.batch, lr=1e-5, warmup_steps=0, log_every=1, save_every=10**9,
                    bf16=args.autocast, **_micro(SFTConfig, args))
    saved = SavedTensors(policy.model.config.vocab_size) if args.saved_tensors else None
    if hasattr(sft_mod, "sft_loss"):  # the loss train_sft calls (forward + cross-entropy)
        sft_mod.sft_loss = ph.wrap(sft_mod.sft_loss, "forward")
    else:  # before sft_loss existed: the forward starts at policy.logits and runs until backward
        logits = policy.logits

        def logits_phase(*a, **kw):
            ph.switch("forward")
            return logits(*a, **kw)

        policy.logits = logits_phase
    for step in range(args.steps):
        cfg.steps = step + 1
        ctx = saved.hooks() if saved is not None and step == 0 else _null()
        with ctx:
            sft_mod.train_sft(policy, fixed, cfg, seed=0, start_step=step, optimizer=optimizer)
        steps.append(snapshot(ph, f"step {step + 1}"))
    ph.stop()
    report(ph, steps, args, f"batch {args.batch} x {args.seq_len} tokens, weights {args.dtype}, "
           f"autocast {'bf16' if args.autocast else 'off'}, trainable {_trainable(policy)}")
    if saved is not None:
        print(f"saved for backward (step 1): logit-sized {saved.bytes['logits'] / 2**30:.2f} GB, "
              f"other {saved.bytes['other'] / 2**30:.2f} GB")


def _micro(cls, args) -> dict:
    """micro_batch_size when given (older versions of the library have no such key)."""
    if args.micro_batch is None:
        return {}
    if "micro_batch_size" not in cls.__dataclass_fields__:
        raise SystemExit("--micro-batch: this version of thinkling has no micro_batch_size")
    return {"micro_batch_size": args.micro_batch}


@contextmanager
def _null():
    yield


def _trainable(policy) -> str:
    n = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    return f"{n / 1e6:.1f} M params"


# ----------------------------------------------------------------------- RL
def run_rl(args):
    from thinkling.config import RLConfig
    from thinkling.models.base import SamplingParams
    from thinkling.tasks import get_task
    from thinkling.train import rl as rl_mod
    from thinkling.train.common import make_optimizer

    ph = Phases()
    steps = []
    policy = load_policy(args, ph)
    rl = RLConfig(algorithm="grpo", prompts_per_step=args.prompts, group_size=args.group, ppo_epochs=args.ppo_epochs,
                  beta=args.beta, lr=1e-5, max_new_tokens=args.new_tokens, bf16=args.autocast,
                  rewards={"accuracy": 1.0, "format": 0.1}, **_micro(RLConfig, args))
    with ph.phase("load"):
        optimizer = make_optimizer(policy.model, rl.lr, rl.weight_decay)
    task = get_task("gsm8k", skip=200)
    problems = task.problems(200, seed=0)
    eos = policy.eos_id

    def ban_eos(logits, history):
        logits = logits.clone()
        logits[:, eos] = float("-inf")
        return logits

    class Trainer(rl_mod.RLTrainer):
        def _params(self, step, round_):
            p = super()._params(step, round_)
            return p if args.allow_eos else SamplingParams(p.max_new_tokens, p.temperature, p.top_p, ban_eos, seed=p.seed)

        def _rewards(self, grp):  # always a signal: reward + a small length/text term
            return [float(c.correct) + 1e-4 * len(c.text) for c in grp.completions]

    with ph.phase("load"):
        trainer = Trainer(policy, task, problems, rl, rl_mod.resolve_knobs(rl), optimizer, seed=0)
    steps.append(snapshot(ph, "load"))
    instrument_common(ph, optimizer)
    trainer.collect = ph.wrap(trainer.collect, "generate")
    trainer._logp = ph.wrap(trainer._logp, "logp")
    rl_mod.minibatch_loss = ph.wrap(rl_mod.minibatch_loss, "forward")
    saved = SavedTensors(policy.model.config.vocab_size) if args.saved_tensors else None
    tokens = []
    for step in range(args.steps):
        ctx = saved.hooks() if saved is not None and step == 0 else _null()
        with ctx:
            metrics, groups = trainer.step(step, args.steps)
        tokens.append(metrics.get("generated_tokens", 0))
        steps.append(snapshot(ph, f"step {step + 1}"))
        seq = max(len(g.prefix) + len(c.ids) for g in groups for c in g.completions)
        print(f"step {step + 1}: {metrics.get('generated_tokens')} generated tokens, longest sequence {seq}, "
              f"skipped={metrics.get('skipped_update', 0)}, time/generate_s {metrics['time/generate_s']:.2f}, "
              f"time/update_s {metrics.get('time/update_s', 0):.2f}", flush=True)
    ph.stop()
    report(ph, steps, args, f"{args.prompts} prompts x G={args.group} x {args.new_tokens} new tokens, "
           f"weights {args.dtype}, rollouts {policy.rollout_dtype}, autocast {'bf16' if args.autocast else 'off'}, "
           f"β={args.beta}, μ={args.ppo_epochs}, trainable {_trainable(policy)}")
    if saved is not None:
        print(f"saved for backward (step 1): logit-sized {saved.bytes['logits'] / 2**30:.2f} GB, "
              f"other {saved.bytes['other'] / 2**30:.2f} GB")


def _setting(text: str):
    key, _, value = text.partition("=")
    import ast

    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["sft", "rl"])
    ap.add_argument("--mode", choices=["full", "lora"], default="lora")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None, help="weights: float32 | bfloat16 (default: full float32, lora bfloat16)")
    ap.add_argument("--rollout-dtype", default=None, help="engine weights (default: the weights' dtype)")
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast of the forward (sft.bf16 / rl.bf16)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=None, help="rows per forward/backward (sft/rl.micro_batch_size)")
    ap.add_argument("--allow-eos", action="store_true")
    ap.add_argument("--saved-tensors", action="store_true", help="count what autograd saves in step 1")
    ap.add_argument("--set", dest="model_set", type=_setting, action="append", default=[],
                    help="KEY=VALUE: set a policy attribute after loading (e.g. gradient_checkpointing=True)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.mode == "full" else "bfloat16")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (run_sft if args.what == "sft" else run_rl)(args)


if __name__ == "__main__":
    main()

"""Generated tokens per CPU second: the bf16 rollout engine vs the same engine with its decode step compiled.

    python benchmarks/compiled_decode.py                       # SmolLM2-135M, batch 64 and 16, 64 new tokens
    python benchmarks/compiled_decode.py --batches 64 --new-tokens 128 --repeats 5

The compiled side (`CompiledEngine` below) runs the same prefill and sampling; only the per-token
forward pass is a `torch.compile` (inductor, CPU; the weights frozen into the graph as constants
and prepacked by inductor, or with --no-freeze graph inputs under plain bf16 matmuls) over static
shapes but the batch: a KV cache of fixed capacity attended whole under a mask, so one graph
serves every step. The script first compiles it (wall and CPU seconds reported apart; the
C++ compiler runs in worker processes, so the wall clock is the honest compile cost), then checks
greedy decoding against the eager engine (same tokens; |delta log-prob| of the sampled tokens), then
times both sides in alternating order over repeats at temperature 1 with eos suppressed (every
row generates exactly new-tokens tokens), in wall and CPU seconds of this process (one torch
thread), with the machine's bf16 peak (`_common.gemm_rate`) for the share of peak.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _common import Recorder, decode_args, footer, gemm_rate, header, llama_linear_shapes, table, time_sides
from rollout import ban
from torch import nn

from thinkling.models.base import SamplingParams
from thinkling.models.hf import HFPolicy
from thinkling.models.hf_engine import RolloutEngine, _EngineState, _Linear, _rotate, _Weights
from thinkling.rollout.prompts import prompt_text
from thinkling.tasks import get_task


class _StepModule(nn.Module):
    """The decode step as a module whose weights are buffers, so inductor's freezing can treat
    them as constants (and prepack the bf16 matmul weights for oneDNN itself)."""

    def __init__(self, w: _Weights, dtype):
        super().__init__()
        self.dtype, self.H, self.KV, self.hd, self.scale = dtype, w.n_heads, w.n_kv, w.head_dim, w.scale
        self.register_buffer("embed", w.embed)
        self.norm_eps = w.norm[1]
        self.register_buffer("norm", w.norm[0])
        self.shifted = not isinstance(w.head, _Linear)
        head = w.head.linear if self.shifted else w.head
        self.register_buffer("head", head.weight)
        self.register_buffer("head_bias", w.head.bias)
        self.layers = nn.ModuleList()
        for layer in w.layers:
            m = nn.Module()
            for name in ("q", "k", "v", "o", "gate", "up", "down"):
                lin = getattr(layer, name)
                m.register_buffer(name, lin.weight)
                m.register_buffer(name + "_b", lin.bias)
            for name in ("attn_norm", "mlp_norm", "q_norm", "k_norm"):
                norm = getattr(layer, name)
                m.register_buffer(name, None if norm is None else norm[0])
                setattr(m, name + "_eps", None if norm is None else norm[1])
            self.layers.append(m)

    def lin(self, x, w, b):
        return F.linear(x.to(w.dtype), w, b)

    def forward(self, tokens, pos, slot, keys, cos_t, sin_t, *caches):
        """One decode step over the whole cache capacity: tokens [B], pos [B], slot [1] (long),
        keys [B, cap] bool (real key slots, filled or not), cos_t/sin_t [cap, hd], and each layer's
        key and value cache [B, kv_heads, cap, head_dim], written in place at `slot`. (Separate
        tensors: a write into a slice of one big cache tensor makes inductor copy all of it.)"""
        B = tokens.shape[0]
        H, KV, hd, dtype = self.H, self.KV, self.hd, self.dtype
        cap = caches[0].shape[2]
        x = F.embedding(tokens, self.embed).float()
        cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]  # [B, 1, hd]
        mask = (keys & (torch.arange(cap, device=keys.device) <= slot))[:, None, None]  # [B, 1, 1, cap]
        for i, m in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), m.attn_norm, m.attn_norm_eps).to(dtype)
            q = self.lin(h, m.q, m.q_b).view(B, H, hd)
            k = self.lin(h, m.k, m.k_b).view(B, KV, hd)
            v = self.lin(h, m.v, m.v_b).view(B, KV, hd)
            if m.q_norm is not None:
                q = F.rms_norm(q.float(), (hd,), m.q_norm, m.q_norm_eps)
                k = F.rms_norm(k.float(), (hd,), m.k_norm, m.k_norm_eps)
            q = _rotate(q.float(), cos, sin).to(dtype)
            k_cache, v_cache = caches[2 * i], caches[2 * i + 1]
            k_cache[:, :, slot] = _rotate(k.float(), cos, sin).to(dtype)[:, :, None]
            v_cache[:, :, slot] = v[:, :, None]
            a = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=mask, scale=self.scale,
                                               enable_gqa=KV != H)
            x = x + self.lin(a.reshape(B, H * hd), m.o, m.o_b).float()
            h = F.rms_norm(x, (x.shape[-1],), m.mlp_norm, m.mlp_norm_eps).to(dtype)
            gated = F.silu(self.lin(h, m.gate, m.gate_b)) * self.lin(h, m.up, m.up_b)
            x = x + self.lin(gated, m.down, m.down_b).float()
        hidden = F.rms_norm(x, (x.shape[-1],), self.norm, self.norm_eps)
        if not self.shifted:
            return self.lin(hidden, self.head, self.head_bias).float()
        x = torch.cat([hidden, hidden.new_zeros(B, 1)], dim=1).to(torch.bfloat16)
        top = F.linear(x, self.head).amax(dim=-1, keepdim=True)
        x = torch.cat([x[:, :-1], -top], dim=1)
        logits = F.linear(x, self.head).float() + top.float()
        return logits if self.head_bias is None else logits + self.head_bias


class CompiledEngine(RolloutEngine):
    """The rollout engine with its decode step compiled by inductor (the prefill stays eager).

    Static shapes but for the batch: the KV cache is allocated to a capacity rounded up to
    `bucket` slots and every step attends over all of it with a mask of the filled slots, the
    slot index is a tensor, and the batch dimension is marked dynamic, so one graph serves every
    step, batch size and prompt width under the same bucket. Inductor's freezing makes the
    weights constants (prepacked for oneDNN), so new weights mean a new compile."""

    def __init__(self, *a, bucket: int = 128, freeze: bool = True, **kw):
        super().__init__(*a, **kw)
        self.bucket, self.freeze = bucket, freeze
        self._fn = self._for = None
        self._seen: set = set()
        self.compile_log: list[tuple[str, float, float]] = []  # (what, wall s, CPU s) of each first call

    def step_fn(self, w: _Weights):
        if self._for is not w:
            module = _StepModule(w, self.dtype).eval()
            self._fn = torch.compile(module, fullgraph=True, options={"freezing": self.freeze})
            self._for, self._seen = w, set()
        return self._fn

    def _prefill(self, prompts, steps):
        width = max(map(len, prompts))
        cap = -(-(width + steps) // self.bucket) * self.bucket
        state, logits = super()._prefill(prompts, cap - width)
        cos, sin = state.w.rotary(torch.zeros(1), torch.arange(cap)[None])
        key_cache, value_cache = state.kv
        for cache in state.kv:
            cache[..., width:, :] = 0  # masked slots are still read: 0 x NaN garbage would be NaN
        # this step keeps its keys in the engine's dtype (the eager engine caches them in float32)
        caches = [c for i in range(len(key_cache))
                  for c in (key_cache[i].to(self.dtype, copy=True), value_cache[i].clone())]
        return _StaticState(state, caches, cos[0].float(), sin[0].float()), logits


class _StaticState:
    """`sampling.DecodeState` of the compiled step: one key and one value cache tensor per layer."""

    def __init__(self, base: _EngineState, caches: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor):
        self.engine, self.w, self.keys, self.next_pos = base.engine, base.w, base.keys, base.next_pos
        self.slot = base.slot
        self.caches, self.cos, self.sin = caches, cos, sin

    def select(self, rows):
        state = copy.copy(self)
        state.keys, state.next_pos, state.caches = self.keys[rows], self.next_pos[rows], [c[rows] for c in self.caches]
        return state

    def step(self, tokens):
        engine = self.engine
        fn = engine.step_fn(self.w)
        args = (tokens, self.next_pos, torch.tensor([self.slot]), self.keys, self.cos, self.sin, *self.caches)
        for t in (tokens, self.next_pos, self.keys, *self.caches):
            torch._dynamo.mark_dynamic(t, 0)
        key = (self.caches[0].shape[2], len(tokens) <= 1)
        first = key not in engine._seen
        t0, c0 = time.perf_counter(), time.process_time()
        logits = fn(*args)
        if first:
            engine._seen.add(key)
            engine.compile_log.append((f"capacity {key[0]}, batch {len(tokens)}", time.perf_counter() - t0,
                                       time.process_time() - c0))
        self.slot += 1
        self.next_pos = self.next_pos + 1
        return logits


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    decode_args(ap, batches="64,16", new_tokens=64)
    ap.add_argument("--check-batch", type=int, default=16, help="rows of the greedy exactness check")
    ap.add_argument("--no-freeze", action="store_true",
                    help="weights as graph inputs (plain bf16 matmuls, one compile for every weight version)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    header("compiled decode step: bf16 engine, eager vs torch.compile",
           ["benchmarks/compiled_decode.py", *sys.argv[1:]])
    policy = HFPolicy.load(args.model, device="cpu")
    kw = dict(eos_id=policy.eos_id, pad_id=policy.pad_id, dtype=torch.bfloat16)
    sides = {"engine-bf16": RolloutEngine(policy.model, **kw),
             # unpacked weights: inductor takes the plain bf16 ones (and prepacks them itself when freezing)
             "engine-bf16-compiled": CompiledEngine(policy.model, freeze=not args.no_freeze, pack=False, **kw)}
    compiled = sides["engine-bf16-compiled"]
    batches = [int(b) for b in args.batches.split(",")]
    problems = get_task("chain").problems(max(batches + [args.check_batch]), seed=0, difficulty=[3, 4, 5, 6])
    prompts = [policy.encode_prompt(prompt_text(p)) for p in problems]
    config = policy.model.config
    params_flops = 2 * sum(k * n for k, n in llama_linear_shapes(config))
    print(f"model={args.model} new_tokens={args.new_tokens} prompt_tokens={min(map(len, prompts))}-"
          f"{max(map(len, prompts))} repeats={args.repeats} bucket={compiled.bucket} freeze={compiled.freeze}\n",
          flush=True)

    with torch.inference_mode():  # compile: one step at each batch (same capacity as the timed runs)
        for batch in batches:
            state, _ = compiled._prefill(prompts[:batch], args.new_tokens)
            state.step(torch.full((batch,), policy.pad_id))
    for what, wall, cpu_s in compiled.compile_log:
        print(f"compile ({what}): {wall:.1f} s wall, {cpu_s:.1f} CPU-s in this process", flush=True)

    greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, logits_processor=ban(policy.eos_id))
    ref, got = (side.sample(prompts[: args.check_batch], greedy) for side in sides.values())
    same = sum(a.ids == b.ids for a, b in zip(ref, got))
    agree = [next((i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y), len(a.ids)) for a, b in zip(ref, got)]
    dlogp = [abs(u - v) for a, b, n in zip(ref, got, agree) for u, v in zip(a.logprobs[:n], b.logprobs[:n])]
    print(f"greedy check, batch {args.check_batch} x {args.new_tokens} tokens: {same}/{len(ref)} rows identical, "
          f"{sum(agree)}/{len(ref) * args.new_tokens} tokens before the first difference; |delta log-prob| of the "
          f"tokens before it: mean {statistics.mean(dlogp):.2e}, max {max(dlogp):.2e}\n", flush=True)

    for side in sides.values():  # warm-up outside the timing
        side.sample(prompts[:2], SamplingParams(max_new_tokens=4, logits_processor=ban(policy.eos_id), seed=0))
    n_compiles = len(compiled.compile_log)
    rec = Recorder()
    for batch in batches:
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, logits_processor=ban(policy.eos_id))
        for rep in range(args.repeats):
            time_sides(rec, {name: side.generate for name, side in sides.items()}, prompts, batch, args.new_tokens,
                       rep, params)
            _, peak = gemm_rate([(config.hidden_size, config.intermediate_size)], 1024)
            rec.add(str(batch), "peak", "flop/s", peak)
    assert len(compiled.compile_log) == n_compiles, f"recompiled while timed: {compiled.compile_log[n_compiles:]}"

    rows = []
    for batch in batches:
        b, peak = str(batch), rec.median(str(batch), "peak", "flop/s")
        base, base_cpu = rec.median(b, "engine-bf16", "tok/s"), rec.median(b, "engine-bf16", "tok/cpu-s")
        for side in sides:
            med, cpu_rate = rec.median(b, side, "tok/s"), rec.median(b, side, "tok/cpu-s")
            rows.append([batch, side, f"{med:.1f}", rec.spread(b, side, "tok/s"), f"{med / base:.2f}x",
                         f"{cpu_rate:.1f}",
                         rec.spread(b, side, "tok/cpu-s"), f"{cpu_rate / base_cpu:.2f}x",
                         f"{cpu_rate * params_flops / 1e9:.0f}", f"{peak / 1e9:.0f}",
                         f"{100 * cpu_rate * params_flops / peak:.0f}%"])
    print()
    print(table(["batch", "side", "tok/s (median)", "min–max", "vs eager", "tok/CPU-s", "min–max", "vs eager (CPU)",
                 "matmul GFLOP/CPU-s", "bf16 peak GFLOP/s", "of peak"], rows))
    footer(rec)


if __name__ == "__main__":
    main()

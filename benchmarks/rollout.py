"""Generated tokens/s: thinkling's rollout engine vs Hugging Face `generate`.

    python benchmarks/rollout.py                       # SmolLM2-135M, batch 1/16/64, 128 new tokens
    python benchmarks/rollout.py --batches 16 --repeats 5 --threads 2

Both sides sample (temperature 1) from the same distinct prompts (chain-task
questions in the chat template) with eos suppressed, so each generates exactly
batch x new-tokens tokens. Sides:
  hf           transformers `generate` on the fp32 model (HFPolicy.generate_reference)
  engine       thinkling.models.hf_engine in float32 (what HFPolicy.generate runs by default)
  engine-bf16  the engine with bfloat16 weights and KV cache (rollout_dtype="bfloat16")
  engine-bf16-torch-attention  the same with decode attention in PyTorch instead of the C kernel
               of `models/cpu_kernels.py` (--with-torch-attention)
  hf-bf16      `generate` on a bfloat16 copy of the model (--with-hf-bf16; the fair
               baseline for engine-bf16)
  llama.cpp    llama.cpp's `llama-batched-bench` on a BF16 GGUF of the same weights
               (--llama-cpp BINARY --gguf FILE; how to build both: docs/performance.md)
  openvino     OpenVINO GenAI's continuous-batching pipeline on an fp16 IR of the same weights,
               run in bf16 (--openvino PYTHON --ov-model DIR: an interpreter with openvino-genai
               and the exported model; how to make both: benchmarks/openvino_side.py)
Ratios are the median tokens/s of a side over that of `hf`, measured in the same run. Each
side is also timed in this process's CPU seconds (one torch thread: the work done), which other
jobs on a shared machine disturb far less than the wall clock.

After every repeat of a batch size the script also times the model's matmuls alone (every
linear layer of one decode step, bf16, oneDNN-prepacked as the engine runs them, at that
batch; `_common.gemm_rate`) and a large-batch GEMM (the machine's bf16 peak), so the last
table says what fraction of the GEMM-only speed the engine reaches (both in CPU seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys

import torch
from _common import Recorder, decode_args, footer, gemm_rate, header, llama_linear_shapes, table, time_sides

from thinkling.models.base import SamplingParams
from thinkling.models.hf import HFPolicy
from thinkling.models.hf_engine import RolloutEngine
from thinkling.rollout.prompts import prompt_text
from thinkling.tasks import get_task


def ban(token: int):
    def processor(logits, history):
        logits[:, token] = -float("inf")
        return logits

    return processor


def llama_cpp(binary: str, gguf: str, threads: int, new_tokens: int):
    """llama.cpp's batched decoding as a side: one `llama-batched-bench` process per call, each
    row its own prompt (not shared) of the batch's median prompt length, `new_tokens` generated
    per row. Wall seconds are the tool's own prefill + decode time (model load excluded); CPU
    seconds are the child's (load included, a fraction of a second). It feeds random tokens
    instead of sampling, so it does a little less work than the other sides."""
    def run(prompts, params) -> dict:
        rows, prompt_len = len(prompts), int(statistics.median(map(len, prompts)))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([binary, "-m", gguf, "-c", str(rows * (prompt_len + new_tokens)), "-b", "2048", "-ub", "512",
                              "-npp", str(prompt_len), "-ntg", str(new_tokens), "-npl", str(rows),
                              "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"],
                             capture_output=True, text=True, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
        return {"seconds": result["t_pp"] + result["t_tg"],
                "cpu_seconds": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}

    return run


def openvino(python: str, model_dir: str, threads: int, new_tokens: int):
    """OpenVINO GenAI as a side: one `benchmarks/openvino_side.py` child process per call (its own
    interpreter), every row its own prompt of the batch's median prompt length (random token
    ids), `new_tokens` sampled per row at temperature 1 with eos ignored. Wall and CPU seconds are
    the child's own for the generate call (reading and compiling the model excluded)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openvino_side.py")

    def run(prompts, params) -> dict:
        out = subprocess.run([python, script, "--model-dir", model_dir, "--rows", str(len(prompts)),
                              "--prompt-tokens", str(int(statistics.median(map(len, prompts)))),
                              "--new-tokens", str(new_tokens), "--threads", str(threads)],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if result["generated"] != len(prompts) * new_tokens:
            raise RuntimeError(f"openvino generated {result['generated']} tokens, not {len(prompts) * new_tokens}")
        return {"seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"]}

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    decode_args(ap, batches="1,16,64", new_tokens=128)
    ap.add_argument("--with-hf-bf16", action="store_true")
    ap.add_argument("--with-torch-attention", action="store_true")
    ap.add_argument("--llama-cpp", metavar="BINARY", help="llama-batched-bench, to add llama.cpp as a side")
    ap.add_argument("--gguf", help="BF16 GGUF of the same model, for --llama-cpp")
    ap.add_argument("--openvino", metavar="PYTHON", help="a Python with openvino-genai, to add OpenVINO as a side")
    ap.add_argument("--ov-model", help="OpenVINO IR directory of the same model, for --openvino")
    ap.add_argument("--sides", default=None, help="comma-separated subset of the sides to run (ratios need hf)")
    args = ap.parse_args(argv)
    if bool(args.llama_cpp) != bool(args.gguf):
        ap.error("--llama-cpp and --gguf go together")
    if bool(args.openvino) != bool(args.ov_model):
        ap.error("--openvino and --ov-model go together")
    torch.set_num_threads(args.threads)
    header("rollout: generated tokens/s, engine vs transformers generate", ["benchmarks/rollout.py", *sys.argv[1:]])

    policy = HFPolicy.load(args.model, device="cpu")
    bf16 = copy.copy(policy)  # same model; only the engine's dtype differs
    bf16._engine = None
    bf16.rollout_dtype = "bfloat16"
    sides = {
        "hf": policy.generate_reference,
        "engine": policy.generate,
        "engine-bf16": bf16.generate,
    }
    if args.with_torch_attention:
        torch_attention = copy.copy(bf16)
        torch_attention._engine = RolloutEngine(policy.model, eos_id=policy.eos_id, pad_id=policy.pad_id,
                                                dtype=torch.bfloat16, c_kernels=False)
        sides["engine-bf16-torch-attention"] = torch_attention.generate
    if args.with_hf_bf16:
        hf16 = HFPolicy(copy.deepcopy(policy.model).to(torch.bfloat16), policy.tokenizer)
        sides["hf-bf16"] = hf16.generate_reference
    if args.llama_cpp:
        sides["llama.cpp"] = llama_cpp(args.llama_cpp, args.gguf, args.threads, args.new_tokens)
    if args.openvino:
        sides["openvino"] = openvino(args.openvino, args.ov_model, args.threads, args.new_tokens)
    if args.sides:
        sides = {k: v for k, v in sides.items() if k in args.sides.split(",")}
    batches = [int(b) for b in args.batches.split(",")]
    config = policy.model.config
    shapes = llama_linear_shapes(config)
    params_flops = 2 * sum(k * n for k, n in shapes)  # matmul FLOPs of one generated token (attention not counted)
    problems = get_task("chain").problems(max(batches), seed=0, difficulty=[3, 4, 5, 6])
    prompts = [policy.encode_prompt(prompt_text(p)) for p in problems]
    print(f"model={args.model} new_tokens={args.new_tokens} prompt_tokens={min(map(len, prompts))}-{max(map(len, prompts))} "
          f"repeats={args.repeats} sides={','.join(sides)}\n")

    warm = SamplingParams(max_new_tokens=4, logits_processor=ban(policy.eos_id), seed=0)
    for fn in sides.values():
        fn(prompts[:2], warm)
    rec = Recorder()
    for batch in batches:
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, logits_processor=ban(policy.eos_id))
        for rep in range(args.repeats):
            time_sides(rec, sides, prompts, batch, args.new_tokens, rep, params)
            sec, rate = gemm_rate(shapes, batch)
            _, peak = gemm_rate([(config.hidden_size, config.intermediate_size)], 1024)
            rec.add(str(batch), "gemm", "tok/s", batch / sec)
            rec.add(str(batch), "gemm", "flop/s", rate)
            rec.add(str(batch), "peak", "flop/s", peak)
            print(f"  batch {batch:3d} rep {rep} matmuls alone {batch / sec:7.1f} tok/CPU-s ({rate / 1e9:.0f} GFLOP/s; "
                  f"bf16 peak at 1024 x {config.hidden_size} x {config.intermediate_size}: {peak / 1e9:.0f} GFLOP/s)",
                  flush=True)

    rows = []
    for batch in batches:
        b = str(batch)
        base, base_cpu = ((rec.median(b, "hf", "tok/s"), rec.median(b, "hf", "tok/cpu-s")) if "hf" in sides
                          else (float("nan"), float("nan")))
        for side in sides:
            med, cpu = rec.median(b, side, "tok/s"), rec.median(b, side, "tok/cpu-s")
            ratio = lambda x, y: "" if y != y else f"{x / y:.2f}x"  # no hf side: no ratio
            rows.append([batch, side, f"{med:.1f}", rec.spread(b, side, "tok/s"), ratio(med, base),
                         f"{cpu:.1f}", rec.spread(b, side, "tok/cpu-s"), ratio(cpu, base_cpu)])
    print()
    print(table(["batch", "side", "tok/s (median)", "min–max", "vs hf", "tok/CPU-s", "min–max", "vs hf (CPU)"], rows))
    rows = []
    for batch in batches:
        b = str(batch)
        gemm, peak = rec.median(b, "gemm", "tok/s"), rec.median(b, "peak", "flop/s")
        for side in [s for s in sides if s.startswith("engine") or s in ("llama.cpp", "openvino")]:
            med = rec.median(b, side, "tok/cpu-s")  # CPU time on both sides of the comparison
            rows.append([batch, side, f"{med:.1f}", f"{med * params_flops / 1e9:.1f}", f"{gemm:.1f}",
                         f"{100 * med / gemm:.0f}%", f"{peak / 1e9:.0f}", f"{100 * med * params_flops / peak:.0f}%"])
    print(f"\nmatmul FLOPs per generated token: {params_flops / 1e6:.1f} M (2 x the linear weights; "
          f"the bf16 engine's LM head runs 1 1/6 times at SmolLM2's vocabulary, see hf_engine._ShiftedHead)")
    print(table(["batch", "side", "tok/CPU-s", "matmul GFLOP/CPU-s", "matmuls-alone tok/CPU-s (bf16)", "of matmuls-alone",
                 "bf16 peak GFLOP/s", "of peak"], rows))
    footer(rec)


if __name__ == "__main__":
    main()

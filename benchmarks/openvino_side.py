"""OpenVINO (openvino-genai) "side" for batch LLM decoding of SmolLM2-135M on CPU.

Measures wall and process-CPU seconds of ONE batched generate (and, apart, of reading and
compiling the model, the floor of a weight sync if this engine sampled rollouts): `rows` distinct
prompts of exactly P tokens (random token ids, fixed seed), `new-tokens` new
tokens per row, multinomial sampling at temperature 1 (no top-k/top-p), EOS
ignored. Prints one JSON line to stdout; everything else goes to stderr.
Run it with the separate venv as a child process:

    /tmp/ovenv/bin/python benchmarks/openvino_side.py --model-dir /tmp/ov_smollm2 \
        --rows 64 --prompt-tokens 41 --new-tokens 128 --threads 1

API: openvino_genai.ContinuousBatchingPipeline.generate(list[ov.Tensor] of token
ids, list[GenerationConfig]). Token ids go straight in (no tokenizer in the
loop). All rows are added as requests before the first step; with
max_num_seqs >= rows and max_num_batched_tokens >= rows*P the scheduler runs
every prompt in one prefill step, then each step is one model inference over
all `rows` running sequences (paged KV cache), i.e. truly one batch.
KV cache precision defaults to the inference precision (OpenVINO's own CPU
default would be u8-compressed KV; pass --kv-precision u8 to get that).

How /tmp/ovenv and /tmp/ov_smollm2 were made (torch 2.13.0+cpu comes from the
local wheel dir /opt/wheels; without the torch pin pip pulls CUDA torch 2.14.1):
    /work/main/.venv/bin/python -m venv /tmp/ovenv
    /tmp/ovenv/bin/pip install /tmp/ov/*.whl "optimum-intel[openvino]" torch==2.13.0
    /tmp/ovenv/bin/pip uninstall -y torchvision   # PyPI build breaks import on CPU torch; unused
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 /tmp/ovenv/bin/optimum-cli export openvino \
        --model ~/.cache/thinkling/models/smollm2-135m --task text-generation-with-past \
        --weight-format fp16 /tmp/ov_smollm2
The IR is stateful (KV cache as 60 state variables, turned into paged attention by
the CB pipeline); its weights are fp16 constants (no int8/int4), and the
tokenizer/detokenizer IRs are written next to it by the same command.
"""
import argparse
import json
import math
import os
import random
import resource
import sys
import time


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/ov_smollm2")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=41)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--kv-precision", choices=["bf16", "f32", "u8"], default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--greedy-text", help="only decode this text greedily (check), then exit")
    a = ap.parse_args()

    import numpy as np
    import openvino as ov
    import openvino_genai as ovg

    cfg = json.load(open(os.path.join(a.model_dir, "config.json")))
    rows, P, new = a.rows, a.prompt_tokens, a.new_tokens
    props = {"INFERENCE_NUM_THREADS": a.threads, "INFERENCE_PRECISION_HINT": a.precision,
             "KV_CACHE_PRECISION": a.kv_precision or a.precision}
    # KV bytes per token (f32 worst case), times tokens with one spare block per row
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_tok = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 4
    sched = ovg.SchedulerConfig()
    sched.cache_size = max(1, math.ceil(rows * (P + new + 64) * per_tok / 2**30))  # GB
    sched.max_num_seqs = max(rows, 1)
    sched.max_num_batched_tokens = max(rows * P, 256)
    sched.enable_prefix_caching = False  # warm-up must not pre-fill the real run's KV
    c0, t0 = cpu_seconds(), time.perf_counter()
    pipe = ovg.ContinuousBatchingPipeline(a.model_dir, sched, "CPU", props)  # reads and compiles the IR
    load = (time.perf_counter() - t0, cpu_seconds() - c0)
    print(f"openvino {ov.__version__} genai {ovg.__version__} props={props} "
          f"cache_size={sched.cache_size}GB", file=sys.stderr)

    if a.greedy_text is not None:
        tok = pipe.get_tokenizer()
        ids = tok.encode(a.greedy_text, add_special_tokens=False).input_ids
        gc = ovg.GenerationConfig(max_new_tokens=new, do_sample=False, ignore_eos=True)
        out = pipe.generate([ids], [gc])[0].m_generation_ids[0]
        print(json.dumps({"prompt_ids": list(ids.data[0]), "new_ids": list(out),
                          "text": tok.decode(list(out))}, default=int))
        return

    rng = random.Random(a.seed)
    lo, hi = 100, cfg["vocab_size"]  # skip the special / byte tokens at the start
    prompts = [ov.Tensor(np.array([[rng.randrange(lo, hi) for _ in range(P)]], np.int64))
               for _ in range(rows)]

    def run(n):
        gcs = [ovg.GenerationConfig(max_new_tokens=n, ignore_eos=True, do_sample=True,
                                    temperature=1.0, rng_seed=a.seed + i) for i in range(rows)]
        c0, t0 = cpu_seconds(), time.perf_counter()
        res = pipe.generate(prompts, gcs)
        t1, c1 = time.perf_counter(), cpu_seconds()
        return t1 - t0, c1 - c0, sum(len(s) for r in res for s in r.m_generation_ids)

    w = run(4)
    print(f"warm-up: {w[0]:.2f}s wall, {w[1]:.2f}s cpu, {w[2]} tokens", file=sys.stderr)
    wall, cpu, gen = run(new)
    m = pipe.get_metrics()
    print(f"max KV cache usage {m.max_cache_usage:.1f}% of {m.cache_size_in_bytes / 2**30:.2f} GiB",
          file=sys.stderr)
    if gen != rows * new:
        print(f"WARNING: generated {gen} != rows*new_tokens {rows * new}", file=sys.stderr)
    print(json.dumps({"seconds": round(wall, 4), "cpu_seconds": round(cpu, 4),
                      "generated": gen, "prompt_tokens": P, "rows": rows,
                      "load_seconds": round(load[0], 3), "load_cpu_seconds": round(load[1], 3),
                      "precision": a.precision, "kv_precision": props["KV_CACHE_PRECISION"],
                      "threads": a.threads, "openvino": ov.__version__}))


if __name__ == "__main__":
    main()

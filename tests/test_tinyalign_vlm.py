"""TinyAlign on the tiny VLM (`model.tiny.tinyalign`): memory slots in the prompt, no loss on them,
no self-retrieval, the bank saved with the policy, one-line config errors, exact resume."""

import shutil

import pytest
import torch

from thinkling import jobs
from thinkling.cli import main
from thinkling.config import load_recipe
from thinkling.errors import ThinklingError
from thinkling.models import images as image_store
from thinkling.models import load_policy
from thinkling.models.base import SamplingParams
from thinkling.models.tiny_vlm import TinyVLMPolicy
from thinkling.models.tinyalign import pair_source, prompt_keys
from thinkling.rollout.prompts import prompt_ids, prompt_text
from thinkling.tasks import get_task
from thinkling.train.sft import build_memory, collate, sft_examples, sft_loss

VISION = {"image_size": 36, "patch_size": 12, "d_model": 16, "n_layers": 1, "n_heads": 2, "connector_hidden": 32}
MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 192, "vision": VISION}
TOP_K = 3
N_IMAGE = 9  # (36 / 12)^2 patches


def _task_problems(n=24, seed=0):
    task = get_task("shapes", question="mixed")
    return task, task.problems(n, seed, [1, 2, 3])


@pytest.fixture
def aligned():
    task, problems = _task_problems()
    policy = TinyVLMPolicy.create({**MODEL, "tinyalign": {"top_k": TOP_K}}, seed=0)
    assert build_memory(policy, task, problems)
    return policy, task, problems


def _memory_entries(ids):
    """Bank entries of a prompt's memory slots (slot index >= the image tokens)."""
    _, j = image_store.split_slot(torch.tensor([i for i in ids if i < 0]))
    return (j[j >= N_IMAGE] - N_IMAGE).tolist()


def test_prompt_holds_top_k_memory_slots_after_the_image_and_they_feed_the_model(aligned):
    policy, task, problems = aligned
    ids = prompt_ids(policy, problems[0])
    assert ids[1 : 1 + N_IMAGE] == image_store.slot_ids(image_store.split_slot(ids[1])[0], N_IMAGE)
    assert len(_memory_entries(ids)) == TOP_K and all(i < 0 for i in ids[1 + N_IMAGE : 1 + N_IMAGE + TOP_K])
    assert ids[1 + N_IMAGE + TOP_K :] == policy.encode_text(prompt_text(problems[0]))
    # the memory tokens are the bank values through the memory connector: changing it changes the logits
    x = torch.tensor([ids + policy.encode_text("tl")])
    before = policy.model(x)
    with torch.no_grad():
        policy.model.memory_connector[2].bias.add_(0.5)
    assert not torch.allclose(before, policy.model(x))
    out = policy.generate([ids], SamplingParams(max_new_tokens=4, temperature=0))
    assert len(out[0]) == 4 or out[0][-1] == policy.eos_id


def test_memory_tokens_get_no_loss_but_their_connector_is_trained(aligned):
    policy, task, problems = aligned
    examples = sft_examples(policy, task, problems[:4])
    for e in examples:
        prefix = 1 + N_IMAGE + TOP_K
        assert all(i < 0 for i in e.ids[1:prefix]) and not any(e.weights[:prefix])  # slots: context, weight 0
        assert all(i >= 0 for i, w in zip(e.ids, e.weights) if w > 0)
    ids, mask, weights = collate(examples, policy.pad_id)
    loss = sft_loss(policy, ids, mask, weights)
    # the loss is the mean CE over weighted targets alone, and no slot position is one
    logp = torch.log_softmax(policy.model(ids)[:, :-1].float(), -1).gather(2, ids[:, 1:].clamp(min=0)[..., None])[..., 0]
    targets = weights[:, 1:] > 0
    assert not (targets & (ids[:, 1:] < 0)).any()
    assert loss.item() == pytest.approx((-logp[targets]).mean().item(), rel=1e-5)
    loss.backward()
    grads = [p.grad for p in policy.model.memory_connector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # context that the loss depends on


def test_a_training_pair_never_retrieves_itself(aligned):
    policy, task, problems = aligned
    bank = policy.model.bank
    assert len(bank) == len(problems)
    for p in problems:
        handles = [image_store.register(im) for im in p.images]
        own = pair_source([image_store.pixels(h) for h in handles], prompt_text(p))
        entries = _memory_entries(prompt_ids(policy, p))
        assert own in bank.sources.tolist() and own not in bank.sources[entries].tolist()
        # without leaving it out, the pair itself would be the best match
        image, text, _ = prompt_keys(handles, prompt_text(p))
        assert bank.sources[bank.search(bank.query_keys(image[None], text[None]), 1)[1][0, 0]] == own


def test_bank_is_deterministic_and_saved_with_the_policy(aligned, tmp_path):
    policy, task, problems = aligned
    again = TinyVLMPolicy.create({**MODEL, "tinyalign": {"top_k": TOP_K}}, seed=0)
    build_memory(again, task, problems)
    assert torch.equal(again.model.bank.keys, policy.model.bank.keys)
    assert not build_memory(policy, task, problems[:5])  # a policy keeps the bank it was trained with
    policy.save(str(tmp_path / "p"))
    loaded = load_policy(tmp_path / "p")
    for name in ("keys", "values", "sources"):
        assert torch.equal(getattr(loaded.model.bank, name), getattr(policy.model.bank, name))
    heldout = _task_problems(6, seed=1)[1]
    prompts = [prompt_ids(policy, p) for p in heldout]
    assert [prompt_ids(loaded, p) for p in heldout] == prompts
    params = SamplingParams(max_new_tokens=6, temperature=0)
    assert loaded.generate(prompts, params) == policy.generate(prompts, params)
    # a policy without its bank cannot encode image prompts: one clear error
    (tmp_path / "p" / "memory_bank.safetensors").unlink()
    with pytest.raises(ThinklingError, match="no memory bank yet"):
        prompt_ids(load_policy(tmp_path / "p"), heldout[0])


def test_plain_twin_is_unchanged_by_the_option():
    plain = TinyVLMPolicy.create(MODEL, seed=0)
    aligned = TinyVLMPolicy.create({**MODEL, "tinyalign": {"top_k": TOP_K}}, seed=0)
    plain_state = plain.model.state_dict()
    for name, value in aligned.model.state_dict().items():
        assert name.startswith("memory_connector.") or torch.equal(value, plain_state[name]), name
    assert not hasattr(plain.model, "memory_connector") and plain.model.bank is None


@pytest.mark.parametrize("override, needle", [
    ("model.tiny.tinyalign={top_k: 0}", "'tinyalign.top_k': must be a positive integer"),
    ("model.tiny.tinyalign={top_k: 100}", "'tinyalign.top_k': at most 64"),
    ("model.tiny.tinyalign={top_k: true}", "'tinyalign.top_k'"),
    ("model.tiny.tinyalign={bank_size: -5}", "'tinyalign.bank_size': must be a positive integer"),
    ("model.tiny.tinyalign={bank_size: 1000000}", "'tinyalign.bank_size': at most"),
    ("model.tiny.tinyalign={topk: 3}", "'tinyalign': unknown key 'topk'"),
    ("model.tiny.tinyalign=3", "'tinyalign': must be a mapping"),
    ("train.size=3", "'tinyalign.top_k': 4, but only 3 training pairs"),
])
def test_bad_tinyalign_config_is_one_line_and_writes_nothing(capsys, tmp_path, override, needle):
    out = tmp_path / "run"
    code = main(["sft", "recipes/vlm/tinyalign-shapes.yaml", f"output_dir={out}", "train.size=24", override, "eval.size=2"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_killed_and_resumed_sft_ends_bit_identical(tmp_path):
    """4 steps straight == 2 steps, a crash, a resume from the step-2 checkpoint, 2 more."""
    common = ["model.tiny={d_model: 16, n_layers: 1, n_heads: 2, max_seq_len: 192, vision: {image_size: 36, "
              "patch_size: 12, d_model: 16, n_layers: 1, n_heads: 2, connector_hidden: 16}, tinyalign: {top_k: 2}}",
              "train.size=24", "eval.size=2", "eval.max_new_tokens=4", "sft.steps=4", "sft.batch_size=4",
              "sft.save_every=2", "sft.warmup_steps=1"]
    recipe = "recipes/vlm/tinyalign-shapes.yaml"
    jobs.run_sft(load_recipe(recipe, [f"output_dir={tmp_path}/a", *common]))
    b = tmp_path / "b"
    jobs.run_sft(load_recipe(recipe, [f"output_dir={b}", *common]))
    shutil.rmtree(b / "checkpoints" / "step_000004")  # the crash: nothing after step 2 survives
    shutil.rmtree(b / "final")
    (b / "checkpoints" / "latest").write_text("step_000002")
    jobs.run_sft(load_recipe(recipe, [f"output_dir={b}", *common]), resume=True)
    pa, pb = load_policy(tmp_path / "a"), load_policy(b)
    wa, wb = pa.model.state_dict(), pb.model.state_dict()
    assert any(name.startswith("memory_connector.") for name in wa)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    for name in ("keys", "values", "sources"):
        assert torch.equal(getattr(pa.model.bank, name), getattr(pb.model.bank, name))


@pytest.mark.slow  # ~40 s, most of it the stages' reports and plots
def test_sft_then_grpo_then_eval_load_the_saved_bank(tmp_path):
    """The CLGRPO pipeline with a TinyAlign model: RL and eval use the bank SFT built and saved."""
    from thinkling.pipeline import run_pipeline

    run_pipeline("recipes/vlm/clgrpo-shapes.yaml", [
        f"output_dir={tmp_path}/p", "model.tiny={d_model: 16, n_layers: 1, n_heads: 2, max_seq_len: 192, "
        "vision: {image_size: 36, patch_size: 12, d_model: 16, n_layers: 1, n_heads: 2, connector_hidden: 16}, "
        "tinyalign: {top_k: 2}}", "train.size=16", "eval.size=4", "sft.steps=2", "sft.batch_size=4", "rl.steps=1",
        "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=8", "eval.max_new_tokens=8",
        "stages=[{name: sft, kind: sft}, {name: grpo, kind: rl}]"])
    sft, grpo = load_policy(tmp_path / "p" / "1-sft"), load_policy(tmp_path / "p" / "2-grpo")
    assert torch.equal(sft.model.bank.keys, grpo.model.bank.keys) and len(sft.model.bank) == 16
    assert main(["eval", "--model", str(tmp_path / "p" / "2-grpo"), "--task", "shapes", "--limit", "2", "--difficulty", "1",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "e")]) == 0

"""TinyAlign on an hf_vlm policy (`model.tinyalign`): memory slots right after the image tokens,
no loss on them, their tokens reach the logits, no self-retrieval, batched generation equal to
one prompt at a time, the connector and bank saved with the policy, one-line config errors, exact
resume. A tiny random LLaVA built here (`test_hf_vlm.make_vlm`, no download)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")
from safetensors import safe_open  # noqa: E402
from sft_resume import straight_and_resumed  # noqa: E402
from test_hf_vlm import make_vlm  # noqa: E402

from thinkling.cli import main  # noqa: E402
from thinkling.models import images as image_store  # noqa: E402
from thinkling.models import load_policy  # noqa: E402
from thinkling.models.base import SamplingParams, pad_batch  # noqa: E402
from thinkling.models.hf_vlm import MEMORY_MODULE, HFVLMPolicy  # noqa: E402
from thinkling.models.tinyalign import pair_source  # noqa: E402
from thinkling.rollout.prompts import prompt_ids, prompt_text  # noqa: E402
from thinkling.tasks import get_task  # noqa: E402
from thinkling.train.sft import build_memory, collate, sft_examples, sft_loss  # noqa: E402

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
TOP_K = 2


def _task():
    task = get_task("shapes", question="mood")
    return task, task.problems(12, 0, [1, 2])


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny random LLaVA saved as a model folder (what `model.name` points at)."""
    folder = tmp_path_factory.mktemp("llava") / "model"
    HFVLMPolicy(*make_vlm("llava")).save(str(folder))
    return folder


@pytest.fixture
def aligned(llava):
    task, problems = _task()
    policy = HFVLMPolicy.load(str(llava), lora=LORA, tinyalign={"top_k": TOP_K})
    assert build_memory(policy, task, problems) and len(policy.memory.bank) == len(problems)
    return policy, task, problems


def _split(policy, ids):
    """(image slot positions, memory slot positions, memory entries) of prompt ids."""
    ids = torch.tensor(ids)
    handle, j = image_store.split_slot(ids)
    n = torch.tensor([policy._image_tokens(int(h)) if t < 0 else 0 for h, t in zip(handle, ids)])
    slots = ids < 0
    image, memory = slots & (j < n), slots & (j >= n)
    return image.nonzero().flatten(), memory.nonzero().flatten(), (j - n)[memory]


def test_memory_slots_follow_the_image_and_get_no_loss(aligned):
    policy, task, problems = aligned
    for p in problems[:3]:
        image, memory, entries = _split(policy, prompt_ids(policy, p))
        assert len(memory) == TOP_K and memory.tolist() == list(range(int(image[-1]) + 1, int(image[-1]) + 1 + TOP_K))
        own = pair_source([image_store.pixels(image_store.register(im)) for im in p.images], prompt_text(p))
        assert own not in policy.memory.bank.sources[entries].tolist()  # a training pair never retrieves itself
    examples = sft_examples(policy, task, problems[:4])
    ids, mask, weights = collate(examples, policy.pad_id)
    for row in range(ids.shape[0]):
        _, memory, _ = _split(policy, ids[row].tolist())
        assert len(memory) == TOP_K and torch.all(weights[row, memory] == 0)
    policy.model.train()
    sft_loss(policy, ids, mask, weights).backward()
    grads = [p.grad for p in policy.memory.connector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # trained through the completion's loss


def test_retrieved_tokens_change_the_logits(aligned):
    """Other bank entries in the memory slots: the same logits before them, other logits after."""
    policy, task, problems = aligned
    ids = prompt_ids(policy, problems[0])
    _, memory, entries = _split(policy, ids)
    other = list(ids)
    h, n = image_store.split_slot(ids[memory[0]])[0], policy._image_tokens(image_store.split_slot(ids[memory[0]])[0])
    swap = [e for e in range(len(policy.memory.bank)) if e not in entries.tolist()][:TOP_K]
    for pos, e in zip(memory.tolist(), swap):
        other[pos] = image_store.slot_id(h, n + e)
    with torch.no_grad():
        a, b = (policy.logits(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))[0] for x in (ids, other))
    first = int(memory[0])
    assert torch.equal(a[:first], b[:first])
    assert not torch.allclose(a[first:], b[first:], atol=1e-4)


def test_batched_generation_equals_one_prompt_at_a_time(aligned):
    """Greedy generation (left padding, KV cache) of prompts of different lengths: the same
    completions and the same first-step scores batched as alone, and those scores depend on the
    retrieved tokens."""
    policy, task, problems = aligned
    pictures = [p.images for p in task.problems(3, 1, [1, 2, 3])]
    prompts = [policy.encode_prompt(t, im) for t, im in zip(["What mood?", "Say it.", "Mood of this scene?"], pictures)]
    assert len({len(p) for p in prompts}) == 3

    def first_scores(batch):
        seen = []

        def record(scores, completion):
            if completion.shape[1] == 0:
                seen.append(scores.clone())
            return scores

        out = policy.generate(batch, SamplingParams(6, 0.0, logits_processor=record))
        return out, torch.cat(seen)

    batched, scores = first_scores(prompts)
    alone = [first_scores([p]) for p in prompts]
    assert batched == [c[0] for c, _ in alone]
    assert torch.allclose(scores, torch.cat([s for _, s in alone]), atol=1e-5)
    with torch.no_grad():
        policy.memory.connector[2].bias.add_(1.0)
    assert not torch.allclose(first_scores(prompts)[1], scores, atol=1e-4)


def test_save_and_load_round_trip(aligned, tmp_path):
    policy, task, problems = aligned
    with torch.no_grad():
        policy.memory.connector[0].bias.add_(0.5)  # trained-looking weights, not a fresh init
    policy.save(str(tmp_path / "p"))
    saved = json.loads((tmp_path / "p" / "policy.json").read_text())
    assert saved["tinyalign"] == {"top_k": TOP_K, "bank_size": None}
    with safe_open(str(tmp_path / "p" / "adapter_model.safetensors"), framework="pt") as f:
        assert not any(MEMORY_MODULE in k for k in f.keys())  # TinyAlign's weights have a file of their own
    again = load_policy(tmp_path / "p")
    for name in ("keys", "values", "sources"):
        assert torch.equal(getattr(again.memory.bank, name), getattr(policy.memory.bank, name))
    ca, cb = policy.memory.connector.state_dict(), again.memory.connector.state_dict()
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    ids = prompt_ids(policy, problems[0])
    assert prompt_ids(again, problems[0]) == ids
    batch, mask = pad_batch([ids], policy.pad_id)
    with torch.no_grad():
        assert torch.allclose(policy.logits(batch, mask), again.logits(batch, mask), atol=1e-6)


def _recipe(tmp_path, folder):
    """An SFT recipe of the saved tiny LLaVA with TinyAlign."""
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"""seed: 0
threads: 1
model: {{backend: hf_vlm, name: {folder}, lora: {{r: 4, alpha: 8, dropout: 0.0}}, tinyalign: {{top_k: 2}}}}
train: {{name: shapes, options: {{question: mood}}, size: 8, difficulty: [1, 2], seed: 0}}
eval: {{name: shapes, options: {{question: mood}}, size: 2, difficulty: [1], seed: 1, max_new_tokens: 4}}
sft: {{steps: 2, batch_size: 2, lr: 1.0e-2, warmup_steps: 0, save_every: 1}}
""")
    return recipe


@pytest.mark.parametrize("override, needle", [
    ("model.tinyalign={top_k: 0}", "'tinyalign.top_k': must be a positive integer"),
    ("model.tinyalign={topk: 3}", "'tinyalign': unknown key 'topk'"),
    ("model.tinyalign=3", "'model.tinyalign': expected dict"),
    ("train.size=2", "'tinyalign.top_k': 2, but only 2 training pairs"),
    ("model.backend=hf", "'model.tinyalign': must be null unless model.backend is hf_vlm"),
])
def test_bad_tinyalign_config_is_one_line_and_writes_nothing(llava, capsys, tmp_path, override, needle):
    recipe, out = _recipe(tmp_path, llava), tmp_path / "run"
    code = main(["sft", str(recipe), f"output_dir={out}", override])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "Loading weights" not in line]  # transformers' own bar
    assert code == 2 and needle in err and "Traceback" not in err and len(lines) == 1, err
    assert not out.exists()


@pytest.mark.slow
def test_killed_and_resumed_sft_ends_identical(llava, tmp_path, capsys):
    """2 steps straight == 1 step, a crash, a resume from the step-1 checkpoint, 1 more: adapters,
    connector, TinyAlign's connector and bank all equal."""
    recipe = _recipe(tmp_path, llava)
    a, b = straight_and_resumed(recipe, tmp_path, capsys)
    pa, pb = load_policy(a), load_policy(b)
    wa, wb = pa.model.state_dict(), pb.model.state_dict()
    assert any(k.startswith(f"base_model.model.{MEMORY_MODULE}.") for k in wa)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for name in ("keys", "values", "sources"):
        assert torch.equal(getattr(pa.memory.bank, name), getattr(pb.memory.bank, name))
    fresh = HFVLMPolicy.load(str(llava), lora=LORA, tinyalign={"top_k": 2})
    key = f"base_model.model.{MEMORY_MODULE}.connector.0.weight"
    assert not torch.equal(wa[key], fresh.model.state_dict()[key])  # it was trained

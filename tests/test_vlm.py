"""Vision-language: image problems, the tiny VLM, and the SFT / GRPO / BREAD paths on image prompts."""

import json

import numpy as np
import pytest
import torch

from thinkling.cli import main
from thinkling.errors import ThinklingError
from thinkling.models import images as image_store
from thinkling.models import load_policy
from thinkling.models.base import SamplingParams, pad_batch
from thinkling.models.logprobs import masked_token_logprobs
from thinkling.models.tiny_vlm import TinyVLMPolicy
from thinkling.rollout.bread import anchor_failed_groups
from thinkling.rollout.groups import sample_groups
from thinkling.rollout.prompts import anchor_text, prompt_ids
from thinkling.rollout.scoring import score
from thinkling.tasks import get_task
from thinkling.tasks.shapes import CELLS, COLOURS, mood_of
from thinkling.train.rl import build_batch, minibatch_loss, resolve_knobs
from thinkling.train.sft import collate, sft_examples, sft_loss

VISION = {"image_size": 36, "patch_size": 12, "d_model": 16, "n_layers": 1, "n_heads": 2, "connector_hidden": 32}


@pytest.fixture
def vlm():
    return TinyVLMPolicy.create({"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 192, "vision": VISION},
                                seed=0)


def _problems(n=4, seed=0, difficulty=(1, 2, 3), **options):
    return get_task("shapes", **options).problems(n, seed, list(difficulty))


def test_shapes_problems_render_the_scene_and_verify():
    task = get_task("shapes")
    problems = task.problems(40, 0, [1, 2, 3, 4, 5])
    again = task.problems(40, 0, [1, 2, 3, 4, 5])
    assert [p.images[0].tobytes() for p in problems] == [p.images[0].tobytes() for p in again]  # deterministic
    for p in problems:
        scene = p.meta["scene"]
        assert len(scene) == p.difficulty and p.images[0].mode == "RGB" and p.images[0].size == (36, 36)
        reasoning, label = mood_of(list(scene))
        assert p.answer == label and f"label={label}" in p.tags
        assert p.steps == tuple(f"{w} {c} {f}" for c, f, w in scene) + tuple(reasoning)
        assert task.verify(p, task.target(p)).correct
        assert not task.verify(p, task.target(p).replace(f"A:{p.answer}", "A:joyful")).correct
        assert not task.format_ok("warm 1 cool 0")
        # each filled shape shows its colour at its cell's centre; empty cells are background
        pixels = np.asarray(p.images[0], dtype=float)
        for i, cell in enumerate(CELLS):
            centre = pixels[(i // 3) * 12 + 5 : (i // 3) * 12 + 7, (i % 3) * 12 + 5 : (i % 3) * 12 + 7].mean((0, 1))
            shape = next((s for s in scene if s[2] == cell), None)
            if shape is None:
                assert centre.min() > 190, cell
            elif shape[1] in ("circle", "square"):
                assert np.abs(centre - COLOURS[shape[0]]).max() < 60, (cell, shape)
    count = get_task("shapes", question="count").problems(30, 0, [3])
    for p in count:
        value = p.prompt.removeprefix("how many ").removesuffix("?")
        assert p.answer == str(sum(value in (c, f) for c, f, _ in p.meta["scene"]))
    with pytest.raises(ThinklingError, match="at most 9"):
        get_task("shapes").problems(2, 0, [10])
    with pytest.raises(ThinklingError, match="question"):
        get_task("shapes", question="colour")


def test_slot_ids_are_content_addressed():
    a, b = _problems(2, seed=3)
    h = image_store.register(a.images[0])
    assert image_store.register(a.images[0].copy()) == h != image_store.register(b.images[0])
    assert image_store.split_slot(image_store.slot_id(h, 5)) == (h, 5)
    assert np.array_equal(image_store.pixels(h), np.asarray(a.images[0]))


def test_vlm_batched_equals_per_prompt_and_sees_the_image(vlm):
    problems = _problems(5, difficulty=(1, 4))
    prompts = [prompt_ids(vlm, p) for p in problems]
    n_img = vlm.model.n_image_tokens
    assert all(ids[1 : 1 + n_img] == image_store.slot_ids(image_store.register(p.images[0]), n_img)
               for ids, p in zip(prompts, problems))
    seqs = [ids + vlm.encode_text(get_task("shapes").target(p)) for ids, p in zip(prompts, problems)]
    ids, mask = pad_batch(seqs, vlm.pad_id)
    with torch.no_grad():
        batched = vlm.logits(ids, mask)
        for i, s in enumerate(seqs):
            alone = vlm.logits(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
            assert torch.allclose(batched[i, : len(s)], alone, atol=1e-5)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=7)
    together = vlm.generate(prompts, params)
    assert together == [vlm.generate([p], SamplingParams(max_new_tokens=20, temperature=1.0, seed=7, keys=(i,)))[0]
                        for i, p in enumerate(prompts)]
    greedy = SamplingParams(max_new_tokens=20, temperature=0)
    assert vlm.generate(prompts, greedy) == vlm.generate_reference(prompts, greedy)
    # same text, different picture: different prompts (never shared as one prefill) and different logits
    assert problems[0].prompt == problems[1].prompt and prompts[0] != prompts[1]
    with torch.no_grad():
        a, b = (vlm.logits(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long))[0, -1] for p in prompts[:2])
    assert not torch.allclose(a, b)


def test_vlm_saves_and_loads(vlm, tmp_path):
    p = prompt_ids(vlm, _problems(1)[0])
    vlm.save(str(tmp_path / "m"))
    loaded = load_policy(tmp_path / "m")
    assert isinstance(loaded, TinyVLMPolicy)
    x = torch.tensor([p])
    with torch.no_grad():
        assert torch.equal(vlm.logits(x, torch.ones_like(x)), loaded.logits(x, torch.ones_like(x)))
    (tmp_path / "m" / "config.json").write_text(json.dumps({"d_model": 32, "vision": {"patch": 3}}))
    with pytest.raises(ThinklingError, match="vision"):
        load_policy(tmp_path / "m")


def test_loss_masks_cover_only_completion_tokens(vlm):
    """SFT and RL never train on image slots or prompt text; the vision tower learns only through completions."""
    task = get_task("shapes")
    problems = _problems(3, difficulty=(1, 3))
    text_only = get_task("chain").problems(1, 0, 1)  # a shorter text row in the same batch as image rows
    examples = sft_examples(vlm, task, problems) + sft_examples(vlm, get_task("chain"), text_only)
    ids, mask, weights = collate(examples, vlm.pad_id)
    for e, p in zip(examples, problems):
        n_prompt = len(prompt_ids(vlm, p))
        assert all(w == 0 for w in e.weights[:n_prompt]) and all(w == 1 for w in e.weights[n_prompt:])
        assert any(t < 0 for t in e.ids[:n_prompt]) and all(t >= 0 for t in e.ids[n_prompt:])
    assert torch.all(weights[ids < 0] == 0)
    loss = sft_loss(vlm, ids, mask, weights)
    # by hand: cross-entropy of completion tokens only
    logits = vlm.logits(ids, mask)[:, :-1]
    w = weights[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].clamp(min=0).flatten(), reduction="none")
    assert torch.allclose(loss, (ce.view_as(w) * w).sum() / w.sum(), atol=1e-5)
    loss.backward()
    assert vlm.model.vision.patch.weight.grad.abs().sum() > 0  # the image is context that the loss reaches
    # masked positions never become targets, whatever they hold
    logp, _ = masked_token_logprobs(vlm, ids, mask, w > 0)
    assert torch.all(logp[w == 0] == 0)
    # RL: the prefix (bos + image slots + prompt) is context
    p = problems[0]
    prefix = prompt_ids(vlm, p)
    comp = score(vlm, task, p, vlm.encode_text(task.target(p)) + [vlm.eos_id])
    from thinkling.rollout.groups import Group

    batch = build_batch([Group(p, prefix, [comp, comp])], torch.tensor([[1.0, -1.0]]), vlm.pad_id)
    assert torch.all(batch.loss_mask[:, : len(prefix) - 1] == 0) and torch.all(batch.loss_mask[:, len(prefix) - 1 :] == 1)


def test_grpo_step_and_bread_anchor_with_image_prompts(vlm):
    task = get_task("shapes")
    problems = _problems(2, difficulty=(3,))
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=1)
    groups = sample_groups(vlm, task, [(p, None, 0) for p in problems], 3, params)
    assert all(g.prefix == prompt_ids(vlm, g.problem) for g in groups)
    assert all(len(g.completions) == 3 for g in groups)
    from thinkling.config import RLConfig

    knobs = resolve_knobs(RLConfig(algorithm="grpo"))
    batch = build_batch(groups, torch.tensor([[1.0, -0.5, -0.5], [0.5, 0.5, -1.0]]), vlm.pad_id)
    before = [t.detach().clone() for t in vlm.model.parameters()]
    loss, stats, _ = minibatch_loss(vlm, batch, slice(None), knobs, max_len=30)
    loss.backward()
    torch.optim.SGD(vlm.model.parameters(), lr=0.1).step()
    moved = {n for (n, t), b in zip(vlm.model.named_parameters(), before) if not torch.equal(t, b)}
    assert any(n.startswith("vision.") for n in moved) and any(n.startswith("connector.") for n in moved)
    # BREAD: an untrained model fails; the anchor is prompt (with its image) + the first k expert steps
    failed = [g for g in groups if not g.has_success]
    assert failed
    kept, stats = anchor_failed_groups(vlm, task, failed, 3, lambda r: params, 2, None)
    assert stats["bread/probe_groups"] >= len(failed)
    branches = sample_groups(vlm, task, [(failed[0].problem, None, 2)], 3, params)
    b = branches[0]
    base = prompt_ids(vlm, b.problem)
    assert b.prefix == base + vlm.encode_text(anchor_text(b.problem, 2)) and b.anchor_tokens > 0
    assert any(t < 0 for t in b.prefix[: len(base)])
    batch = build_batch(branches, torch.tensor([[1.0, 0.0, -1.0]]), vlm.pad_id)
    assert torch.all(batch.loss_mask[:, : len(b.prefix) - 1] == 0)
    minibatch_loss(vlm, batch, slice(None), knobs, max_len=30)[0].backward()


def test_text_only_model_refuses_image_problems(tiny_policy):
    with pytest.raises(ThinklingError, match="takes text only"):
        prompt_ids(tiny_policy, _problems(1)[0])


def _jsonl_with_image(tmp_path, image_field, make=None):
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    if make is not None:
        make(folder)
    rec = [{"question": "mood?", "answer": "calm"}, {"question": "mood?", "answer": "joy", "image": image_field}]
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rec))
    return folder / "d.jsonl"


def _save(name, mode="RGB", data=None):
    def make(folder):
        from PIL import Image

        if data is not None:
            (folder / name).write_bytes(data)
        else:
            Image.new(mode, (8, 8)).save(folder / name)
    return make


@pytest.mark.parametrize("image_field, make, needle", [
    ("missing.png", None, "no such file"),
    ("fake.png", _save("fake.png", data=b"not a picture"), "not an image"),
    ("../outside.png", None, "outside the folder"),
    ("rgba.png", _save("rgba.png", mode="RGBA"), "4 channels"),
    (7, None, "path string"),
])
def test_bad_image_is_one_line_exit_2_nothing_written(capsys, tmp_path, image_field, make, needle):
    if image_field == "../outside.png":
        _save("outside.png")(tmp_path)
    data = _jsonl_with_image(tmp_path, image_field, make)
    out = tmp_path / "run"
    code = main(["pipeline", "recipes/vlm/clgrpo-shapes.yaml", f"output_dir={out}", "train.name=jsonl",
                 f"train.options={{path: {data}}}", "train.difficulty=null"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{data}:2" in err and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_jsonl_images_load_relative_to_the_file(tmp_path):
    from thinkling.tasks.jsonl import load_jsonl

    data = _jsonl_with_image(tmp_path, "sub/ok.png", lambda f: ((f / "sub").mkdir(), _save("sub/ok.png", "L")(f)))
    plain, pictured = load_jsonl(data)
    assert plain.images == () and len(pictured.images) == 1 and pictured.images[0].mode == "RGB"


@pytest.mark.slow  # ~1 min, most of it drawing the five reports' plots
def test_pipeline_runs_every_stage_on_the_vlm(tmp_path):
    """The CLGRPO recipe, shrunk: SFT -> format GRPO -> GRPO -> clip-low GRPO on image prompts, with reports."""
    from thinkling.pipeline import run_pipeline

    results = run_pipeline("recipes/vlm/clgrpo-shapes.yaml", [
        f"output_dir={tmp_path}/p", "model.tiny={d_model: 16, n_layers: 1, n_heads: 2, max_seq_len: 192, "
        "vision: {image_size: 36, patch_size: 12, d_model: 16, n_layers: 1, n_heads: 2, connector_hidden: 16}}",
        "train.size=16", "eval.size=4", "sft.steps=2", "sft.batch_size=4", "rl.steps=1", "rl.prompts_per_step=2",
        "rl.group_size=2", "rl.max_new_tokens=8", "eval.max_new_tokens=8"])
    assert [r["stage"] for r in results] == ["sft", "grpo-format", "grpo", "clgrpo"]
    report = (tmp_path / "p" / "report.md").read_text()
    assert "recall by label" in report
    assert "recall_by_label" in json.loads((tmp_path / "p" / "4-clgrpo" / "eval.json").read_text())

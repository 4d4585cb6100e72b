import torch

from thinkling.train.common import lr_at
from thinkling.train.sft import collate, make_example, weighted_ce


def test_loss_ignores_prompt_tokens(tiny_policy):
    """Changing prompt-token targets never changes the loss: only completion tokens are trained."""
    p = tiny_policy
    ex = make_example(p, p.encode_prompt("12 +3\n"), "12+3=15\nA:15")
    ids, mask, w = collate([ex], p.pad_id)
    vocab = p.logits(ids, mask).shape[-1]
    logits = torch.randn(1, ids.shape[1], vocab, requires_grad=True)
    loss = weighted_ce(logits, ids, w)
    loss.backward()
    n_prompt = len(p.encode_prompt("12 +3\n"))
    # logits at position t predict token t+1: positions before the last prompt token predict prompt tokens
    assert torch.all(logits.grad[0, : n_prompt - 1] == 0)
    assert torch.any(logits.grad[0, n_prompt - 1 :] != 0)


def test_token_weights_are_a_weighted_mean():
    ids = torch.tensor([[1, 5, 6, 7]])
    logits = torch.randn(1, 4, 10)
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    w = torch.tensor([[0.0, 0.0, 3.0, 1.0]])
    expected = (3 * ce[1] + ce[2]) / 4
    assert torch.allclose(weighted_ce(logits, ids, w), expected)


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, base_lr=1.0, warmup=4, total=10) == 0.25
    assert lr_at(3, base_lr=1.0, warmup=4, total=10) == 1.0
    assert abs(lr_at(10, base_lr=1.0, warmup=4, total=10, min_ratio=0.1) - 0.1) < 1e-9


def test_resume_gives_the_same_weights(tmp_path):
    """train 2N steps == train N, stop, resume from the checkpoint, train N more."""
    import shutil

    from thinkling import jobs
    from thinkling.config import load_recipe
    from thinkling.models import load_policy

    common = ["model.tiny={d_model: 32, n_layers: 1, n_heads: 2, max_seq_len: 96}", "train.size=64",
              "train.difficulty=[1,2]", "eval.size=4", "eval.difficulty=1", "sft.steps=6", "sft.batch_size=8",
              "sft.save_every=3", "sft.warmup_steps=2", "eval.max_new_tokens=8"]
    jobs.run_sft(load_recipe("recipes/chain-sft.yaml", [f"output_dir={tmp_path}/a", *common]))
    jobs.run_sft(load_recipe("recipes/chain-sft.yaml", [f"output_dir={tmp_path}/b", *common]))
    # simulate a crash after step 3: forget everything written later
    b = tmp_path / "b"
    shutil.rmtree(b / "checkpoints" / "step_000006")
    shutil.rmtree(b / "final")
    (b / "checkpoints" / "latest").write_text("step_000003")
    jobs.run_sft(load_recipe("recipes/chain-sft.yaml", [f"output_dir={b}", *common]), resume=True)
    wa, wb = load_policy(tmp_path / "a").model.state_dict(), load_policy(b).model.state_dict()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    import json

    rows = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    logged = [r["step"] for r in rows]
    assert logged == sorted(set(logged)), "resume must not duplicate metric rows"
    assert all(0.01 < r["mem/peak_rss_gb"] < 64 for r in rows)  # every step logs the process's peak memory

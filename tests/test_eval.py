import json

import pytest

from thinkling.config import EvalConfig, TaskConfig
from thinkling.errors import ThinklingError
from thinkling.eval.metrics import pass_at_k


def test_pass_at_k_matches_hand_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 4) == 1.0
    assert abs(pass_at_k(5, 2, 2) - (1 - 3 / 10)) < 1e-12  # 1 - C(3,2)/C(5,2)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_interrupted_eval_continues_where_it_stopped(tmp_path, tiny_policy):
    from thinkling import jobs

    tiny_policy.save(str(tmp_path / "pol"))
    task = TaskConfig(name="chain", size=12, difficulty=[1, 2], seed=5)
    cfg = EvalConfig(max_new_tokens=10, samples=2, batch_size=4)
    out = tmp_path / "ev.json"
    full = jobs.run_eval(str(tmp_path / "pol"), task, cfg, str(out))
    rows = (tmp_path / "ev.jsonl").read_text().splitlines()
    assert len(rows) == 12 * 3
    # interrupt: keep the first 10 rows and half a line
    (tmp_path / "ev.jsonl").write_text("\n".join(rows[:10]) + "\n" + rows[10][:15])
    again = jobs.run_eval(str(tmp_path / "pol"), task, cfg, str(out))
    assert again["accuracy"] == full["accuracy"] and again["mean_tokens"] == full["mean_tokens"]
    kept = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()[:10]]
    assert kept == [json.loads(x) for x in rows[:10]]
    # a corrupt row in the middle is named, not skipped
    lines = (tmp_path / "ev.jsonl").read_text().splitlines()
    lines[3] = "garbage"
    (tmp_path / "ev.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ThinklingError, match="ev.jsonl:4"):
        jobs.run_eval(str(tmp_path / "pol"), task, cfg, str(out))


def test_anchor_prefix_is_a_prefix_of_the_expert_target():
    """BREAD anchors must be exactly what SFT would have shown the model."""
    from thinkling.rollout.prompts import anchor_text
    from thinkling.tasks.base import get_task

    for name, d in (("chain", 5), ("mnns", 4), ("countdown", 4)):
        task = get_task(name)
        for p in task.generate(5, 0, d):
            for k in range(len(p.steps) + 1):
                assert task.target(p).startswith(anchor_text(p, k)), (name, k)

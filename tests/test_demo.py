"""The quick-start wiring end to end, shrunk to seconds: SFT -> GRPO and BREAD side by side -> report."""

import json
import os

import pytest

from thinkling.demo import run_demo
from thinkling.errors import ThinklingError

SMALL = ["sft.steps=3", "train.size=40", "eval.size=4", "eval.samples=2", "eval.every=1",
         "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=2", "rl.save_every=1",
         "rl.max_new_tokens=16", "eval.max_new_tokens=16", "model.tiny.d_model=16", "model.tiny.n_layers=1",
         "model.tiny.n_heads=2"]


def test_demo_runs_both_methods_and_writes_the_report(tmp_path):
    summary = run_demo(str(tmp_path / "demo"), SMALL)
    root = tmp_path / "demo"
    assert set(summary["runs"]) == {"GRPO", "BREAD"}
    for run in summary["runs"].values():
        assert run["steps"] == 2 and run["final_pass@1"] is not None and run["start_pass@1"] is not None
    report = (root / "report.md").read_text()
    assert "| GRPO |" in report and "| BREAD |" in report
    for png in ("pass1_vs_step", "pass1_vs_tokens", "greedy_vs_step", "bread_expert_fraction"):
        assert (root / f"{png}.png").stat().st_size > 0
    assert json.loads((root / "summary.json").read_text())["runs"]["BREAD"]["steps"] == 2
    with pytest.raises(ThinklingError, match="already exists"):
        run_demo(str(root), SMALL)


def test_a_bad_override_fails_before_any_training(tmp_path):
    with pytest.raises(ThinklingError, match="rl.no_such_key|no_such_key"):
        run_demo(str(tmp_path / "demo"), ["rl.no_such_key=1"])
    assert not (tmp_path / "demo" / "sft").exists()


def test_the_sft_stage_takes_both_cores_only_where_there_are_two():
    from thinkling.config import load_recipe
    from thinkling.demo import _recipe, busy_cores, sft_speed

    assert "threads=2" not in sft_speed(1, 0.0) and "threads=2" in sft_speed(2, 0.3)
    assert "threads=2" not in sft_speed(2, 1.0)  # a busy machine: two threads would wait on each other
    assert 0.0 <= busy_cores(0.05) <= (os.cpu_count() or 1) + 0.01
    cfg = load_recipe(_recipe("sft.yaml"), ["output_dir=x", *sft_speed(2, 0.0)])
    assert cfg.threads == 2 and cfg.sft.micro_batch_size == 16

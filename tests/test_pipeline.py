import shutil
from pathlib import Path

import pytest
import yaml

from thinkling.errors import ThinklingError
from thinkling.pipeline import run_pipeline, stage_configs

SMALL = ["model.tiny={d_model: 16, n_layers: 1, n_heads: 2, max_seq_len: 96}", "train.size=16", "train.difficulty=[1]",
         "eval.size=2", "eval.difficulty=1", "eval.max_new_tokens=6", "sft.steps=2", "sft.batch_size=4",
         "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=6"]


def _recipe(tmp_path):
    data = yaml.safe_load(open("recipes/clgrpo-pipeline.yaml"))
    for stage in data["stages"]:
        stage.get("rl", {}).pop("steps", None)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**data, "output_dir": str(tmp_path / "run")}))
    return path


def test_stages_chain_their_checkpoints(tmp_path):
    stages = stage_configs(yaml.safe_load(_recipe(tmp_path).read_text()))
    assert [(n, k) for n, k, _ in stages] == [("sft", "sft"), ("grpo-format", "rl"), ("grpo", "rl"), ("clgrpo", "rl")]
    assert stages[1][2].model.init.endswith("1-sft/final")
    assert stages[3][2].rl.algorithm == "clgrpo" and stages[1][2].rl.rewards["accuracy"] == 0.0


def test_pipeline_resumes_at_the_unfinished_stage(tmp_path):
    recipe = _recipe(tmp_path)
    run_pipeline(str(recipe), SMALL)
    root = tmp_path / "run"
    done_mtime = (root / "2-grpo-format" / "final" / "policy.json").stat().st_mtime_ns
    # crash during stage 3: its final policy and everything after it are gone
    shutil.rmtree(root / "3-grpo" / "final")
    (root / "3-grpo" / "eval.json").unlink()
    shutil.rmtree(root / "4-clgrpo")
    with pytest.raises(ThinklingError, match="already exists"):
        run_pipeline(str(recipe), SMALL)
    results = run_pipeline(str(recipe), SMALL, resume=True)
    assert [r["stage"] for r in results] == ["sft", "grpo-format", "grpo", "clgrpo"]
    assert (root / "2-grpo-format" / "final" / "policy.json").stat().st_mtime_ns == done_mtime
    assert (root / "4-clgrpo" / "final" / "policy.json").exists()
    report = (root / "report.md").read_text()
    assert all(f"| {stage} |" in report for stage in ("sft", "grpo-format", "grpo", "clgrpo"))


def test_bad_stage_fails_before_any_work(tmp_path):
    data = yaml.safe_load(_recipe(tmp_path).read_text())
    data["stages"][2]["rl"]["eps_hihg"] = 0.1
    with pytest.raises(ThinklingError, match=r"stages\[2\].*rl.eps_hihg"):
        stage_configs(data)
    data["stages"][2] = {"name": "x", "kind": "ppo"}
    with pytest.raises(ThinklingError, match="kind"):
        stage_configs(data)


def test_recipe_rl_stages_use_a_safe_lr_and_clip_low_can_act(tmp_path, capsys):
    """lr 5e-4 wrecked the tiny model; and clip-low only acts with more than one update per rollout batch."""
    from thinkling.train.rl import resolve_knobs, warn_inert_clip

    stages = stage_configs(yaml.safe_load(Path("recipes/clgrpo-pipeline.yaml").read_text()))
    assert all(cfg.rl.lr <= 1e-4 for _, kind, cfg in stages if kind == "rl")
    rl = stages[3][2].rl
    assert rl.algorithm == "clgrpo" and rl.ppo_epochs * rl.minibatches >= 2
    assert not warn_inert_clip(rl, resolve_knobs(rl))

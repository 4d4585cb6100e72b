"""Bad input: one line naming the key/file/line, exit code 2, no traceback, nothing overwritten."""

import json
import subprocess
import sys

import pytest

from thinkling.cli import main

TINY = "model.tiny={d_model: 16, n_layers: 1, n_heads: 2, max_seq_len: 96}"
FAST = [TINY, "train.size=16", "train.difficulty=1", "eval.size=2", "eval.difficulty=1", "sft.steps=2",
        "sft.batch_size=4", "eval.max_new_tokens=6"]


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv, needle", [
    (["sft", "recipes/chain-sft.yaml", "sft.stepz=3"], "sft.stepz"),
    (["sft", "recipes/chain-sft.yaml", "sft.steps=many"], "sft.steps"),
    (["sft", "recipes/nope.yaml"], "recipes/nope.yaml"),
    (["sft", "recipes/chain-sft.yaml", "train.name=chian"], "chian"),
    (["sft", "recipes/chain-sft.yaml", "train.difficulty=-2"], "difficulty"),
    (["tasks", "show", "nosuchtask"], "nosuchtask"),
    (["eval", "--model", "/nonexistent/run", "--task", "chain"], "nonexistent"),
    (["eval", "--model", "smollm2-135m", "--dtype", "float16"], "--dtype"),
    (["eval", "--model", "smollm2-135m", "--threads", "0"], "--threads"),
    (["sweep-stop", "--model", "smollm2-135m", "--alphas", "1,x"], "--alphas"),
    (["sweep-stop", "--model", "smollm2-135m", "--budgets", "64.5"], "--budgets"),
    (["sweep-stop", "--model", "smollm2-135m", "--alphas", "", "--budgets", ""], "at least one alpha"),
])
def test_bad_input_is_one_clear_line(capsys, tmp_path, argv, needle):
    code, err = _run(capsys, *argv, *([f"output_dir={tmp_path}/r"] if argv[0] == "sft" else []))
    assert code == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_malformed_jsonl_line_is_named(capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n{not json\n")
    code, err = _run(capsys, "sft", "recipes/chain-sft.yaml", f"output_dir={tmp_path}/r", "train.name=jsonl",
                     f"train.options={{path: {data}}}", "train.difficulty=null")
    assert code == 2 and f"{data}:2" in err


def test_existing_run_folder_is_never_overwritten(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["sft", "recipes/chain-sft.yaml", f"output_dir={out}", *FAST]) == 0
    before = (out / "metrics.jsonl").read_text()
    code, err = _run(capsys, "sft", "recipes/chain-sft.yaml", f"output_dir={out}", *FAST)
    assert code == 2 and "already exists" in err
    assert (out / "metrics.jsonl").read_text() == before
    # the run folder holds everything a run promises
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "final/policy.json", "checkpoints/latest", "report.md",
                 "training.png", "heldout.png"):
        assert (out / name).exists(), name
    assert any((out / "tb").iterdir()) and any((out / "samples").iterdir())


def test_tasks_list_runs_as_a_program():
    out = subprocess.run([sys.executable, "-m", "thinkling.cli", "tasks", "list"], capture_output=True, text=True)
    assert out.returncode == 0 and "chain" in out.stderr + out.stdout


def test_report_rebuilds_one_run_and_compares_several(capsys, tmp_path):
    for name in ("a", "b"):
        assert main(["sft", "recipes/chain-sft.yaml", f"output_dir={tmp_path / name}", *FAST, f"seed={len(name)}"]) == 0
    (tmp_path / "a" / "report.md").unlink()
    assert main(["report", str(tmp_path / "a")]) == 0
    assert "| a |" in (tmp_path / "a" / "report.md").read_text()
    code, err = _run(capsys, "report", str(tmp_path / "a"), str(tmp_path / "b"))
    assert code == 2 and "--out" in err
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "| a |" in text and "| b |" in text and (tmp_path / "cmp" / "training.png").exists()
    code, err = _run(capsys, "report", str(tmp_path / "nope"))
    assert code == 2 and "nope" in err


def test_eval_writes_its_report_next_to_the_summary(tmp_path):
    assert main(["sft", "recipes/chain-sft.yaml", f"output_dir={tmp_path / 'r'}", *FAST]) == 0
    assert main(["eval", "--model", str(tmp_path / "r"), "--difficulty", "1", "--limit", "3", "--max-new-tokens", "6",
                 "--out", str(tmp_path / "ev.json")]) == 0
    assert "By difficulty" in (tmp_path / "ev.md").read_text()

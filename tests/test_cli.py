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


# ----------------------------------------------------------------------- bad input, each one line
def _one_line(code, err, needle):
    assert code == 2, err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("override, needle", [
    ("sft.lr=.nan", "sft.lr"), ("sft.lr=.inf", "sft.lr"), ("sft.warmup_steps=-1", "sft.warmup_steps"),
    ("sft.grad_clip=-1", "sft.grad_clip"), ("rl.temperature=0", "rl.temperature"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"), ("eval.temperature=-1", "eval.temperature"),
    ("eval.samples=-1", "eval.samples"), ("model.init=/nonexistent/x", "/nonexistent/x"),
    ("train.difficulty=1000", "context"),  # 1000-step problems do not fit the tiny model's 96 positions
])
def test_bad_values_fail_before_the_run_folder_exists(capsys, tmp_path, override, needle):
    code, err = _run(capsys, "sft", "recipes/chain-sft.yaml", f"output_dir={tmp_path}/r", *FAST, override)
    _one_line(code, err, needle)
    assert not (tmp_path / "r").exists()


def test_empty_and_non_utf8_files_are_named(capsys, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    _one_line(*_run(capsys, "sft", str(empty)), "empty")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"seed: 1\n# caf\xe9\n")
    _one_line(*_run(capsys, "sft", str(latin)), f"{latin}:2")
    data = tmp_path / "data.jsonl"
    data.write_bytes(json.dumps({"question": "1+1?", "answer": "#### 2"}).encode() + b"\n{\"question\": \"\xff\"}\n")
    code, err = _run(capsys, "sft", "recipes/chain-sft.yaml", f"output_dir={tmp_path}/r", "train.name=jsonl",
                     f"train.options={{path: {data}}}", "train.difficulty=null")
    _one_line(code, err, f"{data}:2")


def test_bad_model_folders_are_named(capsys, tmp_path, tiny_policy):
    tiny_policy.save(str(tmp_path / "pol"))
    (tmp_path / "pol" / "tokenizer.json").write_text("{not json")
    _one_line(*_run(capsys, "eval", "--model", str(tmp_path / "pol"), "--limit", "2"), "tokenizer.json")
    (tmp_path / "pol" / "policy.json").write_text("{corrupt")
    _one_line(*_run(capsys, "eval", "--model", str(tmp_path / "pol"), "--limit", "2"), "policy.json")
    _one_line(*_run(capsys, "eval", "--model", "runs/none-such-run", "--limit", "2"), "no such folder")


def test_a_model_folder_cannot_switch_remote_code_on(capsys, tmp_path):
    """Only the user's flag may run a folder's own Python code."""
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "policy.json").write_text(json.dumps({"backend": "hf", "trust_remote_code": True}))
    (folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    _one_line(*_run(capsys, "eval", "--model", str(folder), "--limit", "2"), "trust_remote_code")


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--model", "smollm2-135m", "--batch-size", "0"], "--batch-size"),
    (["eval", "--model", "smollm2-135m", "--samples", "-1"], "--samples"),
    (["eval", "--model", "smollm2-135m", "--limit", "0"], "give a number of problems"),
])
def test_bad_eval_flags_name_the_flag(capsys, argv, needle):
    _one_line(*_run(capsys, *argv), needle)


def test_output_paths_that_cannot_be_written(capsys, tmp_path, tiny_policy):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line(*_run(capsys, "sft", "recipes/chain-sft.yaml", f"output_dir={blocker}/run", *FAST), str(blocker))
    tiny_policy.save(str(tmp_path / "pol"))
    _one_line(*_run(capsys, "eval", "--model", str(tmp_path / "pol"), "--out", str(tmp_path)), "is a folder")


def test_too_long_questions_are_named_before_any_work(capsys, tmp_path, tiny_policy):
    tiny_policy.save(str(tmp_path / "pol"))
    data = tmp_path / "big.jsonl"
    data.write_text(json.dumps({"id": "huge", "question": "x" * 5000, "answer": "#### 2"}) + "\n")
    code, err = _run(capsys, "eval", "--model", str(tmp_path / "pol"), "--task", "jsonl", "--option", f"path={data}",
                     "--limit", "1", "--out", str(tmp_path / "ev.json"))
    _one_line(code, err, "problem huge")
    assert not (tmp_path / "ev.jsonl").exists()
    code, err = _run(capsys, "eval", "--model", str(tmp_path / "pol"), "--task", "jsonl", "--option", f"path={data}",
                     "--limit", "5")
    _one_line(code, err, "0..1")  # more problems than the file has


def test_resume_only_continues_the_same_run(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["sft", "recipes/chain-sft.yaml", f"output_dir={out}", *FAST, "sft.save_every=1"]) == 0
    rows = (out / "metrics.jsonl").read_text()
    # an unchanged recipe resumes; overrides may follow --resume; the final eval row is not logged twice
    assert main(["sft", "recipes/chain-sft.yaml", "--resume", f"output_dir={out}", *FAST, "sft.save_every=1"]) == 0
    assert (out / "metrics.jsonl").read_text() == rows
    capsys.readouterr()
    code, err = _run(capsys, "sft", "recipes/chain-sft.yaml", f"output_dir={out}", *FAST, "sft.save_every=1",
                     "sft.lr=0.5", "--resume")
    _one_line(code, err, "sft.lr")
    plain = tmp_path / "plain"
    (plain / "final").mkdir(parents=True)
    (plain / "eval.json").write_text("{}")
    _one_line(*_run(capsys, "sft", "recipes/chain-sft.yaml", f"output_dir={plain}", *FAST, "--resume"),
              "not a run folder")
    assert (plain / "final").is_dir() and (plain / "eval.json").read_text() == "{}"


def test_resume_after_a_kill_leaves_the_rows_of_an_uninterrupted_run(tmp_path):
    """A kill after the last checkpoint (final eval logged or half a checkpoint written): resume
    removes the leftovers and logs every row exactly once."""
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    over = [*FAST, "sft.steps=4", "sft.save_every=2", "eval.every=2"]
    assert main(["sft", "recipes/chain-sft.yaml", f"output_dir={a}", *over]) == 0
    assert main(["sft", "recipes/chain-sft.yaml", f"output_dir={b}", *over]) == 0
    # killed after checkpoint 2, with rows of steps 3-4 and half a row, a half-written checkpoint and a half-saved final
    shutil.rmtree(b / "checkpoints" / "step_000004")
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    (b / "checkpoints" / "latest").write_text("step_000002")
    (b / "checkpoints" / ".tmp_abc").mkdir()
    (b / ".final_tmp").mkdir()
    assert main(["sft", "recipes/chain-sft.yaml", f"output_dir={b}", *over, "--resume"]) == 0
    key = lambda run: [(r["step"], sorted(r)) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert key(a) == key(b)
    assert not (b / "checkpoints" / ".tmp_abc").exists() and not (b / ".final_tmp").exists()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(capsys, tmp_path, monkeypatch):
    from thinkling.train import sft

    real, calls = sft.sft_loss, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(sft, "sft_loss", nan_at_step_3)
    out = tmp_path / "run"
    code, err = _run(capsys, "sft", "recipes/chain-sft.yaml", f"output_dir={out}", *FAST, "sft.steps=4",
                     "sft.save_every=2")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("thinkling: error: step 3: the loss is nan")  # after the progress
    assert (out / "checkpoints" / "latest").read_text() == "step_000002"


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import errno
    import os

    from thinkling.errors import ThinklingError
    from thinkling.files import atomic_write_text

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(ThinklingError, match="no space left on device"):
        atomic_write_text(tmp_path / "x.txt", "hello")
    assert list(tmp_path.iterdir()) == []


def test_pipeline_checks_every_stage_before_the_first_runs(capsys, tmp_path):
    import yaml

    data = yaml.safe_load(open("recipes/clgrpo-pipeline.yaml"))
    data["output_dir"] = str(tmp_path / "p")
    data["stages"][2]["rl"]["algorithm"] = "ppo"
    recipe = tmp_path / "p.yaml"
    recipe.write_text(yaml.safe_dump(data))
    code, err = _run(capsys, "pipeline", str(recipe))
    _one_line(code, err, "stages[2] (grpo)")
    assert "rl.algorithm" in err and not (tmp_path / "p").exists()


def test_resume_accepts_a_run_saved_before_a_setting_existed(tmp_path):
    """A key the saved config.yaml lacks was added by a newer thinkling at its default: not a change."""
    import yaml

    from thinkling.errors import ThinklingError
    from thinkling.runs import check_same_config

    now = {"seed": 0, "sft": {"lr": 0.1}, "curriculum": {"sampler": "uniform"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "sft": {"lr": 0.1}}))
    check_same_config(tmp_path, yaml.safe_dump(now))
    with pytest.raises(ThinklingError, match="sft.lr"):
        check_same_config(tmp_path, yaml.safe_dump({**now, "sft": {"lr": 0.2}}))

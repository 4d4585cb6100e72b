import json

import pytest

from thinkling.config import EvalConfig
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
    cfg = EvalConfig(name="chain", size=12, difficulty=[1, 2], seed=5, max_new_tokens=10, samples=2, batch_size=4)
    out = tmp_path / "ev.json"
    full = jobs.run_eval(str(tmp_path / "pol"), cfg, str(out))
    header, *rows = (tmp_path / "ev.jsonl").read_text().splitlines()
    assert '"settings"' in header and len(rows) == 12 * 3
    # interrupt: keep the first 10 rows and half a line
    (tmp_path / "ev.jsonl").write_text("\n".join([header, *rows[:10]]) + "\n" + rows[10][:15])
    again = jobs.run_eval(str(tmp_path / "pol"), cfg, str(out))
    assert again["accuracy"] == full["accuracy"] and again["mean_tokens"] == full["mean_tokens"]
    lines = (tmp_path / "ev.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 12 * 3 and [json.loads(x) for x in lines[1:11]] == [json.loads(x) for x in rows[:10]]
    # a corrupt row in the middle is named, not skipped
    lines[3] = "garbage"
    (tmp_path / "ev.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ThinklingError, match="ev.jsonl:4"):
        jobs.run_eval(str(tmp_path / "pol"), cfg, str(out))


def test_eval_out_refuses_rows_of_another_evaluation(tmp_path, tiny_policy):
    """Rerunning with another model or other settings must not append to the same rows."""
    from thinkling import jobs

    tiny_policy.save(str(tmp_path / "pol"))
    cfg = EvalConfig(name="chain", size=3, difficulty=1, seed=5, max_new_tokens=6)
    jobs.run_eval(str(tmp_path / "pol"), cfg, str(tmp_path / "ev.json"))
    before = (tmp_path / "ev.jsonl").read_text()
    for other in (EvalConfig(name="chain", size=3, difficulty=1, seed=5, max_new_tokens=7),
                  EvalConfig(name="chain", size=3, difficulty=2, seed=5, max_new_tokens=6)):
        with pytest.raises(ThinklingError, match="another evaluation"):
            jobs.run_eval(str(tmp_path / "pol"), other, str(tmp_path / "ev.json"))
    assert (tmp_path / "ev.jsonl").read_text() == before


def test_anchor_prefix_is_a_prefix_of_the_expert_target():
    """BREAD anchors must be exactly what SFT would have shown the model."""
    from thinkling.rollout.prompts import anchor_text
    from thinkling.tasks import get_task

    for name, d in (("chain", 5), ("mnns", 4), ("countdown", 4)):
        task = get_task(name)
        for p in task.problems(5, 0, d):
            for k in range(len(p.steps) + 1):
                assert task.target(p).startswith(anchor_text(p, k)), (name, k)


def test_strict_accuracy_counts_only_answers_in_the_expected_form():
    """A math answer found by the last-number fallback is correct, but not strictly correct."""
    from types import SimpleNamespace

    from thinkling.eval.evaluate import RowLog, _row, summarize
    from thinkling.rollout.scoring import score
    from thinkling.tasks.base import Problem
    from thinkling.tasks.mathverify import MathTask

    task = MathTask()
    problems = [Problem(id=str(i), prompt="?", answer="5", difficulty=d) for i, d in enumerate([1, 1, 2])]
    texts = ["2 + 3, so \\boxed{5}.", "She has 5 apples.", "The answer is 4."]
    log = RowLog()
    log.add([_row(p, score(SimpleNamespace(decode=lambda ids, t=t: t), task, p, [0]), "greedy")
             for p, t in zip(problems, texts)])
    summary = summarize(problems, log, ["greedy"])
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["strict_accuracy"] == pytest.approx(1 / 3)
    assert [e["strict_accuracy"] for e in summary["by_difficulty"].values()] == [0.5, 0.0]


def _eval_argv(tmp_path, *extra):
    return ["eval", "--model", str(tmp_path / "pol"), "--task", "chain", "--limit", "12", "--difficulty", "1,2",
            "--max-new-tokens", "10", "--batch-size", "4", "--threads", "1", *extra]


def test_eval_cli_reports_strict_accuracy_and_checks_dtype(tmp_path, tiny_policy, capsys):
    from thinkling.cli import main

    tiny_policy.save(str(tmp_path / "pol"))
    assert main(_eval_argv(tmp_path, "--out", str(tmp_path / "ev.json"))) == 0
    assert "strict" in capsys.readouterr().err
    summary = json.loads((tmp_path / "ev.json").read_text())
    assert 0 <= summary["strict_accuracy"] <= summary["accuracy"]
    assert main(_eval_argv(tmp_path, "--dtype", "bfloat16")) == 2
    assert "--dtype applies to model aliases" in capsys.readouterr().err


def test_interrupted_eval_says_what_was_saved(tmp_path, tiny_policy, capsys, monkeypatch):
    """Ctrl-C after the first batch: one line, exit 130, and the rerun continues from the saved rows."""
    from thinkling.cli import main
    from thinkling.models.tiny import TinyPolicy

    tiny_policy.save(str(tmp_path / "pol"))
    generate = TinyPolicy.generate
    calls = []

    def interrupt_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(TinyPolicy, "generate", interrupt_second_batch)
    argv = _eval_argv(tmp_path, "--out", str(tmp_path / "ev.json"))
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"thinkling: interrupted: 4 generations saved to {tmp_path / 'ev.jsonl'}; "
                   "rerun the same command to continue")
    assert main(argv) == 0
    assert len((tmp_path / "ev.jsonl").read_text().splitlines()) == 1 + 12  # the settings line, then the rows


def test_sweep_stop_cli_writes_table_and_plot(tmp_path, tiny_policy, capsys):
    from thinkling.cli import main

    tiny_policy.save(str(tmp_path / "pol"))
    out = tmp_path / "sweep"
    argv = ["sweep-stop", "--model", str(tmp_path / "pol"), "--task", "chain", "--limit", "4", "--difficulty", "1",
            "--alphas", "1,4", "--budgets", "3", "--max-new-tokens", "8", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    assert "α=4" in capsys.readouterr().err
    table = json.loads((out / "sweep.json").read_text())
    assert [(r["method"], r["value"]) for r in table["rows"]] == [("ts", 1.0), ("ts", 4.0), ("budget", 3)]
    assert table["n"] == 4 and table["decoding"] == "greedy" and (out / "sweep.png").stat().st_size > 0


def test_read_jsonl_redoes_a_half_written_last_line_and_names_a_bad_one(tmp_path):
    from thinkling.files import append_jsonl, read_jsonl

    f = tmp_path / "rows.jsonl"
    append_jsonl(f, [{"a": 1}, {"a": 2}])
    with open(f, "a") as out:
        out.write('{"a": 3')  # the writer was killed mid-line
    assert read_jsonl(f) == [(1, {"a": 1}), (2, {"a": 2})]
    assert f.read_text() == '{"a": 1}\n{"a": 2}\n'  # cut, so the next append starts a whole line
    f.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ThinklingError, match=r"rows.jsonl:2: not a row"):
        read_jsonl(f, "a row")

"""Shared by the resume tests of several policies: one SFT recipe run straight and run with a crash."""

from __future__ import annotations

import shutil
from pathlib import Path

from thinkling.cli import main


def straight_and_resumed(recipe: Path, tmp_path: Path, capsys) -> tuple[Path, Path]:
    """Run a 2-step `recipe` (saving every step) straight into `tmp_path/a`, and into `tmp_path/b`
    as 1 step, a crash (the step-2 checkpoint and final folder gone), a resume and 1 more step."""
    for run in ("a", "b"):
        assert main(["sft", str(recipe), f"output_dir={tmp_path / run}"]) == 0, capsys.readouterr().err
    b = tmp_path / "b"
    shutil.rmtree(b / "checkpoints" / "step_000002")
    shutil.rmtree(b / "final")
    (b / "checkpoints" / "latest").write_text("step_000001")
    assert main(["sft", str(recipe), f"output_dir={b}", "--resume"]) == 0, capsys.readouterr().err
    return tmp_path / "a", b

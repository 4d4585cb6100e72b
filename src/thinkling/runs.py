"""The run folder: resolved config, metrics (JSONL + TensorBoard), atomic checkpoints.

Layout of `output_dir`:
    config.yaml            the resolved config of the run
    metrics.jsonl          one JSON object per logged step
    tb/                    TensorBoard events
    checkpoints/step_N/    policy files + optimizer.pt + state.json
    checkpoints/latest     name of the newest complete checkpoint
    samples/               sample generations
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from thinkling.config import to_dict
from thinkling.errors import ThinklingError


class RunDir:
    def __init__(self, path: str | Path, config, resume: bool = False):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        if self.path.exists() and any(self.path.iterdir()) and not resume:
            raise ThinklingError(
                f"run folder {self.path} already exists; pass --resume to continue it "
                f"or choose another output_dir=..."
            )
        if resume and not self.path.exists():
            raise ThinklingError(f"--resume: run folder {self.path} does not exist")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "samples").mkdir(exist_ok=True)
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        self._tb = None

    # -------------------------------------------------------------- metrics
    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        tb = self._writer()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                tb.add_scalar(k, v, step)
        tb.flush()

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, forget rows logged after the checkpoint so none is duplicated."""
        f = self.path / "metrics.jsonl"
        if f.exists():
            rows = [line for line in f.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
            atomic_write_text(f, "".join(r + "\n" for r in rows))

    def metrics(self) -> list[dict]:
        f = self.path / "metrics.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines() if line] if f.exists() else []

    def _writer(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tb"))
        return self._tb

    def close(self):
        if self._tb is not None:
            self._tb.close()

    def write_samples(self, step: int, rows: list[dict]) -> None:
        with open(self.path / "samples" / f"step_{step:06d}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int, policy, optimizer, state: dict) -> Path:
        """Write to a temp folder, then rename: a crash never leaves half a checkpoint."""
        self.ckpt_dir.mkdir(exist_ok=True)
        final = self.ckpt_dir / f"step_{step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=self.ckpt_dir))
        policy.save(str(tmp / "policy"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_text(tmp / "state.json", json.dumps({"step": step, **state}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(self.ckpt_dir / "latest", final.name)
        return final

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.exists():
            return None
        path = self.ckpt_dir / pointer.read_text().strip()
        return path if path.exists() else None

    def load_state(self, ckpt: Path) -> dict:
        return json.loads((ckpt / "state.json").read_text())


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    return v

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
from thinkling.files import append_jsonl, atomic_write_text, disk_error, read_json, read_jsonl, read_text, write_jsonl


class RunDir:
    """A run's folder. A new run needs an empty or missing folder; `resume=True` reopens a run
    folder written with the same config (a changed recipe is refused, naming the keys)."""

    def __init__(self, path: str | Path, config, resume: bool = False):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        config_text = yaml.safe_dump(to_dict(config), sort_keys=False)
        if resume:
            check_same_config(self.path, config_text)
        elif self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise ThinklingError(
                f"run folder {self.path} already exists; pass --resume to continue it "
                f"or choose another output_dir=..."
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "samples").mkdir(exist_ok=True)
        except OSError as e:
            raise ThinklingError(f"output_dir {self.path}: cannot create the run folder ({e.strerror})") from None
        atomic_write_text(self.path / "config.yaml", config_text)
        self._remove_partial_writes()
        self._rows = len(self.metrics())
        self._tb = None

    def _remove_partial_writes(self) -> None:
        """A process killed while writing leaves `.tmp_*` folders (checkpoints) or `.final_tmp`:
        nothing points at them, so they go."""
        leftovers = list(self.ckpt_dir.glob(".tmp_*")) if self.ckpt_dir.is_dir() else []
        for path in [*leftovers, self.path / ".final_tmp"]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    # -------------------------------------------------------------- metrics
    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        append_jsonl(self.path / "metrics.jsonl", [row], durable=False)
        self._rows += 1
        tb = self._writer()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                tb.add_scalar(k, v, step)
        tb.flush()

    def truncate_metrics(self, rows: int) -> None:
        """On resume, keep the first `rows` rows (those logged before the checkpoint), so a
        resumed run logs exactly the rows of an uninterrupted one."""
        f = self.path / "metrics.jsonl"
        if f.exists():
            kept = read_text(f).splitlines(keepends=True)[:rows]
            atomic_write_text(f, "".join(line if line.endswith("\n") else line + "\n" for line in kept))
        self._rows = min(self._rows, rows)

    def metrics(self) -> list[dict]:
        return [row for _, row in read_jsonl(self.path / "metrics.jsonl", "a metrics row")]

    def _writer(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tb"))
        return self._tb

    def close(self):
        if self._tb is not None:
            self._tb.close()

    def write_samples(self, step: int, rows: list[dict]) -> None:
        write_jsonl(self.path / "samples" / f"step_{step:06d}.jsonl", rows)

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int, policy, optimizer, state: dict) -> Path:
        """Write to a temp folder, then rename: a crash never leaves half a checkpoint. The state
        records how many metric rows were logged so far (what a resume keeps)."""
        self.ckpt_dir.mkdir(exist_ok=True)
        final = self.ckpt_dir / f"step_{step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=self.ckpt_dir))
        try:
            policy.save(str(tmp / "policy"))
            if optimizer is not None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            atomic_write_text(tmp / "state.json", json.dumps({"step": step, "metrics_rows": self._rows, **state}))
        except (OSError, RuntimeError, ThinklingError) as e:  # torch.save says "iostream error" on a full disk
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_error(final, e) from None
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
        return read_json(ckpt / "state.json")


def check_same_config(path: Path, config_text: str) -> None:
    """`--resume` continues a run only with the config it was started with. A key the saved config
    lacks is a setting a newer thinkling added (at its default, old behaviour): not a change."""
    saved = path / "config.yaml"
    if not path.is_dir():
        raise ThinklingError(f"--resume: run folder {path} does not exist")
    if not saved.is_file():
        raise ThinklingError(f"--resume: {path} is not a run folder (no config.yaml); nothing was changed in it")
    before, now = _flat(yaml.safe_load(read_text(saved)) or {}), _flat(yaml.safe_load(config_text))
    changed = sorted(k for k in before if before[k] != now.get(k))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
        more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
        raise ThinklingError(f"--resume: the recipe differs from the one {path} was started with ({shown}{more}); "
                             "resume with the same recipe, or start a new run (model.init can point at a checkpoint)")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    return v

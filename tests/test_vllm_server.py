"""Rollouts from a generation server (`rl.rollout_backend: vllm-server`, models.vllm_server).

vLLM needs a CUDA GPU, so the server here is the real `make_server` around a tiny thinkling
model (`PolicyEngine`), in a thread: the trainer's side (prompts out, completions and sampler
log-probs back, weights after every update) is what runs in production."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from thinkling.config import RLConfig
from thinkling.errors import ThinklingError
from thinkling.models.tiny import TinyPolicy
from thinkling.models.vllm_server import PolicyEngine, ServerClient, make_server
from thinkling.train.distributed import free_port

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 128}
ROOT = Path(__file__).parents[1]


class RecordingEngine(PolicyEngine):
    """The server's engine, remembering what it was asked."""

    def __init__(self, policy):
        super().__init__(policy)
        self.prompts: list[list[int]] = []
        self.syncs = 0

    def sample(self, prompts, params):
        self.prompts += prompts
        return super().sample(prompts, params)

    def sync_weights(self, state_dict):
        self.syncs += 1
        super().sync_weights(state_dict)


@pytest.fixture
def server():
    # The server starts from other weights than the trainer (seed 1 vs 0): only the first
    # sync makes them agree.
    engine = RecordingEngine(TinyPolicy.create(TINY, seed=1))
    httpd = make_server(engine, port=0, model="tiny")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield engine, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_the_trainer_samples_from_the_server_and_syncs_it_after_every_update(server):
    from test_distributed_rl import LengthLottery  # noqa: E402  (tests/ is on sys.path)

    from thinkling.rollout.prompts import prompt_ids
    from thinkling.train.rl import resolve_knobs, train_rl

    torch.set_num_threads(1)
    engine, url = server
    cfg = RLConfig(steps=3, prompts_per_step=4, group_size=3, max_new_tokens=8, lr=3e-3, kl_to_start=False,
                   samples_every=0, tis_cap=2.0, rollout_backend="vllm-server", vllm_url=url)
    task = LengthLottery()
    problems = task.problems(8, seed=0, difficulty=[3])
    policy = TinyPolicy.create(TINY, seed=0)
    metrics = []
    trainer = train_rl(policy, task, problems, cfg, resolve_knobs(cfg), seed=0, rollout_client=ServerClient(url),
                       progress=lambda step, m: metrics.append(m))
    # Prompts went out: the step's G copies of each drawn problem's prompt.
    assert len(engine.prompts) == cfg.steps * cfg.prompts_per_step * cfg.group_size
    assert {tuple(p) for p in engine.prompts} <= {tuple(prompt_ids(policy, p)) for p in problems}
    # Weights: once before the first step, then after every update; the server ends with the trainer's.
    updates = sum(not m.get("skipped_update") for m in metrics)
    assert updates >= 2 and engine.syncs == trainer.weight_syncs == 1 + updates
    assert all("time/weight_sync_s" in m for m in metrics if not m.get("skipped_update"))
    for name, w in policy.model.state_dict().items():
        assert torch.equal(engine.policy.model.state_dict()[name], w), name
    # The server's log-probs reached the update as the sampler's: with synced weights the sampler is
    # π_old itself (k1 KL ~ 0, no token truncated). A stale server (no sync) fails this from step 1.
    for m in metrics:
        if not m.get("skipped_update"):
            assert abs(m["offpolicy/kl"]) < 1e-4 and m["offpolicy/truncated_frac"] == 0.0, m


def test_the_client_says_what_the_server_refused(server):
    from thinkling.models.base import SamplingParams

    _, url = server
    client = ServerClient(url)
    assert client.health() == {"status": "ok", "model": "tiny"}
    out = client.sample([[1, 5, 6], [1, 7]], SamplingParams(max_new_tokens=4, temperature=1.0, seed=3))
    assert len(out) == 2 and all(len(s.ids) == len(s.logprobs) > 0 for s in out)
    with pytest.raises(ThinklingError, match="answered 400"):
        client.sync_weights({"not.a.weight": torch.zeros(2)})


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "thinkling.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180, check=False)


def test_an_unreachable_server_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    done = _cli("rl", "recipes/quickstart/grpo.yaml", f"output_dir={out}", "rl.rollout_backend=vllm-server",
                f"rl.vllm_url=http://127.0.0.1:{free_port()}")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [x for x in (done.stdout + done.stderr).splitlines() if x.strip()]
    assert len(lines) == 1 and "no generation server answers" in lines[0] and "rl.vllm_url" in lines[0], lines
    assert not out.exists()


def test_bad_server_settings_are_config_errors():
    with pytest.raises(ThinklingError, match="rl.vllm_url"):
        RLConfig(rollout_backend="vllm-server").validate()
    with pytest.raises(ThinklingError, match="rl.rollout_backend"):
        dataclasses.replace(RLConfig(), rollout_backend="vllm").validate()


def test_vllm_serve_without_vllm_is_one_line():
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    done = _cli("vllm-serve", "smollm2-135m", "--port", str(free_port()))
    assert done.returncode == 2
    lines = [x for x in (done.stdout + done.stderr).splitlines() if x.strip()]
    assert len(lines) == 1 and "vllm" in lines[0].lower(), lines

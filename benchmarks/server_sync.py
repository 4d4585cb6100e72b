"""Seconds for one weight sync to a generation server (`rl.rollout_backend: vllm-server`).

    python benchmarks/server_sync.py            # SmolLM2-135M, fp32, server in this process's thread

The server is `models.vllm_server.make_server` around an HF policy of the same model (vLLM
needs a CUDA GPU); one sync = serialise the state dict to safetensors, POST it over local
HTTP, parse it and load it into the served model. Best of 3, 1 thread.
"""

from __future__ import annotations

import threading
import time

import torch

from thinkling.models.hf import HFPolicy
from thinkling.models.registry import cache_dir
from thinkling.models.vllm_server import PolicyEngine, ServerClient, make_server

if __name__ == "__main__":
    torch.set_num_threads(1)
    path = str(cache_dir("smollm2-135m"))
    trainer, served = (HFPolicy.load(path, dtype="float32", device="cpu") for _ in range(2))
    httpd = make_server(PolicyEngine(served), port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    client = ServerClient(f"http://127.0.0.1:{httpd.server_port}")
    state = trainer.plain_state_dict()
    size = sum(v.numel() * v.element_size() for v in state.values()) / 2**30
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        client.sync_weights(state)
        times.append(time.perf_counter() - t0)
    print(f"SmolLM2-135M fp32 ({size:.2f} GiB in the state dict): sync {min(times):.2f} s best of 3 "
          f"({', '.join(f'{t:.2f}' for t in times)})")
    httpd.shutdown()

"""Rollouts from a separate generation server (`rl.rollout_backend: vllm-server`).

The trainers keep the policy for the loss; a server process (`thinkling vllm-serve MODEL`, on
its own GPU(s)) holds a vLLM engine and generates. The protocol is plain HTTP + JSON, three
endpoints, after TRL's `vllm-serve`:

- `GET /health` -> `{"status": "ok", "model": ...}`: checked once before a run starts, so a
  wrong `rl.vllm_url` is one error line and nothing is written.
- `POST /generate` `{"prompts": [[ids]], "max_tokens", "temperature", "top_p", "seed", "keys"}`
  -> `{"completions": [{"ids": [...], "logprobs": [...]}]}`: one completion per prompt (token
  ids, eos kept) with the sampler's log-prob of each token. Prompt i samples from the stream
  (seed, keys[i]), as locally (`SamplingParams.keys`). The log-probs go where a local
  sampler's do (`Sample.logprobs` -> `Batch.sampler_logp`): the RL update measures how far the
  server is from π_old (`offpolicy/*`) and, with `rl.tis_cap`, reweights tokens by
  min(π_old / π_server, cap), exactly as for bf16 or in-process vLLM rollouts.
- `POST /update_weights` with a safetensors body (the policy's plain weights, LoRA merged)
  -> `{"tensors": n}`: the engine loads them in place and drops its prefix cache. The trainer
  sends them after every optimizer update (and once before the first step, so a resumed run's
  server generates with the checkpoint's weights), from process 0 only; the others wait.
  Cost per sync: one serialisation and one transfer of the full weights (bf16 SmolLM2-1.7B:
  3.4 GB; ~3 s at 10 Gbit/s), plus a transient in-memory copy of that size on both sides.

`serve` runs the server around any engine with `sample(prompts, params)` and
`sync_weights(state_dict)`: vLLM's (`vllm_backend.VLLMGenerator`) in `thinkling vllm-serve`,
a thinkling policy in the tests (vLLM needs a CUDA GPU).
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch

from thinkling.errors import ThinklingError
from thinkling.models.base import Sample, SamplingParams


# ------------------------------------------------------------------- server
class PolicyEngine:
    """A thinkling policy as a generation engine (a server without vLLM: CPU hosts, tests)."""

    def __init__(self, policy):
        self.policy = policy

    def sample(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        return self.policy.sample(prompts, params)

    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.policy.model.load_state_dict(state_dict)
        hook = getattr(self.policy, "release_generation_memory", None)
        if hook is not None:  # the engine's decoding copy holds the old weights
            hook()


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, model: str = "") -> HTTPServer:
    """An HTTP server answering the three endpoints with `engine`, one request at a time (the
    engine batches within a request). `server.serve_forever()` runs it; port 0 picks a free port."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: one line per request would drown the trainer's output
            pass

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._reply(200, {"status": "ok", "model": model})
            else:
                self._reply(404, {"error": f"no endpoint {self.path}"})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                with lock:
                    if self.path.rstrip("/") == "/generate":
                        self._reply(200, _generate(engine, json.loads(body)))
                    elif self.path.rstrip("/") == "/update_weights":
                        from safetensors.torch import load

                        weights = load(body)
                        engine.sync_weights(weights)
                        self._reply(200, {"tensors": len(weights)})
                    else:
                        self._reply(404, {"error": f"no endpoint {self.path}"})
            except (ThinklingError, ValueError, KeyError, RuntimeError) as e:
                self._reply(400, {"error": str(e).splitlines()[0] if str(e) else type(e).__name__})

    return HTTPServer((host, port), Handler)


def _generate(engine, request: dict) -> dict:
    params = SamplingParams(max_new_tokens=int(request["max_tokens"]), temperature=float(request["temperature"]),
                            top_p=float(request.get("top_p", 1.0)), seed=request.get("seed"),
                            keys=None if request.get("keys") is None else tuple(request["keys"]))
    samples = engine.sample([list(map(int, p)) for p in request["prompts"]], params)
    return {"completions": [{"ids": s.ids, "logprobs": s.logprobs} for s in samples]}


def serve_model(model: str, host: str, port: int, **engine_kwargs) -> None:
    """`thinkling vllm-serve MODEL`: a vLLM engine behind `make_server` until interrupted.
    Sampler log-probs are those of the distribution sampled from (temperature and top-p
    applied: `logprobs_mode="processed_logprobs"`), as the trainer's off-policy correction expects."""
    from thinkling.models.registry import resolve_model
    from thinkling.models.vllm_backend import VLLMGenerator, _require_vllm

    try:  # one line on a host without vLLM or a GPU, before resolving (pulling) the model
        _require_vllm()
    except ThinklingError as e:
        raise ThinklingError(f"vllm-serve needs vLLM and a CUDA GPU ({str(e).split(';')[0].split(': ', 1)[-1]}); "
                             "without them, train with rl.rollout_backend: local") from None
    model = resolve_model(model)
    engine = VLLMGenerator(model, logprobs_mode="processed_logprobs", **engine_kwargs)
    server = make_server(engine, host, port, model)
    print(f"serving {model} on http://{host}:{server.server_port} (/health, /generate, /update_weights)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ------------------------------------------------------------------- client
class ServerClient:
    """The trainer's side of the protocol."""

    def __init__(self, url: str, timeout: float = 3600.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _call(self, path: str, data: bytes | None = None, content_type: str = "application/json",
              timeout: float | None = None) -> dict:
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": content_type},
                                         method="GET" if data is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except ValueError:
                pass
            raise ThinklingError(f"rl.vllm_url {self.url}{path}: the server answered {e.code} ({detail})") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ThinklingError(f"rl.vllm_url {self.url}: no generation server answers ({reason}); start one with "
                                 "`thinkling vllm-serve MODEL` or fix the URL") from None

    def health(self) -> dict:
        """The server's status; one ThinklingError when nothing answers."""
        return self._call("/health", timeout=10)

    def sample(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        params.validate()
        if params.logits_processor is not None:
            raise ThinklingError("rl.rollout_backend vllm-server does not run per-step logits processors "
                                 "(budget forcing, temperature-scaled stopping)")
        if not prompts:
            return []
        body = {"prompts": [list(p) for p in prompts], "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed,
                "keys": params.row_keys(len(prompts))}
        out = self._call("/generate", json.dumps(body).encode())["completions"]
        if len(out) != len(prompts):
            raise ThinklingError(f"rl.vllm_url {self.url}: {len(out)} completions for {len(prompts)} prompts")
        return [Sample(list(c["ids"]), None if c.get("logprobs") is None else [float(x) for x in c["logprobs"]])
                for c in out]

    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> int:
        """Send the weights (safetensors in the request body); returns how many tensors the server loaded."""
        from safetensors.torch import save

        # Copies: tied weights share storage, which safetensors refuses to write twice.
        body = save({k: v.detach().cpu().clone() for k, v in state_dict.items()})
        return int(self._call("/update_weights", body, content_type="application/octet-stream")["tensors"])


class ServedRollouts:
    """The policy as the rollout code sees it, except that sampling goes to the server."""

    def __init__(self, policy, client: ServerClient):
        self._policy, self.client = policy, client

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def sample(self, prompts: list[list[int]], params: SamplingParams, **_) -> list[Sample]:
        return self.client.sample(prompts, params)

    def generate(self, prompts: list[list[int]], params: SamplingParams, **_) -> list[list[int]]:
        return [s.ids for s in self.sample(prompts, params)]

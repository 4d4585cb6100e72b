"""Image files for tasks: loaded, checked and kept inside the folder of the data that names them."""

from __future__ import annotations

from pathlib import Path

from thinkling.errors import ThinklingError

CHANNELS = {"RGB": 3, "L": 1, "LA": 2, "RGBA": 4, "CMYK": 4, "P": 1, "1": 1, "I": 1, "F": 1, "YCbCr": 3}


def load_image(name, root: Path, where: str):
    """The image file `name` (relative to folder `root`) as an RGB PIL image.

    `where` (file:line) names the record in errors. The path must stay inside `root` (no `..`
    or absolute paths out of it, symlinks resolved), and the image must have 3 channels (RGB)
    or 1 (grayscale, repeated to RGB): an alpha or CMYK channel would be silently dropped.
    """
    from PIL import Image, UnidentifiedImageError

    if not isinstance(name, str) or not name.strip():
        raise ThinklingError(f"{where}: 'image' must be a non-empty path string (got {name!r})")
    base = root.resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base):
        raise ThinklingError(f"{where}: image {name!r} is outside the folder {base}")
    if not path.is_file():
        raise ThinklingError(f"{where}: image {name!r}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode == "P":  # a palette image: its colours are RGB unless it has transparency
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                mode = img.mode
            if mode not in ("RGB", "L"):
                n = CHANNELS.get(mode, len(img.getbands()))
                raise ThinklingError(f"{where}: image {name!r} has {n} channels (mode {mode}); "
                                     "need 3 (RGB) or 1 (grayscale)")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        reason = "not an image file" if isinstance(e, UnidentifiedImageError) else str(e).splitlines()[0]
        raise ThinklingError(f"{where}: image {name!r}: {reason}") from None

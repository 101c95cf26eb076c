"""Small generated image data sets on disk, for tests of local data sources.

`write_image_folder` writes an image folder as a user would hold one (`train/<class>/*.png`
and optionally `test/<class>/*.png`) whose classes can be learnt: each class is a bright
square at its own place plus noise, so a model beats chance within a few rounds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def class_names(classes: int, numbered: bool = True) -> list[str]:
    """Folder names of `classes` classes: "0", "1", ... or "class-a", "class-b", ..."""
    if numbered:
        return [str(k) for k in range(classes)]
    return [f"class-{chr(ord('a') + k)}" for k in range(classes)]


def write_image_folder(
    path,
    classes: int = 10,
    shape: tuple[int, int, int] = (1, 28, 28),
    per_class: int = 20,
    with_test: bool = False,
    *,
    test_per_class: int = 5,
    numbered: bool = True,
    seed: int = 0,
) -> Path:
    """Write `path/train/<class>/<i>.png` (`per_class` images per class) and, with
    `with_test`, `path/test/<class>/<i>.png` (`test_per_class` each), of `shape`
    (channels 1 or 3, height, width). Class folders are named by `class_names`, so the
    label of a numbered folder is its number. Returns `path`."""
    channels, height, width = shape
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    rng = np.random.default_rng(seed)
    # Class k: a bright square at its own place (of a 4x4 grid, cycled) and, in colour,
    # its own tint; then noise. A small CNN tells them apart in a few dozen steps.
    prototypes = np.zeros((classes, height, width, channels))
    side_h, side_w = max(1, height // 4), max(1, width // 4)
    for k in range(classes):
        row, col = divmod(k % 16, 4)
        tint = rng.uniform(0.5, 1.0, channels) if k >= 16 or channels == 3 else 1.0
        prototypes[k, row * side_h : (row + 1) * side_h, col * side_w : (col + 1) * side_w] = (
            255 * tint
        )
    path = Path(path)
    splits = {"train": per_class, **({"test": test_per_class} if with_test else {})}
    for split, count in splits.items():
        for k, name in enumerate(class_names(classes, numbered)):
            folder = path / split / name
            folder.mkdir(parents=True, exist_ok=True)
            noise = rng.integers(0, 256, (count, height, width, channels))
            pixels = np.clip(0.7 * prototypes[k] + 0.3 * noise, 0, 255).astype(np.uint8)
            for i, image in enumerate(pixels):
                mode = "L" if channels == 1 else "RGB"
                Image.fromarray(image[..., 0] if channels == 1 else image, mode).save(
                    folder / f"{i}.png"
                )
    return path

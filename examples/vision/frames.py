"""Synthetic conveyor-belt frames: grey belt, sensor noise, and on some frames a
dark scratch (the 'defect'). Written as PNGs, the way a camera dump looks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_frames(
    folder: Path, n: int, *, seed: int = 0, size: tuple[int, int] = (240, 320)
) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    paths = []
    for i in range(n):
        frame = np.full((h, w, 3), 128, np.int16) + rng.integers(-12, 12, (h, w, 3))
        if rng.random() < 0.3:  # a scratch across part of the part
            y, x = int(rng.integers(10, h - 10)), int(rng.integers(0, w // 2))
            frame[y : y + 3, x : x + w // 3] = 25
        path = folder / f"frame_{i:04d}.png"
        Image.fromarray(frame.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def load_frame(path: Path, size: int, mean: list[float], std: list[float]) -> np.ndarray:
    """A PNG -> the model's input row [1, 3, size, size], the import's preprocessing."""
    from PIL import Image

    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    x = np.asarray(img, np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # [1, 3, H, W]

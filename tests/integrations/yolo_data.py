"""A tiny offline detection set in YOLO format: real Fashion-MNIST items pasted onto black canvases.

Each canvas holds 1-3 items, one per quadrant (an item is 28x28, a quadrant half the canvas), at a
random offset inside it. A box is the item's nonzero pixels; its class the item's label. Written as
Ultralytics reads it: images/{train,val}/*.png, labels/{train,val}/*.txt (class xc yc w h,
normalised) and data.yaml.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image

from irep_deploy.data import raw_dataset

NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
Box = Tuple[int, float, float, float, float]


def _canvas(items: np.ndarray, labels: np.ndarray, size: int, rng: random.Random) -> Tuple[np.ndarray, List[Box]]:
    canvas = np.zeros((size, size), dtype=np.uint8)
    half = size // 2
    boxes: List[Box] = []
    for k, quadrant in enumerate(rng.sample(range(4), len(items))):
        item = items[k]
        x0 = (quadrant % 2) * half + rng.randint(0, half - 28)
        y0 = (quadrant // 2) * half + rng.randint(0, half - 28)
        canvas[y0:y0 + 28, x0:x0 + 28] = item
        ys, xs = np.nonzero(item)
        left, top, right, bottom = x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1
        boxes.append((int(labels[k]), (left + right) / 2 / size, (top + bottom) / 2 / size,
                      (right - left) / size, (bottom - top) / size))
    return canvas, boxes


def write_yolo_set(root: Path, train: int = 16, val: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write the set under ``root``; return its data.yaml. Items come from Fashion-MNIST's test split."""
    if size < 56:
        raise ValueError("a canvas of {} pixels has no room for a 28-pixel item per quadrant".format(size))
    data = raw_dataset("fashion-mnist", "test")
    images, labels = data.images[:, 0].numpy(), data.labels.numpy()
    rng = random.Random(seed)
    used = 0
    for split, count in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            n = rng.randint(1, 3)
            canvas, boxes = _canvas(images[used:used + n], labels[used:used + n], size, rng)
            used += n
            Image.fromarray(canvas).convert("RGB").save(root / "images" / split / "{:03d}.png".format(i))
            (root / "labels" / split / "{:03d}.txt".format(i)).write_text(
                "".join("{} {:.6f} {:.6f} {:.6f} {:.6f}\n".format(*box) for box in boxes))
    yaml = root / "data.yaml"
    yaml.write_text("path: {}\ntrain: images/train\nval: images/val\nnames:\n{}".format(
        root.resolve(), "".join("  {}: {}\n".format(i, n) for i, n in enumerate(NAMES))))
    return yaml

"""Reads one split of the standard precomputed-feature layout (SCAN's release) and checks it.

<root>/{split}_ims.npy    float [N, 36, 2048] (memory-mapped; COCO train is 33 GB)
<root>/{split}_caps.txt   5 captions per image, caption j belongs to image j // 5
<root>/{split}_boxes.npy  optional [N, 36, 4], normalised (x1, y1, x2, y2)
Some releases store one image row per caption (each image repeated 5 times); that is detected from the
row count. Every problem is a DataError naming the file, the problem and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import LAYOUT_HELP, DataError

BOX_TOLERANCE = 1e-3


def split_paths(root: str | Path, split: str) -> dict[str, Path]:
    root = Path(root)
    return {"ims": root / f"{split}_ims.npy", "caps": root / f"{split}_caps.txt", "boxes": root / f"{split}_boxes.npy"}


def open_npy(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(path, "file not found", LAYOUT_HELP)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # truncated header, not an .npy, object arrays, ...
        raise DataError(path, f"cannot read this .npy file ({type(e).__name__}: {e})",
                        "re-copy or re-extract it; it must be a plain numeric NumPy array saved with np.save") from None


def read_captions(path: Path) -> list[str]:
    if not path.exists():
        raise DataError(path, "file not found", LAYOUT_HELP)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text ({e})", "re-save the captions as UTF-8, one caption per line") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    lines = [ln.rstrip("\r") for ln in lines]
    empty = [i + 1 for i, ln in enumerate(lines) if not ln.strip()]
    if empty:
        raise DataError(path, f"{len(empty)} empty caption line(s), first at line(s) {empty[:5]}",
                        "every line must hold one caption; remove blank lines only if you also remove the "
                        "matching image (captions are paired with images by position)")
    return lines


@dataclass
class SplitData:
    root: Path
    split: str
    captions: list[str]
    n_images: int
    image_stride: int  # 1, or caps_per_image when each image row is repeated per caption
    caps_per_image: int
    paths: dict[str, Path]
    boxes: np.ndarray | None = None
    all_captions: list[str] | None = None  # the whole file, also when max_images keeps a prefix
    _features: np.ndarray | None = field(default=None, repr=False)

    @property
    def features(self) -> np.ndarray:
        if self._features is None:  # opened lazily: every DataLoader worker maps the file itself
            self._features = open_npy(self.paths["ims"])
        return self._features

    def image_features(self, i: int) -> np.ndarray:
        row = i * self.image_stride
        x = np.asarray(self.features[row], dtype=np.float32)
        if not np.isfinite(x).all():
            raise DataError(self.paths["ims"], f"row {row} (image {i}) contains NaN or Inf values",
                            "re-extract the features of that image; NaN features would silently poison training")
        return x

    def image_boxes(self, i: int) -> np.ndarray:
        assert self.boxes is not None
        return np.asarray(self.boxes[i * self.image_stride], dtype=np.float32)

    def __getstate__(self):  # never pickle a memory map into worker processes
        state = dict(self.__dict__)
        state["_features"] = None
        return state


def load_split(root: str | Path, split: str, *, num_regions: int = 36, feature_dim: int = 2048,
               caps_per_image: int = 5, with_boxes: bool = False, max_images: int | None = None) -> SplitData:
    root = Path(root)
    paths = split_paths(root, split)
    if not root.is_dir():
        raise DataError(root, "data folder not found", LAYOUT_HELP)
    for key in ("ims", "caps"):
        if not paths[key].exists():
            raise DataError(paths[key], f"split '{split}' is missing its {paths[key].name}", LAYOUT_HELP)
    captions = read_captions(paths["caps"])
    n_caps = len(captions)
    if n_caps == 0 or n_caps % caps_per_image:
        raise DataError(paths["caps"], f"{n_caps} captions is not a multiple of {caps_per_image} captions per image",
                        f"the layout pairs caption j with image j // {caps_per_image}; fix the file (or set "
                        f"data.caps_per_image) so every image has exactly {caps_per_image} captions")
    feats = open_npy(paths["ims"])
    if not np.issubdtype(feats.dtype, np.floating):
        raise DataError(paths["ims"], f"features have dtype {feats.dtype}, expected float32",
                        "save the region features as float32")
    if feats.ndim != 3 or feats.shape[1:] != (num_regions, feature_dim):
        raise DataError(paths["ims"], f"features have shape {feats.shape}, expected [N, {num_regions}, {feature_dim}]",
                        "set data.num_regions / data.feature_dim (and the model's feature_dim) to match the file, "
                        "or use features extracted with the standard bottom-up model")
    n_images = n_caps // caps_per_image
    if feats.shape[0] == n_images:
        stride = 1
    elif feats.shape[0] == n_caps:
        stride = caps_per_image  # one row per caption: each image repeated caps_per_image times
    else:
        raise DataError(paths["ims"], f"{feats.shape[0]} feature rows do not match {n_caps} captions in "
                        f"{paths['caps'].name} ({n_images} images x {caps_per_image})",
                        "the two files must describe the same images in the same order; check that they come "
                        "from the same release and split")
    all_captions = captions
    boxes = None
    if with_boxes:
        boxes = _load_boxes(paths["boxes"], feats.shape[0], num_regions)
    if max_images is not None and max_images < n_images:
        n_images = max_images
        captions = captions[: n_images * caps_per_image]
    return SplitData(root, split, captions, n_images, stride, caps_per_image, paths, boxes, all_captions)


def _load_boxes(path: Path, rows: int, num_regions: int) -> np.ndarray:
    boxes = open_npy(path)
    if boxes.shape != (rows, num_regions, 4):
        raise DataError(path, f"boxes have shape {boxes.shape}, expected [{rows}, {num_regions}, 4]",
                        "boxes must be normalised (x1, y1, x2, y2) per region, one row per feature row")
    b = np.asarray(boxes, dtype=np.float32)
    bad = ~np.isfinite(b).all(axis=(1, 2))
    bad |= ((b < -BOX_TOLERANCE) | (b > 1 + BOX_TOLERANCE)).any(axis=(1, 2))
    bad |= ((b[..., 2] < b[..., 0] - BOX_TOLERANCE) | (b[..., 3] < b[..., 1] - BOX_TOLERANCE)).any(axis=1)
    if bad.any():
        rows_bad = np.flatnonzero(bad)
        raise DataError(path, f"{rows_bad.size} row(s) have boxes outside [0, 1] or with x2 < x1 / y2 < y1 "
                        f"(first rows: {rows_bad[:5].tolist()}, e.g. {b[rows_bad[0]].reshape(-1, 4)[0].tolist()})",
                        "divide pixel boxes by the image width/height so they are normalised (x1, y1, x2, y2)")
    return np.clip(b, 0.0, 1.0)

"""Reads one split of the standard precomputed-feature layout (SCAN's release) and checks it.

<root>/{split}_ims.npy    float [N, 36, 2048] (memory-mapped; COCO train is 33 GB)
<root>/{split}_caps.txt   5 captions per image, caption j belongs to image j // 5
<root>/{split}_boxes.npy  optional [N, 36, 4], normalised (x1, y1, x2, y2)
Some releases store one image row per caption (each image repeated 5 times); that is detected from the
row count *and* confirmed by checking that sampled groups of rows are identical (all of them with
`zoo-prepare --check-features`), so a split with one caption per image is never mis-read as repeated rows.
Every problem is a DataError naming the file, the problem and the fix.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .errors import LAYOUT_HELP, DataError

BOX_TOLERANCE = 1e-3
LARGE_FEATURE = 1e4  # bottom-up features are post-ReLU activations of order 1-100; 1e4 means broken extraction
REPEAT_SAMPLES = 8  # groups of rows compared when detecting a repeated-rows release


def split_paths(root: str | Path, split: str) -> dict[str, Path]:
    root = Path(root)
    return {"ims": root / f"{split}_ims.npy", "caps": root / f"{split}_caps.txt", "boxes": root / f"{split}_boxes.npy"}


def open_npy(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(path, "file not found", LAYOUT_HELP)
    if path.is_dir():
        raise DataError(path, "is a folder, not an .npy file", LAYOUT_HELP)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # truncated header, not an .npy, object arrays, ...
        raise DataError(path, f"cannot read this .npy file ({type(e).__name__}: {e})",
                        "re-copy or re-extract it; it must be a plain numeric NumPy array saved with np.save") from None
    if not isinstance(arr, np.ndarray):  # np.load returns an NpzFile for a zip archive
        keys = list(arr.keys())
        arr.close()
        raise DataError(path, f"is an .npz archive (arrays {keys[:5]}), not an .npy array",
                        f"convert it: python -c \"import numpy as np; np.save('{path}', np.load('{path}')['{keys[0] if keys else 'KEY'}'])\"")
    return arr


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
    held: np.ndarray | None = field(default=None, repr=False)  # hold_in_memory(): one row per image, fp32/fp16
    one_region: bool = False  # the file is [N, F] (one vector per image): items are [1, F]

    def hold_in_memory(self, dtype=np.float32) -> np.ndarray:
        """Reads the split's image rows into RAM once (dtype float32 or float16: half the memory) and serves
        items from there; NaN/Inf are checked over the whole copy here (the items then skip the check)."""
        if self.held is None or self.held.dtype != dtype:
            rows = self.features[: self.n_images * self.image_stride: self.image_stride]
            held = np.empty((self.n_images, *rows.shape[1:]), dtype=dtype)
            for a in range(0, self.n_images, 4096):  # chunked: a memory map streams, no fp32 copy of the whole
                chunk = np.asarray(rows[a: a + 4096], dtype=np.float32)
                bad = ~np.isfinite(chunk).reshape(chunk.shape[0], -1).all(1)
                if bad.any():
                    raise self._non_finite(a + int(np.flatnonzero(bad)[0]))
                held[a: a + chunk.shape[0]] = chunk
            if self.one_region:
                held = held[:, None, :]
            if dtype == np.float16 and not np.isfinite(held).all():
                raise DataError(self.paths["ims"], "features overflow float16 (|x| > 65504)",
                                "use data.train_features: memory (float32) or mmap")
            self.held = held
        return self.held

    @property
    def features(self) -> np.ndarray:
        if self._features is None:  # opened lazily: every DataLoader worker maps the file itself
            self._features = open_npy(self.paths["ims"])
        return self._features

    def image_features(self, i: int) -> np.ndarray:
        if self.held is not None:
            return self.held[i]
        row = i * self.image_stride
        x = np.asarray(self.features[row], dtype=np.float32)
        if not np.isfinite(x).all():
            raise self._non_finite(i)
        return x[None] if self.one_region else x

    def _non_finite(self, i: int) -> DataError:
        return DataError(self.paths["ims"], f"row {i * self.image_stride} (image {i}) contains NaN or Inf values",
                         "re-extract the features of that image; NaN features would silently poison training")

    def image_boxes(self, i: int) -> np.ndarray:
        assert self.boxes is not None
        return np.asarray(self.boxes[i * self.image_stride], dtype=np.float32)

    def __getstate__(self):  # never pickle a memory map into worker processes (a held copy travels as is)
        state = dict(self.__dict__)
        state["_features"] = None
        return state


def load_split(root: str | Path, split: str, *, num_regions: int = 36, feature_dim: int = 2048,
               caps_per_image: int = 5, with_boxes: bool = False, max_images: int | None = None) -> SplitData:
    root = Path(root)
    paths = split_paths(root, split)
    check_root(root)
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
    # one vector per image ([N, F], VSE++'s *_precomp features) is served as one region, [N, 1, F]
    one_region = feats.ndim == 2 and num_regions == 1 and feats.shape[1] == feature_dim
    if feats.ndim == 2 and not one_region:
        raise DataError(paths["ims"], f"features have shape {feats.shape}: one vector per image",
                        f"set data.num_regions: 1 and data.feature_dim: {feats.shape[1]} (and the model's "
                        "feature_dim) to serve each vector as one region")
    if not one_region and (feats.ndim != 3 or feats.shape[1:] != (num_regions, feature_dim)):
        raise DataError(paths["ims"], f"features have shape {feats.shape}, expected [N, {num_regions}, {feature_dim}]",
                        "set data.num_regions / data.feature_dim (and the model's feature_dim) to match the file, "
                        "or use features extracted with the standard bottom-up model")
    n_images = n_caps // caps_per_image
    if feats.shape[0] == n_images:
        stride = 1
    elif feats.shape[0] == n_caps:
        stride = caps_per_image  # one row per caption: each image repeated caps_per_image times ...
        check_repeated_rows(feats, paths["ims"], caps_per_image, paths["caps"])  # ... if the rows say so too
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
    return SplitData(root, split, captions, n_images, stride, caps_per_image, paths, boxes, all_captions,
                     one_region=one_region)


def check_root(root: Path) -> None:
    if root.is_file():
        raise DataError(root, "is a file, not a data folder", "point data.root (or --root) at the folder that holds "
                        "{split}_ims.npy and {split}_caps.txt, not at one of the files")
    if not root.is_dir():
        raise DataError(root, "data folder not found", LAYOUT_HELP)


def check_repeated_rows(feats: np.ndarray, path: Path, k: int, caps_path: Path, groups: int | None = REPEAT_SAMPLES,
                        progress: bool = False) -> None:
    """Confirms a repeated-rows release: rows g*k .. g*k+k-1 hold one image (all groups when `groups` is None)."""
    n_groups = feats.shape[0] // k
    picks = range(n_groups) if groups is None else sorted(set(np.linspace(0, n_groups - 1, min(groups, n_groups)).astype(int)))
    for g in tqdm(picks, desc=f"checking repeated rows of {path.name}", disable=not progress, leave=False):
        block = np.asarray(feats[g * k : (g + 1) * k])
        if not (block == block[:1]).all():
            raise DataError(path, f"{feats.shape[0]} feature rows for {feats.shape[0]} captions in {caps_path.name}, but "
                            f"rows {g * k}-{g * k + k - 1} are not copies of one image, so this is not a release that "
                            f"repeats each image's row for its {k} captions",
                            "if every image has one caption, set data.caps_per_image: 1 (zoo-prepare: --caps-per-image 1); "
                            f"otherwise the feature file needs one row per image ({feats.shape[0] // k} rows) or "
                            f"{k} identical rows per image")


@dataclass
class FeatureScan:
    """Rows of a feature file that are non-finite (an error), all zero or absurdly large (warnings)."""

    rows: int
    nonfinite: list[int]
    zero: list[int]
    large: list[int]

    def raise_if_bad(self, path: Path) -> None:
        if self.nonfinite:
            raise DataError(path, f"{len(self.nonfinite)} row(s) contain NaN or Inf values (rows "
                            f"{self.nonfinite[:10]}{' ...' if len(self.nonfinite) > 10 else ''})",
                            "re-extract the features of those images; NaN features would silently poison training")

    def warnings(self, path: Path) -> list[str]:
        out = []
        for rows, what in ((self.zero, "are all zero (no detections?)"),
                           (self.large, f"hold values above {LARGE_FEATURE:g} (broken extraction or wrong dtype?)")):
            if rows:
                out.append(f"{path}: {len(rows)} row(s) {what}: rows {rows[:10]}{' ...' if len(rows) > 10 else ''}")
        return out


def scan_features(path: Path, rows_per_step: int = 256, progress: bool = True) -> FeatureScan:
    """Full scan of a feature file, block by block (COCO train is 33 GB)."""
    feats = open_npy(path)
    scan = FeatureScan(int(feats.shape[0]), [], [], [])
    for a in tqdm(range(0, feats.shape[0], rows_per_step), desc=f"checking {path.name}", disable=not progress,
                  leave=False):
        block = np.asarray(feats[a : a + rows_per_step], dtype=np.float32).reshape(min(rows_per_step, feats.shape[0] - a), -1)
        finite = np.isfinite(block)
        peak = np.abs(np.where(finite, block, 0)).max(axis=1) if block.shape[1] else np.zeros(len(block))
        scan.nonfinite += (a + np.flatnonzero(~finite.all(axis=1))).tolist()
        scan.zero += (a + np.flatnonzero(peak == 0)).tolist()
        scan.large += (a + np.flatnonzero(peak > LARGE_FEATURE)).tolist()
    return scan


def scan_features_cached(path: Path, cache_dir: Path, progress: bool = True) -> FeatureScan:
    """scan_features once per file version: the result is kept beside the vocabulary, keyed by size and mtime."""
    st = path.stat()
    stamp = cache_dir / f"{path.stem}.scan.json"
    key = {"file": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if stamp.exists():
        try:
            data = json.loads(stamp.read_text())
            if data.get("key") == key:
                return FeatureScan(**data["scan"])
        except (ValueError, TypeError, KeyError):
            pass
    scan = scan_features(path, progress=progress)
    if os.access(cache_dir, os.W_OK):
        tmp = stamp.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "scan": asdict(scan)}))
        os.replace(tmp, stamp)
    return scan


def _load_boxes(path: Path, rows: int, num_regions: int) -> np.ndarray:
    boxes = open_npy(path)
    if boxes.shape != (rows, num_regions, 4):
        raise DataError(path, f"boxes have shape {boxes.shape}, expected [{rows}, {num_regions}, 4]",
                        "boxes must be normalised (x1, y1, x2, y2) per region, one row per feature row")
    b = np.asarray(boxes, dtype=np.float32)
    # each problem gets its own message and fix, with one offending box shown
    nonfinite = ~np.isfinite(b).all(axis=-1)  # [rows, regions]
    safe = np.where(np.isfinite(b), b, 0.0)
    outside = ((safe < -BOX_TOLERANCE) | (safe > 1 + BOX_TOLERANCE)).any(axis=-1)
    inverted = (safe[..., 2] < safe[..., 0] - BOX_TOLERANCE) | (safe[..., 3] < safe[..., 1] - BOX_TOLERANCE)
    checks = [
        (nonfinite, "NaN or Inf box coordinates", "re-extract the boxes of those images"),
        (outside, "box coordinates outside [0, 1] (pixel units?)",
         "divide pixel boxes by the image width/height so they are normalised: (x1/W, y1/H, x2/W, y2/H)"),
        (inverted, "boxes with x2 < x1 or y2 < y1 (stored as (x, y, w, h), or corners swapped?)",
         "store corners (x1, y1, x2, y2): from (x, y, w, h) use (x, y, x + w, y + h), normalised"),
    ]
    for mask, problem, fix in checks:
        if mask.any():
            rows_bad, regions_bad = np.nonzero(mask)
            r, q = int(rows_bad[0]), int(regions_bad[0])
            raise DataError(path, f"{len(np.unique(rows_bad))} row(s) have {problem}; first: row {r}, region {q}, box "
                            f"{[round(float(v), 4) for v in b[r, q]]} (rows {np.unique(rows_bad)[:5].tolist()})", fix)
    return np.clip(b, 0.0, 1.0)

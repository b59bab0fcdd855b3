"""Bottom-up-attention TSV -> the zoo's layout: {split}_ims.npy AND {split}_boxes.npy from the same rows.

The widely shared precomputed features (SCAN's *_precomp) carry no boxes, and boxes taken from another
extraction silently misalign with the features, so both files are written here from one pass over the
bottom-up-attention TSV (fields image_id, image_w, image_h, num_boxes, boxes, features; boxes and features
base64-encoded float32, [num_boxes, 4] pixel (x1, y1, x2, y2) and [num_boxes, feature_dim]).

    zoo-convert-tsv --tsv trainval_resnet101_faster_rcnn_genome_36.tsv.* --ids data/f30k/test_ids.txt \
        --split test --out data/f30k_precomp
    (or python -m datamodules.convert_tsv ...)

`--ids` lists the split's image ids, one per line, in the order of {split}_caps.txt (caption j belongs to the
j // 5-th id). The TSV is streamed (COCO's is tens of GB) into memory-mapped outputs; rows of images not in the
list are skipped, so one TSV can serve every split. Boxes are divided by the image width/height.

Checked at conversion time (each a DataError naming the TSV, the image and the fix): image_w/image_h finite,
> 0 and at most MAX_SIDE pixels; NaN/Inf features or boxes; boxes that fall outside the image by more than
`--box-tolerance` (a fraction of the side; detectors clip to the image, so a box reaching x = 720 in a
300-pixel-wide image means a wrong image_w, and clipping it to 1.0 would hide that). Partial outputs are
written to hidden `.{split}_*.npy.<pid>.tmp` files; those of a killed run (SIGTERM/SIGKILL, no cleanup) are
removed at the next start, with a line saying so.
"""
from __future__ import annotations

import argparse
import base64
import csv
import os
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from .errors import DataError

FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
MAX_SIDE = 65535.0  # JPEG's largest image side; an image_w of 1e30 would turn every box into a point
BOX_TOLERANCE = 0.02  # boxes may overshoot the image by 2% of its side (rounding in extractions), then are clipped


def read_ids(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise DataError(path, "image-id list not found", "give a text file with one image id per line, in the order "
                        "of the split's captions file")
    ids = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not ids:
        raise DataError(path, "image-id list is empty", "one image id per line")
    return ids


def _decode(field: str, n: int, width: int, what: str, tsv: Path, image_id: str) -> np.ndarray:
    try:
        buf = base64.b64decode(field)
    except Exception as e:
        raise DataError(tsv, f"image {image_id}: the {what} field is not base64 ({e})",
                        "the TSV must be the bottom-up-attention format (base64-encoded float32)") from None
    if len(buf) != n * width * 4:
        raise DataError(tsv, f"image {image_id}: the {what} field holds {len(buf) // 4} floats, expected "
                        f"num_boxes x {width} = {n * width}",
                        f"check --feature-dim (the {what} width) and that the file is not truncated")
    return np.frombuffer(buf, dtype=np.float32).reshape(n, width)


def iter_rows(paths: Iterable[str | Path]):
    csv.field_size_limit(sys.maxsize)
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise DataError(p, "TSV file not found", "give the bottom-up-attention TSV file(s) with --tsv")
        with open(p, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t", fieldnames=FIELDS):
                yield p, row


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(out: Path, split: str) -> list[Path]:
    """Removes the hidden partial outputs of an earlier conversion of `split` that was killed (its process is
    gone); a conversion still running keeps its files. Returns what was removed."""
    removed = []
    for t in sorted(t for name in ("ims", "boxes") for t in out.glob(f".{split}_{name}.npy*.tmp")):
        parts = t.name.split(".")
        pid = parts[-2] if len(parts) >= 2 else ""
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        size = t.stat().st_size
        t.unlink()
        removed.append(t)
        print(f"removed {t} ({size / 2**30:.2f} GiB), left by a killed conversion", file=sys.stderr)
    return removed


def check_boxes(b: np.ndarray, w: float, h: float, tolerance: float, path: Path, image_id: str) -> np.ndarray:
    """Pixel (x1, y1, x2, y2) boxes -> normalised, after checking they are finite and inside the image."""
    if not np.isfinite(b).all():
        raise DataError(path, f"image {image_id}: NaN/Inf in its boxes (first: {b[~np.isfinite(b).all(1)][0]})",
                        "re-extract that image; the boxes are stored as float32 pixel coordinates")
    norm = b / np.array([w, h, w, h], dtype=np.float64)
    worst = float(max(-norm.min(), norm.max() - 1.0))
    if worst > tolerance:
        k = int(np.argmax(np.maximum(-norm, norm - 1.0).max(1)))
        raise DataError(path, f"image {image_id}: box {b[k].tolist()} falls outside its {w:g} x {h:g} image by "
                        f"{worst:.0%} of a side (tolerance {tolerance:.0%})",
                        "image_w/image_h must be the size the boxes were detected in (a resized or swapped size "
                        "gives wrong boxes); or raise --box-tolerance if the extraction really overshoots")
    return np.clip(norm, 0.0, 1.0).astype(np.float32)


def convert_tsv(tsv: list[str | Path], ids: list[str], out: str | Path, split: str, num_regions: int = 36,
                feature_dim: int = 2048, progress: bool = True,
                box_tolerance: float = BOX_TOLERANCE) -> tuple[Path, Path]:
    """Writes <out>/{split}_ims.npy [N, R, F] float32 and <out>/{split}_boxes.npy [N, R, 4] (normalised x1, y1,
    x2, y2), row k = ids[k]. Raises DataError for duplicate ids (in the list or the TSV), missing ids, wrong
    box counts, image sizes that are not finite/positive/plausible, NaN/Inf features or boxes and boxes outside
    the image; nothing is left behind on an error."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out, split)
    index: dict[str, int] = {}
    for k, i in enumerate(ids):
        if i in index:
            raise DataError(None, f"image id {i} is listed twice in the id list (positions {index[i]} and {k})",
                            "each image of a split appears once; its captions are its 5 consecutive lines")
        index[i] = k
    n = len(ids)
    ims_path, box_path = out / f"{split}_ims.npy", out / f"{split}_boxes.npy"
    tmp_ims, tmp_box = out / f".{split}_ims.npy.{os.getpid()}.tmp", out / f".{split}_boxes.npy.{os.getpid()}.tmp"
    done = np.zeros(n, dtype=bool)
    try:
        ims = np.lib.format.open_memmap(tmp_ims, mode="w+", dtype=np.float32, shape=(n, num_regions, feature_dim))
        boxes = np.lib.format.open_memmap(tmp_box, mode="w+", dtype=np.float32, shape=(n, num_regions, 4))
        bar = tqdm(total=n, desc=f"{split}: TSV -> npy", unit="img", disable=not progress)
        for path, row in iter_rows(tsv):
            image_id = str(row["image_id"]).strip()
            k = index.get(image_id)
            if k is None:
                continue  # an image of another split
            if done[k]:
                raise DataError(path, f"image {image_id} appears twice in the TSV",
                                "use one extraction per image (remove the duplicate row or file)")
            try:
                nb, w, h = int(row["num_boxes"]), float(row["image_w"]), float(row["image_h"])
            except (TypeError, ValueError):
                raise DataError(path, f"image {image_id}: num_boxes/image_w/image_h are not numbers",
                                f"the TSV fields must be {', '.join(FIELDS)}") from None
            if nb != num_regions:
                raise DataError(path, f"image {image_id} has {nb} boxes, expected {num_regions}",
                                "use a fixed-count extraction (e.g. the 36-box bottom-up features) or set "
                                "--num-regions to its count")
            if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):  # also catches NaN and inf
                raise DataError(path, f"image {image_id}: image size {w:g} x {h:g}",
                                f"image_w and image_h must be finite pixel sizes in (0, {MAX_SIDE:g}]")
            b = _decode(row["boxes"], nb, 4, "boxes", path, image_id)
            feats = _decode(row["features"], nb, feature_dim, "features", path, image_id)
            if not np.isfinite(feats).all():
                bad = np.flatnonzero(~np.isfinite(feats).all(1))
                raise DataError(path, f"image {image_id}: NaN/Inf in the features of box(es) {bad.tolist()[:5]}",
                                "re-extract that image (training on it would give a non-finite loss)")
            ims[k] = feats
            boxes[k] = check_boxes(b, w, h, box_tolerance, path, image_id)
            done[k] = True
            bar.update(1)
        bar.close()
        if not done.all():
            missing = [ids[k] for k in np.flatnonzero(~done)]
            raise DataError(", ".join(str(Path(p)) for p in tsv), f"{len(missing)} of {n} image ids are not in the "
                            f"TSV (first: {missing[:5]})", "give every TSV file of the extraction (--tsv a.tsv b.tsv "
                            "...) or drop those images from the id list and their captions")
        ims.flush()
        boxes.flush()
        del ims, boxes
        os.replace(tmp_ims, ims_path)
        os.replace(tmp_box, box_path)
    finally:
        for t in (tmp_ims, tmp_box):
            if t.exists():
                t.unlink()
    return ims_path, box_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tsv", nargs="+", required=True, help="bottom-up-attention TSV file(s)")
    ap.add_argument("--ids", required=True, help="the split's image ids, one per line, in caption-file order")
    ap.add_argument("--split", required=True, help="split name: writes {split}_ims.npy and {split}_boxes.npy")
    ap.add_argument("--out", required=True, help="the data folder (data.root)")
    ap.add_argument("--num-regions", type=int, default=36)
    ap.add_argument("--feature-dim", type=int, default=2048)
    ap.add_argument("--box-tolerance", type=float, default=BOX_TOLERANCE,
                    help="how far (fraction of the image side) a box may fall outside the image before it is an "
                         "error (default %(default)s); within it boxes are clipped")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        ims, box = convert_tsv(args.tsv, read_ids(args.ids), args.out, args.split, args.num_regions,
                               args.feature_dim, progress=not args.no_progress, box_tolerance=args.box_tolerance)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {ims} and {box}")


if __name__ == "__main__":
    main()

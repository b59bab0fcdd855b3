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


def convert_tsv(tsv: list[str | Path], ids: list[str], out: str | Path, split: str, num_regions: int = 36,
                feature_dim: int = 2048, progress: bool = True) -> tuple[Path, Path]:
    """Writes <out>/{split}_ims.npy [N, R, F] float32 and <out>/{split}_boxes.npy [N, R, 4] (normalised x1, y1,
    x2, y2), row k = ids[k]. Raises DataError for duplicate ids (in the list or the TSV), missing ids and wrong
    box counts; nothing is left behind on an error."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, int] = {}
    for k, i in enumerate(ids):
        if i in index:
            raise DataError(None, f"image id {i} is listed twice in the id list (positions {index[i]} and {k})",
                            "each image of a split appears once; its captions are its 5 consecutive lines")
        index[i] = k
    n = len(ids)
    ims_path, box_path = out / f"{split}_ims.npy", out / f"{split}_boxes.npy"
    tmp_ims, tmp_box = out / f".{split}_ims.npy.tmp", out / f".{split}_boxes.npy.tmp"
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
            if w <= 0 or h <= 0:
                raise DataError(path, f"image {image_id}: image size {w} x {h}", "image_w and image_h must be > 0")
            b = _decode(row["boxes"], nb, 4, "boxes", path, image_id)
            ims[k] = _decode(row["features"], nb, feature_dim, "features", path, image_id)
            boxes[k] = np.clip(b / np.array([w, h, w, h], dtype=np.float32), 0.0, 1.0)
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
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        ims, box = convert_tsv(args.tsv, read_ids(args.ids), args.out, args.split, args.num_regions,
                               args.feature_dim, progress=not args.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {ims} and {box}")


if __name__ == "__main__":
    main()

"""One error type for bad input: it always names the file, the problem and the fix."""
from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    def __init__(self, path: str | Path | None, problem: str, fix: str):
        self.path, self.problem, self.fix = (str(path) if path is not None else None), problem, fix
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}{problem}\n  fix: {fix}")


LAYOUT_HELP = (
    "the standard precomputed bottom-up features (the SCAN release, e.g. data/f30k_precomp or data/coco_precomp) "
    "go in one folder as {split}_ims.npy (float32 [N, 36, 2048]), {split}_caps.txt (5 captions per image, one "
    "per line) and optionally {split}_boxes.npy ([N, 36, 4], normalised x1,y1,x2,y2); point data.root at it "
    "(see README 'Data layout'), then run `zoo-prepare --root <folder>` to build the vocabulary and parses"
)

"""`zoo-prepare`: writes the text artifacts a DataModule serves, next to the data or into a cache folder.

- vocab.min<N>.json (SCAN format) from the training captions, words seen at least --min-count (N) times;
- {split}_parse.{backend}.npz: UPOS tags, dependency heads and labels of every caption, aligned with the
  zoo's tokenizer. Parsing runs in chunks with a progress bar; finished chunks are kept in a .parts folder,
  so an interrupted run resumes where it stopped.

    zoo-prepare --root data/coco_precomp --splits train dev testall --parser stanza
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .errors import DataError
from .layout import read_captions, split_paths
from .parsing import UPOS_ID, get_parser
from .text import Vocabulary, tokenize

FORMAT_VERSION = 1


def captions_digest(captions: list[str]) -> str:
    h = hashlib.sha1()
    for c in captions:
        h.update(c.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def vocab_filename(min_count: int) -> str:
    """The minimum count is part of the name: changing it never silently reuses another vocabulary."""
    return f"vocab.min{min_count}.json"


def parse_path(cache_dir: str | Path, split: str, backend: str) -> Path:
    return Path(cache_dir) / f"{split}_parse.{backend}.npz"


class ParseTable:
    """Loaded parses of one split: per caption UPOS ids and 0-based heads, from flat arrays + offsets.

    `captions` is the split's full caption list; a file made from other captions is refused as stale.
    """

    def __init__(self, path: Path, captions: list[str]):
        if not path.exists():
            raise DataError(path, "parse file not found", f"run `zoo-prepare --root <data> --splits "
                            f"{path.name.split('_parse')[0]} --parser <backend>` (the DataModule also does it in "
                            "prepare_data when data.auto_prepare is true)")
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            self.offsets, self.upos, self.heads = z["offsets"], z["upos"], z["heads"]
            self.deprel_ids, self.deprel_names = z["deprels"], [str(s) for s in z["deprel_names"]]
        if meta.get("version") != FORMAT_VERSION or meta["n"] != len(captions) or len(self.offsets) != len(captions) + 1 \
                or meta["digest"] != captions_digest(captions):
            raise DataError(path, "parse file is stale: it was made from different captions or an older format",
                            "delete it and run `zoo-prepare` again")
        self.backend = meta["backend"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[k], self.offsets[k + 1]
        return self.upos[a:b], self.heads[a:b]


def build_vocab(train_caps: Path, out: Path, min_count: int = 4) -> Vocabulary:
    vocab = Vocabulary.build(read_captions(train_caps), min_count)
    vocab.save(out)
    return vocab


def parse_split(captions: list[str], out: Path, backend: str = "spacy", chunk_size: int = 2000,
                progress: bool = True, parser=None) -> Path:
    """Parses every caption into `out`; resumable through `out`.parts/."""
    parts = out.with_suffix(".parts")
    parts.mkdir(parents=True, exist_ok=True)
    n_chunks = -(-len(captions) // chunk_size)
    todo = [i for i in range(n_chunks) if not (parts / f"{i:06d}.npz").exists()]
    if todo:
        parser = parser or get_parser(backend)
    bar = tqdm(total=len(captions), initial=(n_chunks - len(todo)) * chunk_size if todo else len(captions),
               desc=f"parsing {out.name}", unit="cap", disable=not progress)
    for i in todo:
        chunk = captions[i * chunk_size : (i + 1) * chunk_size]
        toks = [tokenize(c) for c in chunk]
        parses = parser.parse(toks)
        lens, upos, heads, rels = [], [], [], []
        for t, p in zip(toks, parses):
            if len(p.upos) != len(t):
                raise RuntimeError(f"parser returned {len(p.upos)} words for a {len(t)}-token caption: {t}")
            lens.append(len(t))
            upos += [UPOS_ID.get(u, UPOS_ID["X"]) for u in p.upos]
            heads += p.heads
            rels += p.deprels
        tmp = parts / f"{i:06d}.tmp.npz"
        np.savez(tmp, lens=np.array(lens, np.int32), upos=np.array(upos, np.uint8), heads=np.array(heads, np.int16),
                 rels=np.array(rels, dtype=str))
        os.replace(tmp, parts / f"{i:06d}.npz")  # a chunk file exists only once complete
        bar.update(len(chunk))
    bar.close()
    lens, upos, heads, rels = [], [], [], []
    for i in range(n_chunks):
        with np.load(parts / f"{i:06d}.npz") as z:
            lens.append(z["lens"]), upos.append(z["upos"]), heads.append(z["heads"]), rels.append(z["rels"])
    rels_all = np.concatenate(rels) if rels else np.array([], dtype=str)
    names, rel_ids = np.unique(rels_all, return_inverse=True)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lens))]).astype(np.int64)
    meta = {"version": FORMAT_VERSION, "backend": backend, "n": len(captions), "digest": captions_digest(captions)}
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, offsets=offsets, upos=np.concatenate(upos), heads=np.concatenate(heads),
             deprels=rel_ids.astype(np.uint16), deprel_names=names, meta=np.array(json.dumps(meta)))
    os.replace(tmp, out)
    shutil.rmtree(parts)
    return out


def ensure_parsed(root: str | Path, cache_dir: str | Path, split: str, backend: str, progress: bool = True) -> Path:
    """Parses a split's captions into the cache unless that was already done."""
    out = parse_path(cache_dir, split, backend)
    if not out.exists():
        parse_split(read_captions(split_paths(root, split)["caps"]), out, backend, progress=progress)
    return out


def check_features(path: Path, rows_per_step: int = 512, progress: bool = True) -> None:
    """Full NaN/Inf scan of a feature file (the DataModule checks each item as it reads it as well)."""
    from .layout import open_npy

    feats = open_npy(path)
    for a in tqdm(range(0, feats.shape[0], rows_per_step), desc=f"checking {path.name}", disable=not progress):
        block = np.asarray(feats[a : a + rows_per_step])
        if not np.isfinite(block).all():
            row = a + int(np.flatnonzero(~np.isfinite(block).reshape(block.shape[0], -1).all(1))[0])
            raise DataError(path, f"row {row} contains NaN or Inf values", "re-extract the features of that image")


def prepare(root: str | Path, splits: list[str], *, train_split: str = "train", parser: str | None = "spacy",
            cache_dir: str | Path | None = None, min_count: int = 4, check: bool = False,
            progress: bool = True) -> dict[str, Path]:
    root = Path(root)
    cache = Path(cache_dir) if cache_dir else root
    cache.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    vocab_file = cache / vocab_filename(min_count)
    if not vocab_file.exists():
        build_vocab(split_paths(root, train_split)["caps"], vocab_file, min_count)
    written["vocab"] = vocab_file
    for split in splits:
        paths = split_paths(root, split)
        if check:
            check_features(paths["ims"], progress=progress)
        if parser:
            written[f"{split}_parse"] = ensure_parsed(root, cache, split, parser, progress)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="zoo-prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder with {split}_ims.npy and {split}_caps.txt")
    ap.add_argument("--splits", nargs="+", default=["train", "dev", "test"])
    ap.add_argument("--train-split", default="train", help="split the vocabulary is built from")
    ap.add_argument("--parser", default="spacy", choices=["spacy", "stanza", "none"])
    ap.add_argument("--cache-dir", default=None, help="where to write (default: next to the data)")
    ap.add_argument("--min-count", type=int, default=4, help="vocabulary minimum word count (SCAN used 4)")
    ap.add_argument("--check-features", action="store_true", help="scan every feature file for NaN/Inf")
    args = ap.parse_args(argv)
    try:
        out = prepare(args.root, args.splits, train_split=args.train_split,
                      parser=None if args.parser == "none" else args.parser, cache_dir=args.cache_dir,
                      min_count=args.min_count, check=args.check_features)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    for k, v in out.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()

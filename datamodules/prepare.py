"""`zoo-prepare`: writes the text artifacts a DataModule serves, next to the data or into a cache folder.

- vocab.min<N>.json (SCAN format) from the training captions, words seen at least --min-count (N) times;
- {split}_parse.{backend}.npz: UPOS tags, dependency heads and labels of every caption, aligned with the
  zoo's tokenizer. Parsing runs in chunks with a progress bar; finished chunks are kept in a .parts folder,
  so an interrupted run resumes where it stopped.

    zoo-prepare --root data/coco_precomp --splits train dev testall --parser stanza
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .errors import LAYOUT_HELP, DataError
from .layout import read_captions, split_paths
from .parsing import UPOS_ID, get_parser
from .text import TOKENIZER_VERSION, Vocabulary, tokenize

FORMAT_VERSION = 2  # 2: records the tokenizer version (parses are aligned with the zoo's tokens)
LOCK_NAME = ".zoo-prepare.lock"


def captions_digest(captions: list[str]) -> str:
    h = hashlib.sha1()
    for c in captions:
        h.update(c.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _caption_files(source) -> list[Path]:
    """One caption file, or several (CASC's released vocabulary counts train + dev: Code_CASC vocab.py:9-10)."""
    return [Path(p) for p in source] if isinstance(source, (list, tuple)) else [Path(source)]


def read_caption_files(source) -> list[str]:
    return [c for p in _caption_files(source) for c in read_captions(p)]


def vocab_meta(captions: list[str], source, min_count: int) -> dict:
    """What a vocabulary is built from; a vocabulary whose meta differs from this is stale."""
    return {"source": "+".join(p.name for p in _caption_files(source)), "digest": captions_digest(captions),
            "min_count": min_count,
            "tokenizer": TOKENIZER_VERSION}


@contextlib.contextmanager
def cache_lock(cache_dir: str | Path):
    """One writer per cache folder: a second zoo-prepare (or DataModule.prepare_data) waits for the first."""
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fh = open(cache_dir / LOCK_NAME, "a+")
    except OSError as e:
        raise DataError(cache_dir, f"cannot write here ({e.strerror})",
                        "pass --cache-dir (zoo-prepare) or data.cache_dir (recipes) pointing at a writable folder") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another zoo-prepare working in {cache_dir} to finish ...", file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
        if not parse_is_current(meta, captions) or len(self.offsets) != len(captions) + 1:
            raise DataError(path, "parse file is stale: it was made from different captions, another tokenizer or "
                            "an older format", "run `zoo-prepare` again (it rebuilds stale parses), or delete the file")
        self.backend = meta["backend"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[k], self.offsets[k + 1]
        return self.upos[a:b], self.heads[a:b]


def parse_meta(captions: list[str], backend: str) -> dict:
    return {"version": FORMAT_VERSION, "backend": backend, "n": len(captions), "digest": captions_digest(captions),
            "tokenizer": TOKENIZER_VERSION}


def parse_is_current(meta: dict, captions: list[str]) -> bool:
    return (meta.get("version") == FORMAT_VERSION and meta.get("n") == len(captions)
            and meta.get("tokenizer") == TOKENIZER_VERSION and meta.get("digest") == captions_digest(captions))


def read_parse_meta(path: Path) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"]))
    except Exception:  # unreadable or truncated: treated as stale and rebuilt
        return None


def build_vocab(train_caps, out: Path, min_count: int = 4) -> Vocabulary:
    captions = read_caption_files(train_caps)
    vocab = Vocabulary.build(captions, min_count, meta=vocab_meta(captions, train_caps, min_count))
    vocab.save(out)
    return vocab


def vocab_is_current(vocab: Vocabulary, captions: list[str], source: Path, min_count: int) -> bool:
    return vocab.meta == vocab_meta(captions, source, min_count)


def parse_split(captions: list[str], out: Path, backend: str = "spacy", chunk_size: int = 2000,
                progress: bool = True, parser=None) -> Path:
    """Parses every caption into `out`; resumable through `out`.parts/."""
    parts = out.with_suffix(".parts")
    meta = parse_meta(captions, backend)
    stamp = parts / "meta.json"
    want = json.dumps({**meta, "chunk_size": chunk_size}, sort_keys=True)
    if parts.exists() and (not stamp.exists() or stamp.read_text() != want):
        shutil.rmtree(parts)  # chunks of other captions (edited while interrupted) or another chunking
    parts.mkdir(parents=True, exist_ok=True)
    stamp.write_text(want)
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
    tmp = out.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, offsets=offsets, upos=np.concatenate(upos), heads=np.concatenate(heads),
             deprels=rel_ids.astype(np.uint16), deprel_names=names, meta=np.array(json.dumps(meta)))
    os.replace(tmp, out)
    shutil.rmtree(parts)
    return out


def ensure_parsed(root: str | Path, cache_dir: str | Path, split: str, backend: str, progress: bool = True) -> Path:
    """Parses a split's captions into the cache unless a parse of exactly these captions is already there."""
    out = parse_path(cache_dir, split, backend)
    captions = read_captions(split_paths(root, split)["caps"])
    if out.exists():
        meta = read_parse_meta(out)
        if meta is not None and parse_is_current(meta, captions):
            return out
        print(f"{out} was made from other captions or another tokenizer: parsing again", file=sys.stderr)
    parse_split(captions, out, backend, progress=progress)
    return out


def check_split(root: str | Path, split: str, caps_per_image: int = 5, progress: bool = True) -> list[str]:
    """`--check-features`: full scan of a split's features: NaN/Inf rows are an error; all-zero and absurdly
    large rows come back as warnings; a repeated-rows release has every group of rows checked."""
    from .layout import check_repeated_rows, open_npy

    paths = split_paths(root, split)
    warnings = check_features(paths["ims"], progress=progress)
    feats = open_npy(paths["ims"])
    n_caps = len(read_captions(paths["caps"])) if paths["caps"].exists() else None
    if caps_per_image > 1 and n_caps == feats.shape[0]:
        check_repeated_rows(feats, paths["ims"], caps_per_image, paths["caps"], groups=None, progress=progress)
    return warnings


def check_features(path: Path, progress: bool = True) -> list[str]:
    """NaN/Inf rows of one feature file raise; returns warnings for all-zero / absurdly large rows."""
    from .layout import scan_features

    scan = scan_features(Path(path), progress=progress)
    scan.raise_if_bad(Path(path))
    return scan.warnings(Path(path))


def report_unknown_words(vocab: Vocabulary, root: Path, splits: list[str]) -> dict[str, float]:
    """<unk> share of each split's words under `vocab`: a vocabulary from other data shows up here at once."""
    rates = {}
    for split in splits:
        caps = split_paths(root, split)["caps"]
        if caps.exists():
            rates[split] = vocab.unk_rate(read_captions(caps))
    return rates


def prepare(root: str | Path, splits: list[str], *, train_split: str = "train", parser: str | None = "spacy",
            cache_dir: str | Path | None = None, min_count: int = 4, check: bool = False, caps_per_image: int = 5,
            progress: bool = True) -> dict[str, Path]:
    from .layout import check_root

    root = Path(root)
    check_root(root)
    cache = Path(cache_dir) if cache_dir else root
    written: dict[str, Path] = {}
    with cache_lock(cache):
        vocab_file = cache / vocab_filename(min_count)
        train_caps = split_paths(root, train_split)["caps"]
        vocab = load_or_build_vocab(vocab_file, train_caps, min_count)
        written["vocab"] = vocab_file
        for split, rate in report_unknown_words(vocab, root, splits).items():
            print(f"{split}: {100 * rate:.2f}% of words are <unk> under {vocab_file.name}", file=sys.stderr)
        for split in splits:
            if check:
                for w in check_split(root, split, caps_per_image, progress=progress):
                    print(f"warning: {w}", file=sys.stderr)
            if parser:
                written[f"{split}_parse"] = ensure_parsed(root, cache, split, parser, progress)
    return written


def load_or_build_vocab(vocab_file: Path, train_caps, min_count: int, quiet: bool = False) -> Vocabulary:
    """The zoo's own vocabulary at `vocab_file`, rebuilt when the training captions, the minimum count or the
    tokenizer changed since it was built. A file without the zoo's record (SCAN's own, copied there) is used
    as it is."""
    for caps in _caption_files(train_caps):  # a list: the vocabulary counts over all of them
        if not caps.exists():
            raise DataError(caps, "training captions not found (the vocabulary is built from them)", LAYOUT_HELP)
    if vocab_file.exists():
        vocab = Vocabulary.load(vocab_file)
        if vocab.meta is None:
            return vocab
        captions = read_caption_files(train_caps)
        if vocab_is_current(vocab, captions, train_caps, min_count):
            return vocab
        if not quiet:
            print(f"{vocab_file} was built from other captions (or another tokenizer/minimum count): rebuilding it "
                  f"from {train_caps}", file=sys.stderr)
    return build_vocab(train_caps, vocab_file, min_count)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="zoo-prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder with {split}_ims.npy and {split}_caps.txt")
    ap.add_argument("--splits", nargs="+", default=["train", "dev", "test"])
    ap.add_argument("--train-split", default="train", help="split the vocabulary is built from")
    ap.add_argument("--parser", default="spacy", choices=["spacy", "stanza", "none"])
    ap.add_argument("--cache-dir", default=None, help="where to write (default: next to the data)")
    ap.add_argument("--min-count", type=int, default=4, help="vocabulary minimum word count (SCAN used 4)")
    ap.add_argument("--caps-per-image", type=int, default=5, help="captions per image (the layout's 5)")
    ap.add_argument("--check-features", action="store_true",
                    help="scan every feature file: NaN/Inf rows (error), all-zero or huge rows (warnings), repeated rows")
    args = ap.parse_args(argv)
    try:
        out = prepare(args.root, args.splits, train_split=args.train_split,
                      parser=None if args.parser == "none" else args.parser, cache_dir=args.cache_dir,
                      min_count=args.min_count, check=args.check_features, caps_per_image=args.caps_per_image)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    for k, v in out.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()

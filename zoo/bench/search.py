"""`make bench-search`: zoo.search at scale on random embeddings with COCO's shapes (build, bytes/item, query latency).

    python -m zoo.bench search [--sizes 10000 100000 1000000] [--full-max 10000] [--exhaustive-max 10000] \
        [--dim 1024] [--regions 36] [--threads 2] [--queries 50] [--rerank 100] [--out runs/bench_search]

For each gallery size: galleries up to --full-max are written as real index folders (zoo.search.IndexWriter: float16
memory-mapped per-item embeddings, float32 global vectors, a FAISS exact inner-product index), one of images (36
regions x d, text->image queries) and one of captions (30 words x d, COCO-like lengths, image->text queries), and
queried through Index.query with CASC-base's exact score re-ranking `--rerank` candidates; sizes up to
--exhaustive-max also time the exhaustive exact scoring of the whole gallery (rerank=None, the reference). Larger
sizes run the first stage alone (FAISS indexes of n unit vectors in RAM: exact flat, and approximate IVF-Flat with
its recall of the exact top-rerank). Prints build time, bytes per item on
disk and in RAM, latency p50/p99 per direction and the peak memory of the queries (VmHWM over VmRSS).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .common import PeakMemory, coco_lengths


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)


def _model(dim: int):
    from ..methods import CASCBase

    m = CASCBase(vocab_size=16, feature_dim=2048, embed_dim=dim, fold_size=None).eval()
    m.vocab_words = None
    return m


def _write_gallery(out: Path, side: str, n: int, dim: int, regions: int, max_words: int, rng: np.random.Generator,
                   chunk: int = 2048):
    from ..search import IndexWriter

    model = _model(dim)
    if side == "images":
        shapes = {"regions": ((regions, dim), np.dtype(np.float16))}
    else:
        shapes = {"words": ((max_words, dim), np.dtype(np.float16)), "lengths": ((), np.dtype(np.int64))}
    meta = {"checkpoint": "random", "checkpoint_sha256": "random", "root": "random", "split": "random", "side": side,
            "chunk": chunk, "ann": "flat", "method": "zoo.methods.casc_base.CASCBase", "vocab": None,
            "vocab_sha256": None, "caps_per_image": 5, "n_items": n, "ids": [], "captions": [], "parser": "spacy"}
    n_chunks = -(-n // chunk)
    w = IndexWriter.create(out, meta, shapes, dim, n_chunks)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    for c in range(n_chunks):
        a, b = c * chunk, min(n, (c + 1) * chunk)
        if side == "images":
            x = torch.nn.functional.normalize(torch.randn(b - a, regions, dim, generator=g), dim=-1)
            emb = {"regions": x}
        else:
            lengths = coco_lengths(b - a, g).clamp(max=max_words)
            x = torch.nn.functional.normalize(torch.randn(b - a, max_words, dim, generator=g), dim=-1)
            x[torch.arange(max_words)[None] >= lengths[:, None]] = 0
            emb = {"words": x, "lengths": lengths}
        with torch.no_grad():
            glob = model.global_embedding(emb, side).numpy()
        w.write(c, a, {k: v.numpy().astype(shapes[k][1]) for k, v in emb.items()}, glob)
    w.finish("flat")
    return model


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _latency(fn, queries: int) -> tuple[float, float]:
    fn(0)  # warm-up
    ts = []
    for q in range(queries):
        t = time.perf_counter()
        fn(q)
        ts.append(1e3 * (time.perf_counter() - t))
    return float(np.percentile(ts, 50)), float(np.percentile(ts, 99))


def bench_full(n: int, args, out: Path) -> list[dict]:
    from ..search import Index

    rows = []
    rng = np.random.default_rng(n)
    g = torch.Generator().manual_seed(n)
    for side, direction in (("images", "t2i"), ("captions", "i2t")):
        folder = out / f"{side}_{n}"
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        model = _write_gallery(folder, side, n, args.dim, args.regions, args.max_words, rng)
        build_s = time.perf_counter() - t
        idx = Index(folder, model=model)
        if side == "images":  # text queries: ~12 words
            qs = [{"words": torch.nn.functional.normalize(torch.randn(1, 14, args.dim, generator=g), dim=-1),
                   "lengths": torch.tensor([14])} for _ in range(args.queries)]
        else:
            qs = [{"regions": torch.nn.functional.normalize(torch.randn(1, args.regions, args.dim, generator=g),
                                                            dim=-1)} for _ in range(args.queries)]
        with PeakMemory(torch.device("cpu")) as pm:
            p50, p99 = _latency(lambda q: idx.query(query_emb=qs[q], k=10, rerank=args.rerank), args.queries)
        row = {"n": n, "direction": direction, "mode": f"two-stage rerank={args.rerank}", "build_s": build_s,
               "disk_B_per_item": _disk_bytes(folder) / n, "ram_B_per_item": idx.faiss.d * 4,
               "p50_ms": p50, "p99_ms": p99, "peak_mb": pm.peak_mb}
        rows.append(row)
        print(_fmt(row), flush=True)
        if n <= args.exhaustive_max:
            nq = max(3, args.queries // 10)
            with PeakMemory(torch.device("cpu")) as pm:
                p50, p99 = _latency(lambda q: idx.query(query_emb=qs[q], k=10, rerank=None), nq)
            row = {**row, "mode": "exhaustive exact", "p50_ms": p50, "p99_ms": p99, "peak_mb": pm.peak_mb}
            rows.append(row)
            print(_fmt(row), flush=True)
        del idx
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def bench_first_stage(n: int, args, ann: str) -> dict:
    """Stage 1 alone over n random unit vectors (zoo.search.index.make_ann); recall@rerank of an approximate index
    against the exact top-rerank of the same queries (on random vectors, the hardest case for IVF)."""
    from ..search.index import make_ann

    rng = np.random.default_rng(n)
    t = time.perf_counter()
    sample = _unit(rng.standard_normal((min(n, 50_000), args.dim), dtype=np.float32)) if ann == "ivf" else None
    index = make_ann(args.dim, ann, n, sample)
    exact = make_ann(args.dim, "flat", n) if ann != "flat" and n <= args.recall_max else None
    for a in range(0, n, 65536):
        x = _unit(rng.standard_normal((min(65536, n - a), args.dim), dtype=np.float32))
        index.add(x)
        if exact is not None:
            exact.add(x)
    build_s = time.perf_counter() - t
    qs = _unit(rng.standard_normal((args.queries, args.dim), dtype=np.float32))
    with PeakMemory(torch.device("cpu")) as pm:
        p50, p99 = _latency(lambda q: index.search(qs[q : q + 1], args.rerank), args.queries)
    mode = f"stage 1 only, {ann}"
    if exact is not None:
        got, want = index.search(qs, args.rerank)[1], exact.search(qs, args.rerank)[1]
        rec = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, want)])
        mode += f" (recall {100 * rec:.0f}%)"
    row = {"n": n, "direction": "t2i/i2t", "mode": mode, "build_s": build_s,
           "disk_B_per_item": float("nan"), "ram_B_per_item": args.dim * 4, "p50_ms": p50, "p99_ms": p99,
           "peak_mb": pm.peak_mb}
    print(_fmt(row), flush=True)
    del index, exact
    return row


HEADER = (f"{'items':>9} {'dir':>7} {'mode':<34} {'build s':>8} {'disk B/item':>12} {'RAM B/item':>11} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'peak MB':>8}")


def _fmt(r: dict) -> str:
    peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
    return (f"{r['n']:>9} {r['direction']:>7} {r['mode']:<34} {r['build_s']:>8.1f} {r['disk_B_per_item']:>12.0f} "
            f"{r['ram_B_per_item']:>11.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {peak:>8}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m zoo.bench search", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000, 1000000])
    ap.add_argument("--full-max", type=int, default=10000, help="largest gallery written as a full index folder")
    ap.add_argument("--exhaustive-max", type=int, default=10000, help="largest gallery also scored exhaustively")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--max-words", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--rerank", type=int, default=100)
    ap.add_argument("--ann", nargs="+", default=["flat", "ivf"], choices=["flat", "ivf", "hnsw"],
                    help="first-stage indexes timed alone on the sizes above --full-max")
    ap.add_argument("--recall-max", type=int, default=100000,
                    help="largest size where an approximate index's recall is checked against the exact one")
    ap.add_argument("--out", default="runs/bench_search")
    ap.add_argument("--keep", action="store_true", help="keep the index folders")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ..search.index import _faiss

    _faiss().omp_set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    print(f"zoo.search at scale: d = {args.dim}, {args.regions} regions, captions padded to {args.max_words} words, "
          f"{args.threads} threads, {args.queries} queries, rerank {args.rerank}; {free / 2**30:.0f} GiB free disk")
    print(HEADER)
    rows = []
    for n in args.sizes:
        need = n * (args.regions + args.max_words) * args.dim * 2 * 1.1
        if n <= args.full_max and need < 0.8 * free:
            rows += bench_full(n, args, out)
        else:
            for ann in args.ann:
                rows.append(bench_first_stage(n, args, ann))


if __name__ == "__main__":
    main()

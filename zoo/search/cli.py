"""`zoo-search`: build an index of a split with a checkpoint, then query it (README, Search).

    zoo-search build --ckpt runs/casc_base_synth/checkpoints/best.ckpt --root .cache/synthscenes --split test \
        --side images --out runs/index_images
    zoo-search query runs/index_images --text "a dog left of a red car" -k 5 [--rerank 100 | --exact] [--json]
    zoo-search build ... --side captions --out runs/index_captions
    zoo-search query runs/index_captions --image-id 3 -k 5
    zoo-search serve runs/index_images --port 8000 [--images DIR]   # a page and /api/search?q=...&k=...
    zoo-search build ... --shard 0/2 --out I0; zoo-search build ... --shard 1/2 --out I1; zoo-search query I0 I1 ...

--json prints a list of {"rank", "id", "score", "caption"} (the caption for caption galleries, the image's first
caption for image galleries); words the checkpoint's vocabulary lacks are reported on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys

from datamodules.errors import DataError


def _build(args) -> None:
    from .index import build_index

    try:
        i, n = (int(x) for x in args.shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard must read i/n (e.g. 0/2), got {args.shard!r}") from None
    out = build_index(args.ckpt, args.root, args.split, args.side, args.out, chunk=args.chunk, ann=args.ann,
                      progress=not args.no_progress, parser=args.parser, shard=(i, n), first_stage=args.first_stage)
    print(f"index written to {out}")


def _query(args) -> None:
    from .index import ShardedIndex

    idx = ShardedIndex.open(args.index, ckpt=args.ckpt)
    res = idx.query(text=args.text, image=args.image_id, k=args.k, rerank=None if args.exact else args.rerank)
    if res.oov:
        print(f"note: not in the checkpoint's vocabulary (read as <unk>): {', '.join(res.oov)}", file=sys.stderr)
    if args.json:
        print(json.dumps(res.as_json()))
        return
    how = "exhaustive" if args.exact else f"two-stage, {res.candidates} candidates"
    print(f"top {len(res.hits)} of {idx.n} {idx.side} ({how}; {sum(res.ms.values()):.1f} ms)")
    print(f"{'rank':>4}  {'id':>6}  {'score':>8}  caption")
    for h in res.hits:
        print(f"{h.rank:>4}  {h.id:>6}  {h.score:>8.4f}  {h.caption}")


def _serve(args) -> None:
    from .serve import serve

    serve(args.index, port=args.port, host=args.host, images=args.images, ckpt=args.ckpt)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="zoo-search", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="encode a split's images or captions into an index folder (resumable)")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--root", required=True, help="data folder in the standard layout (e.g. .cache/synthscenes)")
    b.add_argument("--split", default="test")
    b.add_argument("--side", choices=["images", "captions"], default="images")
    b.add_argument("--out", required=True)
    b.add_argument("--chunk", type=int, default=256, help="images encoded per chunk (the unit of resumption)")
    b.add_argument("--ann", choices=["flat", "ivf", "hnsw"], default="flat",
                   help="first-stage FAISS index: exact inner product (default), or approximate IVF-Flat (trained on "
                   "the gallery) / HNSW (README, Search: from about 100k items)")
    b.add_argument("--first-stage", default=None, metavar="C2",
                   help="take the stage-1 vectors from this checkpoint's global_embedding (e.g. a global model)")
    b.add_argument("--parser", default="spacy", help="dependency parser of methods that read graphs (CCCL)")
    b.add_argument("--shard", default="0/1", help="i/n: build only the i-th of n parts of the gallery (query the "
                   "n folders together)")
    b.add_argument("--no-progress", action="store_true")
    q = sub.add_parser("query", help="top-k items of an index for a text (image gallery) or an image (caption gallery)")
    q.add_argument("index", nargs="+", help="the index folder (or every shard folder of a sharded build)")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text")
    what.add_argument("--image-id", type=int)
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--rerank", type=int, default=100, help="stage-1 candidates re-scored exactly by the method")
    q.add_argument("--exact", action="store_true", help="score the whole gallery exactly (the reference)")
    q.add_argument("--ckpt", default=None, help="checkpoint to score with (default: the one the index was built from)")
    q.add_argument("--json", action="store_true")
    s = sub.add_parser("serve", help="one HTML page and a JSON API (/api/search?q=...&k=...) over an index")
    s.add_argument("index", nargs="+")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--images", default=None, help="folder of image files named by item id ({id}.jpg / .png)")
    s.add_argument("--ckpt", default=None)
    args = ap.parse_args(argv)
    try:
        {"build": _build, "query": _query, "serve": _serve}[args.cmd](args)
    except (DataError, ValueError, IndexError) as e:
        if argv is not None:  # called from Python (tests): let the caller see the exception
            raise
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

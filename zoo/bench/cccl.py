"""CCCL evaluation speed: pairs/s of the blockwise all-pairs scorer (Branch 3's per-pair GRUs dominate).

    python -m zoo.bench cccl --images 20 --dim 1024 --sim-dim 256     # the paper's sizes, CPU
    python -m zoo.bench cccl --images 100 --dim 64 --sim-dim 32       # the SynthScenes recipe's sizes

Random weights and inputs (the cost does not depend on values), built as `make bench`'s CCCL entry
(zoo.bench.specs.CCCLBench): images of 36 regions with boxes, 5 captions per image of ~11 words + <start>/<end>
(zoo.bench.common.coco_lengths) with a chain of dependency arcs. Encoding (once per item) is timed separately from
the pair scoring, which is what grows with gallery size (images x captions).
"""
from __future__ import annotations

import argparse
import time

import torch

from ..engine.evaluation import score_blockwise
from ..methods import CCCL


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--sim-dim", type=int, default=256)
    ap.add_argument("--image-block", type=int, default=128)
    ap.add_argument("--caption-block", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    from .specs import CCCLBench  # the same random inputs as `make bench`'s CCCL entry

    spec = CCCLBench()
    spec.regions = args.regions
    g = torch.Generator().manual_seed(0)
    n_img, n_cap = args.images, 5 * args.images
    batch_img, raw_cap = spec.raw_images(n_img, g), spec.raw_captions(n_cap, 1000, g)
    tokens, lengths, adj = raw_cap["tokens"], raw_cap["lengths"], raw_cap["adjacency"]
    torch.manual_seed(0)
    model = CCCL(vocab_size=1000, embed_dim=args.dim, sim_dim=args.sim_dim, text_encoder="bigru",
                 eval_image_block=args.image_block, eval_caption_block=args.caption_block).to(dev).eval()
    with torch.no_grad():
        t = time.perf_counter()
        img = model.encode_images({k: v.to(dev) for k, v in batch_img.items()})
        cap = model.encode_captions({"tokens": tokens.to(dev), "lengths": lengths.to(dev), "adjacency": adj.to(dev)})
        t_enc = time.perf_counter() - t
        t = time.perf_counter()
        sims = score_blockwise(model.score, img, cap, args.image_block, args.caption_block, progress=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_pairs = time.perf_counter() - t
    pairs = n_img * n_cap
    assert torch.isfinite(sims).all()
    print(f"CCCL d={args.dim} P={args.sim_dim} on {dev} ({torch.get_num_threads()} threads): {n_img} images x "
          f"{n_cap} captions = {pairs} pairs in {t_pairs:.2f} s -> {pairs / t_pairs:,.0f} pairs/s "
          f"(encoding once per item: {t_enc:.2f} s). Flickr30K test (5M pairs) at this rate: "
          f"{5e6 / (pairs / t_pairs) / 60:.0f} min; COCO-5K (125M): {125e6 / (pairs / t_pairs) / 3600:.1f} h")


if __name__ == "__main__":
    main()

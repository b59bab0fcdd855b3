"""Training-loader throughput per `data.train_features` store, next to the memory-mapped reference.

    python -m zoo.bench data --images 2000 --batch 128 --workers 0 2      # make bench-data
    python -m zoo.bench data --device cuda                                 # with the copy to a GPU

Writes a random split in the standard layout (images x 36 x 2048 float32, 5 captions each) to a temporary
folder, then times one epoch of the training loader for each store, including the transfer to --device and
the datamodule's on_after_batch_transfer (where device_fp16 gathers its features and float16 becomes float32).
The files are read once before timing, so every store reads from the page cache: the figures are the loader's
own cost, not the disk's. Prints images/s, MB held and the ratio to 'mmap' measured in the same run.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STORES = ("mmap", "memory", "memory_fp16", "device_fp16")


def write_layout(root: Path, n_images: int, regions: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words = ["dog", "cat", "ball", "red", "blue", "runs", "sits", "grass", "man", "car", "on", "the", "near"]
    for split, n in (("train", n_images), ("dev", 4)):
        feats = np.lib.format.open_memmap(root / f"{split}_ims.npy", mode="w+", dtype=np.float32,
                                          shape=(n, regions, dim))
        for a in range(0, n, 256):
            feats[a: a + 256] = rng.random((min(256, n - a), regions, dim), dtype=np.float32)
        feats.flush()
        del feats
        caps = [" ".join(rng.choice(words, size=int(rng.integers(8, 14)))) for _ in range(5 * n)]
        (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")


def epoch(dm, device: torch.device) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    for batch in dm.train_dataloader():
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        batch = dm.on_after_batch_transfer(batch, 0)
        n += batch["images"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, n


def main(argv: list[str] | None = None) -> None:
    from datamodules import PrecompDataModule

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--stores", nargs="+", default=list(STORES), choices=STORES)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_layout(root, args.images, args.regions, args.dim)
        np.load(root / "train_ims.npy").sum()  # into the page cache
        print(f"training loader, {args.images} images x {args.regions} x {args.dim} float32 "
              f"({args.images * args.regions * args.dim * 4 / 1e6:.0f} MB), {5 * args.images} captions per epoch, "
              f"batch {args.batch}, to {dev}")
        print(f"{'workers':>7} {'store':<12} {'images/s':>10} {'held MB':>8} {'vs mmap':>8}")
        for w in args.workers:
            ref = None
            for store in args.stores:
                dm = PrecompDataModule(str(root), num_regions=args.regions, feature_dim=args.dim, num_workers=w,
                                       batch_size=args.batch, vocab_min_count=1, train_features=store,
                                       pin_memory=dev.type == "cuda", check_features=False)
                dm.prepare_data()
                dm.setup("fit")
                epoch(dm, dev)  # warm-up: workers, the device copy of device_fp16
                sec, n = epoch(dm, dev)
                rate = n / sec
                ref = rate if store == "mmap" else ref
                held = dm.split_data("fit").held
                mb = 0.0 if held is None else held.nbytes / 1e6
                ratio = f"{rate / ref:.2f}x" if ref else "—"
                print(f"{w:>7} {store:<12} {rate:>10,.0f} {mb:>8.0f} {ratio:>8}", flush=True)
                del dm


if __name__ == "__main__":
    main()

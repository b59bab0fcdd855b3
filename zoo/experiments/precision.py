"""bf16 evaluation against fp32 on a trained checkpoint: rsum both ways, the score error and the top-1 agreement.

    python -m zoo.experiments.precision --config recipes/casc_base_synth.yaml \
        --ckpt runs/casc_base_synth/checkpoints/best.ckpt [--ckpt ...] [--data.init_args.X V ...]

Each checkpoint's test split is encoded and scored twice, the way validation/test do it (blockwise), once in
float32 and once as `precision: bf16-mixed` runs it (encoding and scoring under bf16 autocast; on the CPU unless
--device says otherwise). Prints
one line per checkpoint: rsum fp32, rsum bf16, their difference, mean |score error| relative to the scores' std,
and the share of top-1 results (I->T and T->I) that bf16 leaves unchanged. README, Speed: "bf16 evaluation".
"""
from __future__ import annotations

import argparse
import sys

import torch

from ..engine.checkpoints import check_checkpoint, load_model
from ..engine.errors import one_line_errors
from ..engine.metrics import all_metrics
from .ensemble import build_datamodule, similarity_matrix


def compare(model, loader, n_images: int, caps_per_image: int, fold_size, device: str = "cpu") -> dict:
    model = model.to(device).eval()
    out = {}
    with torch.no_grad():
        for name, bf16 in (("fp32", False), ("bf16", True)):
            # as `lightning test --trainer.precision bf16-mixed` runs it: the batches encoded under autocast (test_step)
            # and the grid scored under it too (RetrievalModule._eval_end scores inside the run's forward_context)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                out[name] = similarity_matrix(model, loader, n_images, caps_per_image).float().cpu()
    full, half = out["fp32"], out["bf16"]
    m_full, m_half = all_metrics(full, caps_per_image, fold_size), all_metrics(half, caps_per_image, fold_size)
    return {"rsum_fp32": m_full["all"]["rsum"], "rsum_bf16": m_half["all"]["rsum"],
            "error": float((full - half).abs().mean() / full.std().clamp_min(1e-12)),
            "top1_i2t": float((full.argmax(1) == half.argmax(1)).float().mean()),
            "top1_t2i": float((full.argmax(0) == half.argmax(0)).float().mean())}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m zoo.experiments.precision", description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", required=True, help="the recipe (its datamodule serves the split)")
    ap.add_argument("--ckpt", action="append", required=True)
    ap.add_argument("--device", default="cpu")
    args, overrides = ap.parse_known_args(argv)
    with one_line_errors():
        for c in args.ckpt:
            check_checkpoint(c)
        dm = build_datamodule(args.config, overrides)
        print(f"{'checkpoint':<60} {'rsum fp32':>10} {'rsum bf16':>10} {'diff':>6} {'|err|/std':>10} "
              f"{'top-1 I->T':>10} {'T->I':>6}")
        for c in args.ckpt:
            model = load_model(c, dm)
            r = compare(model, dm.test_dataloader(), dm.num_eval_images("test"), dm.caps_per_image,
                        getattr(model, "fold_size", None), args.device)
            print(f"{str(c):<60} {r['rsum_fp32']:>10.1f} {r['rsum_bf16']:>10.1f} "
                  f"{r['rsum_bf16'] - r['rsum_fp32']:>+6.1f} {r['error']:>10.4f} {100 * r['top1_i2t']:>9.1f}% "
                  f"{100 * r['top1_t2i']:>5.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make bench`: scoring throughput and training-step time of each method, fast path next to the slow reference.

    python -m zoo.bench                                   # CPU defaults, about 2 minutes on 2 cores
    python -m zoo.bench --images 5000 --device cuda --dtype bf16 --train-batch 128   # COCO-5K size on a GPU
    python -m zoo.bench --methods casc_base --images 100 200 --train-batch 64 128 --dim 1024

Methods: casc_base, casc (label branch, K = 500), cccl (BiGRU words, P = 256); each has default sizes
(BenchSpec.default_images / default_batches: 100 images and batch 128; CCCL 4 and 8, because its reference is
a per-pair loop). For every method and size it prints, for the fast (default) path and the slow reference path measured in the
same run, interleaved (fast, reference, fast, reference, ...; the best of --repeats is kept):
- eval: all-pairs scoring of an images x (5 * images) grid through zoo.engine.evaluation.score_blockwise (what
  validation/test run), in pairs/s;
- train: one training step (encoders + scorer forward/backward + Adam) at a batch size, in ms;
- peak memory: GPU: torch.cuda.max_memory_allocated; CPU: the rise of the process's peak resident set
  (VmHWM, reset before each measurement) over the resident set before it (approximate: allocator caching);
- ratio = reference time / fast time. On a shared machine the absolute numbers are noisy; the ratio, from the
  same run, is the figure to quote.

Inputs are random with COCO's shapes (36 regions, 2048-d features, captions of ~12 words + <start>/<end>);
the cost does not depend on the values.

Adding a method: subclass `BenchSpec` (say how to build the model at a size and how to make its inputs) and
register it for the method's class with `@register_bench(MyMethod)`; `--methods` takes the spec's `name`.
The reference column runs the method inside `reference_context()`, by default
`zoo.blocks.reference_scoring()`, which switches every scorer built on `cross_attention_similarity` to the slow
path; a method with its own fast path overrides `reference_context` to switch it.
"""
from __future__ import annotations

import argparse
import os

import torch

from . import specs  # noqa: F401  (registers the zoo's methods)
from .common import BENCHES, Row, bench_eval, bench_train, format_rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = {spec.name: spec for spec in BENCHES.values()}
    ap.add_argument("--methods", nargs="+", default=list(names), choices=list(names))
    ap.add_argument("--images", type=int, nargs="*", default=None,
                    help="evaluation sizes: images (x5 captions); none = skip evaluation; default per method "
                         "(casc_base, casc: 100; cccl: 4)")
    ap.add_argument("--train-batch", type=int, nargs="*", default=None,
                    help="training-step batch sizes; none = skip training; default per method (128; cccl: 8)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=10000)
    ap.add_argument("--image-block", type=int, default=0, help="0 = sized by zoo.engine.evaluation.auto_blocks")
    ap.add_argument("--caption-block", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--kernel", default=None, choices=["torch", "triton"],
                    help="the fast path's per-pair implementation in evaluation (sets ZOO_KERNEL; default torch). "
                         "triton on the CPU runs only in Triton's interpreter (TRITON_INTERPRET=1), slowly")
    args = ap.parse_args(argv)
    if args.kernel:
        os.environ["ZOO_KERNEL"] = args.kernel
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    card += f", OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}" if dev.type == "cpu" else ""
    print(f"zoo.bench: device={dev} ({card}) dtype={args.dtype} kernel={os.environ.get('ZOO_KERNEL', 'torch')} "
          f"torch={torch.__version__}; best of {args.repeats}, "
          "fast and reference interleaved; ratio = reference time / fast time", flush=True)
    rows: list[Row] = []
    for name in args.methods:
        spec = names[name]
        for n in (spec.default_images,) if args.images is None else args.images:
            torch.manual_seed(0)
            model = spec.make_model(args.dim, args.vocab).to(dev).eval()
            rows += bench_eval(spec, model, n, args, dev, dtype)
            print(format_rows([r for r in rows if r.method == name and r.task == "eval"][-2:]).split("\n", 1)[1],
                  flush=True)
        for b in spec.default_batches if args.train_batch is None else args.train_batch:
            rows += bench_train(spec, args, b, dev, dtype)
            print(format_rows(rows[-2:]).split("\n", 1)[1], flush=True)
    print()
    print(format_rows(rows))


if __name__ == "__main__":
    main()

"""`make bench`: scoring throughput and training-step time of each method, fast path next to the slow reference.

    python -m zoo.bench                                   # CPU defaults, about 2 minutes on 2 cores
    python -m zoo.bench --images 5000 --device cuda --dtype bf16 --train-batch 128   # COCO-5K size on a GPU
    python -m zoo.bench --methods casc_base --images 100 200 --train-batch 64 128 --dim 1024

Methods: casc_base, casc (label branch, K = 500), cccl (BiGRU words, P = 256); each has default sizes
(BenchSpec.default_images / default_batches: 100 images and batch 128; CCCL 4 and 8, because its reference is
a per-pair loop). For every method and size it prints, for the fast (default) path and the slow reference path measured in the
same run, interleaved (fast, reference, fast, reference, ...; the best of --repeats is kept):
- eval: all-pairs scoring of an images x (5 * images) grid through zoo.evaluation.score_blockwise (what
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
import contextlib
import gc
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from zoo.blocks import reference_scoring
from zoo.evaluation import Emb, auto_blocks, score_blockwise
from zoo.methods import CASC, CCCL, CASCBase


# ---- what a method provides ----------------------------------------------------------------------------
class BenchSpec:
    """How to benchmark one method class. Subclass and register with @register_bench(MethodClass)."""

    name = "method"
    default_images = 100  # evaluation grid (images x 5 images captions) when --images is not given
    default_batches: tuple[int, ...] = (128,)  # training batch sizes when --train-batch is not given

    def make_model(self, dim: int, vocab: int) -> torch.nn.Module:
        raise NotImplementedError

    def eval_inputs(self, model, n_images: int, dim: int, g: torch.Generator) -> tuple[Emb, Emb]:
        """Encoded images and captions (what evaluation hands to score_blockwise), on the CPU."""
        raise NotImplementedError

    def train_batch(self, model, batch: int, vocab: int, g: torch.Generator) -> dict:
        """A training batch as the datamodule serves it, on the CPU."""
        raise NotImplementedError

    def reference_context(self):
        """Context manager under which the method runs its slow reference path."""
        return reference_scoring()


BENCHES: dict[type, BenchSpec] = {}


def register_bench(method_cls: type) -> Callable[[type[BenchSpec]], type[BenchSpec]]:
    def deco(spec_cls: type[BenchSpec]) -> type[BenchSpec]:
        BENCHES[method_cls] = spec_cls()
        return spec_cls

    return deco


def coco_lengths(n: int, g: torch.Generator) -> torch.Tensor:
    """COCO-like caption lengths: ~12 words + <start>/<end>, between 6 and 30 tokens."""
    return (torch.randn(n, generator=g) * 3 + 13).round().clamp(6, 30).long()


def random_tokens(lengths: torch.Tensor, vocab: int, g: torch.Generator) -> torch.Tensor:
    tokens = torch.randint(1, vocab, (lengths.shape[0], int(lengths.max())), generator=g)
    tokens[torch.arange(tokens.shape[1])[None] >= lengths[:, None]] = 0
    return tokens


@register_bench(CASCBase)
class CASCBaseBench(BenchSpec):
    name = "casc_base"
    regions = 36
    feature_dim = 2048

    def make_model(self, dim: int, vocab: int) -> torch.nn.Module:
        return CASCBase(vocab_size=vocab, feature_dim=self.feature_dim, embed_dim=dim, fold_size=None)

    def eval_inputs(self, model, n_images, dim, g):
        lengths = coco_lengths(5 * n_images, g)
        unit = torch.nn.functional.normalize
        img = {"regions": unit(torch.randn(n_images, self.regions, dim, generator=g), dim=-1)}
        words = unit(torch.randn(lengths.shape[0], int(lengths.max()), dim, generator=g), dim=-1)
        words[torch.arange(words.shape[1])[None] >= lengths[:, None]] = 0  # encoders zero the padding
        return img, {"words": words, "lengths": lengths}

    def train_batch(self, model, batch, vocab, g):
        lengths = coco_lengths(batch, g)
        return {"images": torch.randn(batch, self.regions, self.feature_dim, generator=g),
                "tokens": random_tokens(lengths, vocab, g), "lengths": lengths, "image_ids": torch.arange(batch)}


@register_bench(CASC)
class CASCBench(CASCBaseBench):
    """CASC with its label branch (K labels): S_G reading (a) in evaluation, the label loss in training. The
    reference column is CASC's reference path: the slow local scorer and S_G over the padded block."""

    name = "casc"
    labels = 500  # the paper's K

    def make_model(self, dim: int, vocab: int) -> torch.nn.Module:
        return CASC(vocab_size=vocab, num_labels=self.labels, feature_dim=self.feature_dim, embed_dim=dim,
                    fold_size=None)

    def eval_inputs(self, model, n_images, dim, g):
        img, cap = super().eval_inputs(model, n_images, dim, g)
        dev = next(model.parameters()).device
        with torch.no_grad():  # per item, as CASC.encode_images / encode_captions do
            img["regions_proj"] = model.label_head.project(img["regions"].to(dev)).cpu()
            cap["words_proj"] = model.label_head.project(cap["words"].to(dev)).cpu()
        img["image_ids"] = torch.arange(n_images)
        cap["caption_ids"] = torch.arange(cap["words"].shape[0])
        return img, cap

    def train_batch(self, model, batch, vocab, g):
        labels = (torch.rand(batch, self.labels, generator=g) < 0.01).float()  # ~5 labels per image
        return {**super().train_batch(model, batch, vocab, g), "labels": labels, "caption_ids": torch.arange(batch)}


@register_bench(CCCL)
class CCCLBench(BenchSpec):
    """CCCL (BiGRU text encoder, "w/o BERT"; all three branches, VSF, MLP scorer) at d, P = 256.

    The reference column is CCCL's per-pair loop (CCCLNet.slow_branch_scores, nn.GRU per pair), so the default
    sizes are small: Branch 3's context GRU runs per pair (~2 x 49 GRU steps at d = 1024), which makes CCCL
    orders of magnitude costlier per pair than CASC on any path."""

    name = "cccl"
    regions = 36
    feature_dim = 2048
    default_images = 4
    default_batches = (8,)

    def make_model(self, dim: int, vocab: int) -> torch.nn.Module:
        return CCCL(vocab_size=vocab, feature_dim=self.feature_dim, embed_dim=dim, sim_dim=min(256, dim),
                    text_encoder="bigru", fold_size=None)

    def raw_images(self, n: int, g: torch.Generator) -> dict:
        corner = torch.rand(n, self.regions, 2, generator=g) * 0.6
        return {"images": torch.randn(n, self.regions, self.feature_dim, generator=g),
                "boxes": torch.cat([corner, corner + 0.1 + 0.3 * torch.rand(n, self.regions, 2, generator=g)], -1)}

    def raw_captions(self, n: int, vocab: int, g: torch.Generator) -> dict:
        lengths = coco_lengths(n, g)
        length = int(lengths.max())
        adjacency = torch.zeros(n, length, length)
        for c, m in enumerate(lengths.tolist()):  # a chain of dependency arcs over the words (not <start>/<end>)
            i = torch.arange(1, m - 2)
            adjacency[c, i, i + 1] = adjacency[c, i + 1, i] = 1.0
        return {"tokens": random_tokens(lengths, vocab, g), "lengths": lengths, "adjacency": adjacency}

    def eval_inputs(self, model, n_images, dim, g):
        dev = next(model.parameters()).device
        vocab = model.net.bigru.embed.num_embeddings
        raw_img, raw_cap = self.raw_images(n_images, g), self.raw_captions(5 * n_images, vocab, g)
        with torch.no_grad():
            img = model.encode_images({k: v.to(dev) for k, v in raw_img.items()})
            cap = model.encode_captions({k: v.to(dev) for k, v in raw_cap.items()})
        return img, cap

    def train_batch(self, model, batch, vocab, g):
        return {**self.raw_images(batch, g), **self.raw_captions(batch, vocab, g), "image_ids": torch.arange(batch)}


# ---- measuring -------------------------------------------------------------------------------------------
@dataclass
class Row:
    method: str
    task: str
    size: str
    path: str
    seconds: float
    unit_value: float  # pairs/s (eval) or ms/step (train)
    peak_mb: float | None


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block of code: CUDA allocator peak, or the CPU process's VmHWM rise over VmRSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb: float | None = None

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return float(line.split()[1]) / 1024  # kB -> MB
        except OSError:
            return None
        return None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            _malloc_trim()  # hand freed heap memory back so the resident set starts low
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM (the peak resident set) to the current resident set
                self.base = self._status("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        elif self.base is not None:
            hwm = self._status("VmHWM")
            self.peak_mb = None if hwm is None else max(0.0, hwm - self.base)
        return False


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn: Callable[[], object], dev: torch.device) -> tuple[float, float | None]:
    with PeakMemory(dev) as mem:
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        dt = time.perf_counter() - t
    return dt, mem.peak_mb


def _interleaved(runs: dict[str, Callable[[], object]], contexts: dict[str, Callable], dev: torch.device,
                 repeats: int, warmup: bool) -> dict[str, tuple[float, float | None]]:
    """Best time (and the peak memory of the first timed run) of each path, alternating between paths."""
    best: dict[str, tuple[float, float | None]] = {}
    for _ in range(int(warmup)):
        for path, fn in runs.items():
            with contexts[path]():
                fn()
    for _ in range(repeats):
        for path, fn in runs.items():
            with contexts[path]():
                dt, mb = _timed(fn, dev)
            if path not in best or dt < best[path][0]:
                best[path] = (dt, best.get(path, (None, mb))[1])
    return best


def bench_eval(spec: BenchSpec, model, n_images: int, args, dev: torch.device, dtype) -> list[Row]:
    g = torch.Generator().manual_seed(0)
    img, cap = spec.eval_inputs(model, n_images, args.dim, g)
    img = {k: v.to(dev) for k, v in img.items()}
    cap = {k: v.to(dev) for k, v in cap.items()}
    n_cap = next(iter(cap.values())).shape[0]
    if args.image_block and args.caption_block:
        ib, cb = args.image_block, args.caption_block
    else:
        ib, cb = auto_blocks(img, cap, dev)
    results: dict[str, torch.Tensor] = {}

    def run(path):
        def fn():
            with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                results[path] = score_blockwise(model.score, img, cap, ib, cb)
        return fn

    contexts = {"fast": contextlib.nullcontext, "reference": spec.reference_context}
    with torch.no_grad():  # warm-up on a corner of the grid (one-time initialisation, kernels, allocator)
        small_img = {k: v[:4] for k, v in img.items()}
        small_cap = {k: v[:20] for k, v in cap.items()}
        for path, ctx in contexts.items():
            with ctx():
                score_blockwise(model.score, small_img, small_cap, 4, 20)
    best = _interleaved({p: run(p) for p in contexts}, contexts, dev, args.repeats, warmup=dev.type == "cuda")
    diff = float((results["fast"] - results["reference"]).abs().max())
    pairs = n_images * n_cap
    size = f"{n_images}x{n_cap} d={args.dim} blocks {ib}x{cb} (max |fast-ref| {diff:.1e})"
    return [Row(spec.name, "eval", size, p, dt, pairs / dt, mb) for p, (dt, mb) in best.items()]


def bench_train(spec: BenchSpec, args, batch_size: int, dev: torch.device, dtype) -> list[Row]:
    rows = []
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = spec.make_model(args.dim, args.vocab).to(dev).train()
    batch = {k: v.to(dev) for k, v in spec.train_batch(model, batch_size, args.vocab, g).items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            img = model.encode_images(batch)
            cap = model.encode_captions(batch)
            loss = sum(model.training_losses(batch, img, cap).values())
        loss.backward()
        opt.step()

    contexts = {"fast": contextlib.nullcontext, "reference": spec.reference_context}
    best = _interleaved({p: step for p in contexts}, contexts, dev, args.repeats, warmup=True)
    size = f"batch {batch_size} d={args.dim}"
    for p, (dt, mb) in best.items():
        rows.append(Row(spec.name, "train", size, p, dt, dt * 1000, mb))
    return rows


def format_rows(rows: list[Row]) -> str:
    out = [f"{'method':<10} {'task':<5} {'path':<9} {'pairs/s or ms/step':>19} {'peak MB':>8} {'ratio':>6}  size"]
    by_key: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        by_key.setdefault((r.method, r.task, r.size), {})[r.path] = r
    for (method, task, size), paths in by_key.items():
        ref = paths.get("reference")
        for path in ("fast", "reference"):
            r = paths.get(path)
            if r is None:
                continue
            val = f"{r.unit_value:,.0f} pairs/s" if task == "eval" else f"{r.unit_value:,.0f} ms/step"
            mb = "n/a" if r.peak_mb is None else f"{r.peak_mb:,.0f}"
            ratio = f"{ref.seconds / r.seconds:.2f}x" if ref is not None else ""
            out.append(f"{method:<10} {task:<5} {path:<9} {val:>19} {mb:>8} {ratio:>6}  {size}")
    return "\n".join(out)


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
    ap.add_argument("--image-block", type=int, default=0, help="0 = sized by zoo.evaluation.auto_blocks")
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

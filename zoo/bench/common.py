"""The benchmark machinery every `python -m zoo.bench` entry shares: what a method provides (`BenchSpec`,
`register_bench`), random inputs with COCO's shapes, peak memory, interleaved timing of the fast path next to the
reference, and the printed table. No method is imported here (their specs live in zoo.bench.specs).
"""
from __future__ import annotations

import gc
import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..blocks import reference_scoring
from ..engine.evaluation import Emb, auto_blocks, score_blockwise


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

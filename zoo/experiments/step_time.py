"""Seconds per training step of a recipe, on its own data, through Lightning's own fit loop.

    python -m zoo.experiments.step_time --config recipes/casc_base_synth.yaml [--steps 10] [--threads 2]
    OMP_WAIT_POLICY=ACTIVE python -m zoo.experiments.step_time --config ...    # spinning OpenMP barriers

Builds the recipe (ZooCLI, run=False; `--data.init_args.*` / `--model.init_args.*` overrides pass through), fits
`--steps` steps without validation, checkpoints or loggers, and prints the median and the spread of the
per-step wall times after the first `--skip` (warm-up) steps, with the OpenMP policy and the thread count it ran
under. OMP_WAIT_POLICY is read when torch loads, so compare policies in separate processes (README, Speed:
"OpenMP threads on a shared CPU").
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class StepTimer(Callback):
    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m zoo.experiments.step_time", description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the figures")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args, overrides = ap.parse_known_args(argv)
    if args.steps <= args.skip:
        ap.error("--steps must exceed --skip")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..cli import ZooCLI
    from ..engine.errors import one_line_errors
    from ..engine.module import RetrievalModule
    with one_line_errors():
        cfg = [a for c in args.config for a in ("--config", c)] + overrides
        saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args and a command line
        try:
            cli = ZooCLI(RetrievalModule, subclass_mode_model=True, subclass_mode_data=True, run=False, args=cfg,
                         save_config_callback=None)
        finally:
            sys.argv = saved
        timer = StepTimer()
        trainer = L.Trainer(accelerator="cpu", max_steps=args.steps, limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, callbacks=[timer])
        trainer.fit(cli.model, cli.datamodule)
    t = timer.times[args.skip:]
    print(f"{type(cli.model).__name__}: {statistics.median(t):.3f} s/step median, {min(t):.3f}-{max(t):.3f} over "
          f"{len(t)} steps (after {args.skip} warm-up); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

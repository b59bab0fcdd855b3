"""`make ablate`: run every row of a method's ablation tables, resumably, one Lightning run per row.

    python -m zoo.experiments.ablate --list casc                       # tables and rows it would run
    python -m zoo.experiments.ablate casc synthetic                    # every row: fit, then test on best.ckpt
    python -m zoo.experiments.ablate casc f30k --table table1_components --rows global,local_attention_global
    python -m zoo.experiments.ablate casc_base synthetic -- --trainer.max_epochs 1    # extra args go to lightning

Rows are discovered from the layout `recipes/ablations/<method>/<table>/<NN>_<row>.yaml` (a new row needs no
change here). Row files whose name starts with `_` are not rows; a row file's first line is the comment
`# <display label> — <what it computes>`. Each row runs as two subprocesses:

    python -m zoo fit  --config recipes/<method>_<data>.yaml [--config recipes/ablations/<method>/_<data>.yaml] \
        --config <row> --config <row dir>/ablate_fit.yaml \
        --trainer.default_root_dir runs/ablate/<method>_<data>/<table>/<row> [--ckpt_path <row dir>/checkpoints/last.ckpt]
    python -m zoo test ... --ckpt_path <row dir>/checkpoints/best.ckpt

(`python -m zoo` is the `lightning` console script.) The overlay `ablate_fit.yaml` / `ablate_test.yaml` sets the
loggers (CSV always, W&B unless LOGGER=csv) and, for recipes whose checkpoint callback is a plain
`ModelCheckpoint` with a fixed dirpath, points it at `<row dir>/checkpoints` with `save_last: true`.

A row of another method's recipe (`row: {recipe: vsepp}`, a comparison table's baseline) runs from
recipes/<that method>_<data>.yaml with the table's sizes overlay minus its `model:` section and the row minus its
`row:` block (both written into the row folder as ablate_sizes.yaml / ablate_row.yaml); an ensemble row
(`row: {ensemble: [a, b]}`) runs its members first and then `python -m zoo.experiments.ensemble` on their best
checkpoints (zoo.experiments.rows has the layout).

State of a row, all in its folder: `results.json` = finished (skipped when run again); `.fit_done` = fit
finished, test still to run; `checkpoints/last.ckpt` without `.fit_done` = killed during fit (resumed from it).
A row whose merged settings equal an earlier row's (the same row in two tables, or a row that restates the
base recipe) is not trained again: it gets the earlier row's results with `same_as` naming that row.
The exit code is 0 only when every selected row has finished.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

from .rows import Row, discover, format_listing, read_yaml, select

DATASETS = {"synthetic": "synth", "f30k": "f30k", "coco": "coco"}  # DATA -> recipe suffix
DATA_DIRS = {"f30k": "f30k_precomp", "coco": "coco_precomp"}
WANDB_MODES = ("online", "offline", "disabled", "dryrun", "shared")  # what wandb.init accepts


def recipe_for(method: str, data: str, recipes: str | Path = "recipes") -> Path:
    if data not in DATASETS:
        raise ValueError(f"DATA must be one of {', '.join(DATASETS)}, got {data!r}")
    path = Path(recipes) / f"{method}_{DATASETS[data]}.yaml"
    if not path.is_file():
        raise ValueError(f"no recipe {path} for method {method!r} on {data}")
    return path


def sizes_for(method: str, data: str, recipes: str | Path = "recipes") -> Path | None:
    """The method's ablation-size overlay for DATA, `recipes/ablations/<method>/_<data>.yaml`, if there is one.

    It sits between the base recipe and the row, so every row of the method runs at the same (smaller) sizes
    while the base recipe keeps its own (e.g. SynthScenes rows sized so a method's whole set fits 45 minutes on
    2 CPU cores, next to the demo-sized recipes/<method>_synth.yaml)."""
    path = Path(recipes) / "ablations" / method / f"_{data}.yaml"
    return path if path.is_file() else None


def check_data(data: str, extra: list[str], data_root: str | Path = "data") -> None:
    """f30k/coco: the standard folder must exist (or the one `--data.init_args.root` in the extra args names)."""
    if data not in DATA_DIRS:
        return
    from datamodules.errors import LAYOUT_HELP, DataError
    root = Path(data_root) / DATA_DIRS[data]
    for i, a in enumerate(extra):
        for flag in ("--data.init_args.root", "--data.root"):
            if a == flag and i + 1 < len(extra):
                root = Path(extra[i + 1])
            elif a.startswith(flag + "="):
                root = Path(a.split("=", 1)[1])
    if not root.is_dir():
        raise DataError(root, f"data folder not found for DATA={data}", LAYOUT_HELP)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merged_config(*files: Path | None) -> dict:
    """The YAML files merged in order as the CLI layers them (nested keys merge; a list in a later file replaces
    the earlier one); None entries are skipped."""
    merged: dict = {}
    for f in files:
        if f is not None:
            merged = _deep_merge(merged, read_yaml(Path(f)))
    return merged


def checkpoint_callbacks(config: dict, row_dir: Path) -> list | None:
    """The callbacks of a row's merged settings with every plain ModelCheckpoint pointed at <row dir>/checkpoints,
    save_last on.

    None when nothing needs changing (e.g. zoo.engine.callbacks.ZooCheckpoint, which already writes
    <default_root_dir>/checkpoints/{best,last}.ckpt). best.ckpt/last.ckpt are what the runner resumes and tests.
    """
    cbs = (config.get("trainer") or {}).get("callbacks")
    if not isinstance(cbs, list):
        return None
    changed, out = False, []
    for cb in cbs:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).split(".")[-1] == "ModelCheckpoint":
            args = dict(cb.get("init_args") or {})
            args.update(dirpath=str(row_dir / "checkpoints"), save_last=True)
            args.setdefault("filename", "best")
            args.setdefault("enable_version_counter", False)
            cb = {**cb, "init_args": args}
            changed = True
        out.append(cb)
    return out if changed else None


# ---- loggers --------------------------------------------------------------------------------------------
def _netrc_login() -> bool:
    import netrc
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(timeout: float = 3.0) -> bool:
    from datamodules.hub import reachable
    return reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), timeout)


def wandb_setup(logger: str) -> tuple[bool, dict[str, str], str]:
    """(use W&B, environment for the rows, a line saying what was chosen).

    W&B is used unless LOGGER=csv or wandb is not installed. Mode: WANDB_MODE if set; otherwise online when an
    API key or a netrc login exists and the server answers, offline (`wandb sync` later) when not.
    """
    env: dict[str, str] = {}
    if logger == "csv":
        return False, env, "logging: CSV only (LOGGER=csv)"
    try:
        import wandb  # noqa: F401
    except Exception as e:  # not installed, or broken
        warnings.warn(f"wandb unavailable ({e}); logging to CSV only (pip install wandb)")
        return False, env, "logging: CSV only (wandb not installed)"
    mode = os.environ.get("WANDB_MODE")
    has_key = bool(os.environ.get("WANDB_API_KEY") or _netrc_login())
    if mode is not None and mode not in WANDB_MODES:
        warnings.warn(f"WANDB_MODE={mode!r} is not one of {', '.join(WANDB_MODES)}: logging offline instead")
        mode = env["WANDB_MODE"] = "offline"
    elif mode == "online" and not has_key:
        warnings.warn("WANDB_MODE=online but no W&B API key (WANDB_API_KEY or `wandb login`): logging offline "
                      "instead (upload later with `wandb sync`)")
        mode = env["WANDB_MODE"] = "offline"
    if mode is None:
        mode = "online" if has_key else "offline"
        if mode == "online" and not _reachable():
            warnings.warn("W&B server unreachable: logging offline (upload later with `wandb sync`)")
            mode = "offline"
        env["WANDB_MODE"] = mode
    return True, env, f"logging: CSV + W&B ({mode})"


def overlay(row: Row, data: str, row_dir: Path, stage: str, use_wandb: bool, run_id: str,
            callbacks: list | None) -> dict:
    """The per-row config layered after recipe and row: loggers (and checkpoint paths for ModelCheckpoint)."""
    loggers: list[dict] = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                            "init_args": {"save_dir": str(row_dir), "name": f"csv_{stage}"}}]
    if use_wandb:
        loggers.append({"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {
            "project": wandb_project(row.method, data), "save_dir": str(row_dir), "name": row.name,
            "group": row.table, "tags": [row.method, data, row.table, row.name], "id": run_id, "resume": "allow",
            "notes": f"{row.label} — {row.what}" if row.what else row.label, "log_model": False}})
    trainer: dict[str, Any] = {"logger": loggers}
    if callbacks is not None:
        trainer["callbacks"] = callbacks
    return {"trainer": trainer}


def wandb_project(method: str, data: str) -> str:
    return f"itm-zoo-{method}-{data}"


def results_metrics(by_split: dict[str, dict]) -> dict[str, dict]:
    """{split: metrics} (zoo.engine.metrics.all_metrics: 'all', '1k', ...) keyed as results.json holds them:
    'test', 'test_1k', ..."""
    return {("test" if split == "all" else f"test_{split}"): m for split, m in by_split.items()}


def write_results(path: Path, out: dict) -> None:
    """results.json written atomically: a row is finished exactly when the file exists."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)


class RowCallback(Callback):
    """Added to every ablation run: sends the full resolved config to W&B and writes the test metrics.

    results_path: where on_test_end writes {"test": {...}, "test_1k": {...}} (the module's last_metrics,
    keyed as they are logged). W&B trouble only warns: it never fails a row.
    """

    def __init__(self, results_path: str | None = None):
        self.results_path = results_path

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        from lightning.pytorch.cli import SaveConfigCallback
        from lightning.pytorch.loggers import WandbLogger
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        saver = next((cb for cb in trainer.callbacks if isinstance(cb, SaveConfigCallback)), None)
        if not wandb_loggers or saver is None:
            return
        try:
            config = yaml.safe_load(saver.parser.dump(saver.config, skip_none=False))
            for lg in wandb_loggers:
                lg.experiment.config.update({"cli": config}, allow_val_change=True)
        except Exception as e:  # noqa: BLE001 - logging must not fail the run
            warnings.warn(f"could not send the config to W&B: {e}")

    def on_test_end(self, trainer, pl_module) -> None:
        if not (self.results_path and trainer.is_global_zero):
            return
        metrics = results_metrics({split: {k: float(v) for k, v in m.items()}
                                for split, m in getattr(pl_module, "last_metrics", {}).items()})
        Path(self.results_path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.results_path).write_text(json.dumps(metrics, indent=1))
        # also set the run summary directly: a resumed offline run restarts its step count, and history rows
        # with an older step can be dropped at `wandb sync`, summary values cannot
        from lightning.pytorch.loggers import WandbLogger
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                try:
                    lg.experiment.summary.update({f"{p}/{k}": v for p, m in metrics.items() for k, v in m.items()})
                except Exception as e:  # noqa: BLE001
                    warnings.warn(f"could not write the test metrics to the W&B summary: {e}")


# ---- running ------------------------------------------------------------------------------------------
def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _stream(cmd: list[str], log: Path, env: dict[str, str], use_pty: bool | None = None) -> int:
    """Runs cmd, copying its output (stdout+stderr, progress bars included) to the terminal and to `log`.

    On a terminal the child gets a pseudo-terminal of the same size, so Lightning draws its live progress bar
    as usual (a pipe would make it print only final states); elsewhere (CI, files) a plain pipe.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    if use_pty is None:
        use_pty = sys.stdout.isatty() and sys.platform != "win32"
    with open(log, "ab") as f:
        f.write(("\n$ " + " ".join(cmd) + "\n").encode())
        if use_pty:
            import fcntl
            import pty
            import shutil
            import struct
            import termios
            master, slave = pty.openpty()
            size = shutil.get_terminal_size()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size.lines, size.columns, 0, 0))
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                                    env={**os.environ, **env})
            os.close(slave)
            read = lambda: _read_pty(master)  # noqa: E731
        else:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env={**os.environ, **env})
            assert proc.stdout is not None
            read = lambda: proc.stdout.read1(65536)  # noqa: E731
        try:
            while True:
                chunk = read()
                if not chunk:
                    break
                f.write(chunk)
                out = getattr(sys.stdout, "buffer", None)
                if out is not None:
                    out.write(chunk)
                else:  # a replaced sys.stdout (pytest capture, notebooks)
                    sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        finally:
            if use_pty:
                os.close(master)


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the child closed its side
        return b""


def _tail(log: Path, n: int = 15) -> str:
    try:
        lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    lines = [ln for ln in lines if ln.strip()]
    return "\n".join("    " + ln for ln in lines[-n:])


@dataclass
class RowResult:
    row: Row
    status: str  # finished | skipped | reused (same settings as an earlier row) | failed | stale | busy
    seconds: float = 0.0
    message: str = ""


@dataclass
class Ablation:
    method: str
    data: str
    recipes: Path = Path("recipes")
    runs: Path = Path("runs/ablate")
    use_wandb: bool = False
    env: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.runs / f"{self.method}_{DATASETS[self.data]}"

    def row_dir(self, row: Row) -> Path:
        return self.root / row.table / row.name

    def base_recipe(self, row: Row) -> Path:
        """recipes/<method>_<data>.yaml, or the recipe of the method the row names (`row: {recipe: ...}`)."""
        return recipe_for(row.recipe_name(self.data) or self.method, self.data, self.recipes)

    def layers(self, row: Row) -> list[tuple[str, Path, dict, bool]]:
        """[(name, file, settings, the file holds exactly these settings)] in the order lightning layers them:
        base recipe, the method's sizes overlay, the row. A row of another method's recipe takes the overlay's
        data and trainer sizes but not its `model:` section (the table's own method's settings); a row file
        with a `row:` block reaches lightning without it. Such derived layers are written into the row folder
        (config_files)."""
        recipe = self.base_recipe(row)
        out = [("recipe", recipe, read_yaml(recipe), True)]
        sizes = sizes_for(self.method, self.data, self.recipes)
        if sizes is not None:
            over = read_yaml(sizes)
            if row.recipe is not None and "model" in over:
                out.append(("sizes", sizes, {k: v for k, v in over.items() if k != "model"}, False))
            else:
                out.append(("sizes", sizes, over, True))
        out.append(("row", row.path, row.deltas, row.own_recipe))
        return out

    def config_files(self, row: Row, layers: list | None = None) -> list[Path]:
        """The --config files of a trained row (derived layers written as <row dir>/ablate_<name>.yaml); layers:
        self.layers(row) when the caller has them already."""
        files = []
        for name, f, cfg, as_is in layers or self.layers(row):
            if not as_is:
                left_out = {"sizes": "its model: section", "row": "its row: block"}[name]
                derived = self.row_dir(row) / f"ablate_{name}.yaml"
                derived.parent.mkdir(parents=True, exist_ok=True)
                derived.write_text(f"# derived by zoo.experiments.ablate from {f} without {left_out}\n"
                                   + yaml.safe_dump(cfg, sort_keys=False))
                f = derived
            files.append(f)
        return files

    def merged(self, row: Row, layers: list | None = None) -> dict:
        """A trained row's settings: its layers merged as the CLI merges them (a later list replaces)."""
        merged: dict = {}
        for _, _, cfg, _ in layers or self.layers(row):
            merged = _deep_merge(merged, cfg)
        return merged

    def commands(self, row: Row, stage: str, ckpt: Path | None) -> list[str]:
        row_dir = self.row_dir(row)
        row_dir.mkdir(parents=True, exist_ok=True)
        id_file = row_dir / "wandb_id"
        if not id_file.exists():  # fit and test of a row (and a resumed fit) log to the same W&B run
            id_file.write_text(f"{row.name[:20]}-{secrets.token_hex(4)}")
        layers = self.layers(row)
        files = self.config_files(row, layers)
        cfg = overlay(row, self.data, row_dir, stage, self.use_wandb, id_file.read_text().strip(),
                      checkpoint_callbacks(self.merged(row, layers), row_dir))
        cfg_path = row_dir / f"ablate_{stage}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [sys.executable, "-m", "zoo", stage]
        for f in files:
            cmd += ["--config", str(f)]
        cmd += ["--config", str(cfg_path), "--trainer.default_root_dir", str(row_dir),
                "--trainer.callbacks+=zoo.experiments.ablate.RowCallback"]
        if stage == "test":
            cmd += ["--trainer.callbacks.results_path", str(row_dir / "test_metrics.json")]
        if ckpt is not None:
            cmd += ["--ckpt_path", str(ckpt)]
        return cmd + list(self.extra)

    def members(self, row: Row) -> list[Row]:
        """The rows an ensemble row averages on this data ([] for a trained row)."""
        names = row.members(self.data)
        if not names:
            return []
        table = {r.name: r for r in discover(self.method, self.recipes)[row.table]}
        return [table[n] for n in names]

    def config_key(self, row: Row) -> str:
        """The row's settings as one canonical string: its merged layers plus the extra lightning arguments (an
        ensemble: its members' strings). Two rows with the same string train the same model (e.g. "w/o B-3" of
        Table 6 and of Tables 2-4, or lambda = 0.5 and the base recipe), so the runner trains only the first."""
        if row.ensemble is not None:  # its settings are its members' (and how they are averaged)
            return json.dumps({"ensemble": [self.config_key(m) for m in self.members(row)],
                               "extra": list(self.extra)}, sort_keys=True)
        return json.dumps({"config": self.merged(row), "extra": list(self.extra)}, sort_keys=True, default=str)

    def settings_digest(self, row: Row) -> str:
        """sha1 of the row's merged settings and extra arguments (config_key), recorded in results.json."""
        import hashlib
        return hashlib.sha1(self.config_key(row).encode()).hexdigest()[:16]

    def finished(self, row: Row) -> tuple[str, str]:
        """("finished" | "stale" | "unfinished", why) from the row's results.json: a truncated or malformed file
        is not finished (the row's test runs again); one recorded with other settings (another ARGS, an edited
        row) is stale: reported, never silently taken as this run's figures."""
        from .report import read_result
        results = self.row_dir(row) / "results.json"
        if not results.exists():
            return "unfinished", ""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = read_result(results)
        if res is None or not res.get("metrics"):
            warnings.warn(f"{results} is truncated or malformed: running the row's test again")
            results.unlink()
            return "unfinished", ""
        recorded, now = res.get("settings"), self.settings_digest(row)
        if recorded is not None and recorded != now:
            return "stale", (f"finished with other settings (results.json records {recorded}, this run's are "
                             f"{now}: other ARGS or an edited recipe/row); to run it with these, delete "
                             f"{self.row_dir(row)} (or use another --runs)")
        return "finished", ""

    def run_row(self, row: Row, same_as: Row | None = None) -> RowResult:
        row_dir = self.row_dir(row)
        results = row_dir / "results.json"
        state, why = self.finished(row)
        if state == "stale":
            return RowResult(row, "stale", message=why)
        if state == "finished":
            return RowResult(row, "skipped", message="finished before (delete its results.json to run it again)")
        row_dir.mkdir(parents=True, exist_ok=True)
        import fcntl
        with open(row_dir / ".ablate.lock", "a+") as lock:  # two runners on one folder: one trains each row
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return RowResult(row, "busy", message="another `zoo.ablate` is running this row (its lock "
                                 f"{row_dir / '.ablate.lock'} is held): left to it")
            if results.exists():  # the other runner finished it while this one was deciding
                return RowResult(row, "skipped", message="finished by another runner")
            if row.ensemble is not None and same_as is None:
                return self._run_ensemble_locked(row)
            return self._run_row_locked(row, same_as)

    def _run_ensemble_locked(self, row: Row) -> RowResult:
        """SCAN*, SGRAF: the mean of the members' [I, C] matrices (`zoo.experiments.ensemble`, raw scores as the
        papers average them), on the test data of the first member's settings."""
        t0, row_dir = time.time(), self.row_dir(row)
        members = self.members(row)
        ckpts = {}
        for m in members:
            state, why = self.finished(m)
            if state != "finished":
                return RowResult(row, "failed", 0.0, f"member {m.key} has not finished ({why or state}): run it "
                                 f"first (selecting the ensemble runs its members before it)")
            ckpts[m.name] = json.loads((self.row_dir(m) / "results.json").read_text())["checkpoint"]
        out_json = row_dir / "ensemble.json"
        out_json.unlink(missing_ok=True)
        # the data come from the first member's layers; extra model arguments are training settings, which
        # the checkpoints already hold (the ensemble tool refuses them), the rest reach its datamodule
        from .ensemble import split_model_args
        _, extra = split_model_args(self.extra)
        cmd = [sys.executable, "-m", "zoo.experiments.ensemble"]
        for f in self.config_files(members[0]):
            cmd += ["--config", str(f)]
        cmd += ["--ckpt", *ckpts.values(), "--json", str(out_json), *extra]
        log = row_dir / "ablate.log"
        rc = _stream(cmd, log, self.env)
        if rc != 0 or not out_json.exists():
            return RowResult(row, "failed", time.time() - t0, f"ensemble exited with {rc}; log: {log}\n{_tail(log)}")
        ens = json.loads(out_json.read_text())["ensemble"]
        out = {"method": self.method, "data": self.data, "table": row.table, "row": row.name, "order": row.order,
               "label": row.label, "what": row.what, "row_file": str(row.path), "checkpoint": None,
               "members": ckpts, "settings": self.settings_digest(row), "extra_args": list(self.extra),
               "test_seconds": round(time.time() - t0, 1),
               "metrics": results_metrics(ens)}
        write_results(row_dir / "results.json", out)
        return RowResult(row, "finished", time.time() - t0)

    def _run_row_locked(self, row: Row, same_as: Row | None = None) -> RowResult:
        row_dir = self.row_dir(row)
        results = row_dir / "results.json"
        earlier = self.row_dir(same_as) / "results.json" if same_as is not None else None
        if earlier is not None and earlier.exists():  # same settings as a finished row: its figures, not a rerun
            out = json.loads(earlier.read_text())
            out.update(table=row.table, row=row.name, order=row.order, label=row.label, what=row.what,
                       row_file=str(row.path), same_as=same_as.key, settings=self.settings_digest(row))
            write_results(results, out)
            return RowResult(row, "reused", message=f"same settings as {same_as.key}: its results")
        t0 = time.time()
        fit_done, ckpts = row_dir / ".fit_done", row_dir / "checkpoints"
        log = row_dir / "ablate.log"
        timings = json.loads(fit_done.read_text()) if fit_done.exists() else {}
        if not fit_done.exists():
            last = ckpts / "last.ckpt"
            resume = last if last.exists() else None
            if resume:
                print(f"[ablate] {row.key}: resuming the killed fit from {resume}", flush=True)
            rc = _stream(self.commands(row, "fit", resume), log, self.env)
            if rc != 0:
                return RowResult(row, "failed", time.time() - t0, f"fit exited with {rc}; log: {log}\n{_tail(log)}")
            timings = {"fit_seconds": round(time.time() - t0, 1), "resumed_from": str(resume) if resume else None}
            fit_done.write_text(json.dumps(timings))
        best = ckpts / "best.ckpt"
        if not best.exists():
            if not (ckpts / "last.ckpt").exists():
                return RowResult(row, "failed", time.time() - t0, f"fit wrote no checkpoint in {ckpts}")
            warnings.warn(f"{row.key}: no best.ckpt (no validation ran?): testing last.ckpt")
            best = ckpts / "last.ckpt"
        metrics_file = row_dir / "test_metrics.json"
        metrics_file.unlink(missing_ok=True)
        t1 = time.time()
        rc = _stream(self.commands(row, "test", best), log, self.env)
        if rc != 0 or not metrics_file.exists():
            return RowResult(row, "failed", time.time() - t0, f"test exited with {rc}; log: {log}\n{_tail(log)}")
        out = {"method": self.method, "data": self.data, "table": row.table, "row": row.name, "order": row.order,
               "label": row.label, "what": row.what, "row_file": str(row.path), "checkpoint": str(best),
               "settings": self.settings_digest(row), "extra_args": list(self.extra),
               **timings, "test_seconds": round(time.time() - t1, 1),
               "metrics": json.loads(metrics_file.read_text())}
        write_results(results, out)
        return RowResult(row, "finished", time.time() - t0)

    def with_members(self, rows: list[Row]) -> list[Row]:
        """rows with each ensemble's members (selected or not) placed before it, each row once."""
        out: list[Row] = []
        for row in rows:
            for r in [*self.members(row), row]:
                if all(r.key != o.key for o in out):
                    out.append(r)
        return out

    def run(self, rows: list[Row]) -> list[RowResult]:
        rows = self.with_members(rows)
        start, done, ran_seconds = time.time(), [], []
        n = len(rows)
        keys = [self.config_key(row) for row in rows]
        first_with: dict[str, Row] = {}
        for key, row in zip(keys, rows):
            first_with.setdefault(key, row)
        trains = {id(r) for r in first_with.values()}  # the rows that will run (the others reuse one of them)
        for k, (key, row) in enumerate(zip(keys, rows), 1):
            same_as = first_with[key]
            pending = [r for r in rows[k - 1:] if id(r) in trains and not (self.row_dir(r) / "results.json").exists()]
            eta = (sum(ran_seconds) / len(ran_seconds) * len(pending)) if ran_seconds else None
            eta_s = _fmt(eta) if eta is not None else "after the first row"
            print(f"\n[ablate] row {k}/{n}: {row.key} ({row.label}) | elapsed {_fmt(time.time() - start)} "
                  f"| remaining ~{eta_s}", flush=True)
            res = self.run_row(row, same_as if same_as is not row else None)
            if res.status in ("finished", "failed"):
                ran_seconds.append(res.seconds)
            note = f" in {_fmt(res.seconds)}" if res.status in ("finished", "failed") else ""
            print(f"[ablate] row {k}/{n}: {row.key} {res.status}{note}"
                  + (f"\n{res.message}" if res.status in ("failed", "reused", "stale", "busy") else ""), flush=True)
            done.append(res)
        print(f"\n[ablate] {self.method} on {self.data}: {n} rows in {_fmt(time.time() - start)}")
        for r in done:
            print(f"  {r.status:<8} {r.row.key}" + (f"  ({_fmt(r.seconds)})" if r.status == "finished" else ""))
        return done


def log_comparison(method: str, data: str, runs: Path, table_rows: list[dict], chart: Path | None) -> None:
    """The comparison (ours beside the paper's) as a W&B Table in a `comparison` run of the project."""
    try:
        import wandb
        root = runs / f"{method}_{DATASETS[data]}"
        run = wandb.init(project=wandb_project(method, data), name="comparison", group="comparison",
                         job_type="report", dir=str(root), tags=[method, data, "comparison"], reinit="finish_previous")
        cols = list(table_rows[0].keys()) if table_rows else []
        data_rows = [[r.get(c) for c in cols] for r in table_rows]
        payload: dict[str, Any] = {"comparison": wandb.Table(columns=cols, data=data_rows)}
        if chart is not None and chart.exists():
            payload["rsum_chart"] = wandb.Image(str(chart))
        run.log(payload)
        run.finish()
    except Exception as e:  # noqa: BLE001 - W&B never fails the ablation
        warnings.warn(f"could not log the comparison table to W&B: {e}")


def check_runs(runs: Path) -> None:
    """--runs must be (or become) a writable folder: checked before any row starts."""
    from datamodules.errors import DataError
    probe = runs
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise DataError(probe, "is a file, not a folder for the row runs", "point --runs at a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DataError(probe, "is not writable: the rows' checkpoints and results go here",
                        "point --runs at a writable folder")


def split_extra(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(the command's own arguments, those after `--`, which go to every `lightning fit/test`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv, extra = split_extra(argv)
    ap = argparse.ArgumentParser(prog="python -m zoo.experiments.ablate", description=__doc__.split("\n")[0],
                                 epilog="Arguments after `--` are passed to every `lightning fit/test` of the rows.")
    ap.add_argument("method", nargs="?", help="casc_base | casc | cccl (a folder under recipes/ablations)")
    ap.add_argument("data", nargs="?", choices=list(DATASETS), help="synthetic | f30k | coco")
    ap.add_argument("--list", metavar="METHOD", help="print the tables and rows of METHOD and exit")
    ap.add_argument("--table", help="only this table (folder name)")
    ap.add_argument("--rows", help="only these rows, comma separated (row names, NN_name or table/name)")
    ap.add_argument("--logger", default=os.environ.get("LOGGER", "wandb"), type=str.lower, choices=["wandb", "csv"],
                    help="wandb (CSV + W&B, offline without an API key) or csv (default: $LOGGER or wandb)")
    ap.add_argument("--recipes", default="recipes", help="recipe folder (holds ablations/)")
    ap.add_argument("--runs", default="runs/ablate", help="where row folders go")
    ap.add_argument("--data-root", default="data", help="folder holding f30k_precomp / coco_precomp")
    ap.add_argument("--paper", default=None, help="folder of paper figure CSVs (default zoo/paper_results)")
    ap.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    args = ap.parse_args(argv)
    try:
        if args.list:
            print(format_listing(args.list, discover(args.list, args.recipes)))
            return 0
        if not (args.method and args.data):
            ap.error("give METHOD and DATA (or --list METHOD)")
        tables = discover(args.method, args.recipes)
        if args.rows is not None and not [w for w in args.rows.split(",") if w.strip()]:
            raise ValueError(f"--rows {args.rows!r} names no row (give names separated by commas, or drop --rows "
                             "for every row)")
        rows = select(tables, args.table, args.rows)
        check_runs(Path(args.runs))
        recipe_for(args.method, args.data, args.recipes)
        check_data(args.data, extra, args.data_root)
        abl = Ablation(args.method, args.data, Path(args.recipes), Path(args.runs), extra=extra)
        rows = abl.with_members(rows)
        for row in rows:  # every row's recipe (an ensemble's members are rows too) on this data, before any trains
            if row.ensemble is None:
                abl.base_recipe(row)
    except ValueError as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    use_wandb, env, how = wandb_setup(args.logger)
    print(f"[ablate] {args.method} on {args.data}: {len(rows)} rows; {how}", flush=True)
    abl.use_wandb, abl.env = use_wandb, env
    try:
        results = abl.run(rows)
    except KeyboardInterrupt:
        print("\n[ablate] interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    if not args.no_report:
        from .report import write_report
        try:
            paths, table_rows = write_report(args.method, args.data, runs=args.runs, recipes=args.recipes,
                                             paper_dir=args.paper)  # every table: the report is the method's
            print("[ablate] report: " + ", ".join(str(p) for p in paths.values()))
            if use_wandb:
                saved = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                try:
                    log_comparison(args.method, args.data, Path(args.runs), table_rows, paths.get("png"))
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
        except Exception as e:  # noqa: BLE001 - the rows are done; a report problem is reported, not fatal
            print(f"[ablate] could not write the report: {e}", file=sys.stderr)
    if use_wandb and env.get("WANDB_MODE", os.environ.get("WANDB_MODE")) == "offline":
        print(f"[ablate] W&B ran offline: upload with `wandb sync {abl.root}/*/*/wandb/offline-run-*`")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print(f"[ablate] {len(failed)} of {len(results)} rows failed: " + ", ".join(r.row.key for r in failed),
              file=sys.stderr)
    other = [r for r in results if r.status in ("stale", "busy")]
    if other:
        print(f"[ablate] {len(other)} rows not run here: " + ", ".join(f"{r.row.key} ({r.status})" for r in other),
              file=sys.stderr)
    return 1 if failed or other else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Official checkpoints -> zoo modules (issue 16): a registry of importers, a strict key mapper, the opt check.

    from zoo.methods import load_official
    m = load_official("vsepp", "runs/coco_vse++/model_best.pth.tar", vocab="vocab/coco_precomp_vocab.pkl")
    m.eval(); s = m.score(m.encode_images({"images": X}), m.encode_captions({"tokens": T, "lengths": L}))

    zoo-import-checkpoint vsepp model_best.pth.tar --out runs/vsepp_import.ckpt [--vocab VOCAB]
    lightning test --config recipes/vsepp_f30k.yaml --ckpt_path runs/vsepp_import.ckpt

An importer is `fn(ckpt: dict, vocab: Vocabulary | None) -> RetrievalModule`, registered with
`@register_official("name")` in its method's module (importing zoo.methods registers them all). It reads the official `opt` (an argparse.Namespace) with `check_opt` -- every setting
must be one the zoo implements, a setting it does not know is an error -- builds the zoo module from it and fills it
with `map_state`: every official key is mapped and every zoo parameter/buffer filled, shapes equal; a missing, extra
or mis-shaped key is an error naming it (the official VSE-infinity loader uses strict=False and silently drops keys;
the zoo does not). No official module is imported: checkpoints load with torch's weights-only unpickler and an
allow-list (argparse.Namespace, numpy scalars), vocabularies as JSON or through datamodules.vocab_pickle's restricted
unpickler.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from datamodules.errors import DataError
from datamodules.text import Vocabulary

OFFICIAL: dict[str, Callable] = {}

#: settings every official parser has that configure the run, not the model (accepted with any value)
RUN_SETTINGS = ("data_path", "data_name", "vocab_path", "batch_size", "workers", "log_step", "val_step",
                "logger_name", "model_name", "resume", "reset_train", "reset_start_epoch", "num_epochs",
                "learning_rate", "lr_update", "grad_clip", "optim", "vocab_size")

ANY = object()  # check_opt: any value is accepted


def register_official(name: str):
    """Decorator: registers `fn(ckpt, vocab) -> module` as the importer of official checkpoints of `name`."""
    def wrap(fn):
        if name in OFFICIAL:
            raise ValueError(f"an importer for {name!r} is already registered ({OFFICIAL[name].__module__})")
        OFFICIAL[name] = fn
        return fn
    return wrap


def _safe_globals() -> list:
    allowed: list = [argparse.Namespace]
    try:  # numpy scalars (e.g. a best_rsum saved as numpy.float64) and their dtypes
        import numpy as np
        allowed += [np.dtype, type(np.dtype("float64")), type(np.dtype("float32")), type(np.dtype("int64"))]
        try:
            from numpy._core.multiarray import scalar
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import scalar
        allowed.append(scalar)
    except ImportError:
        pass
    return allowed


def read_official(path: str | Path, trusted: bool = False) -> dict:
    """An official checkpoint as a dict {'model': [state_dict, ...], 'opt': Namespace, 'epoch', ...} on the CPU.

    Weights-only unpickling with an allow-list (argparse.Namespace, numpy scalars): nothing else is executed.
    `trusted=True` falls back to full unpickling (only for files whose origin you trust).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "official checkpoint not found" if not p.exists() else "is not a file",
                        "pass the .pth.tar written by the official train.py (model_best.pth.tar / checkpoint.pth)")
    try:
        if trusted:
            ckpt = torch.load(str(p), map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_safe_globals()):
                ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure becomes one clear message
        raise DataError(p, f"does not load as an official checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})",
                        "a truncated copy or another format; if it holds other Python objects and you trust the "
                        "file, use load_official(..., trusted=True) / zoo-import-checkpoint --trusted") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise DataError(p, "is not an official checkpoint: no 'model' entry (the official train.py saves "
                        "{'epoch', 'model', 'best_rsum', 'opt', 'Eiters'})", "pass the official .pth.tar file")
    if "opt" not in ckpt:
        raise DataError(p, "the checkpoint has no 'opt' (the official settings that size the model)",
                        "use a checkpoint written by the official train.py")
    ckpt["_path"] = str(p)
    return ckpt


def load_vocab(path: str | Path | None) -> Vocabulary | None:
    """A SCAN-format vocabulary JSON or a pickled official `Vocabulary` (*_vocab.pkl, restricted unpickler)."""
    if path is None:
        return None
    return Vocabulary.load(path)  # dispatches .pkl to datamodules.vocab_pickle


def load_official(method: str, path: str | Path, vocab: str | Path | Vocabulary | None = None,
                  trusted: bool = False) -> nn.Module:
    """The zoo module of `method` with the official checkpoint's weights, in eval mode.

    Methods: see `OFFICIAL` (vsepp, vse_infinity, ... as the importers register them). `vocab`: the official
    vocabulary (JSON or .pkl): stored in the module so that `lightning test` refuses data with another vocabulary.
    """
    if method not in OFFICIAL:
        raise DataError(None, f"no importer for official checkpoints of {method!r}",
                        f"use one of {', '.join(sorted(OFFICIAL))}")
    ckpt = read_official(path, trusted=trusted)
    voc = vocab if isinstance(vocab, Vocabulary) or vocab is None else load_vocab(vocab)
    module = OFFICIAL[method](ckpt, voc)
    if voc is not None:
        n = _vocab_size(ckpt)
        if n is not None and len(voc) not in (n, n - 1):
            raise DataError(vocab, f"the vocabulary has {len(voc)} words but the checkpoint's embedding has {n} rows",
                            "pass the vocabulary the checkpoint was trained with")
        module.vocab_words = list(voc.idx2word)
        module.vocab_source = str(vocab) if not isinstance(vocab, Vocabulary) else None
    module.official = {"method": method, "source": str(path), "epoch": ckpt.get("epoch"),
                       "best_rsum": _plain(ckpt.get("best_rsum")), "opt": opt_dict(ckpt["opt"])}
    return module.eval()


def _vocab_size(ckpt: dict) -> int | None:
    opt = ckpt.get("opt")
    n = getattr(opt, "vocab_size", None)
    return int(n) if n is not None else None


def _plain(v):
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return str(v)


def opt_dict(opt) -> dict:
    """The official argparse.Namespace as a dict of plain values (what a weights-only checkpoint may hold)."""
    d = vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt)
    out = {}
    for k, v in d.items():
        out[k] = v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
    return out


def check_opt(opt, supported: Mapping[str, object], source: str | None = None) -> dict:
    """Checks every setting of the official `opt` against what the zoo implements; returns it as a dict.

    `supported` maps each setting the importer knows to ANY (any value: run settings, or a size the importer
    reads), a tuple/set of accepted values, or a predicate. A setting not in `supported` (nor in RUN_SETTINGS),
    or a value outside it, is an error naming it: the zoo never ignores an official setting it does not implement.
    """
    d = opt_dict(opt)
    allowed = {k: ANY for k in RUN_SETTINGS}
    allowed.update(supported)
    for k, v in d.items():
        if k not in allowed:
            raise DataError(source, f"the official opt has the setting {k}={v!r}, which the zoo's importer does not "
                            "know (a newer or other branch of the official code?)",
                            "import a checkpoint of the official branch this importer follows (see "
                            "zoo/methods/official.py), or extend the importer for that setting")
        spec = allowed[k]
        if spec is ANY:
            continue
        ok = spec(v) if callable(spec) else v in spec
        if not ok:
            raise DataError(source, f"the official opt has {k}={v!r}, which the zoo does not implement "
                            f"(supported: {spec if not callable(spec) else getattr(spec, '__doc__', spec)})",
                            "import a checkpoint trained with a supported setting")
    return d


def strip_module_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel's `module.` prefix removed (from every key, or from none)."""
    keys = list(sd)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _target(key: str, mapping: Mapping[str, str | None]) -> tuple[bool, str | None]:
    if key in mapping:
        return True, mapping[key]
    best = None
    for src in mapping:  # prefix rules end with '.': "rnn." -> "text_encoder.rnn."
        if src.endswith(".") and key.startswith(src) and (best is None or len(src) > len(best)):
            best = src
    if best is None:
        return False, None
    dst = mapping[best]
    return True, None if dst is None else dst + key[len(best):]


def map_state(official_sd: Mapping[str, torch.Tensor], mapping: Mapping[str, str | None], module: nn.Module,
              source: str | None = None) -> None:
    """Copies an official state dict into `module` through `mapping`, strictly.

    mapping: official key -> zoo key, or official prefix ending in '.' -> zoo prefix; None = an official key the
    official forward never reads (dropped on purpose; say why in a comment). DataParallel's `module.` prefix is
    stripped first. Errors (each naming the keys): an official key no rule maps (extra), a zoo parameter or
    buffer nothing fills (missing), two official keys onto one zoo key, a shape mismatch.
    """
    sd = strip_module_prefix(official_sd)
    own = module.state_dict()
    filled: dict[str, str] = {}
    extra, shapes = [], []
    new_sd = {}
    for k, v in sd.items():
        known, dst = _target(k, mapping)
        if not known:
            extra.append(k)
            continue
        if dst is None:
            continue
        if dst not in own:
            extra.append(f"{k} (-> {dst}, which the zoo module does not have)")
            continue
        if dst in filled:
            raise DataError(source, f"official keys {filled[dst]} and {k} both map to {dst}",
                            "fix the importer's key mapping (the method's register_official function)")
        if tuple(v.shape) != tuple(own[dst].shape):
            shapes.append(f"{k} {tuple(v.shape)} -> {dst} {tuple(own[dst].shape)}")
            continue
        filled[dst] = k
        new_sd[dst] = v.to(own[dst].dtype)
    missing = [k for k in own if k not in filled]
    problems = []
    if extra:
        problems.append(f"official keys the zoo does not map: {', '.join(extra)}")
    if shapes:
        problems.append(f"shape mismatches: {'; '.join(shapes)}")
    if missing:
        problems.append(f"zoo parameters no official key fills: {', '.join(missing)}")
    if problems:
        raise DataError(source, "the official weights do not fit the zoo model: " + " | ".join(problems),
                        "check that the checkpoint is of this method and branch, and that its opt sizes the model "
                        "(every key must be mapped: nothing is dropped silently)")
    module.load_state_dict(new_sd, strict=True)


# ---- the command -------------------------------------------------------------------------------------------
def lightning_checkpoint(module, out: str | Path) -> Path:
    """Writes `module` (a RetrievalModule from load_official) as a checkpoint `lightning test --ckpt_path` reads.

    Only plain types besides tensors: LightningCLI reads its hyper_parameters with weights_only=True.
    """
    import lightning

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cls = type(module)
    hp = dict(module.hparams)
    hp["_class_path"] = f"{cls.__module__}.{cls.__name__}"
    hp["_instantiator"] = "lightning.pytorch.cli.instantiate_module"  # as LightningCLI writes it (load_from_checkpoint)
    ckpt = {"state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
            "hyper_parameters": hp, "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0,
            "zoo_data": {"caps_per_image": module.caps_per_image, "vocab": module.vocab_words,
                         "vocab_source": module.vocab_source},
            "official": getattr(module, "official", None)}
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="zoo-import-checkpoint", description="Converts an official checkpoint into a "
                                 "zoo checkpoint that `lightning test --config recipes/<method>_<data>.yaml "
                                 "--ckpt_path OUT` evaluates.")
    ap.add_argument("method", choices=sorted(OFFICIAL))
    ap.add_argument("ckpt", help="the official .pth.tar")
    ap.add_argument("--out", required=True, help="the zoo checkpoint to write")
    ap.add_argument("--vocab", default=None, help="the official vocabulary (SCAN-format JSON or *_vocab.pkl)")
    ap.add_argument("--trusted", action="store_true", help="full unpickling of the official file (trusted files only)")
    args = ap.parse_args(argv)
    try:
        module = load_official(args.method, args.ckpt, vocab=args.vocab, trusted=args.trusted)
        out = lightning_checkpoint(module, args.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    n = sum(p.numel() for p in module.parameters())
    print(f"{out}: {args.method} from {args.ckpt} ({n:,} parameters); evaluate with\n"
          f"  lightning test --config recipes/{args.method}_<data>.yaml --ckpt_path {out}"
          + ("" if args.vocab else "  (no --vocab: the data's vocabulary must be the one it was trained with)"))


if __name__ == "__main__":  # `python -m zoo.methods.official`: the package's registry, not this copy's
    from zoo.methods.official import main as _main

    _main()

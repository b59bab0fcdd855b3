"""Issue 19 (second round of trustworthy runs): each case here was a silently wrong result, a traceback or a
confusing outcome before; every test failed before its change."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datamodules.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING = Path(sys.executable).parent / "lightning"
SYNTH = ["--data.init_args.root", "ss", "--data.init_args.n_train", "20", "--data.init_args.n_dev", "5",
         "--data.init_args.n_test", "5", "--data.init_args.feature_dim", "8", "--data.init_args.num_regions", "3",
         "--data.init_args.num_workers", "0", "--data.init_args.vocab_min_count", "1",
         "--model.init_args.feature_dim", "8", "--model.init_args.embed_dim", "8", "--model.init_args.word_dim", "8"]


def _cli(args, cwd):
    return subprocess.run([str(LIGHTNING), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


# ---- tracebacks -> one line ------------------------------------------------------------------------------
def test_model_argument_error_is_one_cli_line(tmp_path):
    """beta outside [0, 1] was a ValueError inside a ~60-line jsonargparse traceback."""
    out = _cli(["fit", "--config", str(ROOT / "recipes" / "casc_synth.yaml"), "--model.init_args.beta", "2"],
               tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: beta must lie in [0, 1], got 2.0 (raised at zoo/methods/casc.py:" in out.stderr
    assert "Traceback" not in out.stderr and "Union" not in out.stderr


@pytest.mark.parametrize("recipe, args, message", [
    ("casc_synth.yaml", ["--model.init_args.sg_reading", "foo"], "sg_reading must be one of"),
    ("casc_synth.yaml", ["--data.init_args.caps_per_image", "0"], "data.caps_per_image is 0"),
    ("casc_synth.yaml", ["--data.init_args.num_regions", "0"], "data.num_regions is 0"),
    ("casc_base_synth.yaml", ["--data.init_args.n_test", "0"], "data.n_test is 0"),
])
def test_argument_errors_are_one_line_in_process(recipe, args, message, tmp_path, monkeypatch, capsys):
    from zoo.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "recipes" / recipe), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err or message in err.split("error:", 1)[-1], err[-2000:]
    assert "Traceback" not in err


def test_library_errors_keep_their_traceback():
    """Only the zoo's own checks become one line: an error raised elsewhere (a bug) is not hidden."""
    from zoo.engine.errors import one_line_errors
    with pytest.raises(ValueError, match="invalid literal"):
        with one_line_errors():
            int("x")


def test_two_runs_generating_one_synthscenes_root_wait_for_each_other(tmp_path):
    """Generation used to run outside the cache lock: a second fit on the same new root died on the first's
    .tmp. Now it waits for the lock (held here), then finds the copy made."""
    from datamodules.prepare import cache_lock
    root = tmp_path / "ss"
    code = ("from datamodules.synthscenes import SynthScenesDataModule as S; "
            f"dm = S(root={str(root)!r}, n_train=6, n_dev=2, n_test=2, feature_dim=4, num_regions=2, num_workers=0, "
            "vocab_min_count=1); print('ready', flush=True); dm.prepare_data(); print('ok')")
    with cache_lock(root):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(3)  # prepare_data now waits for the lock instead of generating next to the holder
        assert not (root / "train_ims.npy").exists() and proc.poll() is None
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "ok" in out, err[-2000:]
    assert "waiting for another" in err and (root / "synthscenes.json").exists()


# ---- model settings given with --ckpt_path (item 8) and a checkpoint of another class ------------------------
def _fake_ckpt(path, class_path="zoo.methods.CASC", **hp):
    import torch
    torch.save({"hyper_parameters": {"_class_path": class_path, "feature_dim": 8, "embed_dim": 8, "word_dim": 8,
                                     "lr": 5e-4, "lambda_t2i": 9.0, **hp}, "state_dict": {}}, path)
    return str(path)


def _main(args, tmp_path, monkeypatch):
    from zoo.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    main(args)


def test_resume_with_other_model_settings_is_refused(tmp_path, monkeypatch, capsys):
    """`fit --ckpt_path ... --model.init_args.embed_dim 64 --model.init_args.lr 0.1` ran with 8 and 5e-4."""
    ckpt = _fake_ckpt(tmp_path / "last.ckpt")
    with pytest.raises(SystemExit) as e:
        _main(["fit", "--config", str(ROOT / "recipes" / "casc_synth.yaml"), *SYNTH, "--ckpt_path", ckpt,
               "--model.init_args.embed_dim", "64", "--model.init_args.lr", "0.1"], tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "resuming a run with other model settings" in err
    assert "embed_dim: 64 given, 8 in the checkpoint" in err and "lr: 0.1 given, 0.0005 in the checkpoint" in err


def test_evaluating_with_other_model_settings_warns_for_each(tmp_path, monkeypatch):
    ckpt = _fake_ckpt(tmp_path / "best.ckpt")
    with pytest.warns(UserWarning, match=r"lambda_t2i: 1.0 given, 9.0 in the checkpoint\); evaluating with the "
                                         r"checkpoint's") as rec, pytest.raises(BaseException):
        _main(["test", "--config", str(ROOT / "recipes" / "casc_synth.yaml"), *SYNTH, "--ckpt_path", ckpt,
               "--model.init_args.lambda_t2i", "1", "--model.init_args.eval_image_block", "2"], tmp_path,
              monkeypatch)  # the fake checkpoint holds no weights: the run itself fails after the warning
    assert not any("eval_image_block" in str(w.message) for w in rec)  # evaluation settings simply apply


def test_checkpoint_of_another_class_names_both(tmp_path, monkeypatch, capsys):
    ckpt = _fake_ckpt(tmp_path / "casc.ckpt")
    with pytest.raises(SystemExit):
        _main(["test", "--config", str(ROOT / "recipes" / "cccl_synth.yaml"), *SYNTH, "--ckpt_path", ckpt],
              tmp_path, monkeypatch)
    assert "this is a zoo.methods.CASC checkpoint, the recipe's model is zoo.methods.CCCL" in capsys.readouterr().err

"""The `lightning` console script end to end: fit a recipe (shrunk by overrides), then test its checkpoint."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING = Path(sys.executable).parent / "lightning"


def _run(args, cwd, env=None):
    return subprocess.run([str(LIGHTNING), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


SHRINK = ["--data.init_args.root", "ss", "--data.init_args.n_train", "60", "--data.init_args.n_dev", "10",
          "--data.init_args.n_test", "10", "--data.init_args.feature_dim", "32", "--data.init_args.num_regions", "6",
          "--data.init_args.num_workers", "0", "--data.init_args.vocab_min_count", "1",
          "--model.init_args.feature_dim", "32", "--model.init_args.embed_dim", "16",
          "--model.init_args.word_dim", "8"]


@pytest.mark.slow
def test_lightning_fit_then_test_prints_recall_table(tmp_path):
    recipe = str(ROOT / "recipes" / "casc_base_synth.yaml")
    shrink = ["--data.init_args.root", "ss", "--data.init_args.n_train", "60", "--data.init_args.n_dev", "10",
              "--data.init_args.n_test", "10", "--data.init_args.feature_dim", "32", "--data.init_args.num_regions", "6",
              "--data.init_args.num_workers", "0", "--data.init_args.vocab_min_count", "1",
              "--model.init_args.feature_dim", "32", "--model.init_args.embed_dim", "16",
              "--model.init_args.word_dim", "8"]
    fit = _run(["fit", "--config", recipe, "--trainer.max_epochs", "1", *shrink], tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    # one progress system and a quiet console: no stray tqdm scoring bars, tips or third-party deprecations
    for noise in ("scoring:", "Tip:", "treespec", "TPU available"):
        assert noise not in fit.stderr + fit.stdout, noise
    ckpt = tmp_path / "runs" / "casc_base_synth" / "checkpoints" / "best.ckpt"
    assert ckpt.exists()
    test = _run(["test", "--config", recipe, "--ckpt_path", str(ckpt), *shrink], tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "| all images |" in test.stdout and "I→T R@1" in test.stdout
    pred = _run(["predict", "--config", recipe, "--ckpt_path", str(ckpt), *shrink], tmp_path)
    assert pred.returncode == 0, pred.stderr[-3000:]
    png = tmp_path / "att.png"
    pic = subprocess.run([sys.executable, "-m", "zoo.tools.pictures", "attention", "--ckpt", str(ckpt), "--root",
                          "ss", "--out", str(png)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert pic.returncode == 0, pic.stderr[-3000:]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_missing_data_is_a_clear_cli_error(tmp_path):
    recipe = str(ROOT / "recipes" / "casc_base_f30k.yaml")
    out = _run(["fit", "--config", recipe, "--data.init_args.root", str(tmp_path / "f30k_precomp")], tmp_path)
    assert out.returncode != 0
    assert "data folder not found" in out.stderr and "f30k_precomp" in out.stderr and "Traceback" not in out.stderr


def test_python_m_zoo_help():
    out = subprocess.run([sys.executable, "-m", "zoo", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "fit" in out.stdout


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_recipe_parses(recipe, tmp_path):
    out = _run(["fit", "--config", str(ROOT / "recipes" / recipe), "--print_config"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: zoo.methods." in out.stdout


def test_test_without_a_checkpoint_is_refused(tmp_path):
    recipe = str(ROOT / "recipes" / "casc_base_synth.yaml")
    for sub in ("test", "validate"):
        out = _run([sub, "--config", recipe, *SHRINK], tmp_path)
        assert out.returncode == 2 and "without --ckpt_path" in out.stderr and "Traceback" not in out.stderr
    out = _run(["test", "--config", recipe, "--ckpt_path", "runs/missing.ckpt", *SHRINK], tmp_path)
    assert out.returncode == 2 and "checkpoint not found" in out.stderr and "Traceback" not in out.stderr
    out = _run(["test", "--config", recipe, "--allow_untrained", "true", *SHRINK], tmp_path)  # explicit opt-in
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| all images |" in out.stdout


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_state(tmp_path):
    """Kill a run mid-epoch (os._exit, as kill -9), resume with --ckpt_path last: same weights and metrics as
    a run that was never interrupted; only the epoch in progress is redone."""
    import os

    import torch
    import yaml

    recipe = str(ROOT / "recipes" / "casc_base_synth.yaml")
    args = ["--config", recipe, "--trainer.max_epochs", "3", "--data.init_args.batch_size", "64", *SHRINK]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil_copy = __import__("shutil").copytree
    full = _run(["fit", *args], tmp_path / "a")
    assert full.returncode == 0, full.stderr[-3000:]
    shutil_copy(tmp_path / "a" / "ss", tmp_path / "b" / "ss")  # same data (SynthScenes is deterministic anyway)
    steps_per_epoch = -(-60 * 5 // 64)
    kill = {"trainer": {"callbacks": [{"class_path": "zoo.engine.callbacks.ZooCheckpoint"},
                                      {"class_path": "killer.KillAtStep",
                                       "init_args": {"step": 2 * steps_per_epoch + 2}}]}}
    (tmp_path / "kill.yaml").write_text(yaml.safe_dump(kill))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    killed = _run(["fit", *args, "--config", str(tmp_path / "kill.yaml")], tmp_path / "b", env)
    assert killed.returncode == 137
    last = tmp_path / "b" / "runs" / "casc_base_synth" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 1  # the kill lost only the epoch in progress
    resumed = _run(["fit", *args, "--ckpt_path", "last"], tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (torch.load(d / "runs" / "casc_base_synth" / "checkpoints" / "last.ckpt", weights_only=False)
            for d in (tmp_path / "a", tmp_path / "b"))
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] == 3 * steps_per_epoch
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    best = [torch.load(d / "runs" / "casc_base_synth" / "checkpoints" / "best.ckpt", weights_only=False)
            for d in (tmp_path / "a", tmp_path / "b")]
    cb = [next(v for k, v in c["callbacks"].items() if "ZooCheckpoint" in k) for c in best]
    assert cb[0]["best_model_score"] == cb[1]["best_model_score"]

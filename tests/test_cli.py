"""The `lightning` console script end to end: fit a recipe (shrunk by overrides), then test its checkpoint."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING = Path(sys.executable).parent / "lightning"


def _run(args, cwd):
    return subprocess.run([str(LIGHTNING), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


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
    ckpt = tmp_path / "runs" / "casc_base_synth" / "checkpoints" / "best.ckpt"
    assert ckpt.exists()
    test = _run(["test", "--config", recipe, "--ckpt_path", str(ckpt), *shrink], tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "| all images |" in test.stdout and "I→T R@1" in test.stdout
    pred = _run(["predict", "--config", recipe, "--ckpt_path", str(ckpt), *shrink], tmp_path)
    assert pred.returncode == 0, pred.stderr[-3000:]
    png = tmp_path / "att.png"
    pic = subprocess.run([sys.executable, "-m", "zoo.attention_map", "--ckpt", str(ckpt), "--root",
                          "ss", "--out", str(png)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert pic.returncode == 0, pic.stderr[-3000:]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_missing_data_is_a_clear_cli_error(tmp_path):
    recipe = str(ROOT / "recipes" / "casc_base_f30k.yaml")
    out = _run(["validate", "--config", recipe, "--data.init_args.root", str(tmp_path / "f30k_precomp")], tmp_path)
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

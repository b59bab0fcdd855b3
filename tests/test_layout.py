"""The zoo's layout (one folder per role): no import cycles, old module paths still resolve, and a checkpoint
written before the move still loads and tests."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from import_graph import cycles, edges, role, role_edges

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING = Path(sys.executable).parent / "lightning"
OLD_CKPT = Path(__file__).parent / "fixtures" / "casc_base_before_layout.ckpt"  # written by commit 4645ee5


def test_no_module_imports_itself_back():
    graph = edges()
    assert "zoo.engine.module" in graph and "zoo.blocks.semantic" in graph  # the graph reads the source
    assert cycles(graph) == []


def test_a_planted_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_roles_form_a_layered_graph():
    """blocks know nothing above them; engine knows no method; nothing imports the experiments or tools."""
    roles = role_edges(edges())
    assert roles.get("zoo.blocks", set()) == set()
    assert "zoo.methods" not in roles.get("zoo.engine", set())
    assert not any(r.startswith("zoo") for r in roles.get("datamodules", set()))
    for low in ("zoo.experiments", "zoo.tools", "zoo.bench", "zoo.cli"):
        users = {a for a, bs in roles.items() if low in bs} - {"zoo", "zoo.__main__", "zoo.experiments"}
        assert users == set(), (low, users)
    node = {r for r in roles} | {b for bs in roles.values() for b in bs}
    assert cycles({r: roles.get(r, set()) - {"zoo", "zoo._moved"} for r in node - {"zoo"}}) == []
    assert role("zoo.methods.cccl.model") == "zoo.methods"


@pytest.mark.parametrize("old, new, attr", [
    ("zoo.callbacks", "zoo.engine.callbacks", "ZooCheckpoint"),
    ("zoo.module", "zoo.engine.module", "RetrievalModule"),
    ("zoo.evaluation", "zoo.engine.evaluation", "score_blockwise"),
    ("zoo.metrics", "zoo.engine.metrics", "RetrievalMetrics"),
    ("zoo.ablate", "zoo.experiments.ablate", "main"),
    ("zoo.ensemble", "zoo.experiments.ensemble", "main"),
    ("zoo.vocab", "zoo.tools.vocab", "main"),
    ("zoo.methods.cccl.bench", "zoo.bench.cccl", "main"),
])
def test_old_module_paths_resolve_to_the_moved_modules(old, new, attr):
    assert getattr(importlib.import_module(old), attr) is getattr(importlib.import_module(new), attr)


def test_python_m_old_name_runs_the_new_module():
    out = subprocess.run([sys.executable, "-m", "zoo.report", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "make report" in out.stdout or "ablation tables" in out.stdout
    out = subprocess.run([sys.executable, "-m", "zoo.bench", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0 and "methods" in out.stdout and "memory" in out.stdout, out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "zoo.bench", "nope"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode != 0 and "no benchmark 'nope'" in out.stderr


def test_checkpoint_written_before_the_move_loads():
    from zoo.engine.checkpoints import load_model
    from zoo.methods import CASCBase

    model = load_model(OLD_CKPT)
    assert type(model) is CASCBase and model.vocab_words and model.caps_per_image == 5
    state = torch.load(OLD_CKPT, map_location="cpu", weights_only=False)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.slow
def test_checkpoint_written_before_the_move_tests_through_the_cli(tmp_path):
    """`lightning test` of the old checkpoint with a recipe whose callback names the old `zoo.callbacks` path."""
    from zoo.tools.vocab import main as vocab_main

    vocab_main([str(OLD_CKPT), str(tmp_path / "vocab.json")])
    recipe = (ROOT / "recipes" / "casc_base_synth.yaml").read_text()
    old = tmp_path / "old_recipe.yaml"
    old.write_text(recipe.replace("zoo.engine.callbacks.ZooCheckpoint", "zoo.callbacks.ZooCheckpoint"))
    assert "zoo.callbacks.ZooCheckpoint" in old.read_text()
    sizes = ["--data.init_args.root", "ss", "--data.init_args.n_train", "40", "--data.init_args.n_dev", "10",
             "--data.init_args.n_test", "10", "--data.init_args.feature_dim", "16", "--data.init_args.num_regions",
             "4", "--data.init_args.num_workers", "0", "--data.init_args.vocab_path", str(tmp_path / "vocab.json"),
             "--model.init_args.feature_dim", "16", "--model.init_args.embed_dim", "8", "--model.init_args.word_dim", "4"]
    out = subprocess.run([str(LIGHTNING), "test", "--config", str(old), "--ckpt_path", str(OLD_CKPT), *sizes],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| all images |" in out.stdout

import os

# Triton kernels run in Triton's interpreter on CPU tensors in tests (read when triton is first imported, so
# before torch); on a GPU the compiled kernel is checked by `make bench BENCH_ARGS="--kernel triton ..."`.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

WORDS = ["dog", "cat", "ball", "red", "blue", "runs", "sits", "grass", "man", "car"]


def write_split(root, split, n_images=6, regions=4, dim=8, caps_per_image=5, repeat_rows=False, boxes=True, seed=0,
                captions=None):
    """A tiny dataset in the standard layout."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    feats = rng.random((n_images, regions, dim), dtype=np.float32)
    if repeat_rows:
        feats = np.repeat(feats, caps_per_image, axis=0)
    np.save(root / f"{split}_ims.npy", feats)
    if boxes:
        b = np.sort(rng.random((feats.shape[0], regions, 4), dtype=np.float32), axis=-1)[..., [0, 1, 2, 3]]
        b = np.stack([b[..., 0], b[..., 1], b[..., 2], b[..., 3]], -1)
        b[..., 2] = np.maximum(b[..., 2], b[..., 0])
        b[..., 3] = np.maximum(b[..., 3], b[..., 1])
        np.save(root / f"{split}_boxes.npy", b)
    if captions is None:
        captions = []
        for i in range(n_images * caps_per_image):
            captions.append(f"a {WORDS[i % 10]} and a {WORDS[(i * 3 + 1) % 10]} {WORDS[(i // 5) % 10]} .")
    (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    return feats


@pytest.fixture
def tiny_data(tmp_path):
    root = tmp_path / "precomp"
    write_split(root, "train", n_images=12)
    write_split(root, "dev", n_images=6, seed=1)
    write_split(root, "test", n_images=6, seed=2)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: threads only contend on a shared 2-core machine (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def f64():
    """float64 as the default dtype for one test (slow references compared to tight tolerances)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def tiny_data_args(root) -> list[str]:
    """`--data.init_args.*` that shrink a SynthScenes recipe to a tiny set under `root` (20 / 4 / 4 scenes)."""
    return ["--data.init_args.root", str(root), "--data.init_args.n_train", "20", "--data.init_args.n_dev", "4",
            "--data.init_args.n_test", "4", "--data.init_args.feature_dim", "16", "--data.init_args.num_regions", "4",
            "--data.init_args.num_workers", "0", "--data.init_args.vocab_min_count", "1",
            "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "4"]


TINY_MODEL_ARGS = ["--model.init_args.feature_dim", "16", "--model.init_args.embed_dim", "8",
                   "--model.init_args.word_dim", "4"]


def fit_and_test_tiny(recipe: str, root, extra=(), configs=(), train_batches: int = 2):
    """`recipes/<recipe>.yaml` (then `configs`, e.g. an ablation row) shrunk to a tiny SynthScenes under `root`:
    `train_batches` training steps (asserting that some parameter moved) and a test; returns the model, whose
    last_metrics hold the test figures."""
    import math
    from pathlib import Path

    import lightning as L

    from zoo.cli import ZooCLI
    from zoo.engine.module import RetrievalModule

    shrink = [*tiny_data_args(root), *TINY_MODEL_ARGS, *extra]
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    configs = [a for c in configs for a in ("--config", str(c))]
    cli = ZooCLI(RetrievalModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                 args=["--config", str(recipes / f"{recipe}.yaml"), *configs, *shrink])
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=train_batches, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    before = {k: v.clone() for k, v in cli.model.state_dict().items()}
    trainer.fit(cli.model, cli.datamodule)
    after = cli.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after), "no parameter moved"
    trainer.test(cli.model, cli.datamodule, verbose=False)
    assert math.isfinite(cli.model.last_metrics["all"]["rsum"])
    return cli.model

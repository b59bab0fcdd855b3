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

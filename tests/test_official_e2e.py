"""End to end: the golden inputs as a precomputed folder (test split + a vocabulary JSON whose ids are the golden
token ids) -> `zoo-import-checkpoint` on the golden official checkpoint -> `lightning test --config
recipes/<method>_f30k.yaml` -> the official recall arrays."""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datamodules.text import SPECIALS, Vocabulary, tokenize
from golden import golden_npz, golden_path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
UNK_WORD = "qqunknown"  # not in the vocabulary: encodes to <unk> = 3


def write_golden_folder(root: Path, g: dict, images: np.ndarray) -> Path:
    """{split}_ims.npy / {split}_caps.txt for every split from the golden inputs, and vocab.json: ids 0..3 the
    specials, id i >= 4 the word f"w{i}" -- so the zoo's tokenizer + vocabulary give back the golden ids."""
    root.mkdir(parents=True)
    n_words = 50
    vocab = Vocabulary.from_words(list(SPECIALS) + [f"w{i}" for i in range(4, n_words)])
    vocab.save(root / "vocab.json")
    lines = []
    for toks, n in zip(g["tokens"], g["lengths"]):
        ids = toks[:n].tolist()
        assert ids[0] == 1 and ids[-1] == 2
        lines.append(" ".join(UNK_WORD if i == 3 else vocab.idx2word[i] for i in ids[1:-1]))
    for split in ("train", "dev", "test"):
        np.save(root / f"{split}_ims.npy", images.astype(np.float32))
        (root / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")
    # the folder really serves the golden ids
    got = [vocab.encode(tokenize(line)) for line in lines]
    assert all(a == t[:n].tolist() for a, t, n in zip(got, g["tokens"], g["lengths"]))
    return root


def _metrics(logdir: Path) -> dict:
    rows = list(csv.DictReader(open(next(logdir.rglob("metrics.csv")))))
    return {k: float(v) for r in rows for k, v in r.items() if v not in ("", None)}


@pytest.mark.slow
@pytest.mark.parametrize("method,npz,ckpt,image_key,extra", [
    ("vsepp", "vsepp_tiny_golden.npz", "vsepp_tiny.pth.tar", "global_feats", ["--data.init_args.num_regions", "1"]),
    ("vse_infinity", "vseinf_tiny_golden.npz", "vseinf_tiny.pth.tar", "regions", []),
])
def test_import_then_lightning_test_gives_the_official_recalls(tmp_path, method, npz, ckpt, image_key, extra):
    g = golden_npz(npz)
    data = write_golden_folder(tmp_path / "golden_precomp", g, g[image_key])
    out = tmp_path / "imported.ckpt"
    imp = subprocess.run([str(BIN / "zoo-import-checkpoint"), method, str(golden_path(ckpt)), "--out", str(out),
                          "--vocab", str(data / "vocab.json")], capture_output=True, text=True, timeout=300)
    assert imp.returncode == 0, imp.stderr[-3000:]
    assert "lightning test" in imp.stdout
    test = subprocess.run([str(BIN / "lightning"), "test", "--config", str(ROOT / "recipes" / f"{method}_f30k.yaml"),
                           "--ckpt_path", str(out), "--data.init_args.root", str(data),
                           "--data.init_args.vocab_path", str(data / "vocab.json"),
                           "--data.init_args.feature_dim", "64", "--data.init_args.num_workers", "0",
                           "--data.init_args.eval_batch_size", "4", "--data.init_args.pin_memory", "false",
                           "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                           "--trainer.default_root_dir", str(tmp_path / "runs"),
                           "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                           "--trainer.logger.save_dir", str(tmp_path / "logs"), *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert test.returncode == 0, test.stderr[-3000:]
    m = _metrics(tmp_path / "logs")
    for d in ("i2t", "t2i"):
        got = [m[f"test/{d}_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr")]
        np.testing.assert_allclose(got, g[f"{d}_r1_r5_r10_medr_meanr"], rtol=1e-6, atol=1e-4)
    assert m["test/rsum"] == pytest.approx(float(g["rsum"]), abs=1e-3)

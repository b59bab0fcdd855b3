"""Pictures from checkpoints: CASC's word attention with its predicted labels (Figs. 4/6), CCCL's region context
scores (Fig. 6). Each model trains one step on a tiny SynthScenes, is saved, and is drawn from the checkpoint."""
from pathlib import Path

import lightning as L
import pytest
import torch

from zoo.tools import pictures
from zoo.cli import ZooCLI
from zoo.engine.module import RetrievalModule

ROOT = Path(__file__).resolve().parents[1]


def _train_and_save(recipe: str, root: Path, tmp_path: Path, extra=()) -> Path:
    shrink = ["--data.init_args.root", str(root), "--data.init_args.n_train", "20", "--data.init_args.n_dev", "4",
              "--data.init_args.n_test", "4", "--data.init_args.feature_dim", "16", "--data.init_args.num_regions", "5",
              "--data.init_args.num_workers", "0", "--data.init_args.vocab_min_count", "1",
              "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "4",
              "--model.init_args.feature_dim", "16", "--model.init_args.embed_dim", "8", "--model.init_args.word_dim", "4",
              *extra]
    cli = ZooCLI(RetrievalModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                 args=["--config", str(ROOT / "recipes" / recipe), *shrink])
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(cli.model, cli.datamodule)
    ckpt = tmp_path / f"{recipe}.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return tmp_path_factory.mktemp("pictures") / "ss"


def test_casc_attention_with_predicted_labels_from_a_checkpoint(synth, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    ckpt = _train_and_save("casc_synth.yaml", synth, tmp_path, ["--model.init_args.label_hidden", "8"])
    model = pictures.load_module(ckpt)
    assert type(model).__name__ == "CASC" and model.label_words  # the label dictionary came with the weights
    dm = pictures.datamodule_for(model, synth)
    top = pictures.predicted_labels(model, dm, image=1, k=5)
    assert len(top) == 5 and all(w in model.label_words for w, _ in top)
    scores = [s for _, s in top]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    fig = pictures.attention_figure(model, dm, image=1, caption=2, labels=5)
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert titles[-1] == "top-5 labels" and [t.get_text() for t in fig.axes[len(titles) - 1].get_yticklabels()] == \
        [w for w, _ in top][::-1]
    out = tmp_path / "att.png"
    pictures.main(["attention", "--ckpt", str(ckpt), "--root", str(synth), "--image", "1", "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="context"):
        pictures.context_figure(model, dm)


def test_cccl_context_scores_from_a_checkpoint(synth, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    ckpt = _train_and_save("cccl_synth.yaml", synth, tmp_path, ["--model.init_args.sim_dim", "4"])
    model = pictures.load_module(ckpt)
    assert type(model).__name__ == "CCCL"
    dm = pictures.datamodule_for(model, synth)
    batch = pictures._item_batch(dm, 2, 0)
    w = pictures.context_scores(model, batch)
    assert w.shape == (5, 5) and torch.allclose(w.sum(-1), torch.ones(5))
    # the weights are the CPC's own: CPC(Y) = alpha w V + Y (Eqs. 6-7; alpha the learned residual gain)
    visual = model.net.visual
    y = visual.cpc_input(batch["images"], batch["boxes"])
    with torch.no_grad():
        alpha = visual.cpc.alpha
        assert torch.allclose(visual.cpc(y)[0], alpha * (w @ visual.cpc.v(y)[0]) + y[0], atol=1e-6)
        assert torch.allclose(model.net.visual(batch["images"], batch["boxes"]), visual.cpc(y))
    fig = pictures.context_figure(model, dm, image=2)
    assert len(fig.axes) == 4 and fig.axes[0].get_title().startswith("context given")
    out = tmp_path / "ctx.png"
    pictures.main(["context", "--ckpt", str(ckpt), "--root", str(synth), "--image", "2", "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="context scores|attention"):
        pictures.attention_figure(model, dm)


def test_missing_boxes_and_checkpoint_are_clear_errors(tmp_path, tiny_data, capsys):
    with pytest.raises(SystemExit):  # one `error:` line (zoo.engine.errors.one_line_errors), no traceback
        pictures.main(["attention", "--ckpt", str(tmp_path / "nope.ckpt"), "--root", str(tiny_data)])
    assert "no such checkpoint" in capsys.readouterr().err

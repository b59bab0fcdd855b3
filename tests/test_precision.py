"""Mixed precision through every method (issue 19 item 4): scores come out float32 and bf16 manufactures no ties.

Each method's SynthScenes recipe is shrunk to a tiny model (conftest.fit_and_test_tiny) and its test split scored
twice, in float32 and under bf16 autocast. A method whose last layer or sigmoid ran in bf16 (SGRAF's sim_eval did
until this test) gives a handful of distinct scores per row: its trained scores lie in a band narrower than bf16's
spacing. The rsum agreement on trained checkpoints is measured, not asserted here: `python -m zoo.experiments.precision`
(README, Speed: "bf16 evaluation").
"""
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL_ARGS, fit_and_test_tiny, tiny_data_args
from zoo.engine.evaluation import cat_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]

RECIPES = ["casc_base_synth", "casc_synth", "cccl_synth", "sgraf_saf_synth", "sgraf_sgr_synth", "vsepp_synth",
           "vse_infinity_synth", "scan_t2i_lse_synth", "scan_i2t_avg_synth", "dan_synth", "smlstm_synth"]

EXTRA = {"sgraf_saf_synth": ["--model.init_args.num_regions", "4"],  # VisualSA's BatchNorm over the 36 regions
         "sgraf_sgr_synth": ["--model.init_args.num_regions", "4"]}


def _scores(model, dm, bf16: bool) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        batches = list(dm.test_dataloader())
        img = cat_embeddings([model.encode_images(b) for b in batches])
        cap = cat_embeddings([model.encode_captions(b) for b in batches])
        return model.score(img, cap)


@pytest.mark.parametrize("recipe", RECIPES)
def test_bf16_scores_are_float32_without_manufactured_ties(recipe, tmp_path):
    model = fit_and_test_tiny(recipe, tmp_path / "synth", EXTRA.get(recipe, ()))
    dm = model.trainer.datamodule
    full, half = _scores(model, dm, False), _scores(model, dm, True)
    assert half.dtype == torch.float32, recipe
    assert torch.isfinite(half).all()
    distinct_full = torch.tensor([row.unique().numel() for row in full]).float()
    distinct_half = torch.tensor([row.unique().numel() for row in half]).float()
    assert (distinct_half >= 0.9 * distinct_full).all(), (distinct_half, distinct_full)
    spread = full.std().clamp_min(1e-12)
    assert (full - half).abs().mean() < 0.05 * spread, ((full - half).abs().mean(), spread)


def test_precision_and_step_time_commands_run_on_a_tiny_recipe(tmp_path, capsys):
    """zoo.experiments.precision (bf16 vs fp32 on a checkpoint) and step_time (s/step through the fit loop)."""
    import lightning as L

    from zoo.experiments import precision, step_time

    shrink = tiny_data_args(tmp_path / "synth")
    recipe = str(ROOT / "recipes" / "casc_base_synth.yaml")
    assert step_time.main(["--config", recipe, *shrink, *TINY_MODEL_ARGS, "--steps", "3", "--skip", "1"]) == 0
    assert "CASCBase: " in capsys.readouterr().out
    model = fit_and_test_tiny("casc_base_synth", tmp_path / "synth")
    ckpt = tmp_path / "m.ckpt"
    model.trainer.save_checkpoint(ckpt)
    assert precision.main(["--config", recipe, "--ckpt", str(ckpt), *shrink]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert line[0] == str(ckpt) and abs(float(line[1]) - model.last_metrics["all"]["rsum"]) < 1e-3


def test_eval_fp32_encodes_in_float32_under_a_bf16_trainer(tmp_path):
    import lightning as L

    model = fit_and_test_tiny("cccl_synth", tmp_path / "synth")
    dm, want = model.trainer.datamodule, model.last_metrics["all"]["rsum"]
    seen = []
    real, real_score = model.encode_images, model.score

    def spy(batch):
        out = real(batch)
        seen.append(out["regions"].dtype)
        return out

    def score_spy(img, cap):
        seen.append("autocast" if torch.is_autocast_enabled("cpu") else "fp32")
        return real_score(img, cap)

    model.encode_images, model.score = spy, score_spy
    for eval_fp32, want_seen in ((False, {torch.bfloat16, "autocast"}), (True, {torch.float32, "fp32"})):
        model.eval_fp32, seen[:] = eval_fp32, []
        trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.test(model, dm, verbose=False)
        assert set(seen) == want_seen
    assert model.last_metrics["all"]["rsum"] == pytest.approx(want, abs=1e-6)

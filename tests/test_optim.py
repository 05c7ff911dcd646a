"""The optimizer choices train, and a run resumed from a step checkpoint is the run that
never stopped, to the last bit of every weight (8-bit moments and their block scales are
saved and loaded whole)."""

from __future__ import annotations

import json

import pytest
import torch

from embedrag.train.checkpoints import TENSORS_FILE
from tests.helpers import run_train, weights

ARGS = ["--finetune_type", "full", "--batch_size", "4", "--epochs", "2", "--save_steps", "4",
        "--save_on_epoch_end", "0", "--lr", "1e-3"]


@pytest.mark.parametrize("optim", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_adamw_trains_and_resumes_exactly(tiny_decoder, learnable_data, tmp_path, optim):
    whole = tmp_path / "whole"
    assert run_train(tiny_decoder, learnable_data, whole, *ARGS, "--optim", optim)[0] == 0
    epochs = json.loads((whole / "training_losses.json").read_text())
    assert epochs[1]["mean_loss"] < epochs[0]["mean_loss"] - 0.2
    # bitsandbytes' 8-bit moments: uint8 codes for the weight matrices (>= 4096 values)
    saved = torch.load(whole / "checkpoint-step-8" / TENSORS_FILE, weights_only=True)
    codes = [s["__bnb_optimizer_quant_state__"]["state1"].dtype
             for s in saved["optimizer"]["state"].values()]
    assert torch.uint8 in codes and torch.float32 in codes  # small tensors keep 32 bits
    resumed = tmp_path / "resumed"
    assert run_train(tiny_decoder, learnable_data, resumed, *ARGS, "--optim", optim,
                     "--resume_from_checkpoint", str(whole / "checkpoint-step-8"))[0] == 0
    final, again = weights(whole / "final"), weights(resumed / "final")
    assert final.keys() == again.keys()
    for name, tensor in final.items():
        assert torch.equal(tensor, again[name]), name


def test_the_optimizer_is_part_of_the_job(tiny_decoder, learnable_data, tmp_path, capsys):
    """Moments in 8 bits are other numbers: resuming with another optimizer is refused."""
    out = tmp_path / "o"
    assert run_train(tiny_decoder, learnable_data, out, *ARGS, "--max_steps", "4")[0] == 0
    capsys.readouterr()
    code = run_train(tiny_decoder, learnable_data, tmp_path / "other", *ARGS, "--optim",
                     "adamw_8bit", "--resume_from_checkpoint", str(out / "checkpoint-step-4"))[0]
    assert code == 2 and "--optim 'adamw' -> 'adamw_8bit'" in capsys.readouterr().err

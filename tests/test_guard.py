"""A non-finite loss between logging steps: the device skips the step and every later one,
and the loop, reading the flag only at its next logging step, stops with exactly the state
that reading it at every step would have saved."""

from __future__ import annotations

import json

import pytest
import torch

from embedrag import losses
from embedrag.train import guard
from embedrag.train.checkpoints import STATE_FILE, TENSORS_FILE
from tests.helpers import run_train, weights


def _nan_at(monkeypatch, step: int) -> None:
    real, calls = losses.embedding_loss, [0]

    def nan_loss(*args, **kwargs):
        calls[0] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls[0] == step else value

    monkeypatch.setattr(losses, "embedding_loss", nan_loss)


def _stopped(out, capsys):
    state = json.loads((out / "checkpoint-step-4" / STATE_FILE).read_text())["state"]
    state.pop("elapsed_s")
    tensors = torch.load(out / "checkpoint-step-4" / TENSORS_FILE, weights_only=False)
    logged = [r["step"] for r in json.loads((out / "detailed_training_logs.json").read_text())]
    return state, tensors, weights(out / "checkpoint-step-4"), logged, capsys.readouterr().err


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_a_nan_between_logging_steps_stops_with_the_state_before_it(
        tiny_decoder, learnable_data, tmp_path, monkeypatch, capsys, finetune):
    args = ["--finetune_type", finetune, "--logging_steps", "4", "--save_on_epoch_end", "0"]
    _nan_at(monkeypatch, 5)
    assert run_train(tiny_decoder, learnable_data, tmp_path / "deferred", *args)[0] == 3
    deferred = _stopped(tmp_path / "deferred", capsys)
    _nan_at(monkeypatch, 5)  # again, and now the flag is read at every step
    monkeypatch.setattr(guard, "can_skip_on_device", lambda optimizer: False)
    assert run_train(tiny_decoder, learnable_data, tmp_path / "each", *args)[0] == 3
    each = _stopped(tmp_path / "each", capsys)
    assert "not finite at step 5 (epoch 1)" in deferred[4] and "not finite at step 5" in each[4]
    assert deferred[0] == each[0] and deferred[0]["step"] == 4     # position, sums, counters
    assert deferred[3] == each[3] == [4]                           # steps logged
    for name, tensor in each[2].items():                           # weights
        assert torch.equal(deferred[2][name], tensor), name
    opt_d, opt_e = deferred[1]["optimizer"], each[1]["optimizer"]  # moments and step counts
    assert opt_d["param_groups"] == opt_e["param_groups"]          # learning rates included
    for i, slots in opt_e["state"].items():
        for key, value in slots.items():
            assert torch.equal(opt_d["state"][i][key], value), (i, key)
    assert deferred[1]["scheduler"] == each[1]["scheduler"]

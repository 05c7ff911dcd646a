"""Log records queued on the device and read back in bulk are the records read one by one."""

from __future__ import annotations

import json

from embedrag.train import progress
from tests.helpers import run_train

TIMING = ("samples_per_second", "elapsed_s")


def _records(path):
    logged = json.loads((path / "detailed_training_logs.json").read_text())
    return [{k: v for k, v in r.items() if k not in TIMING} for r in logged]


def test_records_read_back_in_bulk_are_those_read_at_every_step(
        tiny_decoder, learnable_data, tmp_path, monkeypatch):
    args = ["--max_steps", "11", "--epochs", "2", "--gte_negatives", "1", "--matryoshka_dims",
            "64,32", "--save_steps", "4"]  # a loss with parts; flushes at checkpoints too
    assert run_train(tiny_decoder, learnable_data, tmp_path / "bulk", *args)[0] == 0
    monkeypatch.setattr(progress, "READ_EVERY", 1)
    assert run_train(tiny_decoder, learnable_data, tmp_path / "each", *args)[0] == 0
    bulk, each = _records(tmp_path / "bulk"), _records(tmp_path / "each")
    assert [r["step"] for r in bulk] == list(range(1, 12))
    assert bulk == each and {"loss_infonce", "grad_norm", "tokens"} <= set(bulk[0])
    assert len({r["tokens"] for r in bulk}) == 11  # counted per step, not per read
    summary = json.loads((tmp_path / "bulk" / "training_summary_report.json").read_text())
    assert summary["final_loss"] == bulk[-1]["loss"]

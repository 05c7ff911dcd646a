"""The FLOP count behind the MFU figure, against a count by hand."""

import json

import pytest
import torch

from embedrag.hardware import flops_per_token, matmul_parameters, matmul_peak_flops
from tests.helpers import run_train


def test_matmul_parameters_and_flops_by_hand(tiny_decoder):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_decoder)
    # per block: q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down 128x64 (2 blocks)
    per_block = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    assert matmul_parameters(model) == 2 * per_block
    attention = 4 * 2 * 64 * 10  # 4 * layers * hidden * length
    assert flops_per_token(model, model.config, True, 10) == 3 * (2 * 2 * per_block + attention)
    assert flops_per_token(model, model.config, False, 10) == 2 * (2 * 2 * per_block + attention)


def test_peak_is_a_real_measurement():
    peak = matmul_peak_flops(torch.device("cpu"), torch.float32, largest=256, seconds=0.2)
    assert 1e8 < peak < 1e14


def test_summary_reports_mfu(tiny_decoder, learnable_data, tmp_path):
    assert run_train(tiny_decoder, learnable_data, tmp_path / "o", "--finetune_type", "lora",
                     "--max_steps", "2", "--save_on_epoch_end", "0")[0] == 0
    t = json.loads((tmp_path / "o" / "training_summary_report.json").read_text())["throughput"]
    assert 0 < t["mfu"] < 1 and t["peak_dtype"] == "float32"
    assert t["mfu"] == pytest.approx(t["achieved_tflops"] / t["peak_tflops"])

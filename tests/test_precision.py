"""--mixed_precision auto: measured, cached per machine and shape, the same on every process."""

import json
import math

import pytest
import torch

from embedrag.config import TrainConfig
from embedrag.train import precision
from tests.helpers import run_train


def _cfg(model, **overrides):
    cfg = TrainConfig(model_name_or_path=model, train_dataset=["x.jsonl"], output_dir="out",
                      batch_size=4, neg_nums=2, passage_max_len=64, finetune_type="full")
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDRAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "native_bf16", lambda device=None: True)
    return tmp_path / "cache" / "precision.json"


def _timings(monkeypatch, fp32, bf16):
    calls = []

    def fake(cfg, device):
        calls.append(cfg.passage_max_len)
        return {"fp32": fp32, "bf16": bf16}

    monkeypatch.setattr(precision, "measure", fake)
    return calls


def test_the_faster_precision_wins_and_is_cached_per_shape(tiny_encoder, cache, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_encoder)
    device = torch.device("cpu")
    calls = _timings(monkeypatch, fp32=0.30, bf16=0.20)
    first = precision.choose(_cfg(tiny_encoder), config, device)
    assert first["choice"] == "bf16" and "measured now" in first["reason"]
    assert json.loads(cache.read_text())  # written where EMBEDRAG_CACHE says
    # The same machine and shape: answered from the cache, even if the machine now says other.
    _timings(monkeypatch, fp32=0.10, bf16=0.20)
    again = precision.choose(_cfg(tiny_encoder), config, device)
    assert again["choice"] == "bf16" and "cached" in again["reason"]
    # Another shape (longer passages) is measured afresh, and here fp32 is faster.
    calls = _timings(monkeypatch, fp32=0.10, bf16=0.20)
    other = precision.choose(_cfg(tiny_encoder, passage_max_len=128), config, device)
    assert other["choice"] == "no" and calls == [128]
    assert len(json.loads(cache.read_text())) == 2


def test_without_native_bf16_fp32_is_chosen_unmeasured(tiny_encoder, cache, monkeypatch):
    from transformers import AutoConfig

    monkeypatch.setattr(precision, "native_bf16", lambda device=None: False)
    calls = _timings(monkeypatch, fp32=1.0, bf16=0.1)
    found = precision.choose(_cfg(tiny_encoder), AutoConfig.from_pretrained(tiny_encoder),
                             torch.device("cpu"))
    assert found["choice"] == "no" and calls == [] and not cache.exists()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_the_probe_times_one_layer_of_the_model_as_it_trains(tiny_decoder, kind, monkeypatch):
    built = []
    real = precision.probe_layer

    def spy(cfg, device):
        built.append(real(cfg, device))
        return built[-1]

    monkeypatch.setattr(precision, "probe_layer", spy)
    seconds = precision.measure(_cfg(tiny_decoder, finetune_type=kind), torch.device("cpu"))
    assert set(seconds) == {"fp32", "bf16"}
    assert all(0 < s < math.inf for s in seconds.values())
    assert [m.config.num_hidden_layers for m in built] == [1, 1]
    if kind == "lora":  # the frozen base in its compute dtype, as load_backbone holds it
        assert {p.dtype for p in built[1].parameters()} == {torch.bfloat16}
        assert not any(p.requires_grad for m in built for p in m.parameters())
    else:
        assert all(p.grad is None for m in built for p in m.parameters())  # zeroed after


def test_auto_on_a_gpu_is_bf16_with_tf32_where_it_runs_natively(tiny_encoder, cache,
                                                                  monkeypatch):
    from transformers import AutoConfig

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    calls = _timings(monkeypatch, fp32=0.1, bf16=1.0)  # a GPU is not measured
    config, cuda = AutoConfig.from_pretrained(tiny_encoder), torch.device("cuda", 0)
    found = precision.choose(_cfg(tiny_encoder), config, cuda)
    assert (found["choice"], found.get("tf32")) == ("bf16", True) and calls == []
    assert "NVIDIA H200" in found["reason"]
    monkeypatch.setattr(precision, "native_bf16", lambda device=None: False)  # a V100
    assert precision.choose(_cfg(tiny_encoder), config, cuda)["choice"] == "no"


@pytest.mark.parametrize(("value", "expected"), [("bf16", "bf16"), ("fp16", "fp16"),
                                                 ("no", None), ("NO", None)])
def test_the_accelerate_configs_precision_wins_over_auto(monkeypatch, value, expected):
    """accelerate launch exports the config's mixed_precision; its "no" is also what a config
    that never chose says, so only bf16 and fp16 decide."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", value)
    assert precision.from_launcher() == expected


def test_auto_is_the_default():
    from embedrag.train.checks import build_parser

    args = build_parser().parse_args(["--model_name_or_path", "m", "--train_dataset", "d",
                                      "--output_dir", "o", "--batch_size", "4"])
    assert args.mixed_precision == "auto"


def test_a_run_says_and_records_what_auto_chose(tiny_decoder, learnable_data, tmp_path, cache,
                                                monkeypatch, capsys):
    _timings(monkeypatch, fp32=0.2, bf16=0.3)
    code, summary, _ = run_train(tiny_decoder, learnable_data, tmp_path / "out",
                                 "--finetune_type", "lora", "--max_steps", "1",
                                 "--save_on_epoch_end", "0", "--mixed_precision", "auto")
    assert code == 0
    chosen = summary["embedding"]["precision_auto"]
    assert chosen["choice"] == "no" and chosen["bf16_seconds"] == 0.3
    assert summary["embedding"]["base_dtype"] == "float32"
    assert "precision: fp32 (auto: " in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "final" / "training_config.json").read_text())
    assert saved["mixed_precision"] == "no"


def _autocast_of_another_device(monkeypatch):
    """Accelerate's autocast as on a CUDA machine: torch.autocast("cuda"), which leaves every
    CPU operation in its own dtype (on a machine without CUDA it is off altogether)."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "autocast",
                        lambda self, *a, **k: torch.autocast("cuda", dtype=torch.bfloat16,
                                                             enabled=False))


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_bf16_forwards_run_under_the_autocast_of_the_models_device(
        tiny_decoder, learnable_data, tmp_path, monkeypatch, finetune):
    """The trace forward before `prepare` and in-training evaluation ran under the
    accelerator's autocast; where that is another device's (a model still on the CPU on a
    CUDA machine), a bf16 base met fp32 LoRA weights: 'expected m1 and m2 to have the same
    dtype' at the first forward. They now run under the autocast of the device the model is
    on, and the run trains as it does without the patch."""
    _autocast_of_another_device(monkeypatch)
    code, summary, _ = run_train(tiny_decoder, learnable_data, tmp_path / "out",
                                 "--finetune_type", finetune, "--mixed_precision", "bf16",
                                 "--max_steps", "2", "--eval_dataset", learnable_data)
    assert code == 0
    assert math.isfinite(summary["final_loss"])
    assert all(math.isfinite(m["after"]) for m in summary["eval"]["metrics"].values())


def test_a_gpu_decision_turns_tf32_on_and_says_so(tiny_decoder, learnable_data, tmp_path,
                                                 monkeypatch, capsys):
    """What `auto` decides on a GPU reaches the run: TF32 switched on, bf16 autocast, and
    QLoRA-style bf16 bases for LoRA; the log names the reason."""
    from embedrag.train import setup

    switched = []
    monkeypatch.setattr(setup, "resolve_precision", lambda cfg, config, state: {
        "choice": "bf16", "tf32": True, "reason": "NVIDIA H200 runs bf16 natively"})
    monkeypatch.setattr(setup, "allow_tf32", lambda: switched.append(True))
    code, summary, _ = run_train(tiny_decoder, learnable_data, tmp_path / "out",
                                 "--max_steps", "1", "--mixed_precision", "auto")
    assert code == 0 and switched == [True]
    assert summary["embedding"]["base_dtype"] == "bfloat16"
    assert "precision: bf16 autocast (auto: NVIDIA H200 runs bf16 natively)" in \
        capsys.readouterr().out

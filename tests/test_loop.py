"""End to end on the tiny decoder: lora, qlora 4/8-bit and full, 2 epochs each."""

import json
import os
import subprocess
import sys

import pytest
import torch

from embedrag.model.embedding import EmbeddingModel
from embedrag.model.tokens import load_tokenizer
from tests.helpers import ROOT, run_train

PROBES = ["apple banana", "the river near the zebra tiger", "xenon", "violet walnut quartz"]
STEP_KEYS = {"step", "epoch", "loss", "learning_rate", "grad_norm", "samples_per_second",
             "tokens", "elapsed_s"}
KINDS = {"lora": ["--finetune_type", "lora"],
         "qlora4": ["--finetune_type", "qlora", "--quantization_bits", "4"],
         "qlora8": ["--finetune_type", "qlora", "--quantization_bits", "8"],
         "full": ["--finetune_type", "full"]}


def _quantization(kind):
    from transformers import BitsAndBytesConfig

    if kind == "qlora4":
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32), "device_map": {"": "cpu"}}
    if kind == "qlora8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True),
                "device_map": {"": "cpu"}}
    return {}


@pytest.fixture(scope="module", params=list(KINDS))
def trained(request, tiny_decoder, learnable_data, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"out_{request.param}")
    code, summary, model = run_train(tiny_decoder, learnable_data, out, *KINDS[request.param])
    assert code == 0
    return request.param, out, summary, model.eval()


def test_output_layout_and_log_schema(trained):
    kind, out, summary, _ = trained
    final = os.listdir(out / "final")
    if kind == "full":
        assert "model.safetensors" in final and "adapter_config.json" not in final
    else:
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(final)
    assert {"training_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(final)
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in final)
    for epoch in (1, 2):  # the same files, but the curves of the whole run
        assert sorted(os.listdir(out / f"checkpoint-epoch-{epoch}")) == sorted(
            set(final) - {"training_curves.png"})
    steps = json.loads((out / "detailed_training_logs.json").read_text())
    assert len(steps) == 12 and all(set(r) == STEP_KEYS for r in steps)
    assert [r["step"] for r in steps] == list(range(1, 13))
    epochs = json.loads((out / "training_losses.json").read_text())
    assert [set(r) for r in epochs] == [{"epoch", "mean_loss"}] * 2
    report = json.loads((out / "training_summary_report.json").read_text())
    assert report["world_size"] == 1 and report["totals"]["steps"] == 12
    assert report["totals"]["samples"] == 48 and report["final_loss"] == steps[-1]["loss"]
    assert report["trainable_params"] < report["total_params"] or kind == "full"
    config = json.loads((out / "final" / "training_config.json").read_text())
    assert config["pooling"] == "last" and config["append_eos"] is True
    assert config["finetune_type"] == ("qlora" if kind.startswith("qlora") else kind)


def test_epoch_loss_falls(trained):
    _, out, _, _ = trained
    epochs = json.loads((out / "training_losses.json").read_text())
    assert epochs[1]["mean_loss"] < epochs[0]["mean_loss"] - 0.2


def test_what_trains_and_what_stays(trained, tiny_decoder):
    """lora/qlora: every base weight equals a fresh load of the base, every adapter weight moved
    from its seeded initial value; full: every weight moved."""
    from accelerate.utils import set_seed
    from transformers import AutoModel

    kind, _, _, model = trained
    fresh = dict(AutoModel.from_pretrained(tiny_decoder, **_quantization(kind)).named_parameters())
    trained_params = dict(model.backbone.named_parameters())
    if kind == "full":
        assert set(trained_params) == set(fresh)
        for name, p in trained_params.items():
            assert not torch.equal(p, fresh[name]), f"{name} did not change"
        return
    from embedrag.config import TrainConfig
    from embedrag.model.loading import ModelSettings, load_backbone

    set_seed(7)
    cfg = TrainConfig(model_name_or_path=tiny_decoder, train_dataset="", output_dir="",
                      batch_size=4, finetune_type="lora" if kind == "lora" else "qlora",
                      quantization_bits=8 if kind == "qlora8" else 4, lora_r=4, lora_alpha=8)
    backbone, _ = load_backbone(ModelSettings.from_config(cfg), torch.device("cpu"))
    initial = dict(backbone.named_parameters())
    adapters = [n for n in trained_params if "lora_" in n]
    assert len(adapters) == 2 * 7 * 2  # A and B of 7 linear layers in each of 2 blocks
    for name in adapters:
        assert trained_params[name].requires_grad
        assert not torch.equal(trained_params[name], initial[name]), f"{name} did not change"
    base = [n for n in trained_params if "lora_" not in n]
    assert len(base) == len(fresh)
    for name in base:
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(trained_params[name].data, fresh[plain].data), f"{name} changed"
        assert not trained_params[name].requires_grad


def test_saved_model_reloads_and_embeds_as_in_training(trained, tiny_decoder):
    from peft import PeftModel
    from transformers import AutoModel

    kind, out, _, model = trained
    tok = load_tokenizer(str(out / "final"))
    kwargs = {"max_len": 64, "append_eos": True}
    in_training = model.encode(tok, PROBES, **kwargs)
    if kind == "full":
        backbone = AutoModel.from_pretrained(out / "final")
    else:
        base = AutoModel.from_pretrained(tiny_decoder, **_quantization(kind))
        backbone = PeftModel.from_pretrained(base, out / "final")
    reloaded = EmbeddingModel(backbone, "last").eval()
    for module in reloaded.modules():  # quantized layers compute as in training (see
        if type(module).__module__.startswith("bitsandbytes"):  # match_training_kernels)
            module.train()
    reloaded = reloaded.encode(tok, PROBES, **kwargs)
    assert (in_training - reloaded).abs().max().item() < 1e-5
    untrained = EmbeddingModel(AutoModel.from_pretrained(tiny_decoder), "last").eval()
    assert (untrained.encode(tok, PROBES, **kwargs) - in_training).abs().max().item() > 1e-3


def test_tensorboard_events_hold_the_loss_curve(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _, _ = trained
    runs = out / "runs"
    acc = EventAccumulator(str(runs))
    acc.Reload()
    events = acc.Scalars("train/loss")
    steps = json.loads((out / "detailed_training_logs.json").read_text())
    assert [e.step for e in events] == [r["step"] for r in steps]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert {"train/learning_rate", "train/grad_norm", "train/epoch_mean_loss"} <= set(
        acc.Tags()["scalars"])


def test_cli_refuses_finished_output_and_max_steps_stops_early(cli_run):
    out, done = cli_run  # train.py run as a command, --max_steps 3 of 2 epochs x 2 steps
    assert len(json.loads((out / "detailed_training_logs.json").read_text())) == 3
    assert sorted(os.listdir(out)) == sorted(
        ["final", "runs", "detailed_training_logs.json", "training_losses.json",
         "training_summary_report.json", "training_curves.png", "checkpoint-epoch-1",
         "checkpoint-step-3"])
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out)}
    again = subprocess.run([sys.executable, *done.args[1:]], cwd=ROOT,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                           text=True)
    assert again.returncode == 2 and "not empty" in again.stderr
    assert "Traceback" not in again.stderr
    assert before == {f: os.path.getmtime(out / f) for f in os.listdir(out)}


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "adapter_model.safetensors"))


def test_gradient_checkpointing_trains_the_same_weights(tiny_decoder, learnable_data, tmp_path):
    """Recomputing activations (dropout replayed from the saved RNG state) changes nothing."""
    args = ["--finetune_type", "lora", "--max_steps", "4", "--save_on_epoch_end", "0"]
    assert run_train(tiny_decoder, learnable_data, tmp_path / "plain", *args)[0] == 0
    code, _, model = run_train(tiny_decoder, learnable_data, tmp_path / "ckpt", *args,
                               "--gradient_checkpointing")
    assert code == 0 and model.backbone.get_base_model().is_gradient_checkpointing
    plain, ckpt = _adapter(tmp_path / "plain"), _adapter(tmp_path / "ckpt")
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6), name


def test_bf16_autocast_tracks_fp32(tiny_decoder, learnable_data, tmp_path):
    """bf16 autocast: same per-step losses as fp32 to bf16 precision, fp32 adapter weights."""
    args = ["--finetune_type", "lora", "--max_steps", "3", "--save_on_epoch_end", "0",
            "--lora_dropout", "0"]
    run_train(tiny_decoder, learnable_data, tmp_path / "fp32", *args)
    _, summary, model = run_train(tiny_decoder, learnable_data, tmp_path / "bf16", *args,
                                  "--mixed_precision", "bf16")
    losses = [[r["loss"] for r in json.loads((tmp_path / d / "detailed_training_logs.json")
                                             .read_text())] for d in ("fp32", "bf16")]
    assert losses[0] != losses[1]  # autocast really ran
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
    assert summary["embedding"]["base_dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_schedule_warms_up_and_decays_without_a_zero_step():
    from embedrag.train.optim import linear_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_schedule(opt, warmup=2, total=5)
    rates = []
    for _ in range(5):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert rates == pytest.approx([1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3])


def test_one_step_run_trains(tiny_decoder, learnable_data, tmp_path):
    code, _, model = run_train(tiny_decoder, learnable_data, tmp_path / "o", "--finetune_type",
                               "lora", "--max_steps", "1", "--save_on_epoch_end", "0")
    assert code == 0
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_a_margin_that_drops_most_candidates_is_reported(tiny_decoder, learnable_data,
                                                          tmp_path, capsys):
    """A first step whose score margin dropped most in-batch candidates gets a one-line note;
    without the margin nothing is said."""
    for margin, said in (("2.0", True), ("-1", False)):
        code, _, _ = run_train(tiny_decoder, learnable_data, tmp_path / margin, "--epochs", "1",
                               "--max_steps", "1", "--false_negative_margin", margin)
        out = capsys.readouterr().out
        assert code == 0
        assert ("note: --false_negative_margin 2.0 dropped 100% of the in-batch candidates"
                in out) == said, out
        assert ("false_negative_margin" in out) == said


def test_overwrite_replaces_only_run_files_and_never_inputs(tiny_decoder, learnable_data,
                                                             tmp_path):
    out = tmp_path / "o"
    args = ["--finetune_type", "lora", "--max_steps", "1", "--save_on_epoch_end", "0"]
    assert run_train(tiny_decoder, learnable_data, out, *args)[0] == 0
    (out / "notes.txt").write_text("mine")
    assert run_train(tiny_decoder, learnable_data, out, *args, "--overwrite_output_dir")[0] == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "final").is_dir()
    data_inside = out / "train.jsonl"
    data_inside.write_text(open(learnable_data).read())
    assert run_train(tiny_decoder, str(data_inside), out, *args, "--overwrite_output_dir")[0] == 2
    assert data_inside.exists()


def test_encoder_mean_pooling_and_lengths_clamped_to_the_model(tiny_encoder, learnable_data,
                                                               tmp_path):
    out = tmp_path / "o"
    code, _, model = run_train(tiny_encoder, learnable_data, out, "--finetune_type", "full",
                               "--pooling", "mean", "--passage_max_len", "4096")
    assert code == 0
    config = json.loads((out / "final" / "training_config.json").read_text())
    assert config["passage_max_len"] == 128 and config["append_eos"] is False
    epochs = json.loads((out / "training_losses.json").read_text())
    assert epochs[1]["mean_loss"] < epochs[0]["mean_loss"]


def test_quantized_weights_go_to_this_process_gpu(monkeypatch):
    from embedrag.model.loading import quantized_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert quantized_device(torch.device("cuda")) == 3
    assert quantized_device(torch.device("cuda", 1)) == 1
    assert quantized_device(torch.device("cpu")) == "cpu"


def test_attention_dropout_flag_sets_the_models_config(tiny_encoder, learnable_data, tmp_path):
    args = ["--finetune_type", "full", "--pooling", "mean", "--max_steps", "1",
            "--save_on_epoch_end", "0"]
    _, _, kept = run_train(tiny_encoder, learnable_data, tmp_path / "a", *args)
    assert kept.backbone.config.attention_probs_dropout_prob == 0.1  # BERT's own
    _, _, off = run_train(tiny_encoder, learnable_data, tmp_path / "b", *args,
                          "--attention_dropout", "0")
    assert off.backbone.config.attention_probs_dropout_prob == 0.0
    assert off.backbone.config.hidden_dropout_prob == 0.1  # other dropout untouched


def test_the_model_card_code_embeds_as_training(trained):
    """For every kind: QLoRA's snippets load the base quantized as in training and keep
    bitsandbytes' CPU kernels on the training path (more settings: tests/test_card.py)."""
    from tests.test_card import snippet_differences

    _, out, _, _ = trained
    assert max(snippet_differences(out / "final")) < 1e-5


# What makes the host wait for a device: reading a tensor's value on the host.
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")


def _count_host_reads(monkeypatch, gpu_attention="kernel"):
    """Count READS made inside optimizer steps, the way they would reach a GPU: not while the
    loader draws and collates a batch (host tensors there), not where the loop reads the
    device on purpose (`Progress.flush`, the end of an epoch or of the run), not inside the
    stand-in for the CUDA attention kernel."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    from embedrag.model import varlen
    from embedrag.train import loop, progress
    from tests import packed

    state = {"on": False, "reads": [], "steps": 0}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if state["on"]:
                state["reads"].append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def paused(fn):
        def inner(*args, **kwargs):
            was, state["on"] = state["on"], False
            try:
                return fn(*args, **kwargs)
            finally:
                state["on"] = was
        return inner

    real_fb = loop.forward_backward

    def forward_backward(*args, **kwargs):
        state["on"], state["steps"] = True, state["steps"] + 1
        return real_fb(*args, **kwargs)

    monkeypatch.setattr(loop, "forward_backward", forward_backward)
    for owner, name in ((progress.Progress, "flush"), (loop, "end_epoch"), (loop, "finish"),
                        (_BaseDataLoaderIter, "__init__"), (_BaseDataLoaderIter, "__next__")):
        monkeypatch.setattr(owner, name, paused(getattr(owner, name)))
    if gpu_attention:  # packed rows through the varlen attention (its kernel a CPU stand-in,
        # or its grouped fallback, as for fp32 on a GPU)
        monkeypatch.setattr(varlen, "install", lambda model, device: {} if not varlen.use(model)
                            else {"varlen_attention": True})
        monkeypatch.setattr(varlen, "varlen_attn", paused(packed.reference_varlen))
        monkeypatch.setattr(varlen, "supports", lambda query: gpu_attention == "kernel")
    return state


@pytest.mark.parametrize(("attention", "extra"), [
    ("kernel", []),
    ("kernel", ["--grad_cache_chunk_size", "4", "--gradient_accumulation_steps", "2"]),
    ("kernel", ["--finetune_type", "full", "--max_grad_norm", "0", "--logging_steps", "3"]),
    ("grouped", [])], ids=["lora", "grad_cache+accumulation", "full", "grouped fallback"])
def test_no_host_reads_inside_a_step(tiny_decoder, learnable_data, tmp_path, monkeypatch,
                                     attention, extra):
    """On a GPU each of these reads waits for the device to finish its queue. Token counts,
    losses and the non-finite flag stay on the device and are read back together every 10
    steps, at checkpoints and at epoch ends (`Progress.flush`), though a record is logged at
    every step; packing takes the texts' lengths from the collator, on the host, and so does
    the varlen attention's grouped fallback (fp32 on a GPU)."""
    state = _count_host_reads(monkeypatch, attention)
    code, summary, _ = run_train(tiny_decoder, learnable_data, tmp_path / "out", "--cpu_kernels",
                                 "off", "--max_steps", "12", "--epochs", "3", *extra)
    assert code == 0 and summary["embedding"].get("varlen_attention")
    assert summary["totals"]["padding_share"] == 0  # packed: no padding computed
    assert state["steps"] >= 12 and state["reads"] == []
    logged = json.loads((tmp_path / "out" / "detailed_training_logs.json").read_text())
    every = 3 if "--logging_steps" in extra else 1
    assert [r["step"] for r in logged] == list(range(every, summary["totals"]["steps"] + 1,
                                                     every))


def test_the_read_count_sees_reads_inside_a_step(tiny_decoder, learnable_data, tmp_path,
                                                 monkeypatch):
    """The count is not blind: without an attention that packs (transformers' own SDPA on a
    CPU with --cpu_kernels off), length buckets read each batch's mask on the host."""
    state = _count_host_reads(monkeypatch, gpu_attention=False)
    assert run_train(tiny_decoder, learnable_data, tmp_path / "out", "--cpu_kernels", "off",
                     "--max_steps", "4")[0] == 0
    assert state["reads"].count("numpy") >= 8  # queries and passages, every step

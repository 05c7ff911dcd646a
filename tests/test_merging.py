"""merge.py: exact merges of LoRA and QLoRA adapters, sentence-transformers export, refusals."""

import json
import os
import subprocess
import sys

import pytest
import torch

import merge as merge_script
from embedrag.merging import PROBES
from embedrag.modeling import EmbeddingModel, load_tokenizer
from tests.conftest import ROOT
from tests.test_trainer import run_train

ADAPTERS = {"lora": ["--finetune_type", "lora"],
            "qlora4": ["--finetune_type", "qlora", "--quantization_bits", "4"],
            "qlora8": ["--finetune_type", "qlora", "--quantization_bits", "8"],
            "lora_mean": ["--finetune_type", "lora", "--pooling", "mean"]}


@pytest.fixture(scope="module")
def adapters(tiny_decoder, learnable_data, tmp_path_factory):
    out = {}
    for name, args in ADAPTERS.items():
        path = tmp_path_factory.mktemp(f"adapter_{name}")
        code, _, _ = run_train(tiny_decoder, learnable_data, path, *args, "--max_steps", "6",
                               "--save_on_epoch_end", "0")
        assert code == 0
        out[name] = path / "final"
    return out


def peft_reference(base_path, adapter, dtype=torch.float32):
    """Embeddings of base + adapter through PEFT, computed independently of merge.py."""
    from peft import PeftModel
    from transformers import AutoModel

    config = json.loads((adapter / "training_config.json").read_text())
    tok = load_tokenizer(str(adapter))
    base = AutoModel.from_pretrained(base_path, dtype=dtype)
    model = EmbeddingModel(PeftModel.from_pretrained(base, str(adapter)), config["pooling"]).eval()
    plain = EmbeddingModel(AutoModel.from_pretrained(base_path, dtype=dtype),
                           config["pooling"]).eval()
    kw = {"max_len": 128, "append_eos": config["append_eos"]}
    return model.encode(tok, PROBES, **kw), plain.encode(tok, PROBES, **kw)


def merged_embeddings(path, dtype=torch.float32):
    """Embeddings from the merged folder with plain transformers: AutoModel + its tokenizer."""
    from transformers import AutoModel

    config = json.loads((path / "training_config.json").read_text())
    model = EmbeddingModel(AutoModel.from_pretrained(path, dtype=dtype), config["pooling"]).eval()
    return model.encode(load_tokenizer(str(path)), PROBES, max_len=128,
                        append_eos=config["append_eos"])


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_merged_equals_base_plus_adapter(name, adapters, tiny_decoder, tmp_path):
    out = tmp_path / "merged"
    assert merge_script.main(["--base_model_path", tiny_decoder, "--lora_adapter_path",
                              str(adapters[name] / "adapter_model.safetensors"),
                              "--output_path", str(out)]) == 0
    want, base_only = peft_reference(tiny_decoder, adapters[name])
    got = merged_embeddings(out)
    assert (got - want).abs().max().item() < 1e-5
    assert (got - base_only).abs().max().item() > 1e-3  # the merge really changed the model
    assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(out))


def test_bfloat16_merge_within_documented_tolerance(adapters, tiny_decoder, tmp_path):
    from embedrag.merging import TOLERANCE

    out = tmp_path / "merged"
    assert merge_script.main(["--base_model_path", tiny_decoder, "--lora_adapter_path",
                              str(adapters["lora"]), "--output_path", str(out),
                              "--training_precision", "bfloat16"]) == 0
    want, _ = peft_reference(tiny_decoder, adapters["lora"], torch.bfloat16)
    got = merged_embeddings(out, torch.bfloat16)
    assert (got - want).abs().max().item() < TOLERANCE["bfloat16"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("name", ["lora", "lora_mean"])
def test_sentence_transformers_embeds_as_training(name, adapters, tiny_decoder, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "merged"
    assert merge_script.main(["--base_model_path", tiny_decoder, "--lora_adapter_path",
                              str(adapters[name]), "--output_path", str(out)]) == 0
    want, _ = peft_reference(tiny_decoder, adapters[name])
    st = SentenceTransformer(str(out), device="cpu")
    got = st.encode(PROBES, convert_to_tensor=True, batch_size=4)
    assert (got.cpu() - want).abs().max().item() < 1e-5


def _fail(args, capsys, message, code=2):
    assert merge_script.main(args) == code
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("merge.py")]
    assert len(ours) == 1 and message in ours[0] and "Traceback" not in err, err


def test_refusals_write_nothing(adapters, tiny_decoder, tiny_encoder, tmp_path, capsys):
    out = tmp_path / "merged"
    common = ["--base_model_path", tiny_decoder, "--output_path", str(out)]
    _fail(common + ["--lora_adapter_path", str(tmp_path / "nope")], capsys, "no such file")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "adapter_model.safetensors").write_bytes(
        (adapters["lora"] / "adapter_model.safetensors").read_bytes())
    _fail(common + ["--lora_adapter_path", str(no_config)], capsys,
          "adapter_config.json is missing")
    other = ["--base_model_path", tiny_encoder, "--output_path", str(out),
             "--lora_adapter_path", str(adapters["lora"])]
    _fail(other, capsys, "made for a different base")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    _fail(common + ["--lora_adapter_path", str(adapters["lora"])], capsys, "is not empty")
    assert os.listdir(out) == ["keep.txt"]


def test_refuses_adapter_with_other_shapes(adapters, tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    Qwen2Model(cfg).save_pretrained(tmp_path / "wider")
    _fail(["--base_model_path", str(tmp_path / "wider"), "--lora_adapter_path",
           str(adapters["lora"]), "--output_path", str(tmp_path / "m")], capsys,
          "has in_features=96 in the base, 128 in the adapter")
    assert not (tmp_path / "m").exists()


def test_refuses_untrained_adapter(tiny_decoder, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    untrained = get_peft_model(AutoModel.from_pretrained(tiny_decoder),
                               LoraConfig(r=4, target_modules=["q_proj"]))
    untrained.save_pretrained(tmp_path / "untrained")  # lora_B starts at zero
    _fail(["--base_model_path", tiny_decoder, "--lora_adapter_path", str(tmp_path / "untrained"),
           "--output_path", str(tmp_path / "m")], capsys, "changes nothing")
    assert not (tmp_path / "m").exists()


def test_cli_help_and_bad_precision():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "merge.py", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--training_precision" in out.stdout
    bad = subprocess.run([sys.executable, "merge.py", "--base_model_path", "b",
                          "--lora_adapter_path", "a", "--output_path", "o",
                          "--training_precision", "int4"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'int4'" in bad.stderr


def test_a_base_that_is_not_a_model_is_one_line_exit_2(adapters, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fail(["--base_model_path", str(tmp_path / "empty"), "--lora_adapter_path",
           str(adapters["lora"]), "--output_path", str(tmp_path / "m")], capsys, "error:")
    assert not (tmp_path / "m").exists()

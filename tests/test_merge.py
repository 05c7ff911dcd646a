"""merge.py: exact merges of LoRA and QLoRA adapters, sentence-transformers export, refusals."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import merge as merge_script
from embedrag.model.embedding import EmbeddingModel
from embedrag.model.tokens import load_tokenizer
from embedrag.publish.merge import PROBES
from tests.helpers import ROOT, run_train

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


def peft_reference(base_path, adapter, dtype=torch.float32, bits=None, dequantize=False):
    """Embeddings of base + adapter through PEFT, computed independently of merge.py: the base
    as stored, or quantized to `bits` as training did and computing as in training (its
    quantized layers in train mode: bitsandbytes' CPU inference repack and int8 eval kernel
    stay off; they hold no dropout), or that quantized base dequantized to plain weights by
    transformers."""
    from peft import PeftModel
    from transformers import AutoModel, BitsAndBytesConfig

    config = json.loads((adapter / "training_config.json").read_text())
    tok = load_tokenizer(str(adapter))

    def base():
        if bits is None:
            return AutoModel.from_pretrained(base_path, dtype=dtype)
        quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype) if bits == 4
                 else BitsAndBytesConfig(load_in_8bit=True))
        model = AutoModel.from_pretrained(base_path, dtype=dtype, quantization_config=quant,
                                          device_map={"": "cpu"})
        return model.dequantize(dtype=dtype) if dequantize else model

    model = EmbeddingModel(PeftModel.from_pretrained(base(), str(adapter)),
                           config["pooling"]).eval()
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt") and \
                type(module).__module__.startswith("bitsandbytes"):
            module.train()
    plain = EmbeddingModel(base(), config["pooling"]).eval()
    kw = {"max_len": 128, "append_eos": config["append_eos"]}
    return model.encode(tok, PROBES, **kw), plain.encode(tok, PROBES, **kw)


def merged_embeddings(path, dtype=torch.float32):
    """Embeddings from the merged folder with plain transformers: AutoModel + its tokenizer."""
    from transformers import AutoModel

    config = json.loads((path / "training_config.json").read_text())
    model = EmbeddingModel(AutoModel.from_pretrained(path, dtype=dtype), config["pooling"]).eval()
    return model.encode(load_tokenizer(str(path)), PROBES, max_len=128,
                        append_eos=config["append_eos"])


def _merge(adapter, base, out, *extra):
    assert merge_script.main(["--base_model_path", base, "--lora_adapter_path", str(adapter),
                              "--output_path", str(out), *extra]) == 0
    return json.loads((out / "merge_report.json").read_text())


@pytest.mark.parametrize("name", ["lora", "lora_mean"])
def test_merged_equals_base_plus_adapter(name, adapters, tiny_decoder, tmp_path):
    out = tmp_path / "merged"
    _merge(adapters[name] / "adapter_model.safetensors", tiny_decoder, out)
    want, base_only = peft_reference(tiny_decoder, adapters[name])
    got = merged_embeddings(out)
    assert (got - want).abs().max().item() < 1e-5
    assert (got - base_only).abs().max().item() > 1e-3  # the merge really changed the model
    assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(out))


def test_qlora_4bit_merges_into_the_model_it_trained_as(adapters, tiny_decoder, tmp_path):
    """Default: the 4-bit base dequantized + the update reproduces the trained model (4-bit
    base + adapter); --qlora_base original reproduces the original base + adapter. The two
    differ, and the report says by how much."""
    adapter = adapters["qlora4"]
    trained, quantized_only = peft_reference(tiny_decoder, adapter, bits=4)
    original, _ = peft_reference(tiny_decoder, adapter)
    report = _merge(adapter, tiny_decoder, tmp_path / "default")
    got = merged_embeddings(tmp_path / "default")
    assert (got - trained).abs().max().item() < 1e-5
    assert (got - quantized_only).abs().max().item() > 1e-3
    gap = (original - trained).abs().max().item()
    assert gap > 1e-3  # quantization error: the two candidates really are different models
    assert report["merged_into"] == "4-bit base, dequantized"
    assert report["qlora"]["max_abs_diff_original_vs_trained"] == pytest.approx(gap, abs=1e-5)
    report = _merge(adapter, tiny_decoder, tmp_path / "original", "--qlora_base", "original")
    assert (merged_embeddings(tmp_path / "original") - original).abs().max().item() < 1e-5
    assert report["merged_into"] == "original base weights"


def test_qlora_8bit_merges_into_the_model_it_trained_as(adapters, tiny_decoder, tmp_path):
    """On a CPU, bitsandbytes computes 8-bit layers in training with their dequantized weights
    (and in eval mode with int8 activations, which EmbedRAG does not use): the default merge
    reproduces the training computation, and evaluate.py's model for the adapter embeds the
    same way."""
    from embedrag.model.loading import load_embedder

    adapter = adapters["qlora8"]
    trained, _ = peft_reference(tiny_decoder, adapter, bits=8)
    dequantized, _ = peft_reference(tiny_decoder, adapter, bits=8, dequantize=True)
    report = _merge(adapter, tiny_decoder, tmp_path / "m")
    got = merged_embeddings(tmp_path / "m")
    assert (got - trained).abs().max().item() < 1e-5
    assert (got - dequantized).abs().max().item() < 1e-5
    assert report["qlora"]["max_abs_diff_dequantized_vs_trained"] < 1e-5
    assert report["qlora"]["max_abs_diff_original_vs_trained"] > 1e-3
    model, tok, settings = load_embedder(str(adapter))
    measured = model.encode(tok, PROBES, max_len=128, append_eos=settings.append_eos)
    assert (measured - got).abs().max().item() < 1e-5


def test_eval_dataset_scores_the_candidates_side_by_side(adapters, tiny_decoder, learnable_data,
                                                         tmp_path, capsys):
    from embedrag.data.rows import read_jsonl
    from embedrag.eval.evaluate import evaluate
    from embedrag.model.loading import load_embedder

    report = _merge(adapters["qlora4"], tiny_decoder, tmp_path / "m", "--eval_dataset",
                    learnable_data)
    printed = capsys.readouterr().out
    rows = report["eval"]
    assert set(rows) == {"trained (4-bit base + adapter)", "merged into dequantized base (saved)",
                         "merged into original base"}
    for name in rows:
        assert name in printed
    # what evaluate.py measures for final/ is the trained row, and the saved merge matches it
    model, tok, settings = load_embedder(str(adapters["qlora4"]))
    final = evaluate(model, tok, read_jsonl(learnable_data), settings)
    assert final == pytest.approx(rows["trained (4-bit base + adapter)"], abs=1e-6)
    assert rows["merged into dequantized base (saved)"] == pytest.approx(final, abs=1e-4)


def test_bfloat16_merge_within_documented_tolerance(adapters, tiny_decoder, tmp_path):
    from embedrag.publish.merge import TOLERANCE

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
    # a Matryoshka user's pick of a prefix: sentence-transformers' truncate_dim, compared
    # by cosine (it truncates after normalising)
    short = SentenceTransformer(str(out), device="cpu", truncate_dim=16)
    got = F.normalize(short.encode(PROBES, convert_to_tensor=True).cpu(), dim=-1)
    assert (got - F.normalize(want[:, :16], dim=-1)).abs().max().item() < 1e-5


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

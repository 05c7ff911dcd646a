"""Which network a path becomes: shipped code never silently replaced, bidirectional attention
through transformers' own masks and reproduced wherever the trained model embeds."""

import json

import pytest
import torch

import evaluate as evaluate_script
import merge as merge_script
import train as train_script
from embedrag.model.loading import model_config
from tests.conftest import build_shipped_code_decoder
from tests.helpers import run_train

PROBES = ["apple banana", "the river near the zebra tiger", "xenon", "violet walnut quartz"]


def _exit_code(main, argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_shipped_code_is_refused_unless_trusted_then_trains(tiny_decoder, learnable_data,
                                                            tmp_path, capsys):
    model = build_shipped_code_decoder(str(tmp_path / "shipped"), tiny_decoder)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", model, "--train_dataset", learnable_data, "--output_dir",
            str(out), "--batch_size", "4", "--finetune_type", "lora", "--max_steps", "2",
            "--save_on_epoch_end", "0"]
    assert _exit_code(train_script.main, argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("train.py")]
    assert len(lines) == 1 and "modeling_shipped.ShippedQwen2Model" in lines[0], err
    assert "the stock Qwen2Model would be loaded instead" in lines[0]
    assert "--trust_remote_code" in lines[0] and not out.exists()
    # every script that loads the model says the same
    assert evaluate_script.main(["--model_path", model, "--eval_dataset", learnable_data]) == 2
    assert "ShippedQwen2Model" in capsys.readouterr().err
    # trusted: the shipped class is what trains
    code, _, trained = run_train(model, learnable_data, out, *argv[6:], "--trust_remote_code")
    assert code == 0
    assert type(trained.backbone.get_base_model()).__name__ == "ShippedQwen2Model"
    assert merge_script.main(["--base_model_path", model, "--lora_adapter_path",
                              str(out / "final"), "--output_path", str(tmp_path / "m")]) == 2
    assert "ShippedQwen2Model" in capsys.readouterr().err
    # the adapter folder has no code of its own; its base's is checked all the same
    assert evaluate_script.main(["--model_path", str(out / "final"), "--eval_dataset",
                                 learnable_data]) == 2
    assert "ShippedQwen2Model" in capsys.readouterr().err


def test_shipped_code_that_fails_is_one_line(tiny_decoder, learnable_data, tmp_path, capsys):
    model = build_shipped_code_decoder(str(tmp_path / "broken"), tiny_decoder)
    with open(f"{model}/modeling_shipped.py", "a") as f:  # written for another transformers
        f.write("\n    def forward(self, *a, **k):\n        raise AttributeError("
                "\"'DynamicCache' object has no attribute 'get_max_length'\")\n")
    code = run_train(model, learnable_data, tmp_path / "o", "--finetune_type", "lora",
                     "--max_steps", "1", "--trust_remote_code")[0]
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("train.py")]
    assert code == 2 and len(lines) == 1 and "the code shipped with" in lines[0], err
    assert "get_max_length" in lines[0] and "Traceback" not in err


def _first_token_sees_the_last(model_path, attention):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(
        model_path, config=model_config(model_path, attention=attention)).eval()
    a = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    b = a.clone()
    b[0, -1] = 13
    with torch.no_grad():
        states = [model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
                  for x in (a, b)]
    return (states[0][0, 0] - states[1][0, 0]).abs().max().item() > 1e-6


@pytest.mark.parametrize("fixture", ["tiny_decoder", "tiny_gemma3"])
def test_bidirectional_attention_lets_a_token_see_later_ones(fixture, request):
    path = request.getfixturevalue(fixture)
    assert not _first_token_sees_the_last(path, "model")          # causal, as shipped
    assert _first_token_sees_the_last(path, "bidirectional")
    config = model_config(path, attention="bidirectional")
    if fixture == "tiny_gemma3":  # Gemma 3's own switch (EmbeddingGemma's recipe)
        assert config.use_bidirectional_attention is True


def test_bidirectional_training_is_reproduced_by_every_loader(tiny_decoder, learnable_data,
                                                              tmp_path):
    """Train bidirectional LoRA, merge, reload: the adapter folder (evaluate.py's loader), the
    merged folder through transformers and through sentence-transformers all embed as the model
    did at the end of training."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from embedrag.model.embedding import EmbeddingModel
    from embedrag.model.loading import load_embedder
    from embedrag.model.tokens import load_tokenizer

    out = tmp_path / "o"
    code, _, trained = run_train(tiny_decoder, learnable_data, out, "--finetune_type", "lora",
                                 "--attention", "bidirectional", "--max_steps", "4",
                                 "--save_on_epoch_end", "0")
    assert code == 0
    config = json.loads((out / "final" / "training_config.json").read_text())
    assert config["attention"] == "bidirectional"
    tok = load_tokenizer(str(out / "final"))
    kw = {"max_len": 64, "append_eos": True}
    want = trained.eval().encode(tok, PROBES, **kw)
    model, tok2, _ = load_embedder(str(out / "final"))
    assert (model.encode(tok2, PROBES, **kw) - want).abs().max() < 1e-5
    assert merge_script.main(["--base_model_path", tiny_decoder, "--lora_adapter_path",
                              str(out / "final"), "--output_path", str(tmp_path / "m")]) == 0
    merged = EmbeddingModel(AutoModel.from_pretrained(tmp_path / "m"), "last").eval()
    got = merged.encode(load_tokenizer(str(tmp_path / "m")), PROBES, max_len=64,
                        append_eos=False)  # the merged tokenizer appends EOS itself
    assert (got - want).abs().max() < 1e-5
    st = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    assert (st.encode(PROBES, convert_to_tensor=True).cpu() - want).abs().max() < 1e-5
    # and the causal base embeds differently: the attention really is part of the model
    causal = EmbeddingModel(AutoModel.from_pretrained(tiny_decoder), "last").eval()
    assert (causal.encode(tok, PROBES, **kw) - want).abs().max() > 1e-3


def test_lora_input_casts_off_in_training_and_back_on_for_the_model_handed_out(
        tiny_decoder, learnable_data, tmp_path, monkeypatch):
    """Under bf16 autocast PEFT's input casts are switched off for the run (they only copy);
    the model train() returns embeds outside autocast, which needs them back."""
    from embedrag.model import loading

    seen = []
    real = loading.lora_input_casts

    def spy(model, enabled):
        seen.append(enabled)
        real(model, enabled)

    monkeypatch.setattr("embedrag.train.setup.lora_input_casts", spy)  # on for training
    monkeypatch.setattr("embedrag.train.loop.lora_input_casts", spy)   # off for the user
    _, summary, model = run_train(tiny_decoder, learnable_data, tmp_path / "o", "--finetune_type",
                                  "lora", "--max_steps", "2", "--save_on_epoch_end", "0",
                                  "--mixed_precision", "bf16")
    assert seen == [False, True]
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.isfinite(model(ids, torch.ones_like(ids))).all()  # no autocast here

"""evaluate.py and train.py --eval_dataset agree with each other and across model forms."""

import json
import subprocess
import sys

import pytest
import torch

import evaluate as evaluate_script
from tests.helpers import ROOT, run_train


@pytest.fixture(scope="module")
def run_with_eval(tiny_decoder, learnable_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("with_eval")
    code, summary, _ = run_train(tiny_decoder, learnable_data, out, "--finetune_type", "lora",
                                 "--eval_dataset", learnable_data, "--save_on_epoch_end", "0")
    assert code == 0
    return out, summary


def _evaluate(capsys, *args):
    assert evaluate_script.main(list(args)) == 0
    return capsys.readouterr().out


def test_summary_shows_before_and_after(run_with_eval):
    out, _ = run_with_eval
    report = json.loads((out / "training_summary_report.json").read_text())
    metrics = report["eval"]["metrics"]
    assert set(metrics) == {"ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100",
                            "map@100"}
    for m in metrics.values():
        assert m["change"] == pytest.approx(m["after"] - m["before"])
    assert metrics["ndcg@10"]["after"] > metrics["ndcg@10"]["before"]  # it learned
    assert [e["epoch"] for e in report["eval"]["per_epoch"]] == [1, 2]
    epochs = json.loads((out / "training_losses.json").read_text())
    assert [e["eval"] for e in epochs] == [
        {k: v for k, v in e.items() if k not in ("epoch", "step")}
        for e in report["eval"]["per_epoch"]]


def test_tensorboard_holds_eval_at_start_and_each_epoch(run_with_eval):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run_with_eval
    acc = EventAccumulator(str(out / "runs"))
    acc.Reload()
    events = acc.Scalars("eval/ndcg@10")
    report = json.loads((out / "training_summary_report.json").read_text())
    assert [e.step for e in events] == [0, 6, 12]
    assert events[0].value == pytest.approx(report["eval"]["metrics"]["ndcg@10"]["before"])
    assert events[-1].value == pytest.approx(report["eval"]["metrics"]["ndcg@10"]["after"])


def test_evaluate_py_on_the_adapter_equals_in_training_eval_and_the_merged_model(
        run_with_eval, learnable_data, tiny_decoder, tmp_path, capsys):
    import merge as merge_script

    out, _ = run_with_eval
    report = json.loads((out / "training_summary_report.json").read_text())
    _evaluate(capsys, "--model_path", str(out / "final"), "--eval_dataset", learnable_data,
              "--output_file", str(tmp_path / "adapter.json"))
    adapter = json.loads((tmp_path / "adapter.json").read_text())
    after = {k: v["after"] for k, v in report["eval"]["metrics"].items()}
    assert adapter == pytest.approx(after, abs=1e-9)
    assert merge_script.main(["--base_model_path", tiny_decoder, "--lora_adapter_path",
                              str(out / "final"), "--output_path", str(tmp_path / "merged")]) == 0
    printed = _evaluate(capsys, "--model_path", str(tmp_path / "merged"), "--eval_dataset",
                        learnable_data, "--output_file", str(tmp_path / "merged.json"))
    assert json.loads((tmp_path / "merged.json").read_text()) == pytest.approx(adapter, abs=1e-9)
    assert "ndcg@10" in printed and f"{adapter['ndcg@10']:.4f}" in printed


def test_evaluate_py_on_a_plain_model_matches_a_hand_computation(tiny_encoder, learnable_data,
                                                                  tmp_path, capsys):
    """A base model with no training_config.json, mean pooling given on the command line,
    against cosine scores computed here with transformers and the metric definitions."""
    from transformers import AutoModel, AutoTokenizer

    from embedrag.data.rows import read_jsonl
    from embedrag.eval.metrics import query_metrics

    _evaluate(capsys, "--model_path", tiny_encoder, "--eval_dataset", learnable_data,
              "--pooling", "mean", "--output_file", str(tmp_path / "m.json"))
    got = json.loads((tmp_path / "m.json").read_text())
    rows = read_jsonl(learnable_data)
    corpus = list(dict.fromkeys(t for r in rows for t in r.pos + r.neg))
    tok = AutoTokenizer.from_pretrained(tiny_encoder)
    model = AutoModel.from_pretrained(tiny_encoder)

    def embed(text):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0]
        return torch.nn.functional.normalize(h.mean(0), dim=0)

    docs = torch.stack([embed(t) for t in corpus])
    per_query = []
    for r in rows:
        scores = docs @ embed(r.query)
        ranking = sorted(range(len(corpus)), key=lambda j: (-scores[j].item(), j))
        per_query.append(query_metrics(ranking, {corpus.index(p) for p in r.pos}))
    want = {k: sum(q[k] for q in per_query) / len(rows) for k in got}
    assert got == pytest.approx(want, abs=1e-6)


def test_evaluate_py_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": []}\n')
    done = subprocess.run([sys.executable, "evaluate.py", "--model_path", "x", "--eval_dataset",
                           str(bad)], cwd=ROOT, capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and f"{bad}:1: 'pos' is empty" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("kind", [["--finetune_type", "lora"],
                                  ["--finetune_type", "qlora", "--quantization_bits", "4"],
                                  ["--finetune_type", "qlora", "--quantization_bits", "8"],
                                  ["--finetune_type", "full"]],
                         ids=["lora", "qlora4", "qlora8", "full"])
def test_evaluation_leaves_no_trace_in_training(kind, tiny_decoder, learnable_data, tmp_path):
    """Evaluating before training and after epoch 1 (LoRA dropout on) changes no training loss
    by a single bit. The tiny model's 4-bit layers (64 inputs, multiples of 32 outputs) take
    bitsandbytes' AVX-512-BF16 CPU path where the CPU has it (see the next test)."""
    args = [*kind, "--save_on_epoch_end", "0"]
    assert run_train(tiny_decoder, learnable_data, tmp_path / "plain", *args)[0] == 0
    assert run_train(tiny_decoder, learnable_data, tmp_path / "eval", *args,
                     "--eval_dataset", learnable_data)[0] == 0
    losses = [[r["loss"] for r in json.loads((tmp_path / d / "detailed_training_logs.json")
                                             .read_text())] for d in ("plain", "eval")]
    assert len(losses[0]) == 12 and losses[0] == losses[1]
    evals = json.loads((tmp_path / "eval" / "training_summary_report.json").read_text())["eval"]
    assert evals["metrics"]["ndcg@10"]["after"] > evals["metrics"]["ndcg@10"]["before"]


def test_why_quantized_layers_are_kept_on_their_training_kernels(tiny_decoder):
    """The mechanism behind the test above, on one real 4-bit layer of the tiny model: one
    eval-mode forward without gradients makes bitsandbytes repack the weight for its CPU
    inference kernel, and afterwards no gradient reaches the layer's input in training;
    `match_training_kernels` keeps the training layout."""
    from bitsandbytes.functional import has_avx512bf16
    from transformers import AutoModel

    from embedrag.model.loading import match_training_kernels, quantization_config

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX-512 BF16")

    def layer(pinned):
        model = AutoModel.from_pretrained(tiny_decoder, dtype=torch.float32,
                                          device_map={"": "cpu"},
                                          quantization_config=quantization_config(4, torch.float32))
        if pinned:
            assert match_training_kernels(model) == 14  # 7 linear layers in each of 2 blocks
        return model.layers[0].mlp.up_proj

    def input_grad(q):
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = q.train()(x)
        return None if not out.requires_grad else \
            torch.autograd.grad(out.sum(), x, allow_unused=True)[0]

    for pinned in (False, True):
        q = layer(pinned)
        before = input_grad(q)
        assert before is not None
        with torch.no_grad():
            q.eval()(torch.randn(3, 64))  # what any evaluation does
        after = input_grad(q)
        if pinned:
            assert torch.equal(after, before)
        else:
            assert after is None  # bitsandbytes' inference kernel: no gradient to the input


def test_matryoshka_prefixes_are_trained_and_scored_per_dimension(tiny_decoder, learnable_data,
                                                                 tmp_path, capsys):
    """In-training eval, evaluate.py (dims from training_config.json) and a model whose
    embeddings are themselves the re-normalised 32-dimension prefix all agree."""
    from embedrag.data.formats import load_rows
    from embedrag.eval.evaluate import evaluate
    from embedrag.model.loading import load_embedder

    out = tmp_path / "mrl"
    code, summary, _ = run_train(tiny_decoder, learnable_data, out, "--finetune_type", "lora",
                                 "--matryoshka_dims", "64,32:0.5", "--eval_dataset",
                                 learnable_data, "--save_on_epoch_end", "0")
    assert code == 0
    after = {k: v["after"] for k, v in summary["eval"]["metrics"].items()}
    assert {"dim32/ndcg@10", "ndcg@10"} <= set(after) and "dim64/ndcg@10" not in after
    assert json.loads((out / "final" / "training_config.json").read_text())[
        "matryoshka_dims"] == [64, 32]
    logs = json.loads((out / "detailed_training_logs.json").read_text())
    assert "loss_infonce" in logs[0] and "loss_kd" not in logs[0]
    result = tmp_path / "metrics.json"
    printed = _evaluate(capsys, "--model_path", str(out / "final"), "--eval_dataset",
                        learnable_data, "--output_file", str(result))
    assert "32 dims" in printed
    assert json.loads(result.read_text()) == pytest.approx(after, abs=1e-6)

    model, tok, settings = load_embedder(str(out / "final"))

    class Prefix(torch.nn.Module):  # the 32-dimension embedding as a model of its own
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids, mask):
            return torch.nn.functional.normalize(self.inner(ids, mask)[:, :32], dim=-1)

    prefix = evaluate(Prefix(), tok, load_rows(learnable_data), settings)
    assert {k: after[f"dim32/{k}"] for k in prefix} == pytest.approx(prefix, abs=1e-6)

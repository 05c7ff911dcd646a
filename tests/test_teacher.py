"""score_teacher.py and distillation: scores equal the teacher's own, bad rows are refused,
and a run trained on them logs InfoNCE and KD apart."""

import json
import math

import pytest
import torch

import score_teacher
from embedrag.model.loading import load_embedder
from tests.float64 import TOLERANCE, float64
from tests.helpers import learnable_rows, run_train, write_jsonl


def _cos(model, tok, settings, query, passage):
    """One text per forward pass, float64 dot product: independent of batching."""
    q = model.encode(tok, [query], max_len=settings.query_max_len, append_eos=settings.append_eos,
                     instruction=settings.query_instruction)[0].double()
    p = model.encode(tok, [passage], max_len=settings.passage_max_len,
                     append_eos=settings.append_eos, instruction=settings.passage_instruction)[0]
    return float(q @ p.double())


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("teacher") / "rows.jsonl", learnable_rows(10))


def test_embedding_teacher_scores_are_the_teachers_cosines(tiny_decoder, rows_file, tmp_path):
    out = tmp_path / "scored.jsonl"
    assert score_teacher.main(["--teacher", tiny_decoder, "--input", rows_file, "--output",
                               str(out), "--batch_size", "3"]) == 0
    model, tok, settings = load_embedder(tiny_decoder)
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    original = [json.loads(line) for line in open(rows_file)]
    assert [{k: r[k] for k in ("query", "pos", "neg")} for r in scored] == original
    for row in scored[:4]:
        for key in ("pos", "neg"):
            want = [_cos(model, tok, settings, row["query"], t) for t in row[key]]
            assert row[f"{key}_scores"] == pytest.approx(want, abs=1e-5)


def _tiny_cross_encoder(tiny_encoder, path):
    from tokenizers import Tokenizer, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    tok = Tokenizer.from_file(f"{tiny_encoder}/tokenizer.json")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(1)
    config = BertConfig.from_pretrained(tiny_encoder, num_labels=1)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model, fast


def test_cross_encoder_teacher_scores_are_its_logits(tiny_encoder, rows_file, tmp_path):
    path = str(tmp_path / "reranker")
    model, tok = _tiny_cross_encoder(tiny_encoder, path)
    out = tmp_path / "scored.jsonl"
    assert score_teacher.main(["--teacher", path, "--input", rows_file, "--output", str(out),
                               "--batch_size", "5"]) == 0
    for row in [json.loads(line) for line in out.read_text().splitlines()][:3]:
        for key in ("pos", "neg"):
            with torch.no_grad():
                want = [model(**tok(row["query"], t, return_tensors="pt")).logits[0, 0].item()
                        for t in row[key]]
            assert row[f"{key}_scores"] == pytest.approx(want, abs=1e-5)


def test_bad_rows_and_an_existing_output_are_refused(tiny_decoder, rows_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "pos": ["b"]}\n{"query": "a"}\n')
    out = tmp_path / "out.jsonl"
    assert score_teacher.main(["--teacher", tiny_decoder, "--input", str(bad),
                               "--output", str(out)]) == 2
    assert f"{bad}:2: missing 'pos'" in capsys.readouterr().err and not out.exists()
    out.write_text("keep me\n")
    assert score_teacher.main(["--teacher", tiny_decoder, "--input", rows_file,
                               "--output", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me\n"


@pytest.mark.parametrize("fields, message", [
    ({"pos_scores": [1.0, 2.0]}, "'pos_scores' must be a list of 1 numbers"),
    ({"neg_scores": "high"}, "'neg_scores' must be a list of 3 numbers"),
    ({"pos_scores": [True]}, "'pos_scores[0]' must be a finite number"),
    ({"neg_scores": [1, float("nan"), 2]}, "'neg_scores[1]' must be a finite number"),
    ({"prompt": 3}, "'prompt' must be a string")])
def test_train_refuses_bad_scores_naming_the_line(fields, message, tiny_decoder, tmp_path, capsys):
    rows = learnable_rows(6)
    rows[4].update(fields)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    code = run_train(tiny_decoder, data, tmp_path / "out", "--finetune_type", "lora",
                     "--kd_weight", "1")[0]
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:5: {message}" in err, err
    assert not (tmp_path / "out").exists()


def test_distillation_logs_both_parts_and_moves_the_student_toward_the_teacher(
        tiny_decoder, tmp_path, capsys):
    rows = learnable_rows(24)
    for row in rows:  # a teacher that prefers the first negative to the positive
        row["pos_scores"] = [2.0]
        row["neg_scores"] = [3.0, 0.0, -1.0]
    rows[1].pop("neg_scores")  # a row scored in part is refused, naming its line
    data = write_jsonl(tmp_path / "partial.jsonl", rows)
    code = run_train(tiny_decoder, data, tmp_path / "refused", "--finetune_type", "lora",
                     "--kd_weight", "0.5")[0]
    assert code == 2 and f"{data}:2: no teacher scores" in capsys.readouterr().err
    rows[1]["neg_scores"] = [3.0, 0.0, -1.0]
    data = write_jsonl(tmp_path / "scored.jsonl", rows)
    out = tmp_path / "out"
    code, summary, _ = run_train(tiny_decoder, data, out, "--finetune_type", "lora",
                                 "--kd_weight", "0.5", "--kd_temperature", "0.5",
                                 "--neg_nums", "3")
    assert code == 0
    logs = json.loads((out / "detailed_training_logs.json").read_text())
    for r in logs:
        assert r["loss"] == pytest.approx(r["loss_infonce"] + 0.5 * r["loss_kd"], rel=1e-5)
    first = sum(r["loss_kd"] for r in logs[:3]) / 3
    last = sum(r["loss_kd"] for r in logs[-3:]) / 3
    assert last < first and math.isfinite(last)


def test_distillation_and_matryoshka_through_grad_cache_equal_plain_backprop(tiny_decoder,
                                                                              tmp_path):
    rows = learnable_rows(16)
    for i, row in enumerate(rows):
        row["pos_scores"] = [1.0 + i % 3]
        row["neg_scores"] = [float(i % 4), 0.5, -1.0]
    data = write_jsonl(tmp_path / "scored.jsonl", rows)
    # no dropout: chunks draw other masks than one whole forward pass (test_scale replays them)
    flags = ["--finetune_type", "lora", "--kd_weight", "0.5", "--matryoshka_dims", "64,16:0.5",
             "--epochs", "1", "--lora_dropout", "0"]
    logs = []
    for name, extra in (("plain", []), ("cached", ["--grad_cache_chunk_size", "3"])):
        out = tmp_path / name
        with float64():  # the two runs then agree to TOLERANCE on any CPU
            assert run_train(tiny_decoder, data, out, *flags, *extra)[0] == 0
        logs.append(json.loads((out / "detailed_training_logs.json").read_text()))
    assert len(logs[0]) > 1
    for key in ("loss", "loss_infonce", "loss_kd"):
        assert [r[key] for r in logs[1]] == pytest.approx([r[key] for r in logs[0]], rel=0,
                                                          abs=TOLERANCE)

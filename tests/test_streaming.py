"""--streaming: rows read as they stream, drawn through a shuffle buffer, tokenized on the fly."""

import json
import os
import subprocess
import sys

import pytest

import train as train_script
from embedrag.data.passages import text_hash
from embedrag.data.rows import DataError
from embedrag.data.tokens import tokenize
from tests.helpers import ROOT, learnable_rows, run_train, write_jsonl


def _stream_set(path, tok, seed=3, buffer=8, neg_nums=2):
    from embedrag.data.streaming import StreamingSet, stream_rows

    return StreamingSet(stream_rows(path), tok, neg_nums=neg_nums, query_max_len=16,
                        passage_max_len=16, query_instruction="Q: ", passage_instruction="",
                        append_eos=True, seed=seed, buffer=buffer)


def test_streamed_items_are_draws_from_their_own_rows(tiny_decoder, tmp_path):
    from embedrag.model.tokens import load_tokenizer

    tok = load_tokenizer(tiny_decoder)
    rows = learnable_rows(20)
    for row in rows[::4]:
        row["neg"] = row["neg"][:1]  # short rows: topped up from the rows streamed before
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    by_query = {r["query"]: r for r in rows}
    queries = {tuple(tokenize(tok, ["Q: " + q], 16, True)[0]): q for q in by_query}
    data = _stream_set(path, tok)
    items = list(data)
    assert len(items) >= 18  # only a first short row can find nothing to top up with
    for item in items:
        row = by_query[queries[tuple(item["query_tokens"])]]
        positives = {text_hash(p) for p in row["pos"]}
        assert item["pos"] in positives and set(item["pos_set"]) == positives
        assert len(set(item["negs"])) == 2 and not set(item["negs"]) & positives
        for h in [item["pos"], *item["negs"]]:
            assert item["tokens"][h][-1] == tok.eos_token_id
        own = {text_hash(n) for n in row["neg"]}
        if len(own) >= 2:
            assert set(item["negs"]) <= own
    assert [i["query_tokens"] for i in _stream_set(path, tok)] == \
        [i["query_tokens"] for i in items]                         # seeded: the same stream
    data.set_epoch(2)
    assert [i["query_tokens"] for i in data] != [i["query_tokens"] for i in items]  # reshuffled
    order = [queries[tuple(i["query_tokens"])] for i in items]
    assert order != [r["query"] for r in rows][:len(order)]        # the buffer shuffles


def test_streaming_trains_past_one_pass_and_refuses_what_it_cannot_do(tiny_decoder, tmp_path,
                                                                      capsys):
    data = write_jsonl(tmp_path / "d.jsonl", learnable_rows(12))
    args = ["--finetune_type", "lora", "--streaming", "--shuffle_buffer", "4",
            "--save_on_epoch_end", "0"]
    code, summary, _ = run_train(tiny_decoder, data, tmp_path / "o", *args, "--max_steps", "5")
    assert code == 0 and summary["totals"]["steps"] == 5        # 3 batches a pass: 2 passes
    epochs = json.loads((tmp_path / "o" / "training_losses.json").read_text())
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert (tmp_path / "o" / "final" / "adapter_model.safetensors").exists()
    capsys.readouterr()
    for extra, message in ((["--max_steps", "0"], "--streaming needs --max_steps"),
                           (["--max_steps", "3", "--save_steps", "2"], "no exact resume")):
        argv = ["--model_name_or_path", tiny_decoder, "--train_dataset", data, "--output_dir",
                str(tmp_path / "x"), "--batch_size", "4", *args, *extra]
        try:
            code = train_script.main(argv)
        except SystemExit as e:
            code = e.code
        assert code == 2 and message in capsys.readouterr().err


def test_a_bad_row_in_the_stream_stops_with_its_line(tiny_decoder, tmp_path, capsys):
    rows = learnable_rows(12)
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    with open(path, "a") as f:
        f.write('{"query": "q", "pos": "not a list"}\n')
    code = run_train(tiny_decoder, str(path), tmp_path / "o", "--finetune_type", "lora",
                     "--streaming", "--max_steps", "2")[0]
    err = capsys.readouterr().err
    assert code == 2 and f"{path}:13: 'pos' must be a list of strings" in err, err
    with pytest.raises(DataError, match="holds no training rows"):
        from embedrag.data.streaming import stream_rows

        stream_rows(write_jsonl(tmp_path / "empty.jsonl", []))


def test_streaming_on_two_processes(tiny_decoder, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", learnable_rows(24))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "train.py", "--model_name_or_path", tiny_decoder, "--train_dataset", data,
         "--output_dir", str(tmp_path / "o"), "--batch_size", "2", "--finetune_type", "lora",
         "--streaming", "--max_steps", "4", "--save_on_epoch_end", "0"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "o" / "training_summary_report.json").read_text())
    assert report["world_size"] == 2 and report["totals"]["steps"] == 4
    assert report["totals"]["samples"] == 16

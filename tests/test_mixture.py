"""Several training files: every optimizer step from one file, on every process, resumable."""

import json
import sys
from collections import Counter

import pytest
import torch

from embedrag.data.mixture import FileBatches, expand
from tests.float64 import TOLERANCE
from tests.helpers import (
    FLOAT64,
    TORCHRUN,
    assert_same_weights,
    flags,
    learnable_rows,
    logs,
    max_diff,
    run,
    run_train,
    weights,
    write_jsonl,
)


def _file_of(row, sizes):
    edge = 0
    for f, n in enumerate(sizes):
        edge += n
        if row < edge:
            return f
    raise AssertionError(row)


@pytest.mark.parametrize("file_weights", [None, [1.0, 1.0, 2.0]])
def test_every_step_is_one_file_on_every_process_through_accelerates_sharding(file_weights):
    """Accelerate's own sharding of the loader (process r takes batches r, W + r, ...): with
    2 processes x batch 2 x 2 accumulation steps, each step's 8 rows come from one file."""
    from accelerate.data_loader import prepare_data_loader

    sizes, world, batch, accum = [10, 3, 7], 2, 2, 2
    block = world * batch * accum
    sampler = FileBatches(sizes, block, seed=5, weights=file_weights)
    shards = [prepare_data_loader(torch.utils.data.DataLoader(list(range(20)), batch_size=batch,
                                                              sampler=sampler),
                                  num_processes=world, process_index=r, put_on_device=False)
              for r in range(world)]
    orders = []
    for epoch in (1, 2):
        for shard in shards:
            shard.set_epoch(epoch)
        per_rank = [[b.tolist() for b in shard] for shard in shards]
        assert len(per_rank[0]) == len(per_rank[1]) == len(sampler) // (world * batch)
        files = []
        for s in range(len(per_rank[0]) // accum):
            rows = [x for r in range(world) for b in per_rank[r][s * accum:(s + 1) * accum]
                    for x in b]
            assert len(rows) == block and len({_file_of(x, sizes) for x in rows}) == 1
            files.append(_file_of(rows[0], sizes))
        expected = [2, 1, 1] if file_weights is None else [1, 1, 2]  # ceil(rows / 8), or by weight
        assert sorted(Counter(files).items()) == list(enumerate(expected))
        seen = Counter(x for rank in per_rank for b in rank for x in b)
        for f, n in enumerate(sizes):  # a file's rows in cycles: none twice before all once
            counts = [seen[x] for x in range(sum(sizes[:f]), sum(sizes[:f + 1]))]
            if expected[f] * block >= n:
                assert min(counts) >= 1 and max(counts) - min(counts) <= 1
        orders.append(per_rank)
    assert orders[0] != orders[1]  # each epoch its own order ...
    again = FileBatches(sizes, block, seed=5, weights=file_weights)
    again.set_epoch(2)
    sampler.set_epoch(2)
    assert list(again) == list(sampler)  # ... a function of (seed, epoch) alone


def test_a_folder_stands_for_its_data_files(tmp_path):
    for name in ("b.jsonl", "a.parquet", "notes.txt"):
        (tmp_path / name).write_text("")
    assert expand([str(tmp_path)]) == [str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl")]
    (tmp_path / "state.json").write_text("{}")  # a save_to_disk folder is one dataset
    assert expand([str(tmp_path)]) == [str(tmp_path)]


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    b = learnable_rows(12, seed=1)
    b[0]["prompt"] = "Zebra says: "
    return (write_jsonl(root / "a.jsonl", learnable_rows(24, seed=0)),
            write_jsonl(root / "b.jsonl", b))


def test_two_files_train_one_per_step_with_their_instructions_and_resume_exactly(
        tiny_decoder, two_files, tmp_path, monkeypatch):
    from embedrag.data.tokens import tokenize
    from embedrag.model.tokens import load_tokenizer
    from embedrag.train import loop as trainer

    a, b = two_files
    seen = []
    real = trainer.forward_backward

    def spy(accelerator, model, batch, *args):
        seen.append((batch["rows"].tolist(), batch["query_input_ids"],
                     batch["query_attention_mask"]))
        return real(accelerator, model, batch, *args)

    monkeypatch.setattr(trainer, "forward_backward", spy)
    args = ["--finetune_type", "lora", "--gradient_accumulation_steps", "2", "--save_steps", "3",
            "--save_on_epoch_end", "0", "--train_dataset", a, b,
            "--dataset_instructions", "Find: ", ""]
    whole = tmp_path / "whole"
    code, summary, _ = run_train(tiny_decoder, a, whole, *args)
    assert code == 0
    # 24 + 12 rows in blocks of 4 x 2 = 8: 3 + 2 steps an epoch, 2 epochs
    assert summary["totals"]["steps"] == 10 and len(seen) == 20
    tok = load_tokenizer(tiny_decoder)
    rows_a = [json.loads(x) for x in open(a)]
    rows_b = [json.loads(x) for x in open(b)]
    files = []
    for step in range(10):
        rows = [r for micro in seen[2 * step:2 * step + 2] for r in micro[0]]
        assert len({r >= 24 for r in rows}) == 1, rows
        files.append(int(rows[0] >= 24))
    assert files.count(0) == 6 and files.count(1) == 4
    for rows, ids, mask in seen:  # each file's instruction; a row's own prompt wins
        for r, q, m in zip(rows, ids, mask, strict=True):
            row = rows_a[r] if r < 24 else rows_b[r - 24]
            prefix = row.get("prompt", "Find: " if r < 24 else "")
            want = tokenize(tok, [prefix + row["query"]], 64, True)[0]
            assert q[m.bool()].tolist() == want
    used = json.loads((whole / "final" / "training_config.json").read_text())["datasets"]
    assert [(d["path"], d["rows"], d["query_instruction"], d["rows_with_own_prompt"])
            for d in used] == [(a, 24, "Find: ", 0), (b, 12, "", 1)]
    reference = json.loads((whole / "detailed_training_logs.json").read_text())
    checkpoint = whole / "checkpoint-step-6"  # epoch 2, one step in
    state = json.loads((checkpoint / "trainer_state.json").read_text())["state"]
    assert (state["epoch"], state["micro"]) == (2, 2)
    out = tmp_path / "resumed"
    assert run_train(tiny_decoder, a, out, *args, "--resume_from_checkpoint",
                     str(checkpoint))[0] == 0
    assert max_diff(weights(whole / "final"), weights(out / "final")) < 1e-5
    logged = json.loads((out / "detailed_training_logs.json").read_text())
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in reference[6:]],
                                                        abs=1e-6)


def _code(*args):
    """train.py's exit code, whether its flag check exits or main() returns."""
    try:
        return run_train(*args)[0]
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("flags, message", [
    (["--dataset_weights", "1,2,3"], "--dataset_weights: 3 given for 2 training files"),
    (["--dataset_instructions", "x"], "--dataset_instructions: 1 given for 2 training files"),
    (["--dataset_weights", "1,0"], "weights must be finite and positive"),
    (["--dataset_weights", "1,x"], "not a list of numbers")])
def test_per_file_flags_must_match_the_files(flags, message, tiny_decoder, two_files, tmp_path,
                                             capsys):
    a, b = two_files
    code = _code(tiny_decoder, a, tmp_path / "out", "--finetune_type", "lora",
                 "--train_dataset", a, b, *flags)
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_two_files_on_two_processes_equal_one_process_with_the_double_batch(tiny_decoder,
                                                                           two_files, tmp_path):
    """2 processes x batch 2 (every step from one file on both, passages shared across them)
    train as 1 process x batch 4 does: same files per step, same losses, same adapter."""
    a, b = two_files
    common = ["--finetune_type", "lora", "--lora_r", "4", "--lora_alpha", "8", "--lr", "5e-3",
              "--lora_dropout", "0", "--neg_nums", "2", "--epochs", "2", "--train_dataset", a, b,
              "--dataset_weights", "1,2", "--kd_weight", "0"]
    # in float64 (tests/float64.py): the runs agree to TOLERANCE on any CPU
    run([*TORCHRUN, *FLOAT64, *flags(tiny_decoder, a, tmp_path / "two", 2, *common)])
    run([sys.executable, *FLOAT64, *flags(tiny_decoder, a, tmp_path / "one", 4, *common,
                                          "--num_processes", "1")])
    two, one = logs(tmp_path / "two"), logs(tmp_path / "one")
    assert len(two) == len(one) == 2 * 9  # 6 + 3 = 9 blocks of 4 rows an epoch, shared 1:2
    # another batch composition would differ by ~0.1
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=0,
                                                     abs=TOLERANCE)
    assert_same_weights(weights(tmp_path / "two" / "final"), weights(tmp_path / "one" / "final"),
                        atol=TOLERANCE)


def test_folders_and_file_lists_are_checked_before_anything_loads(tiny_decoder, two_files,
                                                                  tmp_path, capsys):
    a, b = two_files
    empty = tmp_path / "empty"
    empty.mkdir()
    for data, message in (([str(empty)], "a folder without .jsonl or .parquet files"),
                          ([a, a], "a file is given twice")):
        code = _code(tiny_decoder, a, tmp_path / "out", "--finetune_type", "lora",
                     "--train_dataset", *data)
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    code = _code(tiny_decoder, a, tmp_path / "out", "--finetune_type", "lora",
                 "--dataset_weights", "2")
    assert code == 2 and "are for several --train_dataset files" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

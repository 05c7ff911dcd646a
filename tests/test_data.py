"""Reading, checking, sampling, tokenizing once and padding the training data."""

import pytest
import torch

from embedrag.data.dataset import Collator, TrainingSet
from embedrag.data.rows import DataError, read_jsonl
from embedrag.data.tokens import pad, tokenize
from embedrag.losses import false_negative_mask
from embedrag.model.tokens import load_tokenizer
from tests.float64 import float64_norms
from tests.helpers import ROOT, learnable_rows, write_jsonl


def test_reads_rows_skipping_blank_lines_with_bom_and_crlf(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('\ufeff{"query": "q1", "pos": ["a"], "neg": ["b"]}\r\n\r\n'
                     '{"query": "q2", "pos": ["c"], "extra": 1}\r\n'.encode())
    rows = read_jsonl(str(path))
    assert [(r.query, r.pos, r.neg, r.line) for r in rows] == [
        ("q1", ["a"], ["b"], 1), ("q2", ["c"], [], 3)]


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ('["q"]', "expected a JSON object"),
    ('{"pos": ["a"]}', "missing 'query'"),
    ('{"query": " ", "pos": ["a"]}', "'query' is empty"),
    ('{"query": "q", "pos": []}', "'pos' is empty"),
    ('{"query": "q", "pos": "a"}', "'pos' must be a list"),
    ('{"query": "q", "pos": ["a", 3]}', "'pos[1]' must be a string"),
    ('{"query": "q", "pos": ["a"], "neg": "b"}', "'neg' must be a list"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"query": "ok", "pos": ["a"]}\n' + line + "\n")
    with pytest.raises(DataError) as exc:
        read_jsonl(str(path))
    assert str(exc.value).startswith(f"{path}:2: ") and message in str(exc.value)


def test_sample_data_is_valid_traditional_chinese():
    rows = read_jsonl(f"{ROOT}/datasets/sample_data.jsonl")
    assert len(rows) >= 40 and all(len(r.neg) >= 3 for r in rows)
    assert len({r.query for r in rows}) == len(rows)


@pytest.fixture(scope="module")
def tok(tiny_decoder):
    return load_tokenizer(tiny_decoder)


def test_tokenize_appends_eos_once_and_keeps_it_when_truncating(tok):
    ids = tokenize(tok, ["apple banana cherry", "apple"], max_len=4, append_eos=True)
    assert all(seq[-1] == tok.eos_token_id and seq.count(tok.eos_token_id) == 1 for seq in ids)
    assert len(ids[0]) == 4  # truncated to 3 tokens + EOS
    assert ids[1] == tok("apple")["input_ids"] + [tok.eos_token_id]
    assert tokenize(tok, ["apple"], 8, append_eos=False) == [tok("apple")["input_ids"]]


def test_pad_left_and_right():
    ids, mask = pad([[1, 2, 3], [4]], pad_id=0, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _set(rows, tok, neg_nums=2, seed=0):
    from embedrag.data.rows import Example

    ex = [Example(r["query"], r["pos"], r.get("neg", []), i) for i, r in enumerate(rows)]
    return TrainingSet(ex, tok, neg_nums=neg_nums, query_max_len=16, passage_max_len=16,
                       query_instruction="Query: ", append_eos=True, seed=seed)


def test_draws_are_deterministic_per_epoch_and_vary_across_epochs(tok):
    data = _set(learnable_rows(), tok)
    first = [data[i] for i in range(len(data))]
    assert first == [data[i] for i in range(len(data))]
    data.set_epoch(1)
    assert first != [data[i] for i in range(len(data))]
    for i, item in enumerate(first):
        assert data.table.text(item["pos"]) in learnable_rows()[i]["pos"]
        assert len(set(item["negs"])) == 2
        assert all(data.table.text(n) in learnable_rows()[i]["neg"] for n in item["negs"])


def test_short_rows_are_topped_up_from_other_rows_never_with_own_positive(tok):
    rows = [{"query": f"q{i}", "pos": [f"p{i}", f"p{i}b"], "neg": [] if i % 2 else [f"n{i}"]}
            for i in range(6)]
    data = _set(rows, tok, neg_nums=3)
    assert data.short_rows == 6
    for epoch in range(5):
        data.set_epoch(epoch)
        for i in range(6):
            item = data[i]
            texts = [data.table.text(n) for n in item["negs"]]
            assert len(set(texts)) == 3 and not set(texts) & {f"p{i}", f"p{i}b"}
            if i % 2 == 0:
                assert f"n{i}" in texts  # own negatives come first


def test_texts_are_tokenized_once_with_instruction(tok):
    data = _set(learnable_rows(4), tok)
    assert data.query_tokens(0) == tok("Query: " + learnable_rows(4)[0]["query"])["input_ids"] + [
        tok.eos_token_id]
    assert data.passage_tokens(0) == tok(learnable_rows(4)[0]["pos"][0])["input_ids"] + [
        tok.eos_token_id]


def test_collator_orders_passages_and_masks_false_negatives(tok):
    rows = [{"query": "q0", "pos": ["shared", "p0"], "neg": ["n0"]},
            {"query": "q1", "pos": ["shared"], "neg": ["n1"]},
            {"query": "q2", "pos": ["p2"], "neg": ["p0"]}]
    data = _set(rows, tok, neg_nums=1)
    items = [data[i] for i in range(3)]
    batch = Collator(data, tok.pad_token_id, "right")(items)
    texts = [data.table.text(i) for i in batch["passage_ids"].tolist()]
    assert texts[2:] == ["shared", "n1", "p2", "p0"]
    want = torch.zeros(3, 6, dtype=torch.bool)
    for i, row in enumerate(rows):
        for j, t in enumerate(texts):
            want[i, j] = t in row["pos"] and j != 2 * i
    mask = false_negative_mask(batch["relevant_ids"], batch["passage_ids"], torch.arange(3) * 2)
    assert torch.equal(mask, want)
    assert batch["passage_input_ids"].shape[1] == max(
        len(data.passage_tokens(n)) for n in batch["passage_ids"].tolist())


def test_not_enough_passages_is_a_clear_error(tok):
    with pytest.raises(DataError, match="data:0: only 1 passages .* --neg_nums 5 needs 5"):
        _set([{"query": "q", "pos": ["a"], "neg": ["b"]}], tok, neg_nums=5)
    # enough passages in all, but not outside the first query's own positives: no endless draw
    with pytest.raises(DataError, match="data:0: only 1 passages"):
        _set([{"query": "q1", "pos": ["a", "b", "c"]}, {"query": "q2", "pos": ["d"]}], tok,
             neg_nums=2)


def test_rows_sharing_a_query_share_their_positives(tok):
    rows = [{"query": "q", "pos": ["a"], "neg": ["b", "x"]},
            {"query": "q", "pos": ["b"], "neg": ["a", "y"]},
            {"query": "r", "pos": ["c"], "neg": ["a"]}]
    data = _set(rows, tok, neg_nums=1)
    assert [data.table.text(n) for n in data.table.negatives(0)] == ["x"]  # "b" is relevant
    assert [data.table.text(n) for n in data.table.negatives(1)] == ["y"]
    batch = Collator(data, tok.pad_token_id, "right")([data[0], data[1], data[2]])
    mask = false_negative_mask(batch["relevant_ids"], batch["passage_ids"], torch.arange(3) * 2)
    # passages: a, x, b, y, c, a -> for query 0, "b" (j=2) and the second "a" (j=5) are masked
    assert mask[0].tolist() == [False, False, True, False, False, True]


def test_fixture_file_round_trips(tmp_path):
    rows = read_jsonl(write_jsonl(tmp_path / "x.jsonl", learnable_rows(3)))
    assert [r.query for r in rows] == [r["query"] for r in learnable_rows(3)]


def test_duplicate_passages_are_embedded_once_with_the_same_loss_and_gradients(tiny_decoder,
                                                                               tok):
    """Dedup is an optimisation only: the loss and every gradient equal those of embedding
    every slot separately (no dropout here, so copies would embed identically anyway). In
    float64 (norms too), where the two summation orders agree to ~1e-16 of the terms."""
    from transformers import AutoModel

    from embedrag.losses import embedding_loss
    from embedrag.model.embedding import EmbeddingModel

    rows = [{"query": "q0", "pos": ["apple pie"], "neg": ["tiger river", "zebra"]},
            {"query": "q1", "pos": ["tiger river"], "neg": ["apple pie", "zebra"]},
            {"query": "q2", "pos": ["zebra"], "neg": ["apple pie", "tiger river"]}]
    data = _set(rows, tok, neg_nums=2)
    batch = Collator(data, tok.pad_token_id, "right")([data[i] for i in range(3)])
    assert batch["passage_input_ids"].shape[0] == 3 and batch["passage_index"].shape[0] == 9
    model = EmbeddingModel(float64_norms(AutoModel.from_pretrained(tiny_decoder,
                                                                   dtype=torch.float64)), "last")

    def run(p_ids, p_mask, index):
        model.zero_grad()
        q = model(batch["query_input_ids"], batch["query_attention_mask"])
        p = model(p_ids, p_mask)[index]
        loss = embedding_loss(q, p, batch["relevant_ids"], batch["passage_ids"], 0.05)
        loss.backward()
        return loss.item(), {n: t.grad.clone() for n, t in model.named_parameters()
                             if t.grad is not None}

    dedup_loss, dedup_grads = run(batch["passage_input_ids"], batch["passage_attention_mask"],
                                  batch["passage_index"])
    every = batch["passage_index"]  # embed all 9 slots, copies included
    full_loss, full_grads = run(batch["passage_input_ids"][every],
                                batch["passage_attention_mask"][every], torch.arange(9))
    assert abs(dedup_loss - full_loss) < 1e-12
    assert len(full_grads) == len(dedup_grads) > 0
    for name, g in full_grads.items():
        torch.testing.assert_close(dedup_grads[name], g, rtol=0, atol=1e-12, msg=name)


def test_arrow_training_set_reproduces_the_list_based_one(tok):
    """Today's draws, exactly: the Arrow-backed set numbers passages, builds relevant sets and
    negatives and draws them as the list-based one did (tests/reference_data.py), over several
    epochs, with shared queries, repeated passages, a second positive and short rows."""
    from embedrag.data.rows import Example
    from tests.reference_data import ListTrainingSet

    rows = learnable_rows(24)
    rows[3]["pos"] = rows[3]["pos"] + [rows[5]["pos"][0]]          # a positive seen elsewhere
    rows.append({"query": rows[0]["query"], "pos": [rows[7]["pos"][0]], "neg": []})  # shared
    rows.append({"query": "lonely", "pos": ["lonely answer"], "neg": [rows[2]["pos"][0]]})
    ex = [Example(r["query"], r["pos"], r.get("neg", []), i + 1) for i, r in enumerate(rows)]
    kw = {"neg_nums": 3, "query_max_len": 16, "passage_max_len": 16, "query_instruction": "Q: ",
          "passage_instruction": "P: ", "append_eos": True, "seed": 5}
    want, got = ListTrainingSet(ex, tok, **kw), TrainingSet(ex, tok, **kw)
    assert got.table.size == len(want.passages) and got.short_rows == want.short_rows > 0
    for epoch in (1, 2, 3):
        want.set_epoch(epoch)
        got.set_epoch(epoch)
        assert [got[i] for i in range(len(ex))] == [want[i] for i in range(len(ex))]
    assert [got.table.text(n) for n in range(got.table.size)] == want.passages
    assert [got.passage_tokens(n) for n in range(got.table.size)] == want.passage_ids
    assert [got.query_tokens(i) for i in range(len(ex))] == want.query_ids


def test_inputs_in_every_format_give_the_same_rows(tmp_path):
    """JSONL, Parquet and a save_to_disk folder load as the same Arrow rows; bad rows of a
    Parquet file are named by row index, the first five, as JSONL's are by line."""
    from embedrag.data.formats import load_rows

    path = write_jsonl(tmp_path / "d.jsonl", learnable_rows(6))
    jsonl = load_rows(path)
    assert jsonl["query"] == [r["query"] for r in learnable_rows(6)]
    jsonl.select_columns(["query", "pos", "neg"]).to_parquet(str(tmp_path / "d.parquet"))
    jsonl.save_to_disk(str(tmp_path / "saved"))
    for other in (load_rows(str(tmp_path / "d.parquet")), load_rows(str(tmp_path / "saved"))):
        assert other.select_columns(["query", "pos", "neg"]).to_list() == \
            jsonl.select_columns(["query", "pos", "neg"]).to_list()
    import datasets

    bad = datasets.Dataset.from_dict({"query": ["q", "", "x", "", "", "", "", ""],
                                      "pos": [["a"], ["b"], [], ["c"], ["d"], ["e"], ["f"], ["g"]]})
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError) as e:
        load_rows(str(tmp_path / "bad.parquet"))
    lines = str(e.value).splitlines()
    assert lines[0] == f"{tmp_path / 'bad.parquet'}: row 1: 'query' is empty"
    assert lines[1] == f"{tmp_path / 'bad.parquet'}: row 2: 'pos' is empty"
    assert len(lines) == 6 and lines[-1].endswith("... and 2 more problem(s)")

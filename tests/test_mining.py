"""mine_negatives.py: false negatives never mined, margins filter near-duplicates, seeded."""

import json

import mine_negatives as mine_script
from embedrag.data.rows import Example, read_jsonl
from embedrag.mining.negatives import bm25_tokens, mine, normalise
from tests.helpers import learnable_rows, write_jsonl

TOPICS = ["apple pie recipe with cinnamon", "river fishing in spring", "zebra stripes explained",
          "tiger habitat in asia", "violet flowers in the garden", "walnut bread baking",
          "quartz crystal formation", "harbor boats at night", "jungle trek safety",
          "kettle descaling with vinegar", "lemon tart baking tips", "marble floor cleaning"]


def _pairs(tmp_path):
    rows = [{"query": t.split(" ", 2)[0] + " " + t.split(" ", 2)[1], "pos": [t]} for t in TOPICS]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def test_bm25_tokens_split_words_and_han_bigrams():
    assert bm25_tokens("Copy FILES 複製檔案") == ["copy", "files", "複製", "製檔", "檔案"]


def test_no_negative_is_a_positive_and_margin_drops_a_near_duplicate(tmp_path, capsys):
    pairs = _pairs(tmp_path)
    corpus = tmp_path / "corpus.txt"
    planted_equal = "APPLE   pie Recipe with cinnamon"          # the positive, re-typed
    near_duplicate = "Apple-pie recipe (with cinnamon)."        # same words, other text
    corpus.write_text("\n".join(TOPICS + [planted_equal, near_duplicate]) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["--input", pairs, "--output", str(out), "--corpus", str(corpus), "--bm25",
            "--neg_nums", "3", "--rank_start", "1", "--rank_end", "14", "--seed", "1"]
    assert mine_script.main(args) == 0
    report = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        positives = {normalise(p) for p in row["pos"]}
        assert len(row["neg"]) == 3
        assert not positives & {normalise(n) for n in row["neg"]}
    apple = next(r for r in rows if r["pos"][0].startswith("apple"))
    assert near_duplicate not in apple["neg"] and planted_equal not in apple["neg"]
    assert "dropped 1 candidates equal to a positive" in report
    assert "and 1 within the score margin" in report  # the near-duplicate
    # without the margin the near-duplicate is a candidate (it is what the filter removed)
    examples = read_jsonl(pairs)
    from embedrag.mining.negatives import bm25_scores

    texts = corpus.read_text().splitlines()
    scores = bm25_scores([e.query for e in examples], texts)
    loose, _ = mine(examples, texts, scores, neg_nums=13, rank_start=1, rank_end=14,
                    relative_margin=100.0, absolute_margin=-1e9, keep_existing=False, seed=1)
    assert near_duplicate in next(r for r in loose if r["pos"][0].startswith("apple"))["neg"]


def test_deterministic_for_a_seed(tmp_path):
    pairs = _pairs(tmp_path)
    outs = []
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        out = tmp_path / f"{name}.jsonl"
        assert mine_script.main(["--input", pairs, "--output", str(out), "--bm25",
                                 "--neg_nums", "2", "--rank_start", "2", "--rank_end", "12",
                                 "--seed", seed]) == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_mined_rows_validate_and_train(tiny_decoder, tmp_path):
    from tests.helpers import run_train

    rows = [{"query": r["query"], "pos": r["pos"]} for r in learnable_rows(12)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "mined.jsonl"
    assert mine_script.main(["--input", pairs, "--output", str(out), "--model_name_or_path",
                             tiny_decoder, "--neg_nums", "2", "--rank_start", "2",
                             "--rank_end", "8", "--relative_margin", "10",
                             "--absolute_margin", "-10"]) == 0  # a random model: no margins
    mined = read_jsonl(str(out))
    assert len(mined) == 12 and all(len(r.neg) == 2 for r in mined)
    assert run_train(tiny_decoder, str(out), tmp_path / "run", "--finetune_type", "lora",
                     "--max_steps", "2", "--save_on_epoch_end", "0")[0] == 0


def test_keep_existing_and_refusals(tmp_path, capsys):
    rows = [{"query": t.split(" ")[0], "pos": [t], "neg": ["own negative"]} for t in TOPICS]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert mine_script.main(["--input", pairs, "--output", str(out), "--bm25", "--neg_nums",
                             "1", "--rank_start", "2", "--keep_existing"]) == 0
    assert all(r.neg[0] == "own negative" and len(r.neg) == 2 for r in read_jsonl(str(out)))
    assert mine_script.main(["--input", pairs, "--output", str(out), "--bm25"]) == 2
    assert "exists" in capsys.readouterr().err
    assert mine_script.main(["--input", pairs, "--output", str(tmp_path / "x"), "--bm25",
                             "--model_name_or_path", "m"]) == 2


def test_mine_reports_rows_short_of_candidates():
    examples = [Example("q", ["a"], [], 1), Example("r", ["b"], [], 2)]
    import torch

    rows, report = mine(examples, ["a", "b"], torch.tensor([[1.0, 0.5], [0.5, 1.0]]),
                        neg_nums=3, rank_start=1, rank_end=10, relative_margin=0.95,
                        absolute_margin=0.0, keep_existing=False, seed=0)
    assert [r["neg"] for r in rows] == [["b"], ["a"]] and report.short_rows == 2


def test_chunked_scores_mine_like_the_full_matrix():
    import torch

    from embedrag.mining.negatives import ChunkedScores

    gen = torch.Generator().manual_seed(0)
    q, p = torch.randn(2100, 8, generator=gen), torch.randn(50, 8, generator=gen)
    corpus = [f"passage {i}" for i in range(50)]
    examples = [Example(f"q{i}", [corpus[i % 50]], [], i) for i in range(2100)]
    kw = {"neg_nums": 3, "rank_start": 2, "rank_end": 20, "relative_margin": 0.9,
          "absolute_margin": 0.0, "keep_existing": False, "seed": 3}
    full, _ = mine(examples, corpus, q @ p.T, **kw)
    chunked, _ = mine(examples, corpus, ChunkedScores(q, p), **kw)
    assert full == chunked


def test_a_corpus_file_is_mined_from_arrow_as_from_a_list(tiny_decoder, tmp_path):
    """--corpus goes through memory-mapped Arrow (duplicates dropped, tokenized by datasets)
    and mines exactly the negatives the same corpus mines as a Python list."""
    import torch

    from embedrag.data.formats import TextColumn
    from embedrag.mining.negatives import embedding_ranker

    rows = [{"query": r["query"], "pos": r["pos"]} for r in learnable_rows(8)]
    passages = [r["pos"][0] for r in learnable_rows(24)] + [TOPICS[0], TOPICS[0]]
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in passages))
    column = TextColumn(str(corpus_file))
    assert list(column) == list(dict.fromkeys(passages))  # distinct, first-seen order
    examples = read_jsonl(write_jsonl(tmp_path / "pairs.jsonl", rows))
    rank = embedding_ranker(tiny_decoder, None, 8)
    queries = [e.query for e in examples]
    from_arrow, from_list = rank(queries, column), rank(queries, list(column))
    assert torch.allclose(from_arrow[0:len(queries)], from_list[0:len(queries)], atol=1e-6)
    kw = {"neg_nums": 2, "rank_start": 2, "rank_end": 10, "relative_margin": 10.0,
          "absolute_margin": -10.0, "keep_existing": False, "seed": 1}
    assert mine(examples, column, from_arrow, **kw)[0] == \
        mine(examples, list(column), from_list, **kw)[0]

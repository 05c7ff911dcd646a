"""evaluate.py on the BEIR layout, scored as pytrec_eval scores it (an independent
implementation: trec_eval's C code), graded relevance, a qrels document missing from the
corpus and a query whose own id is in the corpus included."""

import json
import random

import pytest
import pytrec_eval
import torch

import evaluate as evaluate_script
from tests.helpers import WORDS


@pytest.fixture(scope="module")
def beir_folder(tmp_path_factory):
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("beir")
    docs = {f"d{i}": {"_id": f"d{i}", "title": rng.choice(WORDS) if i % 3 else "",
                      "text": " ".join(rng.choices(WORDS, k=8))} for i in range(40)}
    docs["q3"] = {"_id": "q3", "title": "", "text": "a document sharing a query's id"}
    queries = {f"q{i}": " ".join(rng.choices(WORDS, k=3)) for i in range(12)}
    qrels = [(f"q{i}", f"d{(3 * i + k) % 40}", grade)
             for i in range(12) for k, grade in enumerate([2, 1, 0])]
    qrels.append(("q5", "d_missing", 1))  # relevant, not in the corpus
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs.values()))
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in qrels))
    return folder, docs, queries, qrels


def test_beir_metrics_equal_pytrec_eval(beir_folder, tiny_encoder, tmp_path):
    from embedrag.model.loading import load_embedder

    folder, docs, queries, qrels = beir_folder
    out = tmp_path / "metrics.json"
    assert evaluate_script.main(["--model_path", tiny_encoder, "--eval_dataset", str(folder),
                                 "--pooling", "mean", "--dims", "16",
                                 "--output_file", str(out)]) == 0
    ours = json.loads(out.read_text())

    # independent: embed the texts as plain lists, rank with torch, score with trec_eval
    model, tok, settings = load_embedder(tiny_encoder, overrides={"pooling": "mean"})
    ids = list(docs)
    texts = [(d["title"] + " " + d["text"]).strip() for d in docs.values()]
    p = model.encode(tok, texts, max_len=settings.passage_max_len, append_eos=False)
    q = model.encode(tok, list(queries.values()), max_len=settings.query_max_len,
                     append_eos=False)
    truth = {}
    for qid, doc, grade in qrels:
        truth.setdefault(qid, {})[doc] = grade

    def trec_eval(q, p):
        scores = (q.double() @ p.double().T).tolist()
        run10, run100 = {}, {}
        for qid, row in zip(queries, scores, strict=True):
            ranked = sorted((s, d) for s, d in zip(row, ids, strict=True) if d != qid)[::-1]
            run100[qid] = {d: s for s, d in ranked[:100]}
            run10[qid] = {d: s for s, d in ranked[:10]}

        def mean(run, measure, key):
            per_query = pytrec_eval.RelevanceEvaluator(truth, {measure}).evaluate(run)
            return sum(v[key] for v in per_query.values()) / len(per_query)

        return {"ndcg@10": mean(run100, "ndcg_cut.10", "ndcg_cut_10"),
                "mrr@10": mean(run10, "recip_rank", "recip_rank"),
                "recall@1": mean(run100, "recall.1", "recall_1"),
                "recall@10": mean(run100, "recall.10", "recall_10"),
                "recall@100": mean(run100, "recall.100", "recall_100"),
                "map@100": mean(run100, "map_cut.100", "map_cut_100")}

    full = {k: v for k, v in ours.items() if not k.startswith("dim")}
    assert full == pytest.approx(trec_eval(q, p), abs=1e-6)
    assert 0 < ours["ndcg@10"] < 1 and ours["recall@100"] < 1  # d_missing: never found
    # the first 16 dimensions, re-normalised, as an embedding of their own (Matryoshka)
    short = trec_eval(*(torch.nn.functional.normalize(x[:, :16], dim=-1) for x in (q, p)))
    assert {k[len("dim16/"):]: v for k, v in ours.items() if k.startswith("dim16/")} == \
        pytest.approx(short, abs=1e-6)
    assert short != pytest.approx(full, abs=1e-3)  # the prefix ranks differently


def test_graded_ndcg_by_hand():
    from embedrag.eval.metrics import query_metrics

    got = query_metrics([7, 3, 9], {3: 2, 9: 1, 5: 0})
    dcg = 2 / torch.log2(torch.tensor(3.0)).item() + 1 / 2
    ideal = 2 + 1 / torch.log2(torch.tensor(3.0)).item()
    assert got["ndcg@10"] == pytest.approx(dcg / ideal)
    assert got["mrr@10"] == pytest.approx(0.5) and got["recall@10"] == 1.0

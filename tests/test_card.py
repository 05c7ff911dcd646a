"""Model cards: what they say is what the run's files say, and their code embeds as training did.

The usage snippets are taken out of the written README.md and executed; their embeddings are
compared with those of EmbedRAG's own EmbeddingModel (load_embedder), the model evaluate.py
and the training loop measure."""

import json
import os
import re
import shutil

import pytest
import torch
import yaml

import merge as merge_script
from embedrag.model.loading import load_embedder
from embedrag.publish.card import base_identity, count_rows, write_card

TEMPLATE = "[More Information Needed]"  # PEFT's blank model card, 100+ times


def split_card(path):
    """(front matter as a dict, Markdown body) of a README.md."""
    text = open(path, encoding="utf-8").read()
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def snippet_differences(folder):
    """Run every Python block of folder/README.md; for each, the largest difference between
    its query and passage embeddings and EmbeddingModel's for the same texts."""
    _, body = split_card(os.path.join(folder, "README.md"))
    blocks = re.findall(r"```python\n(.*?)```", body, re.S)
    model, tokenizer, settings = load_embedder(str(folder))
    differences = []
    for code in blocks:
        space = {}
        exec(compile(code, f"{folder}/README.md", "exec"), space)
        for texts, got, max_len, prefix in (
                ("queries", "query_embeddings", settings.query_max_len,
                 settings.query_instruction),
                ("passages", "passage_embeddings", settings.passage_max_len,
                 settings.passage_instruction)):
            want = model.encode(tokenizer, space[texts], max_len=max_len,
                                append_eos=settings.append_eos, instruction=prefix)
            got = torch.as_tensor(space[got]).float().cpu()
            assert got.shape == want.shape
            differences.append((got - want).abs().max().item())
    assert len(blocks) == 2 and len(differences) == 4  # transformers and sentence-transformers
    return differences


# --- a run of train.py: final/, its checkpoints, its merge ----------------------------------

def test_final_card_tells_the_run_as_its_files_do(cli_run):
    out, _ = cli_run
    meta, body = split_card(out / "final" / "README.md")
    summary = json.loads((out / "training_summary_report.json").read_text())
    args = summary["config"]
    assert TEMPLATE not in body  # PEFT's template replaced
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "feature-extraction"
    assert {"embedrag", "lora"} <= set(meta["tags"]) and "base_model" not in meta
    data = args["train_dataset"][0]
    rows = sum(1 for line in open(data) if line.strip())
    assert f"- Data: `{data}` ({rows} rows);" in body
    assert f"{summary['totals']['steps']} optimizer steps, {summary['totals']['samples']} " \
           "queries" in body
    assert "LoRA (r 4, alpha 8, dropout 0.1)" in body and "Attention: bidirectional" in body
    assert "--query_instruction 'query: '" in body and "--gradient_checkpointing" in body
    for metric, values in summary["eval"]["metrics"].items():
        assert f"| {metric} | {values['before']:.4f} | {values['after']:.4f} | " \
               f"{values['change']:+.4f} |" in body
    assert "![training curves](training_curves.png)" in body
    assert (out / "final" / "training_curves.png").read_bytes() == \
        (out / "training_curves.png").read_bytes()


def test_final_card_is_what_the_saved_folder_gives(cli_run, tmp_path):
    """The run writes final/README.md with the tokenizer it holds, not one loaded again from
    final/: the card must be the same as one written from the folder alone."""
    out, _ = cli_run
    summary = json.loads((out / "training_summary_report.json").read_text())
    copy = tmp_path / "final"
    shutil.copytree(out / "final", copy)
    write_card(str(copy), target=str(out / "final"), summary=summary)
    assert (copy / "README.md").read_text() == (out / "final" / "README.md").read_text()


def test_checkpoint_cards_tell_how_far_training_had_come(cli_run):
    out, _ = cli_run
    summary = json.loads((out / "training_summary_report.json").read_text())
    per_epoch = {e["epoch"]: e for e in summary["eval"]["per_epoch"]}
    # epoch 2 stopped at --max_steps, part way: no checkpoint of it
    assert not (out / "checkpoint-epoch-2").exists() and 2 in per_epoch
    _, body = split_card(out / "checkpoint-epoch-1" / "README.md")
    assert TEMPLATE not in body and "a checkpoint after epoch 1" in body
    assert "as of the last logged step, 2 optimizer steps" in body
    assert "| metric | epoch 1 |\n" in body  # the epochs done by then, no later one
    assert f"| ndcg@10 | {per_epoch[1]['ndcg@10']:.4f} |\n" in body
    _, body = split_card(out / "checkpoint-step-3" / "README.md")
    state = json.loads((out / "checkpoint-step-3" / "trainer_state.json").read_text())["state"]
    assert "a checkpoint at optimizer step 3" in body and "So far: 3 optimizer steps" in body
    before = summary["eval"]["metrics"]["ndcg@10"]["before"]
    ndcg = per_epoch[1]["ndcg@10"]
    assert f"| ndcg@10 | {before:.4f} | {ndcg:.4f} | {ndcg - before:+.4f} |" in body
    assert state["step"] == 3


def test_snippets_of_a_lora_run_and_of_its_merge_embed_as_training(cli_run, tiny_decoder,
                                                                    tmp_path):
    out, _ = cli_run
    assert max(snippet_differences(out / "final")) < 1e-5
    merged = tmp_path / "merged"
    assert merge_script.main(["--base_model_path", tiny_decoder, "--lora_adapter_path",
                              str(out / "final"), "--output_path", str(merged)]) == 0
    meta, body = split_card(merged / "README.md")
    assert meta["library_name"] == "sentence-transformers"
    assert "sentence-transformers" in meta["tags"]
    report = json.loads((merged / "merge_report.json").read_text())
    assert f"within {report['max_abs_diff']:.1e} of original base + adapter" in body
    summary = json.loads((out / "training_summary_report.json").read_text())
    after = summary["eval"]["metrics"]["ndcg@10"]["after"]
    assert f"{after:.4f}" in body and (merged / "training_curves.png").is_file()
    assert 'SentenceTransformer("' + str(merged) + '")' in body
    assert max(snippet_differences(merged)) < 1e-5


# --- folders shaped as train.py writes them, for the settings the run above does not use ----

def _as_trained(source, folder, base, **settings):
    """`source` saved as a full fine-tune of `base` with these embedding settings."""
    shutil.copytree(source, folder)
    config = {"base_model": str(base), "finetune_type": "full", "normalize": True,
              "query_instruction": "", "passage_instruction": "", "query_max_len": 32,
              "passage_max_len": 48, "append_eos": False, "attention": "model",
              "dense_modules": [], **settings}
    (folder / "training_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind", ["cls_prompts", "mean_dense", "last_left_padded"])
def test_snippets_for_each_pooling_prompt_padding_and_dense_head(
        kind, tiny_encoder, tiny_st_encoder, tiny_decoder_left, tmp_path):
    source, settings = {
        "cls_prompts": (tiny_encoder, {"pooling": "cls", "query_instruction": "query: ",
                                       "passage_instruction": "passage: "}),
        "mean_dense": (tiny_st_encoder, {"pooling": "mean", "query_instruction": "query: ",
                                         "dense_modules": ["2_Dense"]}),
        "last_left_padded": (tiny_decoder_left, {"pooling": "last", "append_eos": True,
                                                 "query_max_len": 8}),
    }[kind]
    folder = _as_trained(source, tmp_path / "m", source, **settings)
    write_card(str(folder))
    meta, body = split_card(folder / "README.md")
    assert meta["library_name"] == "transformers" and "full-fine-tune" in meta["tags"]
    assert max(snippet_differences(folder)) < 1e-5


def test_front_matter_names_the_base_and_its_license(tiny_encoder, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_encoder, base)
    (base / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/tiny-bert\n"
                                    "tags: [x]\n---\n# tiny\n")
    folder = _as_trained(tiny_encoder, tmp_path / "m", base, pooling="mean")
    write_card(str(folder))
    meta, body = split_card(folder / "README.md")
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "org/tiny-bert"
    assert "tags" in meta and "x" not in meta["tags"]  # the base's own tags are its own
    assert base_identity("org/name") == ("org/name", {})
    cache = "/c/hub/models--acme--embed-v1/snapshots/0123abc"
    assert base_identity(cache)[0] == "acme/embed-v1"
    assert base_identity(str(tiny_encoder)) == (None, {})


def test_row_counts_of_every_input_format(tmp_path):
    from datasets import Dataset

    rows = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": []} for i in range(5)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n  \n")
    Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    Dataset.from_list(rows[:3]).save_to_disk(str(tmp_path / "saved"))
    assert count_rows(str(jsonl)) == 5
    assert count_rows(str(tmp_path / "rows.parquet")) == 5
    assert count_rows(str(tmp_path / "saved")) == 3
    assert count_rows("hub:org/data") is None and count_rows(str(tmp_path / "gone")) is None

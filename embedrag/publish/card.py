"""The model card: README.md with Hugging Face front matter in every model folder we write.

A folder that is handed on (final/, a checkpoint, a merged model) must say what it is: the base
model, the data, the flags, how long and on what it trained, how much it improved retrieval, and
how to embed with it — the last one as code that runs, since a wrong pooling or a missing prompt
fails silently (see `embedrag/publish/usage.py`). Everything comes from files already in the
folder or the run's output folder (training_config.json, the JSON logs, the summary report), so
a card can be rewritten at any time and says only what those files say. PEFT writes its own
blank template README.md into an adapter folder; ours replaces it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Any

from embedrag import __version__
from embedrag.config import TrainConfig
from embedrag.data.formats import count_rows
from embedrag.hardware import hardware
from embedrag.io import read_json, read_training_config, write_text
from embedrag.model.recipe import model_file
from embedrag.model.tokens import load_tokenizer
from embedrag.publish.curves import FILE as CURVES
from embedrag.publish.curves import write_curves
from embedrag.publish.usage import (
    Usage,
    sentence_transformers_snippet,
    transformers_snippet,
    usage_of,
)

CARD = "README.md"
PRECISION = {"bf16": "bfloat16 autocast", "fp16": "float16 autocast", "no": "float32"}
HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+")
KIND = {"lora": "LoRA adapter", "qlora": "QLoRA adapter", "full": "fully fine-tuned model",
        "merged": "merged model (LoRA folded into its base)"}


# --- facts gathered from files ---
def front_matter_of(path: str | None) -> dict[str, Any]:
    """The YAML front matter of a model card (README.md), or {}."""
    if path is None or not os.path.isfile(path):
        return {}
    import yaml

    with open(path, encoding="utf-8") as f:
        text = f.read()
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def base_identity(base: str) -> tuple[str | None, dict[str, Any]]:
    """(the base model's Hub id where it can be told, its own card's front matter).

    A Hub id is itself; a folder of the Hub cache (…/models--org--name/snapshots/…) is
    org/name; another local folder is named by its own card's base_model, if it has one."""

    meta = front_matter_of(model_file(base, CARD))
    if not os.path.isdir(base) and HUB_ID.fullmatch(base):
        return base, meta
    cached = re.search(r"models--([^/\\]+?)--([^/\\]+)", base)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}", meta
    named = meta.get("base_model")
    named = named[0] if isinstance(named, list) and named else named
    return (named if isinstance(named, str) and HUB_ID.fullmatch(named) else None), meta


def progress(folder: str, args: dict[str, Any], summary: dict[str, Any] | None,
             name: str = "") -> dict:
    """How far training had come when this folder was written: from the run's summary (a
    finished run), the folder's trainer_state.json (a step checkpoint), or the run's logs (up
    to its epoch, for checkpoint-epoch-N)."""
    if summary:
        totals = summary["totals"]
        return {"step": totals["steps"], "samples": totals["samples"],
                "seconds": totals["seconds"], "loss": summary.get("final_loss"),
                "processes": summary.get("world_size"), "finished": True,
                "eval": summary.get("eval")}
    state = (read_json(os.path.join(folder, "trainer_state.json")) or {}).get("state")
    if state:
        evals = state.get("evals") or {}
        return {"step": state["step"], "samples": state["samples"],
                "seconds": state["elapsed_s"], "loss": state.get("last_loss"),
                "processes": state.get("world_size"), "finished": False,
                "eval": _eval_table(evals.get("before"), evals.get("per_epoch") or [])}
    out = args.get("output_dir", "")
    steps = read_json(os.path.join(out, "detailed_training_logs.json")) or []
    epochs = read_json(os.path.join(out, "training_losses.json")) or []
    if re.fullmatch(r"checkpoint-epoch-\d+", name):
        upto = int(name.rsplit("-", 1)[-1])
        steps = [r for r in steps if r["epoch"] <= upto]
        epochs = [r for r in epochs if r["epoch"] <= upto]
    last = steps[-1] if steps else {}
    per_epoch = [{"epoch": e["epoch"], **e["eval"]} for e in epochs if e.get("eval")]
    return {"step": last.get("step"), "seconds": last.get("elapsed_s"), "loss": last.get("loss"),
            "finished": False, "logged": True, "eval": _eval_table(None, per_epoch)}


def _eval_table(before: dict | None, per_epoch: list[dict]) -> dict | None:
    if before is None and not per_epoch:
        return None
    metrics = list(before or {k: v for k, v in per_epoch[0].items()
                             if k not in ("epoch", "step")})
    return {"metrics": {m: {**({"before": before[m]} if before else {}),
                            **{f"epoch {e['epoch']}": e[m] for e in per_epoch}}
                        for m in metrics}}


# --- the card ---
def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(metrics: dict[str, dict[str, Any]]) -> list[str]:
    columns = list(next(iter(metrics.values())))
    has_change = "change" not in columns and "before" in columns and len(columns) > 1
    header = ["metric", *columns, *(["change"] if has_change else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric, values in metrics.items():
        cells = [f"{values[c]:+.4f}" if c == "change" else _number(values[c]) for c in columns]
        if has_change:
            cells.append(f"{values[columns[-1]] - values['before']:+.4f}")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}h {minutes % 60:02d}m {s:02d}s" if minutes >= 60 else \
        f"{minutes}m {s:02d}s" if minutes else f"{seconds:.1f}s"


def command_line(args: dict[str, Any]) -> str:
    """train.py with the flags that differ from their defaults (and the required ones)."""
    parts = ["python train.py"]
    for f in dataclasses.fields(TrainConfig):
        value = args.get(f.name, f.default)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if isinstance(value, bool):
            parts.append(f"--{f.name}") if value else None
        elif value is not None:
            texts = [str(v) for v in value] if isinstance(value, list) else [str(value)]
            quoted = [t if re.fullmatch(r"[\w./:@%+=,-]+", t) else "'" + t.replace(
                "'", "'\\''") + "'" for t in texts]
            parts.append(f"--{f.name} {' '.join(quoted)}")
    return " \\\n    ".join(parts)


def _mode(config: dict[str, Any], args: dict[str, Any]) -> str:
    kind = args.get("finetune_type", config["finetune_type"])
    if kind == "full":
        return "full fine-tuning: every weight trained"
    targets = ", ".join(config.get("lora_target_modules") or []) or "every linear layer"
    mode = (f"LoRA (r {args.get('lora_r')}, alpha {args.get('lora_alpha')}, dropout "
            f"{args.get('lora_dropout')}) on {targets}")
    if kind == "qlora":
        bits = config.get("quantization_bits") or args.get("quantization_bits")
        quant = "4-bit NF4 with double quantization" if bits == 4 else "8-bit LLM.int8"
        mode = f"QLoRA: {mode}, the frozen base quantized to {quant} (bitsandbytes)"
    return mode


def front_matter(kind: str, base_id: str | None, base_meta: dict[str, Any],
                 train_data: str) -> dict[str, Any]:
    """The Hub's metadata: what the model is, what it came from, under which license."""
    meta: dict[str, Any] = {"base_model": base_id} if base_id else {}
    meta["library_name"] = {"lora": "peft", "qlora": "peft", "full": "transformers",
                            "merged": "sentence-transformers"}[kind]
    meta["pipeline_tag"] = "sentence-similarity" if kind == "merged" else "feature-extraction"
    meta["tags"] = ["embedrag", "text-embeddings", "retrieval", "sentence-similarity",
                    "feature-extraction", *(["sentence-transformers"] if kind == "merged" else []),
                    {"lora": "lora", "qlora": "qlora", "full": "full-fine-tune",
                     "merged": "merged-lora"}[kind]]
    for key in ("license", "license_name", "license_link"):
        if base_meta.get(key):
            meta[key] = base_meta[key]
    hub = [d[4:].split(":")[0] for d in ([train_data] if isinstance(train_data, str)
                                          else train_data) if d.startswith("hub:")]
    if hub:
        meta["datasets"] = hub
    return meta


def _intro(name: str, kind: str, base: str, base_id: str | None, base_meta: dict[str, Any],
           config: dict[str, Any], merge: dict[str, Any] | None) -> list[str]:
    if name.startswith("checkpoint-epoch-"):
        stage = f"; a checkpoint after epoch {name.rsplit('-', 1)[-1]}"
    elif name.startswith("checkpoint-step-"):
        stage = (f"; a checkpoint at optimizer step {name.rsplit('-', 1)[-1]}, with the "
                 "optimizer, schedule and data position to resume from")
    else:
        stage = ""
    link = f"[{base_id}](https://huggingface.co/{base_id})"
    from_card = os.path.isdir(base) and "models--" not in base  # named by the folder's card
    hub = "" if not base_id else f" (whose own card names {link} as its base)" if from_card \
        else f" (on the Hub: {link})"
    lines = [f"# {os.path.basename(os.path.normpath(base)) or 'model'}: {KIND[kind]} for "
             "text embeddings", "",
             "A text-embedding model fine-tuned with contrastive learning (InfoNCE) by EmbedRAG "
             f"from `{base}`{hub}{stage}.", ""]
    if base_meta.get("license"):
        lines += [f"License: `{base_meta['license']}`, as the base model's own card states; "
                  "the base model's terms apply to this model.", ""]
    if merge:
        lines += [f"Merged from the adapter `{config.get('merged_from')}` into "
                  f"{merge.get('merged_into')}, stored in {merge.get('precision')}; verified: "
                  f"the merged model embeds {len(merge.get('probes', []))} probe texts within "
                  f"{merge.get('max_abs_diff', 0):.1e} of {merge.get('verified_against')} "
                  f"(tolerance {merge.get('tolerance', 0):.0e}).", ""]
    return lines


def _usage(usage: Usage, config: dict[str, Any]) -> list[str]:
    prompts = (f"Queries are prefixed with `{usage.query_instruction!r}`"
               if usage.query_instruction else "Queries take no prompt") + (
        f", passages with `{usage.passage_instruction!r}`." if usage.passage_instruction
        else ", passages none.")
    eos = usage.eos_template or config.get("tokenizer_appends_eos")
    lines = ["## Usage", "",
             f"Embeddings: {usage.pooling} pooling"
             + (" (last real token)" if usage.pooling == "last" else "")
             + (f", through the model's Dense layers {', '.join(usage.dense)}" if usage.dense
                else "")
             + f", L2-normalised; score by dot product (cosine). {prompts} Queries are cut at "
             f"{usage.query_max_len} tokens, passages at {usage.passage_max_len}."
             + (" Every text ends with the EOS token, appended after truncation." if eos
                else ""), ""]
    if usage.kind == "qlora":
        lines += ["This adapter was trained on a quantized base, and embeds as trained only on "
                  "that base quantized the same way (below). For serving, fold it into a plain "
                  "model with EmbedRAG's `merge.py` (it verifies the merge).", ""]
    return lines + [
        "With transformers" + (" and PEFT" if usage.adapter else "") + ":", "",
        "```python", transformers_snippet(usage).rstrip(), "```", "",
        "With sentence-transformers:", "",
        "```python", sentence_transformers_snippet(usage).rstrip(), "```", "",
        *([f"Trained as Matryoshka embeddings: the first {', '.join(map(str, dims))} "
           "numbers are embeddings of their own — slice and re-normalise them, or "
           f"`SentenceTransformer(..., truncate_dim={dims[-1]})` and score by cosine (it "
           "truncates after normalising).", ""]
          if (dims := [d for d in config.get("matryoshka_dims") or []
                       if d < config.get("embedding_dim", 0)]) else []),
        "EmbedRAG's own `evaluate.py --model_path` and `EmbeddingModel` read "
        "`training_config.json` in this folder and embed the same way.", ""]


def _evaluation(at: dict[str, Any], args: dict[str, Any],
                merge: dict[str, Any] | None) -> list[str]:
    evaluation, scores = at.get("eval"), (merge or {}).get("eval")
    if not evaluation and not scores:
        return []
    lines = ["## Evaluation", ""]
    if evaluation:
        data = args.get("eval_dataset", "")
        rows = count_rows(data)
        columns = list(next(iter(evaluation["metrics"].values())))
        if at["finished"]:
            when = "Before and after training:"
        elif columns == ["before"]:
            when = "Before training:"
        else:
            when = ", ".join(c.replace("epoch", "after epoch") for c in columns).capitalize()
            when += ":"
        lines += [f"Retrieval on `{data}`" + (f" ({rows} queries)" if rows else "")
                  + ": each query ranked against every distinct passage of the file, its "
                  f"`pos` passages relevant. {when}", "", *_table(evaluation["metrics"]), ""]
    if scores:
        lines += ["Scored by merge.py before writing:", "",
                  *_table({m: {name: s[m] for name, s in scores.items()}
                           for m in next(iter(scores.values()))}), ""]
    return lines


def _training(folder: str, at: dict[str, Any], args: dict[str, Any],
              config: dict[str, Any]) -> list[str]:
    files = config.get("datasets") or [
        {"path": d} for d in ([args.get("train_dataset", "")] if isinstance(
            args.get("train_dataset", ""), str) else args["train_dataset"])]
    for d in files:  # a stream is never read whole
        d.setdefault("rows", None if args.get("streaming") else count_rows(d["path"]))
    data = ", ".join(f"`{d['path']}`" + (f" ({d['rows']} rows" + (
        f", {d['share_of_steps']:.0%} of the steps, query instruction "
        f"{d.get('query_instruction')!r}" if len(files) > 1 else "") + ")" if d["rows"] else "")
        for d in files)
    everywhere = (at.get("processes") or 1) > 1 and args.get("cross_device_negatives")
    dims = config.get("matryoshka_dims")
    lines = ["## Training", "",
             f"- Mode: {_mode(config, args)}.",
             "- Data: " + ("one file per optimizer step from " if len(files) > 1 else "")
             + data + f"; {args.get('neg_nums')} hard negatives per query plus every other "
             "passage of the batch" + (" on every process" if everywhere else "") + ".",
             f"- Loss: InfoNCE at temperature {args.get('temperature')}"
             + (f" + {args['kd_weight']} x KL(teacher || student) from the rows' teacher "
                f"scores (at temperature {args.get('kd_temperature')})"
                if args.get("kd_weight") else "")
             + (f", on the embedding's prefixes {', '.join(map(str, dims))} (Matryoshka)"
                if dims else "") + "; batch "
             f"{args.get('batch_size')} queries per process x "
             f"{args.get('gradient_accumulation_steps')} accumulation step(s); learning rate "
             f"{args.get('lr')}, {args.get('warmup_proportion')} warm-up then linear decay.",
             f"- Precision: {PRECISION.get(config.get('mixed_precision'), 'float32')}, base "
             f"weights stored in {config.get('base_dtype', 'float32')}.",
             f"- Attention: {config.get('attention', 'model')}."]
    if at.get("step") is not None:
        lines.append(
            ("- Run: " if at["finished"] else "- So far: ")
            + ("as of the last logged step, " if at.get("logged") else "")
            + f"{at['step']} optimizer steps"
            + (f", {at['samples']} queries" if at.get("samples") else "")
            + f", {_duration(at.get('seconds'))}"
            + (f", last logged loss {at['loss']:.4f}" if at.get("loss") is not None else "")
            + (f", {at['processes']} process(es)" if at.get("processes") else "") + ".")
    lines += [f"- Hardware: {hardware()}.", ""]
    if os.path.isfile(os.path.join(folder, CURVES)):
        lines += [f"![training curves]({CURVES})", "",
                  "Loss and learning rate per logged step; retrieval metrics per epoch.", ""]
    return lines + ["The command, with every flag that differs from its default (every flag's "
                    "value is in `training_config.json`, under `train_args`):", "",
                    "```bash", command_line(args), "```", ""]


def render(folder: str, config: dict[str, Any], usage: Usage, *, name: str = "",
           summary: dict[str, Any] | None = None, merge: dict[str, Any] | None = None) -> str:
    """The card's text (front matter + Markdown) for the model in `folder`, whose own name is
    `name` (default: the folder's; a folder being written is a .tmp sibling of its name)."""
    import yaml

    args = config.get("train_args") or {}
    kind = config["finetune_type"]
    base = config.get("base_model") or args.get("model_name_or_path", "")
    base_id, base_meta = base_identity(base)
    name = name or os.path.basename(os.path.normpath(folder))
    at = progress(folder, args, summary, name)
    lines = [*_intro(name, kind, base, base_id, base_meta, config, merge),
             *_usage(usage, config), *_evaluation(at, args, merge),
             *(_training(folder, at, args, config) if args else []),
             f"Written by EmbedRAG {__version__}.", ""]
    meta = front_matter(kind, base_id, base_meta, args.get("train_dataset", ""))
    return f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n\n" + \
        "\n".join(lines)


def write_card(folder: str, *, target: str | None = None, tokenizer: Any = None,
               summary: dict[str, Any] | None = None, merge: dict[str, Any] | None = None,
               ) -> str:
    """Write folder/README.md for the model in `folder`, whose snippets read it at `target`
    (where the folder will be once committed; default `folder`). Returns the card's path."""
    config = read_training_config(folder)
    if config is None:
        raise FileNotFoundError(f"{folder}: no training_config.json to describe")
    target = os.path.abspath(target or folder)
    if tokenizer is None:
        tokenizer = load_tokenizer(folder)
    usage = usage_of(config, folder, tokenizer, target)
    text = render(folder, config, usage, name=os.path.basename(target), summary=summary,
                  merge=merge)
    path = os.path.join(folder, CARD)
    write_text(path, text)
    return path


def publish(output_dir: str, summary: dict[str, Any], tokenizer: Any = None) -> str:
    """At the end of a run (main process): draw training_curves.png, put a copy beside the
    model in final/ and rewrite final/README.md with the whole run. Returns a line to print;
    a failure here is reported, and leaves the trained model as it is. `tokenizer` is the one
    final/ was saved with: passing it spares loading it again (4 s for Gemma 3's 262k vocab)."""
    import sys

    final, done = os.path.join(output_dir, "final"), []
    try:
        curves = write_curves(output_dir, summary)
        if curves:
            shutil.copyfile(curves, os.path.join(final, CURVES))
            done.append(f"training curves: {curves}")
        done.insert(0, f"model card: {write_card(final, summary=summary, tokenizer=tokenizer)}")
    except Exception as e:  # the weights are saved; a picture or a card is not worth a crash
        print(f"warning: {type(e).__name__}: {e} (writing the model card and curves)",
              file=sys.stderr)
    return "; ".join(done)

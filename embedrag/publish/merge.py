"""Folding a LoRA/QLoRA adapter into its base model, verified, in a sentence-transformers layout.

The merge is checked, not trusted: probe texts are embedded by base+adapter (PEFT) before the
merge and by the merged folder reloaded from disk after it; the merge is committed only if the
two agree within the precision's tolerance, and refused if the adapter changed nothing at all.
A QLoRA adapter is merged into plain (unquantized) weights — adding the update to 4/8-bit
weights would round it away or corrupt them — by default the base's quantized weights
dequantized, which is the model training computed with, or optionally the original weights.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from embedrag.eval.evaluate import evaluate, format_table
from embedrag.io import atomic_dir, commit_dir, read_json, read_training_config, write_json
from embedrag.model.embedding import EmbeddingModel, EmbedSettings
from embedrag.model.loading import apply_adapter, check_remote_code, load_base, model_config
from embedrag.model.recipe import load_head
from embedrag.model.tokens import (
    load_tokenizer,
    make_tokenizer_append_eos,
    resolve_append_eos,
)
from embedrag.publish.card import CURVES, write_card

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Max abs difference allowed between PEFT and merged embeddings (unit vectors). Merging rounds
# W + BA to the storage dtype once, while PEFT adds BA in float32 at run time; in float32 that
# is float noise, in 16-bit formats it is the format's own rounding (bf16 keeps 8 bits).
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}
PROBES = [
    "How do I open a file for reading?",
    "台北最好的牛肉麵店在哪裡",
    "The quick brown fox jumps over the lazy dog.",
    "Instruct: retrieve passages\nQuery: list files in a directory",
    "機器學習入門：從線性回歸到深度學習",
    "x",
]
ST_POOLING = {"last": "lasttoken", "mean": "mean_tokens", "cls": "cls_token"}


class MergeError(RuntimeError):
    """A refusal: bad input, nothing written."""


class VerificationError(RuntimeError):
    """The merged model does not embed as base+adapter does; nothing written."""


def adapter_folder(path: str) -> str:
    """The adapter's folder, given the folder or its adapter_model.safetensors."""
    folder = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path
    if not os.path.isdir(folder):
        raise MergeError(f"--lora_adapter_path {path}: no such file or folder")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise MergeError(f"--lora_adapter_path: {os.path.join(folder, name)} is missing")
    return folder


def check_adapter_fits(base: torch.nn.Module, folder: str) -> None:
    """Every adapted module exists in the base with the shapes the adapter was trained for."""
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for key, shape in sorted(shapes.items()):
        for part, dim, attr in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
            if part not in key:
                continue
            module_name = key.split(part)[0].removeprefix("base_model.model.")
            try:
                module = base.get_submodule(module_name)
            except AttributeError:
                raise MergeError(f"adapter was made for a different base: it adapts "
                                 f"'{module_name}', which the base model does not have") from None
            have = getattr(module, attr, None)
            if have != shape[dim]:
                raise MergeError(f"adapter was made for a different base: '{module_name}' has "
                                 f"{attr}={have} in the base, {shape[dim]} in the adapter")


def settings_for(folder: str, tokenizer: Any, say: Callable[[str], None]) -> EmbedSettings:
    config = read_training_config(folder)
    if config is None:
        say(f"note: no training_config.json in {folder}; assuming last-token pooling, no "
            "instruction, EOS appended as gte-Qwen2 does")
        return EmbedSettings(append_eos=resolve_append_eos("auto", "last", tokenizer))
    return EmbedSettings.from_training_config(config)


def write_sentence_transformers_files(path: str, settings: EmbedSettings, dim: int,
                                      dense: list[str]) -> None:
    """modules.json + Pooling (+ the Dense modules already saved in their folders) + Normalize,
    with the prompts, in the layout sentence-transformers 2.x to 6.x read."""
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), *((d, "Dense") for d in dense)]
    modules.append((f"{len(modules)}_Normalize", "Normalize"))
    write_json(os.path.join(path, "modules.json"), [
        {"idx": i, "name": str(i), "path": sub, "type": f"sentence_transformers.models.{kind}"}
        for i, (sub, kind) in enumerate(modules)])
    write_json(os.path.join(path, "sentence_bert_config.json"),
               {"max_seq_length": settings.passage_max_len, "do_lower_case": False})
    pooling = {f"pooling_mode_{mode}": mode == ST_POOLING[settings.pooling]
               for mode in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                            "weightedmean_tokens", "lasttoken")}
    os.makedirs(os.path.join(path, "1_Pooling"))
    write_json(os.path.join(path, "1_Pooling", "config.json"),
               {"word_embedding_dimension": dim, **pooling, "include_prompt": True})
    os.makedirs(os.path.join(path, modules[-1][0]))
    prompts = {"query": settings.query_instruction, "document": settings.passage_instruction}
    write_json(os.path.join(path, "config_sentence_transformers.json"),
               {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"})


def _embed(model: EmbeddingModel, tok: Any, settings: EmbedSettings) -> torch.Tensor:
    return model.encode(tok, PROBES, max_len=settings.passage_max_len,
                        append_eos=settings.append_eos, batch_size=len(PROBES),
                        instruction=settings.passage_instruction)


def describe_merge(tmp: str, output_path: str, adapter: str, report: dict[str, Any]) -> None:
    """The merged folder's model card, with the training run's curves and summary when the
    adapter is a run's final/ folder."""

    if os.path.isfile(os.path.join(adapter, CURVES)):
        shutil.copyfile(os.path.join(adapter, CURVES), os.path.join(tmp, CURVES))
    run = os.path.dirname(os.path.abspath(adapter))
    summary = read_json(os.path.join(run, "training_summary_report.json")) \
        if os.path.basename(os.path.abspath(adapter)) == "final" else None
    write_card(tmp, target=output_path, summary=summary, merge=report)


QLORA_BASES = ("dequantized", "original")


@dataclass
class Trained:
    """What the adapter folder says about the model it belongs to."""

    folder: str
    settings: EmbedSettings
    head: torch.nn.Module | None   # the base's Dense layers (frozen in LoRA training)
    head_names: list[str]
    config: Any                    # the base's transformers config, with the training's attention
    trust_remote_code: bool

    def base(self, path: str, dtype: torch.dtype, bits: int | None = None,
             dequantize: bool = False) -> torch.nn.Module:
        """The base model in `dtype`: as stored, or quantized to `bits` as QLoRA training did
        (optionally dequantized again: the weights training computed with, plain tensors)."""
        model = load_base(path, dtype=dtype, config=self.config, device="cpu", bits=bits,
                          trust_remote_code=self.trust_remote_code)
        return model.dequantize(dtype=dtype) if dequantize and bits else model

    def embedder(self, backbone: torch.nn.Module, adapter: bool = True) -> EmbeddingModel:
        """The backbone (with the adapter applied), pooled and headed as in training."""
        if adapter:
            backbone = apply_adapter(backbone, self.folder)
        return EmbeddingModel(backbone, self.settings.pooling, self.head,
                              self.head_names).eval()


def check_request(adapter_path: str, output_path: str, precision: str, qlora_base: str,
                  overwrite: bool) -> str:
    """The adapter folder, once the options are valid and the output may be written."""
    if precision not in PRECISIONS:
        raise MergeError(f"--training_precision must be one of {', '.join(PRECISIONS)}")
    if qlora_base not in QLORA_BASES:
        raise MergeError(f"--qlora_base must be one of {', '.join(QLORA_BASES)}")
    folder = adapter_folder(adapter_path)
    if os.path.isdir(output_path) and os.listdir(output_path) and not overwrite:
        raise MergeError(f"--output_path {output_path} is not empty; pass --overwrite to replace")
    if os.path.exists(output_path) and not os.path.isdir(output_path):
        raise MergeError(f"--output_path {output_path} is a file")
    return folder


def save(tmp: str, merged: Any, trained: EmbeddingModel, tokenizer: Any,
         settings: EmbedSettings, names: list[str], config: dict[str, Any]) -> EmbedSettings:
    """Write a merged model into `tmp`: weights, Dense head, tokenizer (appending EOS itself
    where it can), sentence-transformers files and training_config.json (`config` plus the
    settings). Returns the settings the saved folder embeds with."""
    merged.save_pretrained(tmp, safe_serialization=True)
    trained.save_head(tmp)
    saved = EmbedSettings(**asdict(settings))
    if settings.append_eos and make_tokenizer_append_eos(tokenizer):
        saved.append_eos = False  # the saved tokenizer now adds it itself
    tokenizer.save_pretrained(tmp)
    write_sentence_transformers_files(tmp, saved, merged.config.hidden_size, names)
    write_json(os.path.join(tmp, "training_config.json"), {**config, **asdict(saved)})
    return saved


def qlora_gaps(reference: dict[str, torch.Tensor], trained: torch.Tensor, bits: int, into: str,
               precision: str, say: Callable[[str], None]) -> dict[str, Any]:
    """How far a QLoRA adapter merged into each base would embed from the trained model."""
    gap = (reference["original"] - trained).abs().max().item()
    weights = f"dequantized {bits}-bit weights" if into == "dequantized" else "original weights"
    say(f"QLoRA adapter ({bits}-bit base in training): merging into the {weights} in "
        f"{precision}; merged into the original weights the model would embed up to "
        f"{gap:.2e} away from the trained one")
    return {"quantization_bits": bits, "max_abs_diff_original_vs_trained": gap,
            "max_abs_diff_dequantized_vs_trained":
                (reference["dequantized"] - trained).abs().max().item()}


def warn_other_base(trained_on: str | None, base_path: str, say: Callable[[str], None]) -> None:
    """Say so when the adapter was trained on a base of another name (shapes already fit)."""
    if trained_on and os.path.abspath(trained_on) != os.path.abspath(base_path) and (
            os.path.basename(os.path.normpath(trained_on))
            != os.path.basename(os.path.normpath(base_path))):
        say(f"warning: the adapter was trained on {trained_on}, not {base_path}; merging "
            "anyway since the shapes fit, but check that this is the same model")


def adapter_effect(trained: EmbeddingModel, embedded: torch.Tensor, tokenizer: Any,
                   settings: EmbedSettings, folder: str) -> float:
    """How far the adapter moves the probe embeddings; MergeError when it moves nothing."""
    with trained.backbone.disable_adapter():
        effect = (embedded - _embed(trained, tokenizer, settings)).abs().max().item()
    if effect <= 1e-7:
        raise MergeError(f"the adapter in {folder} changes nothing (max embedding change "
                         f"{effect:.1e}); was it trained?")
    return effect


def merge(base_path: str, adapter_path: str, output_path: str, precision: str = "float32",
          overwrite: bool = False, say: Callable[[str], None] = print,
          qlora_base: str = "dequantized", eval_examples: list | None = None,
          eval_batch_size: int = 32, trust_remote_code: bool = False) -> dict[str, Any]:
    """Merge, save, reload and verify; returns a small report. Raises MergeError (bad input)
    or VerificationError (merged model differs); in both cases nothing is left behind.

    A QLoRA adapter is merged by default into the base as training saw it — its 4-bit (8-bit)
    weights dequantized, stored in `precision` — so the merged model is the model training
    and evaluate.py measured; qlora_base="original" merges into the original weights instead.
    Either way the report records how far the two candidates' embeddings lie apart, and with
    `eval_examples` both candidates (and the trained model) are scored side by side."""
    folder = check_request(adapter_path, output_path, precision, qlora_base, overwrite)
    check_remote_code(base_path, trust_remote_code)
    has_tokenizer = os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
    tokenizer = load_tokenizer(folder if has_tokenizer else base_path)
    settings = settings_for(folder, tokenizer, say)
    train_config = read_training_config(folder) or {}
    warn_other_base(train_config.get("base_model"), base_path, say)
    bits = train_config.get("quantization_bits") if train_config.get(
        "finetune_type") == "qlora" else None
    into = qlora_base if bits else "original"

    # The model as trained (and evaluated): base (quantized as in training) + adapter.
    dtype = PRECISIONS[precision]
    names = train_config.get("dense_modules") or []
    how = Trained(folder, settings, load_head(folder, names), names,
                  model_config(base_path, attention=train_config.get("attention", "model"),
                               trust_remote_code=trust_remote_code), trust_remote_code)
    original = how.base(base_path, dtype)
    check_adapter_fits(original, folder)
    trained = how.embedder(how.base(base_path, dtype, bits) if bits else original)
    trained_emb = _embed(trained, tokenizer, settings)                      # (N, D)
    effect = adapter_effect(trained, trained_emb, tokenizer, settings, folder)

    # The candidates: PEFT on the base each merges into, before merging (the reference).
    candidates = {"original": trained}
    if bits:
        candidates = {"dequantized": how.embedder(how.base(base_path, dtype, bits, True)),
                      "original": how.embedder(original)}
    reference = {name: _embed(m, tokenizer, settings) for name, m in candidates.items()}
    report: dict[str, Any] = {"merged_into": f"{bits}-bit base, dequantized" if into ==
                              "dequantized" else "original base weights"}
    if bits:
        report["qlora"] = qlora_gaps(reference, trained_emb, bits, into, precision, say)
    if eval_examples is None:
        merged = {into: candidates[into].backbone.merge_and_unload()}
    else:  # the trained model, then each candidate merged, scored side by side
        def score(model: EmbeddingModel) -> dict[str, float]:
            return evaluate(model, tokenizer, eval_examples, settings, batch_size=eval_batch_size)

        scores = {f"trained ({bits}-bit base + adapter)" if bits else "base + adapter":
                  score(trained)}
        merged = {name: m.backbone.merge_and_unload() for name, m in candidates.items()}
        for name, model in merged.items():
            scores[f"merged into {name} base" + (" (saved)" if name == into else "")] = \
                score(how.embedder(model, adapter=False))
        say(format_table(scores))
        report["eval"] = scores

    # The dequantized merge is checked against the trained model itself (quantized base +
    # adapter, computing as in training); the other against its own base + adapter.
    if into == "dequantized":
        target, what = trained_emb, f"the trained model ({bits}-bit base + adapter)"
    else:
        target, what = reference[into], "original base + adapter"
    tmp = atomic_dir(output_path)
    try:
        saved_settings = save(tmp, merged[into], trained, tokenizer, settings, names, {
            **train_config, "finetune_type": "merged", "merged_from": os.path.abspath(folder),
            "base_model": base_path, "merged_into": report["merged_into"],
            "precision": precision, "tokenizer_appends_eos": settings.append_eos})
        from transformers import AutoModel

        reloaded = EmbeddingModel(
            AutoModel.from_pretrained(tmp, dtype=dtype, trust_remote_code=trust_remote_code),
            settings.pooling, load_head(tmp, names), names).eval()
        diff = (_embed(reloaded, load_tokenizer(tmp), saved_settings) - target).abs().max().item()
        say(f"verify: max |merged - {what}| = {diff:.2e} over {len(PROBES)} probe texts "
            f"(tolerance {TOLERANCE[precision]:.0e} for {precision}); the adapter moves "
            f"embeddings by up to {effect:.2e}")
        if diff > TOLERANCE[precision]:
            raise VerificationError(f"merged model differs from {what} by {diff:.2e} "
                                    f"> {TOLERANCE[precision]:.0e}; nothing written")
        report.update({"verified_against": what, "max_abs_diff": diff,
                       "tolerance": TOLERANCE[precision], "adapter_effect": effect,
                       "precision": precision, "probes": PROBES})
        write_json(os.path.join(tmp, "merge_report.json"), report)
        describe_merge(tmp, output_path, folder, report)
        commit_dir(tmp, output_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report

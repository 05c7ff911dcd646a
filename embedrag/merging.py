"""Folding a LoRA/QLoRA adapter into its base model, verified, in a sentence-transformers layout.

The merge is checked, not trusted: probe texts are embedded by base+adapter (PEFT) before the
merge and by the merged folder reloaded from disk after it; the merge is committed only if the
two agree within the precision's tolerance, and refused if the adapter changed nothing at all.
A QLoRA adapter is merged into the unquantized base (merging into 4/8-bit weights would round
the update away or corrupt it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from embedrag.checkpoints import atomic_dir, commit_dir
from embedrag.config import read_training_config, write_json
from embedrag.modeling import EmbeddingModel, EmbedSettings, load_tokenizer, resolve_append_eos

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


def make_tokenizer_append_eos(tokenizer: Any) -> bool:
    """Make the saved tokenizer end every text with EOS itself, as training did by hand, so
    that plain transformers and sentence-transformers users embed the same way. Keeps the
    special tokens the tokenizer already puts before the text (a BOS, say)."""
    from tokenizers import processors

    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return False
    prefix = tokenizer.convert_ids_to_tokens(tokenizer("", add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token
    specials = {t: tokenizer.convert_tokens_to_ids(t) for t in [*prefix, eos]}
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join([*prefix, "$A", eos]), pair=" ".join([*prefix, "$A", eos, "$B:1", eos]),
        special_tokens=list(specials.items()))
    return True


def write_sentence_transformers_files(path: str, settings: EmbedSettings, dim: int) -> None:
    """modules.json + Pooling + Normalize in the layout sentence-transformers 2.x to 6.x read."""
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
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
    os.makedirs(os.path.join(path, "2_Normalize"))
    prompts = {"query": settings.query_instruction, "document": ""}
    write_json(os.path.join(path, "config_sentence_transformers.json"),
               {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"})


def _embed(model: EmbeddingModel, tok: Any, settings: EmbedSettings) -> torch.Tensor:
    return model.encode(tok, PROBES, max_len=settings.passage_max_len,
                        append_eos=settings.append_eos, batch_size=len(PROBES))


def merge(base_path: str, adapter_path: str, output_path: str, precision: str = "float32",
          overwrite: bool = False, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Merge, save, reload and verify; returns a small report. Raises MergeError (bad input)
    or VerificationError (merged model differs); in both cases nothing is left behind."""
    from peft import PeftModel
    from transformers import AutoModel

    if precision not in PRECISIONS:
        raise MergeError(f"--training_precision must be one of {', '.join(PRECISIONS)}")
    folder = adapter_folder(adapter_path)
    if os.path.isdir(output_path) and os.listdir(output_path) and not overwrite:
        raise MergeError(f"--output_path {output_path} is not empty; pass --overwrite to replace")
    if os.path.exists(output_path) and not os.path.isdir(output_path):
        raise MergeError(f"--output_path {output_path} is a file")
    has_tokenizer = os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
    tokenizer = load_tokenizer(folder if has_tokenizer else base_path)
    settings = settings_for(folder, tokenizer, say)
    train_config = read_training_config(folder) or {}
    trained_on = train_config.get("base_model")
    if trained_on and os.path.abspath(trained_on) != os.path.abspath(base_path) and (
            os.path.basename(os.path.normpath(trained_on))
            != os.path.basename(os.path.normpath(base_path))):
        say(f"warning: the adapter was trained on {trained_on}, not {base_path}; merging "
            "anyway since the shapes fit, but check that this is the same model")
    if train_config.get("finetune_type") == "qlora":
        say(f"QLoRA adapter ({train_config.get('quantization_bits')}-bit base in training): "
            f"merging into the unquantized base weights in {precision}")

    dtype = PRECISIONS[precision]
    base = AutoModel.from_pretrained(base_path, dtype=dtype)
    check_adapter_fits(base, folder)
    peft_model = PeftModel.from_pretrained(base, folder)
    model = EmbeddingModel(peft_model, settings.pooling).eval()
    with_adapter = _embed(model, tokenizer, settings)                       # (N, D)
    with peft_model.disable_adapter():
        without = _embed(model, tokenizer, settings)
    effect = (with_adapter - without).abs().max().item()
    if effect <= 1e-7:
        raise MergeError(f"the adapter in {folder} changes nothing (max embedding change "
                         f"{effect:.1e}); was it trained?")

    merged = peft_model.merge_and_unload()
    tmp = atomic_dir(output_path)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        saved_settings = EmbedSettings(**asdict(settings))
        if settings.append_eos and make_tokenizer_append_eos(tokenizer):
            saved_settings.append_eos = False  # the saved tokenizer now adds it itself
        tokenizer.save_pretrained(tmp)
        write_sentence_transformers_files(tmp, saved_settings, with_adapter.shape[1])
        write_json(os.path.join(tmp, "training_config.json"), {
            **train_config, **asdict(saved_settings), "finetune_type": "merged",
            "merged_from": os.path.abspath(folder), "base_model": base_path,
            "precision": precision, "tokenizer_appends_eos": settings.append_eos})
        reloaded = EmbeddingModel(AutoModel.from_pretrained(tmp, dtype=dtype),
                                  settings.pooling).eval()
        after = _embed(reloaded, load_tokenizer(tmp), saved_settings)
        diff = (after - with_adapter).abs().max().item()
        say(f"verify: max |merged - (base + adapter)| = {diff:.2e} over {len(PROBES)} probe "
            f"texts (tolerance {TOLERANCE[precision]:.0e} for {precision}); the adapter moves "
            f"embeddings by up to {effect:.2e}")
        if diff > TOLERANCE[precision]:
            raise VerificationError(f"merged model differs from base + adapter by {diff:.2e} "
                                    f"> {TOLERANCE[precision]:.0e}; nothing written")
        report = {"max_abs_diff": diff, "tolerance": TOLERANCE[precision],
                  "adapter_effect": effect, "precision": precision, "probes": PROBES}
        write_json(os.path.join(tmp, "merge_report.json"), report)
        commit_dir(tmp, output_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report

"""The embedding recipe a model ships with, and how each embedding setting is decided.

Most embedding models (all-MiniLM, bge, e5, gte, Qwen3-Embedding, EmbeddingGemma) ship a
sentence-transformers configuration beside their weights: `modules.json` lists what follows
the transformer (Pooling, Dense, Normalize), `1_Pooling/config.json` the pooling,
`sentence_bert_config.json` the maximum length, `config_sentence_transformers.json` the query
and document prompts. A model trained with mean pooling and a query prompt embeds badly with
last-token pooling and no prompt, so that recipe is the default here: a flag given by the user
wins, then the model's recipe, then EmbedRAG's own default, and `training_config.json` records
which one decided each setting. A recipe EmbedRAG cannot honour (a pooling mode or module it
does not implement) is refused with one line rather than trained with a guess.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from embedrag.model.embedding import EmbedSettings

# EmbedRAG's defaults where neither a flag nor the model decides (the seed's lengths).
# What a flag left unset and a model without a recipe get: EmbedSettings' own defaults.
DEFAULTS = {k: v for k, v in dataclasses.asdict(EmbedSettings()).items() if k != "append_eos"}
# sentence-transformers pooling modes, old boolean keys and new names, to ours.
POOLING = {"cls": "cls", "cls_token": "cls", "mean": "mean", "mean_tokens": "mean",
           "lasttoken": "last"}
MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
DOCUMENT_PROMPTS = ("document", "passage", "corpus")  # as sentence-transformers' encode_document
# Dense settings sentence-transformers 5+ writes; at these values they change nothing.
DENSE_DEFAULTS = {"module_input_name": "sentence_embedding",
                  "module_output_name": "sentence_embedding", "use_residual": False}


class RecipeError(ValueError):
    """The model's recipe asks for something EmbedRAG does not implement."""


@dataclass
class Recipe:
    """What the model's own configuration says; empty for a model without one."""

    values: dict[str, Any] = field(default_factory=dict)   # settings, as in DEFAULTS
    sources: dict[str, str] = field(default_factory=dict)  # setting -> file that set it
    dense: list[str] = field(default_factory=list)          # Dense module folders, in order
    normalize: bool = True


def model_file(model: str, name: str) -> str | None:
    """A file of a model folder or hub id (from the local cache offline), or None."""
    if os.path.isdir(model):
        path = os.path.join(model, name)
        return path if os.path.isfile(path) else None
    try:
        from transformers.utils import cached_file

        return cached_file(model, name, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None


def _json(model: str, name: str) -> Any:
    path = model_file(model, name)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _pooling(model: str, folder: str) -> str:
    config = _json(model, f"{folder}/config.json")
    if config is None:
        raise RecipeError(f"{model}: modules.json names a Pooling module in {folder or '.'}/, "
                          f"but {folder}/config.json is missing")
    modes = config.get("pooling_mode")
    if modes is None:  # sentence-transformers < 5: one boolean key per mode
        modes = [k.removeprefix("pooling_mode_") for k, on in config.items()
                 if k.startswith("pooling_mode_") and on]
    modes = [modes] if isinstance(modes, str) else list(modes)
    where = f"{model}: {folder}/config.json"
    if len(modes) != 1 or modes[0] not in POOLING:
        raise RecipeError(f"{where} asks for pooling {'+'.join(modes) or 'none'}; EmbedRAG "
                          f"implements cls, mean and last-token pooling")
    if config.get("include_prompt", True) is False:
        raise RecipeError(f"{where} leaves the prompt out of the pooling (include_prompt "
                          f"false), which EmbedRAG does not implement")
    return POOLING[modes[0]]


def read_recipe(model: str) -> Recipe:
    """The sentence-transformers recipe of `model` (a folder or hub id); raises RecipeError
    for what cannot be honoured."""
    recipe = Recipe()
    modules = _json(model, "modules.json")
    if modules is None:
        return recipe
    kinds = []
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind not in MODULES:
            raise RecipeError(f"{model}: modules.json has a {module.get('type')} module; "
                              f"EmbedRAG embeds with {', '.join(MODULES)} modules only")
        kinds.append(kind)
        if kind == "Pooling":
            recipe.values["pooling"] = _pooling(model, module["path"])
            recipe.sources["pooling"] = f"{module['path']}/config.json"
        elif kind == "Dense":
            if "Pooling" not in kinds:
                raise RecipeError(f"{model}: a Dense module before pooling is not supported")
            recipe.dense.append(module["path"])
    recipe.normalize = "Normalize" in kinds
    length = (_json(model, "sentence_bert_config.json") or {}).get("max_seq_length")
    if isinstance(length, int) and length > 0:
        for name in ("query_max_len", "passage_max_len"):
            recipe.values[name] = length
            recipe.sources[name] = "sentence_bert_config.json"
    prompts = (_json(model, "config_sentence_transformers.json") or {}).get("prompts") or {}
    if prompts.get("query"):
        recipe.values["query_instruction"] = prompts["query"]
        recipe.sources["query_instruction"] = "config_sentence_transformers.json prompts.query"
    for name in DOCUMENT_PROMPTS:
        if prompts.get(name):
            recipe.values["passage_instruction"] = prompts[name]
            recipe.sources["passage_instruction"] = \
                f"config_sentence_transformers.json prompts.{name}"
            break
    return recipe


def decide(given: dict[str, Any], recipe: Recipe) -> tuple[dict[str, Any], dict[str, str]]:
    """Each embedding setting and where it came from: a flag (`given`, None = not given),
    then the model's recipe, then EmbedRAG's default."""
    values, sources = {}, {}
    for name, default in DEFAULTS.items():
        if given.get(name) is not None:
            values[name], sources[name] = given[name], "flag"
        elif name in recipe.values:
            values[name], sources[name] = recipe.values[name], f"model ({recipe.sources[name]})"
        else:
            values[name], sources[name] = default, "default"
    return values, sources


class Dense(nn.Module):
    """A sentence-transformers Dense module (linear layer + activation) after pooling, read from
    and written to its own folder in that layout (config.json + model.safetensors)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation_function: str = "torch.nn.modules.linear.Identity"):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.activation_name = activation_function
        self.activation = _activation(activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                  # (N, in) -> (N, out)
        return self.activation(self.linear(x))

    @classmethod
    def load(cls, model: str, folder: str) -> Dense:
        from safetensors.torch import load_file

        config = _json(model, f"{folder}/config.json") or {}
        for key, default in DENSE_DEFAULTS.items():  # newer sentence-transformers write these
            if config.get(key, default) == default:
                config.pop(key, None)
        unknown = set(config) - {"in_features", "out_features", "bias", "activation_function"}
        if unknown or not {"in_features", "out_features"} <= set(config):
            raise RecipeError(f"{model}: {folder}/config.json has settings EmbedRAG does not "
                              f"implement ({', '.join(sorted(unknown)) or 'sizes missing'})")
        dense = cls(**config)
        weights = model_file(model, f"{folder}/model.safetensors")
        if weights is not None:
            state = load_file(weights)
        elif (weights := model_file(model, f"{folder}/pytorch_model.bin")) is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        else:
            raise RecipeError(f"{model}: {folder} holds no weights")
        dense.load_state_dict(state)
        return dense

    def save(self, path: str, state: dict[str, torch.Tensor] | None = None) -> None:
        """config.json + model.safetensors; `state` replaces this module's own weights."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        config = {"in_features": self.linear.in_features,
                  "out_features": self.linear.out_features,
                  "bias": self.linear.bias is not None,
                  "activation_function": self.activation_name}
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        state = self.state_dict() if state is None else state
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  os.path.join(path, "model.safetensors"))


def _activation(name: str) -> nn.Module:
    """A torch.nn activation named by its import path, as sentence-transformers saves it."""
    import importlib

    module_name, _, cls_name = name.rpartition(".")
    if not module_name.startswith("torch."):
        raise RecipeError(f"Dense activation {name} is not a torch.nn module")
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise RecipeError(f"Dense activation {name} is not a torch.nn module")
    return cls()


def load_head(model: str, folders: list[str]) -> nn.Sequential | None:
    """The Dense modules after pooling, in order, or None when there are none."""
    return nn.Sequential(*(Dense.load(model, f) for f in folders)) if folders else None

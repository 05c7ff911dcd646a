"""Copy-paste code that embeds with a trained model exactly as training did, for model cards.

A model card's usage example is where a receiver learns how to embed; an example with the
wrong pooling, a missing query prompt or no EOS gives vectors that look fine and retrieve
badly. So the snippets are generated from the folder's training_config.json and carry every
setting training used: pooling, query and passage prompts, each side's maximum length, the
EOS token appended after truncation (done by the tokenizer's post-processor, as merge.py makes
the merged tokenizer do), bidirectional attention, a QLoRA base quantized as in training (with
bitsandbytes' CPU kernels kept on the training path, as `loading.match_training_kernels`
does), and the model's Dense layers. They use only transformers, PEFT and sentence-
transformers, never EmbedRAG; the tests run them and compare with `EmbeddingModel`.

Every snippet leaves `queries`, `passages`, `query_embeddings` and `passage_embeddings`
(L2-normalised, one row per text) in its namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from embedrag.model.tokens import eos_template

ST_POOLING = {"last": "lasttoken", "mean": "mean", "cls": "cls"}
QUERIES = ["How do I list the files in a directory?"]
PASSAGES = ["ls lists the contents of a directory, one name per entry.",
            "cp copies files and directories to another place."]

POOLING_CODE = {
    "last": ["    # last-token pooling: each text's last real token, whichever side is padded",
             "    last = (mask * torch.arange(mask.shape[1], device=device)).argmax(dim=1)",
             "    pooled = hidden[torch.arange(len(texts), device=device), last]"],
    "mean": ["    # mean pooling over the real tokens",
             "    weights = mask.unsqueeze(-1).to(hidden.dtype)",
             "    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)"],
    "cls": ["    # the first real token ([CLS]), whichever side is padded",
            "    pooled = hidden[torch.arange(len(texts), device=device), mask.argmax(dim=1)]"],
}


@dataclass
class Usage:
    """What a snippet needs to know about a model folder."""

    model_path: str                 # the folder (absolute), as it will be read
    kind: str                       # lora, qlora, full or merged
    pooling: str
    dim: int                        # width of the pooled vector (the hidden size)
    query_instruction: str = ""
    passage_instruction: str = ""
    query_max_len: int = 256
    passage_max_len: int = 1024
    base_path: str | None = None    # lora/qlora: the base the adapter goes on
    bits: int | None = None         # qlora: 4 or 8
    eos_template: tuple[str, list[tuple[str, int]]] | None = None  # (single, special tokens)
    bidirectional: str | None = None  # the config switch to set: is_causal or
    #                                   use_bidirectional_attention (lora/qlora only)
    dense: list[str] = field(default_factory=list)
    trust_remote_code: bool = False

    @property
    def adapter(self) -> bool:
        return self.kind in ("lora", "qlora")


def usage_of(config: dict[str, Any], folder: str, tokenizer: Any, path: str = "") -> Usage:
    """The Usage of the model in `folder` (its training_config.json, tokenizer and config),
    to be read from `path` (default: `folder`)."""
    from transformers import AutoConfig

    kind = config["finetune_type"]
    adapter = kind in ("lora", "qlora")
    remote = bool((config.get("train_args") or {}).get("trust_remote_code"))
    model_config = AutoConfig.from_pretrained(config["base_model"] if adapter else folder,
                                              trust_remote_code=remote)
    text_config = model_config.get_text_config()
    bidirectional = None
    if adapter and config.get("attention") == "bidirectional":
        bidirectional = ("use_bidirectional_attention"
                         if hasattr(model_config, "use_bidirectional_attention") else "is_causal")
    template = None
    if config.get("append_eos"):
        single, _, specials = eos_template(tokenizer)
        template = (single, specials)
    return Usage(model_path=path or folder, kind=kind, pooling=config["pooling"],
                 dim=text_config.hidden_size,
                 query_instruction=config.get("query_instruction") or "",
                 passage_instruction=config.get("passage_instruction") or "",
                 query_max_len=config["query_max_len"],
                 passage_max_len=config["passage_max_len"],
                 base_path=config["base_model"] if adapter else None,
                 bits=config.get("quantization_bits") if kind == "qlora" else None,
                 eos_template=template, bidirectional=bidirectional,
                 dense=list(config.get("dense_modules") or []), trust_remote_code=remote)


def _quantization(u: Usage) -> list[str]:
    if u.bits == 4:
        config = ('BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",\n'
                  '                                  bnb_4bit_use_double_quant=True, '
                  'bnb_4bit_compute_dtype=torch.float32)')
    else:
        config = "BitsAndBytesConfig(load_in_8bit=True)"
    return [f"# The adapter was trained on the base quantized to {u.bits} bits: load it so.",
            f"quantization = {config}"]


def _training_kernels(model: str) -> list[str]:
    return ["# bitsandbytes on a CPU computes differently in eval mode than in training (a bf16",
            "# kernel for 4-bit layers on CPUs with AVX-512 BF16, int8 activations for 8-bit",
            "# ones): keep the kernels training used.",
            f"for module in {model}.modules():",
            '    if hasattr(module, "support_avx512bf16_for_cpu"):',
            "        module.support_avx512bf16_for_cpu = False",
            '    if type(module).__name__ == "Linear8bitLt" and '
            'module.weight.device.type == "cpu":',
            '        module.register_forward_pre_hook(lambda m, args: setattr(m, "training", '
            'True))']


def _eos(u: Usage, tokenizer: str) -> list[str]:
    if u.eos_template is None:
        return []
    single, specials = u.eos_template
    return ["# Training ended every text with the EOS token, kept after truncation: the",
            "# tokenizer's post-processor adds it the same way.",
            f"{tokenizer}.backend_tokenizer.post_processor = TemplateProcessing(",
            f"    single={single!r}, special_tokens={specials!r})"]


def _texts() -> list[str]:
    return [f"queries = {QUERIES!r}", "passages = ["] + [f"    {p!r}," for p in PASSAGES] + ["]"]


def transformers_snippet(u: Usage) -> str:
    """transformers (+ PEFT for an adapter): tokenize, run, pool, normalise by hand."""
    remote = ", trust_remote_code=True" if u.trust_remote_code else ""
    names = ["AutoConfig"] * bool(u.bidirectional) + ["AutoModel", "AutoTokenizer"] + \
        ["BitsAndBytesConfig"] * (u.kind == "qlora")
    lines = ["import torch", "import torch.nn.functional as F"]
    if u.dense:
        lines[:0] = ["import json", "import os", ""]
        lines.append("from safetensors.torch import load_file")
    if u.adapter:
        lines.append("from peft import PeftModel")
    if u.eos_template:
        lines.append("from tokenizers.processors import TemplateProcessing")
    lines += [f"from transformers import {', '.join(names)}", "",
              f'model_path = "{u.model_path}"  # this folder, or where you uploaded it']
    if u.adapter:
        lines.append(f'base_path = "{u.base_path}"  # the base model the adapter was trained on')
    lines += ['device = "cuda" if torch.cuda.is_available() else "cpu"', "",
              f"tokenizer = AutoTokenizer.from_pretrained(model_path{remote})"]
    lines += _eos(u, "tokenizer")
    source = "base_path" if u.adapter else "model_path"
    kwargs = f"dtype=torch.float32{remote}"
    if u.bidirectional:
        lines += [f"config = AutoConfig.from_pretrained(base_path{remote})",
                  f"config.{u.bidirectional} = "
                  f"{'False' if u.bidirectional == 'is_causal' else 'True'}"
                  "  # trained with bidirectional attention"]
        kwargs += ", config=config"
    if u.kind == "qlora":
        lines += _quantization(u)
        lines.append(f"model = AutoModel.from_pretrained({source}, {kwargs},\n"
                     '                                  quantization_config=quantization, '
                     'device_map={"": device})')
        lines += _training_kernels("model")
    else:
        lines.append(f"model = AutoModel.from_pretrained({source}, {kwargs}).to(device)")
    if u.adapter:
        lines.append("model = PeftModel.from_pretrained(model, model_path)")
    lines.append("model.eval()")
    if u.dense:
        lines += ["", "",
                  "def dense_layer(folder):",
                  '    """A sentence-transformers Dense module saved in `folder` (local): linear '
                  '+ activation."""',
                  '    with open(os.path.join(folder, "config.json")) as f:',
                  "        config = json.load(f)",
                  '    layer = torch.nn.Linear(config["in_features"], config["out_features"], '
                  'bias=config["bias"])',
                  '    weights = load_file(os.path.join(folder, "model.safetensors"))',
                  '    layer.load_state_dict({k.removeprefix("linear."): v for k, v in '
                  'weights.items()})',
                  '    activation = getattr(torch.nn, config["activation_function"]'
                  '.rsplit(".", 1)[-1])()',
                  "    return torch.nn.Sequential(layer, activation)",
                  "", "",
                  "head = torch.nn.Sequential(*(dense_layer(os.path.join(model_path, name)) "
                  f"for name in {u.dense!r})).to(device)"]
    lines += ["", "",
              "def embed(texts, prefix, max_length):",
              '    """One L2-normalised vector per text, as training computed it."""',
              "    batch = tokenizer([prefix + text for text in texts], padding=True, "
              "truncation=True,",
              '                      max_length=max_length, return_tensors="pt").to(device)',
              "    mask = batch[\"attention_mask\"]",
              "    with torch.no_grad():",
              '        hidden = model(input_ids=batch["input_ids"], attention_mask=mask)'
              ".last_hidden_state",
              *POOLING_CODE[u.pooling]]
    if u.dense:
        lines.append("    pooled = head(pooled)")
    lines += ["    return F.normalize(pooled.float(), dim=-1)", "", "", *_texts(),
              f"query_embeddings = embed(queries, {u.query_instruction!r}, {u.query_max_len})",
              f"passage_embeddings = embed(passages, {u.passage_instruction!r}, "
              f"{u.passage_max_len})",
              "print(query_embeddings @ passage_embeddings.T)  # cosine similarities"]
    return "\n".join(lines) + "\n"


def sentence_transformers_snippet(u: Usage) -> str:
    """sentence-transformers: the merged folder as it is; otherwise modules built to match."""
    lines = ["from sentence_transformers import SentenceTransformer"]
    if u.kind == "merged":
        # The merged folder carries modules.json, the prompts and a tokenizer that adds EOS.
        lines += ["", f'model = SentenceTransformer("{u.model_path}")', "", *_texts()]
        encode = [("query_embeddings", "queries", 'prompt_name="query", ', u.query_max_len),
                  ("passage_embeddings", "passages", 'prompt_name="document", ',
                   u.passage_max_len)]
    else:
        modules = ["Dense"] * bool(u.dense) + ["Normalize", "Pooling", "Transformer"]
        lines[:0] = ["import torch"]
        lines += ["",
                  "try:  # sentence-transformers 6",
                  f"    from sentence_transformers.sentence_transformer.modules import "
                  f"{', '.join(modules)}",
                  "except ImportError:  # sentence-transformers 3 to 5",
                  f"    from sentence_transformers.models import {', '.join(modules)}"]
        if u.dense:
            lines[:0] = ["import os", ""]
        if u.eos_template:
            lines.append("from tokenizers.processors import TemplateProcessing")
        if u.kind == "qlora":
            lines.append("from transformers import BitsAndBytesConfig")
        lines += ["", f'model_path = "{u.model_path}"  # this folder, or where you uploaded it',
                  'device = "cuda" if torch.cuda.is_available() else "cpu"']
        model_kwargs = '{"dtype": torch.float32'
        if u.kind == "qlora":
            lines += _quantization(u)
            model_kwargs += ', "quantization_config": quantization, "device_map": {"": device}'
        if u.trust_remote_code:
            model_kwargs += ', "trust_remote_code": True'
        model_kwargs += "}"
        extra = ""
        if u.bidirectional == "use_bidirectional_attention":  # a setting the config declares
            extra = (",\n                          "
                     'config_kwargs={"use_bidirectional_attention": True}')
        if u.adapter:
            lines.append("# The adapter folder: its base (from adapter_config.json) with the "
                         "adapter on it.")
        lines.append(f"transformer = Transformer(model_path, model_kwargs={model_kwargs}{extra})")
        if u.bidirectional == "is_causal":  # not a declared setting: config_kwargs drop it
            lines.append("transformer.auto_model.config.is_causal = False  # trained with "
                         "bidirectional attention")
        lines += _eos(u, "transformer.tokenizer")
        if u.kind == "qlora":
            lines += _training_kernels("transformer.auto_model")
        dense = [f"Dense.load(os.path.join(model_path, {name!r}))" for name in u.dense]
        lines += ["model = SentenceTransformer(modules=[",
                  f'    transformer, Pooling({u.dim}, pooling_mode="{ST_POOLING[u.pooling]}"),',
                  *(f"    {d}," for d in dense), "    Normalize()], device=device)", "",
                  *_texts()]
        encode = [("query_embeddings", "queries", u.query_instruction, u.query_max_len),
                  ("passage_embeddings", "passages", u.passage_instruction, u.passage_max_len)]
        encode = [(name, texts, f"prompt={prompt!r}, " if prompt else "", length)
                  for name, texts, prompt, length in encode]
    two_lengths = u.query_max_len != u.passage_max_len
    for name, texts, prompt, length in encode:
        if two_lengths:
            lines.append(f"model.max_seq_length = {length}  # as training cut {texts}")
        lines.append(f"{name} = model.encode({texts}, {prompt}convert_to_tensor=True)")
    lines.append("print(model.similarity(query_embeddings, passage_embeddings))")
    return "\n".join(lines) + "\n"

"""Tokenizers: loading one as trained, and whether and how it appends EOS."""

from __future__ import annotations

from typing import Any


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer with a pad token: its own, else EOS, else UNK."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ValueError(f"{path}: the tokenizer has no pad, EOS or UNK token to pad with")
        tok.pad_token = fallback
    return tok


def tokenizer_adds_eos(tok: Any) -> bool:
    """Does the tokenizer already end every text with EOS (as Qwen3-Embedding's does)?"""
    if tok.eos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[-1] == tok.eos_token_id


def resolve_append_eos(mode: str, pooling: str, tok: Any) -> bool:
    """auto: append EOS for last-token pooling when the tokenizer has one and does not add it."""
    if mode == "yes":
        if tok.eos_token_id is None:
            raise ValueError("--append_eos yes, but the tokenizer has no EOS token")
        return not tokenizer_adds_eos(tok)
    if mode == "no":
        return False
    return pooling == "last" and tok.eos_token_id is not None and not tokenizer_adds_eos(tok)


def eos_template(tokenizer: Any) -> tuple[str, str, list[tuple[str, int]]]:
    """A post-processor template (single, pair, special tokens) that ends every text with EOS
    after truncation, as training did by hand, keeping the special tokens the tokenizer
    already puts before the text (a BOS, say)."""
    prefix = tokenizer.convert_ids_to_tokens(tokenizer("", add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token
    specials = {t: tokenizer.convert_tokens_to_ids(t) for t in [*prefix, eos]}
    return (" ".join([*prefix, "$A", eos]), " ".join([*prefix, "$A", eos, "$B:1", eos]),
            list(specials.items()))


def make_tokenizer_append_eos(tokenizer: Any) -> bool:
    """Make the saved tokenizer end every text with EOS itself (`eos_template`), so that plain
    transformers and sentence-transformers users embed as training did."""
    from tokenizers import processors

    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return False
    single, pair, specials = eos_template(tokenizer)
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=specials)
    return True

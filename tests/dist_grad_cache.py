"""GradCache through DDP on two processes, compared with plain backpropagation; run as

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/dist_grad_cache.py MODEL OUT

Each process trains its own batch — process 0's holds duplicated passages, so it embeds fewer
distinct passages and runs fewer real chunks than process 1 — with LoRA dropout on, for three
optimizer steps, through the trainer's own `forward_backward` (chunk size 1). The reference is
a second DDP copy that embeds the same chunks, in the same order, from the same random state,
in one graph, and backpropagates once. In float64 (tests/float64.py), where the two orders of
summation agree to ~1e-16 of the terms. Writes OUT/rank{r}.json with the largest difference of
the synchronised gradients.
"""

import copy
import gc
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from accelerate.utils import set_seed  # noqa: E402

from embedrag.config import TrainConfig  # noqa: E402
from embedrag.data.dataset import Collator, TrainingSet  # noqa: E402
from embedrag.data.rows import Example  # noqa: E402
from embedrag.losses import LossSettings, embedding_loss  # noqa: E402
from embedrag.model.embedding import EmbeddingModel  # noqa: E402
from embedrag.model.loading import ModelSettings, load_backbone  # noqa: E402
from embedrag.model.tokens import load_tokenizer  # noqa: E402
from embedrag.train.launch import make_accelerator  # noqa: E402
from embedrag.train.step import forward_backward  # noqa: E402
from tests.float64 import float64  # noqa: E402
from tests.helpers import learnable_rows  # noqa: E402


def batch_of(rank: int, step: int, tok) -> dict:
    rows = learnable_rows(12, seed=step)
    if rank == 0:  # three queries share one positive: fewer distinct passages here
        for row in rows[:3]:
            row["pos"] = [rows[0]["pos"][0]]
    rows = rows[:3]
    examples = [Example(r["query"], r["pos"], [n for n in r["neg"] if n not in r["pos"]], i)
                for i, r in enumerate(rows)]
    data = TrainingSet(examples, tok, neg_nums=1, query_max_len=16, passage_max_len=24,
                       query_instruction="", append_eos=True, seed=step)
    return Collator(data, tok.pad_token_id, tok.padding_side)([data[i] for i in range(3)])


def main(model_path: str, out: str) -> None:
    cfg = TrainConfig(model_name_or_path=model_path, train_dataset="", output_dir="",
                      batch_size=3, finetune_type="lora", lora_r=4, lora_alpha=8,
                      lora_dropout=0.3, temperature=0.05, grad_cache_chunk_size=1)
    accelerator = make_accelerator("no", 1, streaming=False, dynamic_graph=False)
    rank = accelerator.process_index
    set_seed(0)
    tok = load_tokenizer(model_path)
    backbone, _ = load_backbone(ModelSettings.from_config(cfg), torch.device("cpu"))
    for name, p in backbone.named_parameters():  # every adapter weight gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model = EmbeddingModel(backbone, "last").train()
    plain = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model),
                                                      broadcast_buffers=False)
    model = accelerator.prepare(model)
    worst, chunks, changes = 0.0, None, True
    for step in range(3):
        batch = batch_of(rank, step, tok)
        chunks = [batch["query_input_ids"].shape[0], batch["passage_input_ids"].shape[0]]

        def loss_of(q, p, batch=batch):
            return embedding_loss(q, p[batch["passage_index"]], batch["relevant_ids"],
                                  batch["passage_ids"], cfg.temperature)

        torch.manual_seed(100 + step)
        loss, _ = forward_backward(accelerator, model, batch, LossSettings.from_config(cfg),
                                   cfg.grad_cache_chunk_size, 1.0)
        torch.manual_seed(100 + step)
        reps = {"query": [], "passage": []}
        for kind in reps:
            ids, mask = batch[f"{kind}_input_ids"], batch[f"{kind}_attention_mask"]
            reps[kind] = [plain(ids[i:i + 1], mask[i:i + 1]) for i in range(ids.shape[0])]
        reference = loss_of(torch.cat(reps["query"]), torch.cat(reps["passage"]))
        reference.backward()
        assert abs(loss.item() - reference.item()) < 1e-12, (loss.item(), reference.item())
        got = dict(accelerator.unwrap_model(model).named_parameters())
        for name, p in plain.module.named_parameters():
            if p.grad is not None:
                worst = max(worst, (p.grad - got[name].grad).abs().max().item())
        torch.manual_seed(7)  # another random state, another dropout: another loss
        with torch.no_grad():
            other = loss_of(plain(batch["query_input_ids"], batch["query_attention_mask"]),
                            plain(batch["passage_input_ids"], batch["passage_attention_mask"]))
        changes = changes and abs(other.item() - reference.item()) > 1e-4
        with torch.no_grad():  # the same SGD step on both copies
            for name, p in plain.module.named_parameters():
                if p.grad is not None:
                    got[name].sub_(0.5 * got[name].grad)
                    p.copy_(got[name])
        model.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "steps": 3, "chunks": chunks, "max_grad_diff": worst,
                   "dropout_changes_loss": changes}, f)
    del plain, model  # both DDP reducers go before the process group they talk through
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    with float64():
        main(*sys.argv[1:3])

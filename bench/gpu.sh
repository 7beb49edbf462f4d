#!/usr/bin/env bash
# The GPU check of issue #16, for a machine with a CUDA GPU. NOT RUN YET: written in a session
# that had no GPU (no vLLM wheel, no bitsandbytes, no deepspeed either); every figure it prints is
# still to be measured. Budget: under 10 minutes on one H100/H200-class GPU.
#
#   pip install -e '.[vllm]' bitsandbytes        # into a CUDA environment (vLLM brings its own torch)
#   bash bench/gpu.sh [WORK_DIR]          # prints `name: value` lines; also WORK_DIR/gpu_check.log
#   bash bench/gpu.sh --cpu [WORK_DIR]    # the reduced CPU form: tiny model, HF only, no 4-bit (in the suite)
#
# What it checks:
#   1. vLLM vs HF generate tokens/s on one random-initialised LLaMA (~0.3B: hidden 1024, 24 layers),
#      8 prompts x 8 responses x 128 tokens (target: vLLM >= 10x HF);
#   2. the sample stage's log pi_ref (both backends) against train's own forward pass (bf16 autocast,
#      float32 weights) and, for scale, against the engine's numerics (bf16 weights);
#   3. train pairs/s and peak memory: full, LoRA, each with and without gradient checkpointing, QLoRA;
#   4. 2-process DDP and FSDP2 train steps against one process (needs 2 GPUs; skipped with one);
#   5. the paper recipe on stand-ins and the refprobs tests, on the GPU (pytest picks cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda SIZE=(--hidden 1024 --layers 24 --heads 16) RUN=(--prompts 8 --k 8 --max-new-tokens 128)
if [[ "${1:-}" == "--cpu" ]]; then
  DEVICE=cpu SIZE=(--hidden 64 --layers 2 --heads 2 --vocab 400) RUN=(--prompts 4 --k 2 --max-new-tokens 8 --steps 2)
  shift
fi
WORK=${1:-$(mktemp -d -t dualign-gpu-check-XXXX)}
mkdir -p "$WORK"
exec > >(tee "$WORK/gpu_check.log") 2>&1
echo "work dir: $WORK  device: $DEVICE"
[[ $DEVICE == cuda ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python -c "import vllm; print('vllm', vllm.__version__)" || echo "vllm: not installed (its checks fail)"

python bench/gpu_check.py build "$WORK" "${SIZE[@]}" "${RUN[@]}"
python bench/gpu_check.py sampling "$WORK" --device "$DEVICE" "${RUN[@]}"
python bench/gpu_check.py train "$WORK" --device "$DEVICE" "${RUN[@]}"

GPUS=$([[ $DEVICE == cuda ]] && nvidia-smi -L | wc -l || echo 0)
if (( GPUS >= 2 )); then
  # one process with 16 pairs per step against two with 8 each, full fine-tune, 3 steps
  FLAGS=(--model "$WORK/model" --template beaver --max-steps 3 --max-length 512 --pairs-per-prompt 4 --logging-steps 1)
  for name in one ddp fsdp2; do
    mkdir -p "$WORK/dp_$name" && cp "$WORK/train/full/scores.parquet" "$WORK/train/full/dual.json" "$WORK/dp_$name/"
  done
  python -m dualign train "${FLAGS[@]}" --run-dir "$WORK/dp_one" --per-device-batch-size 16
  for cfg in ddp fsdp2; do
    accelerate launch --config_file "configs/accelerate/$cfg.yaml" --num_processes 2 -m dualign train \
      "${FLAGS[@]}" --run-dir "$WORK/dp_$cfg" --per-device-batch-size 8 \
      && python bench/gpu_check.py compare "$WORK/dp_one" "$WORK/dp_$cfg" || echo "accelerate/$cfg: FAILED"
  done
else
  echo "ddp/fsdp2: skipped, $GPUS GPU(s) (2 needed: one process per GPU)"
fi
# (the suite's run of this script sets GPU_CHECK_NO_TESTS: it runs those tests itself)
[[ -n "${GPU_CHECK_NO_TESTS:-}" ]] || python -m pytest -q -o addopts="" -p no:xdist tests/test_paper_recipe.py tests/test_refprobs.py
echo "gpu check: done ($WORK/gpu_check.log)"

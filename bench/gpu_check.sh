#!/usr/bin/env bash
# The checks that need CUDA GPUs, in one go: run it on a new machine before a long run, and the first
# time this project is given a GPU (not yet timed on one; --cpu takes 1.5 minutes on 2 CPU cores).
# The test suite runs on CPUs, with gloo standing in for NCCL; these are the parts only a GPU shows.
#
#   1. train.py under torchrun on every GPU here (NCCL, and bf16, the default on CUDA): the built-in
#      world, 4 iterations straight, then 2 + 2 with --resume. Passes if both runs finish with finite
#      metrics (nothing but CUDA tensors reached NCCL) and every first update's |ratio - 1| is under
#      bf16's 1e-4 (the training forward is the rollout's). Prints how far the resumed run's metrics
#      are from the straight run's: on a CPU they are identical (tests/test_train.py); on a GPU, kernels
#      with atomics may move the last digits.
#   1b. the critic with and without --gradient-checkpointing (3 critic-only iterations, fp32): its adapter
#      and head must agree (the backward runs under the critic's own adapter).
#   2. eval.py --steer grad+bon on that run, on one GPU: the critic's gradient guidance in bf16.
#   3. bench/gpu_throughput.py --size full: SD3.5-M and SD1.5 at full size, random weights, one GPU:
#      seconds per iteration, images/s, peak memory and MFU (bench/results/gpu_throughput.json and its
#      BENCHMARKS.md section).
#
# Run:  bash bench/gpu_check.sh [LOG_DIR]         (default LOG_DIR: a new folder under /tmp)
#       NPROC=2 bash bench/gpu_check.sh           (fewer ranks than GPUs)
#       bash bench/gpu_check.sh --cpu [LOG_DIR]   (the same steps on the CPU, gloo, tiny sizes: checks
#                                                  this script, not the GPU path)
# Exit code: 0 if every step passed, 1 if one failed (its log is named), 2 if there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

device=cuda
if [ "${1:-}" = "--cpu" ]; then device=cpu; shift; fi
if [ "$device" = cuda ]; then
    gpus=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)") || exit 2
    if [ "$gpus" = 0 ]; then echo "error: no CUDA GPU visible to $PY (bench/gpu_check.sh --cpu checks the script itself)"; exit 2; fi
    nproc=${NPROC:-$gpus}
else
    nproc=${NPROC:-2}
fi
if [ -n "${1:-}" ] && [ -n "$(ls -A "$1" 2>/dev/null)" ]; then echo "error: $1 is not empty; give a new LOG_DIR"; exit 2; fi
logs=${1:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$logs"
[ "$device" = cuda ] && nvidia-smi -L | tee "$logs/gpus.txt"
$PY -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, '| diffusers', diffusers.__version__,
'| transformers', transformers.__version__, '| peft', peft.__version__)" | tee "$logs/versions.txt" || exit 1

failed=()
step() {   # step NAME COMMAND...: runs it, logs to LOG_DIR/NAME.log, says how long it took
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $*"
    if "$@" >"$logs/$name.log" 2>&1; then echo "   passed in $((SECONDS - t0)) s"
    else echo "   FAILED after $((SECONDS - t0)) s: $logs/$name.log"; tail -n 15 "$logs/$name.log"; failed+=("$name"); fi
}

# 1. the training loop, straight and resumed; a constant lr, since --resume --iters 4 would stretch a cosine
launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" train.py)
flags=(--model tiny-dit --device "$device" --batch-size $((4 * nproc)) --minibatch-size $((4 * nproc))
       --eval-every 2 --eval-seeds 1 --sample-every 2 --save-every 2 --lr-schedule constant)
step train_straight "${launch[@]}" "${flags[@]}" --iters 4 --run-dir "$logs/straight"
step train_2 "${launch[@]}" "${flags[@]}" --iters 2 --run-dir "$logs/resumed"
step train_resume_2 "${launch[@]}" --resume "$logs/resumed" --iters 4
step compare "$PY" - "$logs/straight" "$logs/resumed" <<'EOF'
import json, math, os, sys
rows = [[json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))] for d in sys.argv[1:]]
assert len(rows[0]) == len(rows[1]), f"{len(rows[0])} rows straight, {len(rows[1])} resumed"
worst, values = 0.0, 0
for a, b in zip(*rows):
    for k, x in a.items():
        if isinstance(x, (int, float)) and not isinstance(x, bool) and k in b and "time" not in k and "sec" not in k:
            assert math.isfinite(x) and math.isfinite(b[k]), f"non-finite {k}: {x}, {b[k]}"
            worst, values = max(worst, abs(x - b[k]) / max(abs(x), 1e-8)), values + 1
# the tripwire: the first update's ratio is 1 to 1e-4 in bf16 (tests/test_gpu_paths.py), 1e-5 in fp32
ratio = max(r["losses/ratio_dev_first"] for rs in rows for r in rs if r.get("losses/ratio_dev_first") is not None)
assert ratio < 1e-4, f"first update's max |ratio - 1| = {ratio:.2e}: the training forward is not the rollout's"
print(f"{values} metric values, all finite; first update's max |ratio - 1| {ratio:.1e}; "
      f"largest relative difference resumed vs straight: {worst:.3g}")
EOF
[ -f "$logs/compare.log" ] && tail -n 1 "$logs/compare.log" | sed 's/^/   /'

# 1b. gradient checkpointing trains the critic's adapter as without it (the backward runs under the critic's
#     own adapter: tests/test_gpu_paths.py on CPU); critic-only iterations, so only the critic moves; fp32
#     (--mixed-precision no) so the two runs can agree to float rounding
ckpt_flags=(--model tiny-dit --device "$device" --lora-rank 4 --iters 3 --value-warmup 3 --batch-size 8
            --minibatch-size 8 --eval-every 3 --eval-seeds 1 --mixed-precision no --lr-schedule constant)
step critic_plain "$PY" train.py "${ckpt_flags[@]}" --run-dir "$logs/critic_plain"
step critic_checkpointed "$PY" train.py "${ckpt_flags[@]}" --gradient-checkpointing --run-dir "$logs/critic_ckpt"
step critic_compare "$PY" - "$logs/critic_plain" "$logs/critic_ckpt" <<'EOF2'
import os, sys
from safetensors.torch import load_file
a, b = (load_file(os.path.join(d, "checkpoint", "critic.safetensors")) for d in sys.argv[1:])
worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)
assert moved > 0, "the critic's adapter did not train"
assert worst < 1e-5, f"critic weights with and without --gradient-checkpointing differ by {worst:.2e}"
print(f"critic adapter and head with and without --gradient-checkpointing: max difference {worst:.1e}")
EOF2
[ -f "$logs/critic_compare.log" ] && tail -n 1 "$logs/critic_compare.log" | sed 's/^/   /'

# 2. steering with the critic's gradient, on one device
step eval_steer "$PY" eval.py --policy "$logs/straight" --device "$device" --steer grad+bon --n 2 --seeds 1 \
    --max-prompts 4 --out "$logs/eval"

# 3. full-size throughput and memory on one GPU (tiny on the CPU, written only under LOG_DIR)
if [ "$device" = cuda ]; then step throughput "$PY" bench/gpu_throughput.py --size full
else step throughput "$PY" bench/gpu_throughput.py --size tiny --out "$logs/gpu_throughput.json"; fi
[ -f "$logs/throughput.log" ] && sed -n '/^| model/,$p' "$logs/throughput.log" | sed 's/^/   /'

if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]} (logs in $logs)"; exit 1; fi
echo "all passed on $nproc x $device (logs in $logs)"

#!/usr/bin/env bash
# On a CUDA machine, from the repository root. Steps (STEPS, default all, in this order):
#   tests    the CUDA tests (tests/test_cuda.py and the static-pass tests)
#   moe      the expert-kernel micro-benchmark (benchmarks/moe_kernel.py --sweep)
#   profile  the kernels of one denoising pass (benchmarks/profile_pass.py)
#   bench    `dgemma bench` on the full 26B-A4B shape, random bf16 weights built on the GPU, transformers on
#            the same tensors (AR=--ar adds the same weights' AR mode: several minutes more)
#   compiled the same for the whole pass through torch.compile (batch 1)
#   train    the shipped model's recipe with infilling + the AR baseline, then `dgemma eval` of both
#   trainmem one training step's peak memory with and without --grad-checkpoint: a LoRA step on the 26B-A4B
#            shape with its base in bf16 (does fine-tuning fit one GPU?), and full training of the bench preset
#   suite    the whole test suite
# Results go to $OUT (default out/cuda).
set -u
OUT=${OUT:-out/cuda}
STEPS=${STEPS:-tests moe profile bench compiled suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
has() { [[ " $STEPS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
if has tests; then
  timeout "${CUDA_TESTS_S:-180}" python3 -m pytest tests/test_cuda.py tests/test_static.py tests/test_bench.py -q -rs \
    2>&1 | tee "$OUT/test_cuda.log" | tail -25
fi
if has moe; then
  timeout "${MOE_S:-200}" python3 benchmarks/moe_kernel.py --sweep > "$OUT/moe.log" 2>&1
  grep -v MOE_KERNEL_JSON "$OUT/moe.log" | tail -n 8 | cut -c1-1500
fi
if has profile; then
  timeout "${PROFILE_S:-150}" python3 benchmarks/profile_pass.py --batch "${PROFILE_BATCH:-1,4}" \
    --experts "${PROFILE_EXPERTS:-triton}" > "$OUT/profile.log" 2>&1
  grep -E "^==|Self CUDA|^-" -A0 "$OUT/profile.log" | head -3
  awk '/^==/{p=1} p' "$OUT/profile.log" | cut -c1-120 | grep -v "^-" | head -n 40
fi
if has bench; then
  timeout "${BENCH_S:-420}" python3 -m dgemma bench --preset 26b-a4b --device cuda --batch "${BATCH:-1,4}" \
    --prompt-len 1024 --passes 16 --canvases 2 --modes "${MODES:-eager,graph,fused,fp8}" --split \
    ${TRANSFORMERS---transformers} ${AR-} --repeats 6 --out "$OUT" > /dev/null 2> "$OUT/bench.log"
  tail -n 12 "$OUT/bench.log"
  python3 - "$OUT/bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("floors", r.get("floors"), "fp8 bandwidth floor", r.get("bandwidth_floor_ms_fp8"), "copy GB/s", r.get("copy_bandwidth_GBps"),
      "peak GB", r.get("peak_memory_GB"))
for row in r["runs"]:
    print({k: row.get(k) for k in ("system", "mode", "batch", "pass_ms", "step_ms", "commit_ms", "tokens_per_s",
                                   "first_canvas_s", "passes_per_canvas", "pass_over_floor")})
print("split", r.get("split_ms"), "fp8 expert rel err", r.get("fp8_expert_rel_error"))
for e in r["errors"]:
    print("ERROR", e["what"], e["error"][:300])
PY
fi
if has compiled; then  # the whole pass through torch.compile (compile time is part of the first capture)
  mkdir -p "$OUT/compiled"
  timeout "${COMPILED_S:-300}" python3 -m dgemma bench --preset 26b-a4b --device cuda --batch 1 --prompt-len 1024 \
    --passes 16 --canvases 2 --modes compiled --repeats 6 --out "$OUT/compiled" > /dev/null 2> "$OUT/compiled/bench.log"
  tail -n 3 "$OUT/compiled/bench.log"
  python3 -c "import json,sys; [print(r) for r in json.load(open(sys.argv[1]))['runs']]" "$OUT/compiled/bench.json"
fi
if has trainmem; then
  timeout "${TRAINMEM_S:-400}" python3 benchmarks/train_memory.py --preset 26b-a4b --device cuda --dtype bfloat16 \
    --lora "${LORA_RANK:-16}" --seq-len "${TRAINMEM_LEN:-1024}" --batch 1 2>&1 | tee "$OUT/train_memory.log"
  timeout 200 python3 benchmarks/train_memory.py --preset bench --device cuda --seq-len 4096 --batch 8 2>&1 \
    | tee -a "$OUT/train_memory.log"
fi
if has suite; then
  timeout "${SUITE_S:-240}" python3 -m pytest tests -q -n "${WORKERS:-8}" -p no:cacheprovider 2>&1 \
    | tee "$OUT/test_all.log" | tail -15
fi
if has train; then
  # the shipped model's recipe with the infilling objective, and the AR-only baseline: same config, data, steps
  STD=${STDLIB_DIR:-$(python3 -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")}
  HELD='/(bisect|heapq|fractions|textwrap|shlex|colorsys|glob|fnmatch|graphlib|statistics|string|calendar)\.py$'
  TRAIN=$(ls $STD/*.py | grep -vE "$HELD"); EVAL=$(ls $STD/*.py | grep -E "$HELD")
  STEPS_N=${TRAIN_STEPS:-2500}
  COMMON="--data $TRAIN --eval-data $EVAL --holdout-frac 0 --config-json docs/dgemma-code-tiny.json
    --tokenizer models/dgemma-code-tiny --steps $STEPS_N --batch-size 16 --seq-len 256 --lr 2e-3 --warmup 100
    --eval-every 250 --save-every $STEPS_N --log-every 100 --device cuda"
  mkdir -p runs
  # a run stopped by the timeout saves a checkpoint first (SIGTERM), so the newest checkpoint is used below
  ( time timeout "${TRAIN_S:-600}" python3 -m dgemma train $COMMON --infill-prob ${INFILL_PROB:-0.5} --out runs/fim ) \
    > runs/train_fim.log 2>&1 &
  ( time timeout "${TRAIN_S:-600}" python3 -m dgemma train $COMMON --diffusion-weight 0 --out runs/ar ) \
    > runs/train_ar.log 2>&1 &
  wait
  tail -n 4 runs/train_fim.log runs/train_ar.log
  FIM=$(ls -d runs/fim/checkpoint-* | sort -V | tail -n 1); AR=$(ls -d runs/ar/checkpoint-* | sort -V | tail -n 1)
  echo "checkpoints: $FIM $AR"
  DGEMMA_STDLIB=$STD timeout "${EVAL_S:-300}" python3 -m dgemma eval --model $FIM --ar-model $AR --device cuda \
    --table runs/eval.md --plot runs/eval_steps.png > runs/eval.json 2> runs/eval.log
  cat runs/eval.md; tail -n 3 runs/eval.log
  python3 -c "
import sys, torch; from dgemma import DiffusionGemma
DiffusionGemma.from_pretrained(sys.argv[1], dtype=torch.bfloat16).save_pretrained(sys.argv[2])" \
    $FIM runs/fim_bf16
  tar cf - runs/fim_bf16 | split -b 15M - "$OUT/fim_bf16.tar.part-"
  tar cf "$OUT/train_runs.tar" runs/*.log runs/eval.* runs/eval_steps.png runs/fim/metrics.jsonl runs/ar/metrics.jsonl \
    runs/fim/*.png runs/ar/*.png 2>/dev/null
fi

#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, section by section, each run's JSON in OUT/<name>.json
# and its stderr in OUT/<name>.log. From the repository root on a CUDA machine:
#
#   scripts/bench_gpu.sh OUT [SECTION ...]
#
# Sections (default: all, in this order; each fits a 10-minute slot on an H100):
#   bert     BERT-base MLM, T=128, 256 sequences: eager, then hardware.compile=true (each vs the HF loop)
#   gpt2     GPT-2 124M, T=1024, 16 sequences: eager with --loss, then compiled (each vs the HF loop)
#   ablate   BERT-base and GPT-2 eager with one speed switch off at a time: what each one gives
#   profile  torch.profiler top operators per step, BERT-base and GPT-2 compiled, with Chrome traces
#   micro    micro-batch sizes around the defaults, compiled, no baseline: the fastest that fits
#   curve    300 steps of BERT-base eager and compiled (compile must follow the eager loss curve)
#
# BERT and GPT override the model arguments (e.g. to try the plumbing on CPU with tiny models).
set -uo pipefail  # not -e: one failing run leaves the others to run
OUT=${1:?usage: scripts/bench_gpu.sh OUT [bert gpt2 ablate profile micro curve]}
shift
SECTIONS=${*:-bert gpt2 ablate profile micro curve}
PYTHON=${PYTHON:-python}
BERT=${BERT:-model=bert-base hardware=gpu trainer.seq_len=128 trainer.batch_size=256 trainer.micro_batch_size=256 tokenizer.vocab_size=30522}
GPT=${GPT:-objective=ar model=gpt2 hardware=gpu trainer.seq_len=1024 trainer.batch_size=16 trainer.micro_batch_size=16 tokenizer.vocab_size=50257}
WARMUP=${WARMUP:-10}
STEPS=${STEPS:-30}
mkdir -p "$OUT"

run() {  # run NAME ARGS...: one bench.py run; prints a one-line summary
    local name=$1
    shift
    local start=$SECONDS
    # shellcheck disable=SC2068
    $PYTHON scripts/bench.py --json --warmup "$WARMUP" --steps "$STEPS" $@ >"$OUT/$name.json" 2>"$OUT/$name.log"
    local rc=$?
    local summary
    summary=$($PYTHON - "$OUT/$name.json" <<'EOF'
import json, sys
try:
    r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except Exception:
    print("no result"); sys.exit()
s, b = r["ssltrain"], r.get("hf_baseline") or {}
print(f"ssltrain {s['tokens_per_s']:.0f} tok/s mfu {s['mfu']}"
      + (f" | hf {b['tokens_per_s']:.0f} tok/s mfu {b['mfu']} | ratio {r['speedup_vs_hf']}" if b else "")
      + (f" | loss eager {r['loss']['eager_ms']} compiled {r['loss']['compiled_ms']} hf {r['loss']['hf_ms']} ms"
         if "loss" in r else ""))
EOF
)
    echo "$name: rc=$rc $((SECONDS - start))s $summary"
}

for section in $SECTIONS; do
    case $section in
    bert)
        run bert_eager $BERT
        run bert_compiled $BERT hardware.compile=true
        ;;
    gpt2)
        run gpt2_eager --loss $GPT
        run gpt2_compiled $GPT hardware.compile=true
        ;;
    ablate)
        for off in hardware.compile_loss=false objective.sparse_head=false hardware.fused_optimizer=false \
                   hardware.attn_implementation=eager hardware.mixed_precision=no; do
            run "bert_without_${off%%=*}" --no-baseline $BERT "$off"
        done
        for off in hardware.compile_loss=false hardware.fused_optimizer=false hardware.attn_implementation=eager; do
            run "gpt2_without_${off%%=*}" --no-baseline $GPT "$off"
        done
        ;;
    profile)
        run bert_profile --no-baseline --profile 5 --trace "$OUT/bert_trace.json" $BERT hardware.compile=true
        run gpt2_profile --no-baseline --profile 5 --trace "$OUT/gpt2_trace.json" $GPT hardware.compile=true
        ;;
    micro)
        for m in 128 512 1024; do
            run "bert_micro_$m" --no-baseline $BERT hardware.compile=true trainer.batch_size=$m trainer.micro_batch_size=$m
        done
        for m in 8 32 64; do
            run "gpt2_micro_$m" --no-baseline $GPT hardware.compile=true trainer.batch_size=$m trainer.micro_batch_size=$m
        done
        ;;
    curve)
        for flag in false true; do
            # shellcheck disable=SC2086
            $PYTHON -m ssltrain $BERT hardware.compile=$flag trainer.max_steps=300 trainer.log_every=50 \
                "hydra.run.dir=$OUT/curve_compile_$flag" >"$OUT/curve_compile_$flag.log" 2>&1
            echo "curve_compile_$flag: rc=$? $(grep -h '\[eval\]' "$OUT/curve_compile_$flag.log" | tail -1)"
        done
        ;;
    *)
        echo "unknown section $section; valid: bert gpt2 ablate profile micro curve" >&2
        exit 2
        ;;
    esac
done

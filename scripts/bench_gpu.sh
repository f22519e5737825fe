#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one go, the most important first, inside a time
# budget, so that a single call on a lent GPU machine brings back everything it measured. From the
# repository root on a CUDA machine:
#
#   [WHEELS=.wheels/device] [DEADLINE=510] scripts/bench_gpu.sh OUT [SECTION ...]
#
# OUT receives (few files, each small enough to copy back):
#   summary.txt    one line per measured configuration (tokens/s, MFU, ratio to the HF loop), and
#                  one per section skipped for lack of time
#   results.jsonl  every bench.py JSON object, each with its "section"
#   log.txt        every command's stderr, in order
#   <name>_trace.json.gz   the profile section's Chrome traces
#
# Sections (default: all, in this order). Each is one bench.py process: the variants of a section
# share its start-up, data and HF baseline (bench.py --variant).
#   bert     BERT-base MLM, T=128, 256 sequences: eager, compiled, compiled with 512; vs the HF loop
#   gpt2     GPT-2 124M, T=1024, 16 sequences: eager (+ the loss alone), compiled, compiled with 32; vs the HF loop
#   profile  torch.profiler top operators per step, BERT-base and GPT-2 compiled
#   ablate   BERT-base and GPT-2 eager with one speed switch off at a time: what each one gives
#   curve    200 steps of BERT-base through `ssltrain`, eager and compiled: compile follows the eager losses
#   modes    GPT-2 compiled with CUDA graphs (compile_mode=reduce-overhead; its shapes never change)
#
# DEADLINE: seconds from the start after which no section starts that would not end by then
# (each has an estimate below); skipped sections are named in summary.txt.
# WHEELS: a folder of wheels (scripts/offline_wheels.sh --device) to install into a scratch
# site-packages on PYTHONPATH first, so the machine's own torch and transformers stay.
# BERT and GPT override the model arguments (e.g. to try the plumbing on CPU with tiny models).
set -uo pipefail  # not -e: one failing run leaves the others to run
OUT=${1:?usage: scripts/bench_gpu.sh OUT [bert gpt2 profile ablate curve modes]}
shift
SECTIONS=${*:-bert gpt2 profile ablate curve modes}
PYTHON=${PYTHON:-python3}
DEADLINE=${DEADLINE:-510}
BERT=${BERT:-model=bert-base hardware=gpu trainer.seq_len=128 trainer.batch_size=256 trainer.micro_batch_size=256 tokenizer.vocab_size=30522}
GPT=${GPT:-objective=ar model=gpt2 hardware=gpu trainer.seq_len=1024 trainer.batch_size=16 trainer.micro_batch_size=16 tokenizer.vocab_size=50257}
WARMUP=${WARMUP:-10}
STEPS=${STEPS:-40}
CURVE_STEPS=${CURVE_STEPS:-200}
mkdir -p "$OUT"
: >"$OUT/summary.txt"; : >"$OUT/results.jsonl"; : >"$OUT/log.txt"  # a rerun into OUT starts afresh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export SSLTRAIN_CACHE=${SSLTRAIN_CACHE:-/tmp/ssltrain-cache}

note() { echo "$*" | tee -a "$OUT/summary.txt"; }

if [ -n "${WHEELS:-}" ]; then
    # "site-packages" in the path matters: dill (datasets' fingerprints) pickles the modules of any
    # other folder by value, and fails on pyarrow's.
    site=${TMPDIR:-/tmp}/ssltrain/site-packages
    $PYTHON -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$WHEELS"/*.whl >>"$OUT/log.txt" 2>&1 || note "installing $WHEELS failed (see log.txt)"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # python -m ssltrain from this checkout
note "$($PYTHON -c 'import torch, transformers, datasets, hydra
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"{gpu} | torch {torch.__version__} | transformers {transformers.__version__} | datasets {datasets.__version__}")' \
    2>>"$OUT/log.txt" || echo "imports failed (see log.txt)")"

fits() {  # fits NAME SECONDS: whether a section estimated at SECONDS ends before DEADLINE
    if (( SECONDS + $2 > DEADLINE )); then
        note "$1: skipped at ${SECONDS}s (estimated ${2}s, deadline ${DEADLINE}s)"
        return 1
    fi
}

bench() {  # bench SECTION ARGS...: one bench.py process; its JSON lines go to results.jsonl, one summary line each
    local section=$1
    shift
    local start=$SECONDS
    echo "== $section: bench.py $*" >>"$OUT/log.txt"
    $PYTHON scripts/bench.py --json --warmup "$WARMUP" --steps "$STEPS" "$@" 2>>"$OUT/log.txt" \
        | $PYTHON scripts/bench_summary.py "$section" "$OUT/results.jsonl" "$OUT/summary.txt"
    note "$section: rc=${PIPESTATUS[0]} in $((SECONDS - start))s"
}

for section in $SECTIONS; do
    case $section in
    bert)
        fits bert 150 && bench bert $BERT --variant "" --variant "hardware.compile=true" \
            --variant "hardware.compile=true trainer.batch_size=512 trainer.micro_batch_size=512"
        ;;
    gpt2)
        fits gpt2 150 && bench gpt2 $GPT --loss --variant "" --variant "hardware.compile=true" \
            --variant "hardware.compile=true trainer.batch_size=32 trainer.micro_batch_size=32"
        ;;
    profile)
        for model in bert gpt2; do
            args=$BERT
            [ $model = gpt2 ] && args=$GPT
            # shellcheck disable=SC2086
            fits "profile_$model" 60 && bench "profile_$model" --no-baseline --steps 10 --profile 5 \
                --trace "$OUT/${model}_trace.json" $args hardware.compile=true \
                && gzip -f "$OUT/${model}_trace.json"
        done
        ;;
    ablate)
        fits ablate_bert 60 && bench ablate_bert --no-baseline $BERT --variant "" \
            --variant hardware.compile_loss=false --variant objective.sparse_head=false \
            --variant hardware.fused_optimizer=false --variant hardware.attn_implementation=eager \
            --variant hardware.mixed_precision=no
        fits ablate_gpt2 60 && bench ablate_gpt2 --no-baseline $GPT --variant "" \
            --variant hardware.compile_loss=false --variant hardware.fused_optimizer=false \
            --variant hardware.attn_implementation=eager
        ;;
    curve)
        for flag in false true; do
            fits "curve_compile_$flag" 75 || continue
            start=$SECONDS
            run_dir=${TMPDIR:-/tmp}/ssltrain-curve-compile-$flag
            rm -rf "$run_dir"  # a fresh run, never a resume
            # shellcheck disable=SC2086
            $PYTHON -m ssltrain $BERT hardware.compile=$flag trainer.max_steps="$CURVE_STEPS" trainer.log_every=25 \
                trainer.eval_every=100 trainer.export=false "hydra.run.dir=$run_dir" >>"$OUT/log.txt" 2>&1
            rc=$?
            cp "$run_dir/metrics.jsonl" "$OUT/curve_compile_$flag.jsonl" 2>/dev/null
            note "curve_compile_$flag: rc=$rc in $((SECONDS - start))s;" \
                "$($PYTHON scripts/bench_summary.py --curve "$run_dir/metrics.jsonl" 2>&1 | tail -1)"
        done
        ;;
    modes)
        fits modes 90 && bench modes --no-baseline $GPT --variant "hardware.compile=true hardware.compile_mode=reduce-overhead"
        ;;
    *)
        echo "unknown section $section; valid: bert gpt2 profile ablate curve modes" >&2
        exit 2
        ;;
    esac
done
note "done in ${SECONDS}s"

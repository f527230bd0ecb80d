#!/bin/bash
# Issue 12's emergent-collapse runs in ONE call of a lent GPU (15 minutes of device time per session, all tries
# together), fp32 with TF32 off so that the GPU continues the CPU runs' arithmetic:
#   * t1024_dtmin from its committed checkpoint-7500 (examples/unfinished_runs) to the end of its 30M tokens,
#   * t128_dtmin_s1, the second seed of t128_dtmin, from scratch,
#   * t128_dtmin re-evaluated there, to check that a GPU evaluation matches the committed CPU one,
# then emergent_eval.py on each finished run. Each run's training stops at a deadline, so that whatever is unfinished
# comes back as a resumable checkpoint (`emergent_training.py` resumes from the newest one in --out).
#
# Ran on 2026-11-29 as below, then again with `BUDGET=540 COMPILE= JOBS=t1024_dtmin` (eager: the compiled 1024-token
# run failed in inductor), then with `BUDGET=280 TRAIN_END=215 JOBS=t128_s1` on the device time left; logs in
# examples/state_collapse/emergent/*_gpu*.log and *_s1_train.log. The runs are
# finished and their models committed under examples/state_collapse/emergent/models/; the t1024_dtmin checkpoint this
# script resumed is only in git history now: `git checkout cc9cbca -- examples/unfinished_runs`.
#
# Uses data OUTSIDE the repository: ../shared/data/corpus, carried as .devrun/corpus (tinyshakespeare gzipped to fit
# the 64 MiB transfer):
#   mkdir -p .devrun/corpus && cp ../shared/data/corpus/*.zip .devrun/corpus/ &&
#       gzip -9c ../shared/data/corpus/tinyshakespeare.txt > .devrun/corpus/tinyshakespeare.txt.gz
#   device run: command="bash examples/state_collapse/emergent_device_run.sh", carry=[".devrun"], timeout_s=590
# Results come back as $OUT/<run>.tgz (the run: model/ and half-lives if finished, else its newest checkpoint; its
# evaluation under eval/) and $OUT/<run>.log.
#
# Environment (for a dry run on CPU): BUDGET (seconds for everything, default 560), TRAIN_EXTRA / EVAL_EXTRA (more
# arguments for the two scripts), PY (python3), COMPILE (default --torch_compile; empty: eager, since torch 2.11's
# inductor fails on the 1024-token chunked scan on the GPU: "InductorError: TypeError: list indices must be integers"),
# JOBS (default "t1024_dtmin t128_dtmin_s1 t128_dtmin"; also t128_s1, the default-initialised model's second seed),
# TRAIN_END / EVAL_END (seconds after the start at which training / evaluation stop).
set -u
OUT=${OUT:-/tmp/emergent_device_out}
BUDGET=${BUDGET:-560}
PY=${PY:-python3}
TRAIN_EXTRA=${TRAIN_EXTRA:-}
COMPILE=${COMPILE---torch_compile}
JOBS=${JOBS:-t1024_dtmin t128_dtmin_s1 t128_dtmin}
EVAL_EXTRA=${EVAL_EXTRA:---length 65536 --sequences 8}
TRAIN_END=${TRAIN_END:-$((BUDGET - 170))}  # training stops here: leaves time for an evaluation and the packing
EVAL_END=${EVAL_END:-$((BUDGET - 25))}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=8
mkdir -p "$OUT"
C=/tmp/emergent_corpus R=/tmp/emergent_runs
rm -rf $C $R && mkdir -p $C $R
cp .devrun/corpus/*.zip $C/ && gunzip -c .devrun/corpus/tinyshakespeare.txt.gz > $C/tinyshakespeare.txt || exit 1
[ -d examples/unfinished_runs/emergent/t1024_dtmin ] && cp -r examples/unfinished_runs/emergent/t1024_dtmin $R/
cp -r examples/state_collapse/emergent/models/t128_dtmin $R/  # the finished model, for the evaluation check
nvidia-smi -L 2>/dev/null
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available())"

left() { echo $(($1 - SECONDS)); }

evaluate() {  # evaluate <run>: per-run results under <run>/eval
    local t; t=$(left $EVAL_END)
    [ "$t" -gt 5 ] || { echo "no time left to evaluate $1"; return; }
    timeout "$t" $PY examples/state_collapse/emergent_eval.py --runs $R/$1 --out $R/$1/eval --threads 2 \
        --data_dir $C $EVAL_EXTRA
}

train_then_evaluate() {  # train_then_evaluate <run> <emergent_training.py arguments...>
    local name=$1; shift
    timeout "$(left $TRAIN_END)" $PY examples/state_collapse/emergent_training.py --out $R/$name --data_dir $C \
        --threads 2 $COMPILE --precision fp32 "$@" $TRAIN_EXTRA
    echo "training exit code $? after ${SECONDS}s"
    [ -d $R/$name/model ] && evaluate $name
}

for job in $JOBS; do
    case $job in
    t1024_dtmin) train_then_evaluate t1024_dtmin --train_length 1024 --batch 2 --seed 0 --time_step_min 1e-4 ;;
    t128_dtmin_s1) train_then_evaluate t128_dtmin_s1 --train_length 128 --seed 1 --time_step_min 1e-4 ;;
    t128_s1) train_then_evaluate t128_s1 --train_length 128 --seed 1 ;;
    t128_dtmin) evaluate t128_dtmin ;;
    esac > "$OUT/$job.log" 2>&1 &
done
wait

for run in $JOBS; do  # what comes back: ≤ 16 MiB a file
    d=$R/$run
    [ -d "$d" ] || continue
    last=$(ls -d "$d"/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1)
    keep=()
    if [ $run = t128_dtmin ]; then  # trained on CPU and committed: only its GPU evaluation comes back
        :
    elif [ -d "$d/model" ]; then  # finished: the model, and the curve of its last checkpoint
        keep=(model)
        [ -n "$last" ] && keep+=("${last#$d/}/trainer_state.json")
    elif [ -n "$last" ]; then  # stopped at the deadline: its newest checkpoint, to resume from
        keep=("${last#$d/}")
    fi
    for f in half_lives.jsonl run_args.json eval; do [ -e "$d/$f" ] && keep+=("$f"); done
    [ ${#keep[@]} -gt 0 ] && tar czf "$OUT/$run.tgz" -C "$d" "${keep[@]}"
done
ls -la "$OUT"
echo "done after ${SECONDS}s"

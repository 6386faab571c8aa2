#!/usr/bin/env bash
# speedrun.sh: from raw text to a chat model you trained yourself, in one command.
#
#   bash speedrun.sh            # the plan picks itself: CPU -> small model on the embedded corpus (~20 min on 2 cores);
#                               # N GPUs -> torchrun over all of them, FineWeb-Edu, a depth-20 model (hours)
#   bash speedrun.sh --quick    # a tiny end-to-end run (a couple of minutes), used by the tests
#
# Flags: --depth N, --vocab-size N, --shards N (FineWeb-Edu train shards; default: enough for the depth's token
# budget), --gpus N (per node), --corpus default|fineweb-edu, --minutes M (pretraining time limit), --quick.
# Env: SCRATCHCHAT_HOME (artifacts), SCRATCHCHAT_NO_SETUP=1 (use the current python as is instead of creating .venv),
# SCRATCHCHAT_DEVICE=cpu (every stage on the CPU, torchrun ranks on gloo), GPU_HOUR_COST (dollars, for the report),
# SCRATCHCHAT_FINEWEB_URL / SCRATCHCHAT_SMOLTALK_URL / SCRATCHCHAT_BENCHMARK_URL (mirrors), and torchrun's rendezvous
# variables for multi-node (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT; see README).
# Each stage records completion in $SCRATCHCHAT_HOME/speedrun/; re-running skips finished stages (and reruns every
# stage after one that had to run) and resumes an interrupted pretraining from its last checkpoint. Logs go to
# $SCRATCHCHAT_HOME/logs/<stage>.log; the report card to $SCRATCHCHAT_HOME/report/report.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
t_setup=$(date +%s)

die() { echo "error: $*" >&2; exit 2; }
quick=0; depth=""; vocab_size=""; shards=""; gpus=""; corpus=""; minutes=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --depth|--vocab-size|--shards|--gpus|--minutes)
            [[ "${2:-}" =~ ^[0-9]+$ ]] || die "$1 needs a whole number (see bash speedrun.sh --help)"
            name="${1#--}"; printf -v "${name//-/_}" %s "$2"; shift ;;
        --corpus)
            [[ "${2:-}" =~ ^(default|fineweb-edu)$ ]] || die "--corpus is default or fineweb-edu"
            corpus="$2"; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown flag $1 (see bash speedrun.sh --help)" ;;
    esac
    shift
done
[ -z "$vocab_size" ] || [ "$vocab_size" -ge 512 ] || die "--vocab-size must be at least 512"
node_rank="${NODE_RANK:-0}"; nodes="${NNODES:-1}"

if [ $quick = 1 ]; then
    export SCRATCHCHAT_HOME="${SCRATCHCHAT_HOME:-$HOME/.cache/scratchchat-quick}"
else
    export SCRATCHCHAT_HOME="${SCRATCHCHAT_HOME:-$HOME/.cache/scratchchat}"
fi
home="$SCRATCHCHAT_HOME"
mkdir -p "$home/speedrun" "$home/logs"
if [ "${SCRATCHCHAT_NO_SETUP:-0}" != 1 ]; then source scripts/setup.sh; fi
setup_time="$t_setup $(date +%s)"  # written once a stage runs, so a rerun with nothing to do rewrites nothing
start=$(date +%s)

if [ -z "$gpus" ]; then
    gpus=0
    if [ "${SCRATCHCHAT_DEVICE:-}" != cpu ]; then
        gpus=$(python -c "import torch; print(torch.cuda.device_count())")
        listed=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if [ "$gpus" = 0 ] && [ "${listed:-0}" -gt 0 ]; then
            die "nvidia-smi lists $listed GPU(s) but torch $(python -c 'import torch; print(torch.__version__)') sees" \
                "none: its CUDA build may need a newer driver. Install a torch wheel that matches the driver, or set" \
                "SCRATCHCHAT_DEVICE=cpu to run the CPU plan on purpose."
        fi
    fi
fi

# The plan: every knob of every stage, in one place. Sizes come from the hardware (or --quick); GPUs also bring
# the web-scale data (FineWeb-Edu, SmolTalk, benchmarks) and torchrun. Checkpoints every few minutes make
# pretraining resumable.
if [ $quick = 1 ]; then
    # 2048 tokens per step: gradient accumulation on one process and on two ranks alike.
    plan=quick; vocab=${vocab_size:-1024}; depth=${depth:-2}
    pre_args=(--depth "$depth" --max-steps 30 --device-batch-size 4 --sequence-len 128 --total-batch-tokens 2048
              --save-every 20)
    sft_args=(--max-steps 20 --mix-scale 0.1 --quick-eval-items 3); eval_args=(--limit 4)
elif [ "$gpus" -gt 0 ]; then
    plan=gpu; vocab=${vocab_size:-65536}; depth=${depth:-20}
    pre_args=(--depth "$depth" --save-every-minutes 30); eval_args=(); sft_args=()
else
    # <= 20 minutes in all: pretraining gets the most, SFT less than half of it, the eval 100 items per task. The
    # shape comes from benchmarks/sweep.py on 2 cores (depth 2, vocab 8192, 32 x 256 tokens per step: pretrain's
    # CPU defaults; see README); more cores buy a deeper model, as compute^(1/6): the compute-optimal parameter
    # count grows as compute^(1/2), parameters as depth^3.
    cores=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
    plan=cpu; vocab=${vocab_size:-8192}
    depth=${depth:-$(python -c "print(max(2, round(2 * ($cores / 2) ** (1 / 6))))")}
    pre_args=(--depth "$depth" --max-minutes 10 --save-every-minutes 2); sft_args=(--max-minutes 4)
    eval_args=(--limit 100)
fi
if [ "$gpus" -gt 0 ]; then corpus=${corpus:-fineweb-edu}; else corpus=${corpus:-default}; fi
if [ "$corpus" = fineweb-edu ]; then  # these download like FineWeb-Edu; the embedded corpus stays offline
    sft_args+=(--data default,smoltalk); eval_args+=(--benchmark mmlu,arc,gsm8k)
fi
[ -n "$minutes" ] && pre_args+=(--max-minutes "$minutes")
echo "speedrun: plan=$plan gpus=$gpus nodes=$nodes corpus=$corpus depth=$depth vocab=$vocab home=$home"

launch=(python)
if [ "$gpus" -gt 0 ]; then
    launch=(torchrun --nproc_per_node="$gpus" --nnodes="$nodes" --node_rank="$node_rank"
            --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}")
fi

# Several nodes may share $home (one disk for all) or not (node-local disks): either way every node runs this
# script. A lock per stage makes one process per filesystem do the work while the others wait, then find the
# stage done. flock comes with util-linux; without it (macOS) there is one node and nothing to wait for.
lock() { if command -v flock > /dev/null; then exec {lock_fd}>>"$home/speedrun/$1.lock"; flock "$lock_fd"; fi; }
unlock() { if [ -n "${lock_fd:-}" ]; then exec {lock_fd}>&-; lock_fd=""; fi; }

# stage NAME [--resume-from RUN_DIR] CMD...: run CMD unless NAME already finished with the same command after the
# stage before it (a stage that had to run makes every later one run again); log to logs/NAME.log, time to
# speedrun/NAME.time (start end). --resume-from marks a training stage: it runs under $launch (torchrun, which
# every node joins, so the lock is held only while deciding), and an interrupted run of the same command continues
# from its newest step_N checkpoint (whatever the launcher's port); otherwise an older run there is moved to
# RUN_DIR.prev, so its checkpoints never mix with the new ones.
prev=""
stage() {
    local name="$1"; shift
    local run_dir="" extra=() t0
    if [ "$1" = --resume-from ]; then run_dir="$2"; shift 2; fi
    local marker="$home/speedrun/$name.done" started="$home/speedrun/$name.started" log="$home/logs/$name.log"
    lock "$name"
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$*" ] && { [ -z "$prev" ] || [ "$marker" -nt "$prev" ]; }; then
        unlock; prev="$marker"
        echo "== $name: done earlier, skipping"; return
    fi
    if [ -n "$run_dir" ]; then
        if [ -f "$started" ] && [ "$(cat "$started")" = "$*" ] && compgen -G "$run_dir/step_*" > /dev/null; then
            extra=(--resume)
        elif [ -e "$run_dir" ]; then
            rm -rf "$run_dir.prev"; mv "$run_dir" "$run_dir.prev"
        fi
        echo "$*" > "$started"
    fi
    rm -f "$marker"
    [ -z "$run_dir" ] || unlock
    [ -z "$setup_time" ] || { echo "$setup_time" > "$home/speedrun/setup.time"; setup_time=""; }
    local cmd=("$@")
    [ -z "$run_dir" ] || cmd=("${launch[@]}" "$@" "${extra[@]}")
    echo "== $name: ${cmd[*]}  (log: $log)"
    t0=$(date +%s)
    if ! "${cmd[@]}" > >(tee "$log") 2>&1; then
        echo "error: stage '$name' failed; see $log" >&2; exit 1
    fi
    echo "$t0 $(date +%s)" > "$home/speedrun/$name.time"
    # On a shared disk another node may have finished the same run first: keep its marker (and its time).
    [ -f "$marker" ] && [ "$(cat "$marker")" = "$*" ] || echo "$*" > "$marker"
    rm -f "$started"
    unlock; prev="$marker"
    echo "== $name: finished in $(( $(date +%s) - t0 ))s"
}

if [ "$corpus" = fineweb-edu ]; then
    # The token budget (20 tokens per parameter) sets the download; the tokenizer trains on the first ~2 B
    # characters (8 shards) while the rest download in the background.
    [ -n "$shards" ] || shards=$(python -c "from pretrain.data import fineweb_shards_for as f; print(f($depth, $vocab))")
    first=$(( shards < 8 ? shards : 8 ))
    stage corpus python -m pretrain.data fineweb-edu --shards "$first"
    t_download=$(date +%s)
    ( lock download; python -m pretrain.data fineweb-edu --shards "$shards" ) > "$home/logs/download.log" 2>&1 &
    download=$!
    stage tokenizer python -m tokenizer train --vocab-size "$vocab" --max-chars 2000000000 \
        --input $(for i in $(seq 0 $(( first - 1 ))); do printf "$home/data/fineweb-edu/shard_%05d.parquet " "$i"; done)
    wait $download || { echo "error: stage 'download' failed; see $home/logs/download.log" >&2; exit 1; }
    # Timed when it fetched something (the manifest changes only then), so a rerun rewrites nothing.
    manifest="$home/data/fineweb-edu/manifest.json"
    [ -f "$home/speedrun/download.time" ] && [ ! "$manifest" -nt "$home/speedrun/download.time" ] ||
        echo "$t_download $(date +%s)" > "$home/speedrun/download.time"
    # More shards than before make the tokens stale: the manifest changes only when the shards do.
    [ "$manifest" -nt "$prev" ] && prev="$manifest"
else
    stage corpus python -m pretrain.data default
    stage tokenizer python -m tokenizer train --input "$home/data/default/train.parquet" --vocab-size "$vocab"
fi
stage tokens python -m pretrain.data tokenize --corpus "$corpus"
stage pretrain --resume-from "$home/checkpoints/base" -m pretrain --corpus "$corpus" "${pre_args[@]}"
stage sft --resume-from "$home/checkpoints/sft" -m finetune "${sft_args[@]}"
if [ "$node_rank" != 0 ]; then
    echo "speedrun: node $node_rank done; the first node evaluates the model and writes the report card"
    exit 0
fi
stage eval python -m finetune.eval "${eval_args[@]}"
report_gpus=$gpus; [ "${SCRATCHCHAT_DEVICE:-}" = cpu ] && report_gpus=0
stage report python scripts/report.py --gpu-hour-cost "${GPU_HOUR_COST:-3.0}" --gpus "$report_gpus" --nodes "$nodes"

echo
echo "speedrun finished in $(( $(date +%s) - start ))s; report card: $home/report/report.md"
# Commands that work as given in a new shell: the venv's python by path, not whatever python is first on PATH.
py="$(command -v python)"; env_prefix=""
[ $quick = 1 ] && env_prefix="SCRATCHCHAT_HOME=$home "
cat <<EOT
Chat with your model:
  ${env_prefix}$py -m serve    # OpenAI-compatible API on http://127.0.0.1:8000/v1 and a web page at http://127.0.0.1:8000/
  $py -m tui                   # terminal client (in another shell)
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "scratchchat", "messages": [{"role": "user", "content": "Hello!"}]}'
EOT

#!/usr/bin/env bash
# speedrun.sh: from raw text to a chat model you trained yourself, in one command.
#
#   bash speedrun.sh            # the plan picks itself: CPU -> small model on the embedded corpus (~20 min on 2 cores);
#                               # N GPUs -> torchrun over all of them, FineWeb-Edu, a depth-20 model (hours)
#   bash speedrun.sh --quick    # a tiny end-to-end run (a couple of minutes), used by the tests
#
# Flags: --depth N, --shards N (FineWeb-Edu shards), --gpus N, --corpus default|fineweb-edu, --minutes M (pretraining
# time limit), --quick. Env: SCRATCHCHAT_HOME (artifacts), SCRATCHCHAT_NO_SETUP=1 (use the current python as is
# instead of creating .venv), GPU_HOUR_COST (dollars, for the report's cost estimate), torchrun's rendezvous
# variables for multi-node (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT; see README).
# Each stage records completion in $SCRATCHCHAT_HOME/speedrun/; re-running skips finished stages (and reruns every
# stage after one that had to run) and resumes an interrupted pretraining from its last checkpoint. Logs go to
# $SCRATCHCHAT_HOME/logs/<stage>.log; the report card to $SCRATCHCHAT_HOME/report/report.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"

die() { echo "error: $*" >&2; exit 2; }
quick=0; depth=""; shards=""; gpus=""; corpus=""; minutes=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --depth|--shards|--gpus|--minutes)
            [[ "${2:-}" =~ ^[0-9]+$ ]] || die "$1 needs a whole number (see bash speedrun.sh --help)"
            printf -v "${1#--}" %s "$2"; shift ;;
        --corpus)
            [[ "${2:-}" =~ ^(default|fineweb-edu)$ ]] || die "--corpus is default or fineweb-edu"
            corpus="$2"; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown flag $1 (see bash speedrun.sh --help)" ;;
    esac
    shift
done

if [ "${SCRATCHCHAT_NO_SETUP:-0}" != 1 ]; then source scripts/setup.sh; fi
if [ $quick = 1 ]; then
    export SCRATCHCHAT_HOME="${SCRATCHCHAT_HOME:-$HOME/.cache/scratchchat-quick}"
else
    export SCRATCHCHAT_HOME="${SCRATCHCHAT_HOME:-$HOME/.cache/scratchchat}"
fi
home="$SCRATCHCHAT_HOME"
mkdir -p "$home/speedrun" "$home/logs"
[ -n "$gpus" ] || gpus=$(python -c "import torch; print(torch.cuda.device_count())")
start=$(date +%s)

# The plan: every knob of every stage, in one place. Checkpoints every few minutes make pretraining resumable.
if [ $quick = 1 ]; then
    plan=quick; corpus=${corpus:-default}; vocab=1024; depth=${depth:-2}
    pre_args=(--depth "$depth" --max-steps 30 --device-batch-size 8 --sequence-len 128 --save-every 20)
    sft_args=(--max-steps 20 --mix-scale 0.1 --quick-eval-items 3); eval_args=(--limit 4)
elif [ "$gpus" -gt 0 ]; then
    plan=gpu; corpus=${corpus:-fineweb-edu}; vocab=65536; depth=${depth:-20}; shards=${shards:-240}
    pre_args=(--depth "$depth" --save-every 2000); eval_args=()
    # SmolTalk downloads like FineWeb-Edu; a run on the embedded corpus stays offline.
    [ "$corpus" = fineweb-edu ] && sft_args=(--data default,smoltalk) || sft_args=()
else
    # 2 CPU cores, <= 20 minutes in all: pretraining gets the most, SFT a third of it, the eval a fixed sample.
    plan=cpu; corpus=${corpus:-default}; vocab=8192; depth=${depth:-4}
    pre_args=(--depth "$depth" --max-minutes 10 --save-every 200); sft_args=(--max-minutes 4); eval_args=(--limit 50)
fi
[ -n "$minutes" ] && pre_args+=(--max-minutes "$minutes")
echo "speedrun: plan=$plan gpus=$gpus corpus=$corpus home=$home"

launch=(python)
if [ "$gpus" -gt 0 ]; then
    launch=(torchrun --nproc_per_node="$gpus" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}"
            --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}")
fi

# stage NAME [--resume-from RUN_DIR] CMD...: run CMD unless NAME already finished with the same command and no
# earlier stage had to run in this invocation; log to logs/NAME.log, time to speedrun/NAME.time (start end).
# With --resume-from, an interrupted run of the same command continues from its newest step_N checkpoint;
# otherwise an older run there is moved to RUN_DIR.prev, so its checkpoints never mix with the new ones.
ran=0
stage() {
    local name="$1"; shift
    local run_dir="" extra=() t0
    if [ "$1" = --resume-from ]; then run_dir="$2"; shift 2; fi
    local marker="$home/speedrun/$name.done" started="$home/speedrun/$name.started" log="$home/logs/$name.log"
    if [ $ran = 0 ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$*" ]; then
        echo "== $name: done earlier, skipping"; return
    fi
    ran=1
    if [ -n "$run_dir" ]; then
        if [ -f "$started" ] && [ "$(cat "$started")" = "$*" ] && compgen -G "$run_dir/step_*" > /dev/null; then
            extra=(--resume)
        elif [ -e "$run_dir" ]; then
            rm -rf "$run_dir.prev"; mv "$run_dir" "$run_dir.prev"
        fi
        echo "$*" > "$started"
    fi
    rm -f "$marker"
    echo "== $name: $* ${extra[*]}  (log: $log)"
    t0=$(date +%s)
    if ! "$@" "${extra[@]}" > >(tee "$log") 2>&1; then
        echo "error: stage '$name' failed; see $log" >&2; exit 1
    fi
    echo "$t0 $(date +%s)" > "$home/speedrun/$name.time"
    echo "$*" > "$marker"
    rm -f "$started"
    echo "== $name: finished in $(( $(date +%s) - t0 ))s"
}

if [ "$corpus" = fineweb-edu ]; then
    # Web-scale shards download in the background while the tokenizer trains on the embedded corpus.
    t_download=$(date +%s)
    python -m pretrain.data fineweb-edu --shards "$shards" > "$home/logs/download.log" 2>&1 & download=$!
fi
stage corpus python -m pretrain.data default
stage tokenizer python -m tokenizer train --input "$home/data/default/train.parquet" --vocab-size "$vocab"
if [ "$corpus" = fineweb-edu ]; then
    wait $download || { echo "error: stage 'download' failed; see $home/logs/download.log" >&2; exit 1; }
    echo "$t_download $(date +%s)" > "$home/speedrun/download.time"
fi
stage tokens python -m pretrain.data tokenize --corpus "$corpus"
stage pretrain --resume-from "$home/checkpoints/base" "${launch[@]}" -m pretrain --corpus "$corpus" "${pre_args[@]}"
stage sft --resume-from "$home/checkpoints/sft" "${launch[@]}" -m finetune "${sft_args[@]}"
stage eval python -m finetune.eval "${eval_args[@]}"
stage report python scripts/report.py --gpu-hour-cost "${GPU_HOUR_COST:-3.0}"

echo
echo "speedrun finished in $(( $(date +%s) - start ))s; report card: $home/report/report.md"
[ $quick = 1 ] && prefix="SCRATCHCHAT_HOME=$home " || prefix=""
cat <<EOT
Chat with your model:
  ${prefix}python -m serve          # OpenAI-compatible API on http://127.0.0.1:8000/v1 and a web page at http://127.0.0.1:8000/
  python -m tui                     # terminal client (in another shell)
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "scratchchat", "messages": [{"role": "user", "content": "Hello!"}]}'
EOT

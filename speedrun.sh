#!/usr/bin/env bash
# speedrun.sh: from raw text to a chat model you trained yourself, in one command.
#
#   bash speedrun.sh            # the plan picks itself: CPU -> small model on the embedded corpus (~20 min on 2 cores);
#                               # N GPUs -> torchrun over all of them, FineWeb-Edu, a depth-20 model (hours)
#   bash speedrun.sh --quick    # a tiny end-to-end run (a couple of minutes), used by the tests
#
# Flags: --depth N, --shards N (FineWeb-Edu shards), --gpus N, --quick. Env: SCRATCHCHAT_HOME (artifacts),
# SCRATCHCHAT_NO_SETUP=1 (use the current python as is instead of creating .venv), torchrun's rendezvous
# variables for multi-node (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT; see README).
# Each stage records completion in $SCRATCHCHAT_HOME/speedrun/; re-running skips finished stages and resumes
# an interrupted pretraining from its last checkpoint. Logs go to $SCRATCHCHAT_HOME/logs/<stage>.log.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"

quick=0; depth=""; shards=""; gpus=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --depth) depth="$2"; shift ;;
        --shards) shards="$2"; shift ;;
        --gpus) gpus="$2"; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "error: unknown flag $1 (see bash speedrun.sh --help)" >&2; exit 2 ;;
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

# The plan: every knob of every stage, in one place.
if [ $quick = 1 ]; then
    plan=quick; corpus=default; vocab=1024; depth=${depth:-2}
    pre_args=(--depth "$depth" --max-steps 30 --device-batch-size 8 --sequence-len 128)
    sft_args=(--max-steps 20); eval_args=(--limit 8)
elif [ "$gpus" -gt 0 ]; then
    plan=gpu; corpus=fineweb-edu; vocab=65536; depth=${depth:-20}; shards=${shards:-240}
    pre_args=(--depth "$depth"); sft_args=(); eval_args=()
else
    plan=cpu; corpus=default; vocab=8192; depth=${depth:-4}
    pre_args=(); sft_args=(); eval_args=()
fi
echo "speedrun: plan=$plan gpus=$gpus home=$home"

launch=(python)
if [ "$gpus" -gt 0 ]; then
    launch=(torchrun --nproc_per_node="$gpus" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}"
            --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}")
fi

# stage NAME CMD...: run CMD unless NAME already finished with the same command; log to logs/NAME.log.
stage() {
    local name="$1"; shift
    local marker="$home/speedrun/$name.done" log="$home/logs/$name.log" t0
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$*" ]; then
        echo "== $name: done earlier, skipping"; return
    fi
    echo "== $name: $*  (log: $log)"
    t0=$(date +%s)
    if ! "$@" > >(tee "$log") 2>&1; then
        echo "error: stage '$name' failed; see $log" >&2; exit 1
    fi
    echo "$*" > "$marker"
    echo "== $name: finished in $(( $(date +%s) - t0 ))s"
}

if [ $plan = gpu ]; then
    # Web-scale shards download in the background while the tokenizer trains on the embedded corpus.
    python -m pretrain.data fineweb-edu --shards "$shards" > "$home/logs/download.log" 2>&1 & download=$!
fi
stage corpus python -m pretrain.data default
stage tokenizer python -m tokenizer train --input "$home/data/default/train.parquet" --vocab-size "$vocab" 
if [ $plan = gpu ]; then
    wait $download || { echo "error: stage 'download' failed; see $home/logs/download.log" >&2; exit 1; }
fi
stage tokens python -m pretrain.data tokenize --corpus "$corpus"
stage pretrain "${launch[@]}" -m pretrain --corpus "$corpus" "${pre_args[@]}"
stage sft "${launch[@]}" -m finetune "${sft_args[@]}"
stage eval python -m finetune.eval "${eval_args[@]}"

echo
echo "speedrun finished in $(( $(date +%s) - start ))s; artifacts in $home"
[ $quick = 1 ] && prefix="SCRATCHCHAT_HOME=$home " || prefix=""
cat <<EOT
Chat with your model:
  ${prefix}python -m serve          # OpenAI-compatible API on http://127.0.0.1:8000/v1 and a web page at http://127.0.0.1:8000/
  python -m tui                     # terminal client (in another shell)
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "scratchchat", "messages": [{"role": "user", "content": "Hello!"}]}'
EOT

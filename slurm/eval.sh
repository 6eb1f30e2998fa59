#!/bin/bash
# Zero-shot classification and image<->text retrieval of a training run's checkpoint.
#
#   RUN_DIR=runs/cc12m-vitl14-123456 sbatch --nodes=2 slurm/eval.sh
#   RUN_DIR=... TAG=step_00005000 IMAGENET_VAL=/data/imagenet/val sbatch slurm/eval.sh
#   RUN_DIR=... ZEROSHOT_DATA=imagenet:/data/in1k/val,imagenet-r:/data/in-r RETRIEVAL_DATA=clip_benchmark:/data/wds sbatch ...
#
# Runs `python -m pretrain.evaluate` on every rank (pretrain/eval_cli.py): rank 0 merges the ZeRO shards
# to fp32 once, every rank loads the whole model and evaluates its share. So any number of GPUs works
# (not only the training world size), the run's training data and flags are not needed (no training
# feed is built), and a run trained with an EMA teacher loads like any other (only the student is kept).
#
# Environment: RUN_DIR (required), TAG (latest), EVAL_DIR (RUN_DIR/eval/<tag>), ZEROSHOT_DATA
# (default: imagenet:$IMAGENET_VAL when IMAGENET_VAL is set, else the run's own, with a warning when that
# is the embedded smoke-test set), RETRIEVAL_DATA (the run's own), EVAL_BATCH_SIZE (the run's), PRECISION
# (bf16 on GPUs), plus the launcher's SETUP_CMD PYTHON SRUN_ARGS SRUN_WAIT MASTER_PORT (slurm/lib/launch.sh).
#
#SBATCH --job-name=eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=02:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=lib/launch.sh
source "$REPO/slurm/lib/launch.sh" 2>/dev/null || {
    echo "error: $REPO/slurm/lib/launch.sh not found; run sbatch from the repository root or set REPO." >&2
    exit 2
}
launch_init

[[ -n ${RUN_DIR:-} ]] || die "RUN_DIR is not set; point it at a training run directory (it holds config.json and checkpoints/)."
check_dir RUN_DIR "$RUN_DIR"
check_file "RUN_DIR/config.json" "$RUN_DIR/config.json" "the trainer writes it at startup; is RUN_DIR a run directory?"
TAG=${TAG:-latest}

# Which complete tag (pretrain.checkpoint decides what is complete).
TAG_DIR=$("$PYTHON" - "$RUN_DIR/checkpoints" "$TAG" <<'EOF' || true
import sys
from pathlib import Path
from pretrain import checkpoint as c
ckpt, tag = Path(sys.argv[1]), sys.argv[2]
d = c.find_latest(ckpt, log=lambda m: print(m, file=sys.stderr)) if tag == "latest" else ckpt / tag
if d is not None and d.is_dir() and not c.is_complete(d):
    print(d)
EOF
)
[[ -n ${TAG_DIR:-} ]] || die "no complete checkpoint $TAG in $RUN_DIR/checkpoints; give TAG=step_NNNNNNNN of a finished save, or TAG=latest."
world_layout

EVAL_DIR=${EVAL_DIR:-$RUN_DIR/eval/$(basename "$TAG_DIR")}
mkdir -p "$EVAL_DIR" || die "EVAL_DIR=$EVAL_DIR cannot be created."

# Eval sets and batch size: the run's own unless given (its config.json is only read, never re-run).
IFS=$'\t' read -r RUN_ZEROSHOT RUN_RETRIEVAL RUN_EVAL_BATCH < <("$PYTHON" -c 'import json, sys; c = json.load(open(sys.argv[1])); print(c["zeroshot_data"], c["retrieval_data"], c["eval_batch_size"], sep="\t")' "$RUN_DIR/config.json") \
    || die "cannot read the eval settings from $RUN_DIR/config.json."
ZEROSHOT_DATA=${ZEROSHOT_DATA:-${IMAGENET_VAL:+imagenet:$IMAGENET_VAL}}
ZEROSHOT_DATA=${ZEROSHOT_DATA:-$RUN_ZEROSHOT}
RETRIEVAL_DATA=${RETRIEVAL_DATA:-$RUN_RETRIEVAL}
check_eval_data ZEROSHOT_DATA "$ZEROSHOT_DATA"
check_eval_data RETRIEVAL_DATA "$RETRIEVAL_DATA"
EVAL_ARGS=(--checkpoint "$TAG_DIR" --out "$EVAL_DIR/results.json" --zeroshot-data "$ZEROSHOT_DATA"
           --retrieval-data "$RETRIEVAL_DATA" --batch-size "${EVAL_BATCH_SIZE:-$RUN_EVAL_BATCH}")
[[ -n ${PRECISION:-} ]] && EVAL_ARGS+=(--precision "$PRECISION")
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && EVAL_ARGS+=(--workers $(( SLURM_CPUS_PER_TASK > 2 ? SLURM_CPUS_PER_TASK - 2 : 1 )))

echo "== evaluating $TAG_DIR into $EVAL_DIR"
master_env
echo "== $(date -Is) launching python -m pretrain.evaluate ${EVAL_ARGS[*]}"
run_ranks "$PYTHON" -u -m pretrain.evaluate "${EVAL_ARGS[@]}"
(( RANKS_RC == 0 )) || { echo "== evaluation failed with exit code $RANKS_RC" >&2; exit "$RANKS_RC"; }
echo "== $(date -Is) results: $EVAL_DIR/results.json"

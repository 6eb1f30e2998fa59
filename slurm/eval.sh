#!/bin/bash
# Zero-shot classification and image<->text retrieval of a training run's checkpoint.
#
#   SOFTCLIP_RUN_DIR=runs/cc12m-vitl14-123456 sbatch --nodes=2 slurm/eval.sh
#   SOFTCLIP_RUN_DIR=... SOFTCLIP_TAG=step_00005000 SOFTCLIP_IMAGENET_VAL=/data/imagenet/val sbatch slurm/eval.sh
#   SOFTCLIP_RUN_DIR=... SOFTCLIP_ZEROSHOT_DATA=imagenet:/data/in1k/val,imagenet-r:/data/in-r SOFTCLIP_RETRIEVAL_DATA=clip_benchmark:/data/wds sbatch ...
#
# Runs `python -m pretrain.evaluate` on every rank (pretrain/evaluate/cli.py): rank 0 merges the ZeRO shards
# to fp32 once, every rank loads the whole model and evaluates its share. So any number of GPUs works
# (not only the training world size), the run's training data and flags are not needed (no training
# feed is built), and a run trained with an EMA teacher loads like any other (only the student is kept).
#
# Environment: SOFTCLIP_RUN_DIR (required), SOFTCLIP_TAG (latest), SOFTCLIP_EVAL_DIR (SOFTCLIP_RUN_DIR/eval/<tag>), SOFTCLIP_ZEROSHOT_DATA
# (default: imagenet:$SOFTCLIP_IMAGENET_VAL when SOFTCLIP_IMAGENET_VAL is set, else the run's own, with a warning when that
# is the embedded smoke-test set), SOFTCLIP_RETRIEVAL_DATA (the run's own), SOFTCLIP_EVAL_BATCH_SIZE (the run's), SOFTCLIP_PRECISION
# (bf16 on GPUs), plus the launcher's SOFTCLIP_SETUP_CMD SOFTCLIP_PYTHON SOFTCLIP_SRUN_ARGS SOFTCLIP_SRUN_WAIT SOFTCLIP_MASTER_PORT (slurm/lib/launch.sh).
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

SOFTCLIP_REPO=${SOFTCLIP_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=lib/launch.sh
source "$SOFTCLIP_REPO/slurm/lib/launch.sh" 2>/dev/null || {
    echo "error: $SOFTCLIP_REPO/slurm/lib/launch.sh not found; run sbatch from the repository root or set SOFTCLIP_REPO." >&2
    exit 2
}
launch_init

[[ -n ${SOFTCLIP_RUN_DIR:-} ]] || die "SOFTCLIP_RUN_DIR is not set; point it at a training run directory (it holds config.json and checkpoints/)."
check_dir SOFTCLIP_RUN_DIR "$SOFTCLIP_RUN_DIR"
check_file "SOFTCLIP_RUN_DIR/config.json" "$SOFTCLIP_RUN_DIR/config.json" "the trainer writes it at startup; is SOFTCLIP_RUN_DIR a run directory?"
SOFTCLIP_TAG=${SOFTCLIP_TAG:-latest}

# Which complete tag (pretrain.checkpoints.checkpoint decides what is complete).
TAG_DIR=$("$SOFTCLIP_PYTHON" - "$SOFTCLIP_RUN_DIR/checkpoints" "$SOFTCLIP_TAG" <<'EOF' || true
import sys
from pathlib import Path
from pretrain.checkpoints import checkpoint as c
ckpt, tag = Path(sys.argv[1]), sys.argv[2]
d = c.find_latest(ckpt, log=lambda m: print(m, file=sys.stderr)) if tag == "latest" else ckpt / tag
if d is not None and d.is_dir() and not c.is_complete(d):
    print(d)
EOF
)
[[ -n ${TAG_DIR:-} ]] || die "no complete checkpoint $SOFTCLIP_TAG in $SOFTCLIP_RUN_DIR/checkpoints; give SOFTCLIP_TAG=step_NNNNNNNN of a finished save, or SOFTCLIP_TAG=latest."
world_layout

SOFTCLIP_EVAL_DIR=${SOFTCLIP_EVAL_DIR:-$SOFTCLIP_RUN_DIR/eval/$(basename "$TAG_DIR")}
mkdir -p "$SOFTCLIP_EVAL_DIR" || die "SOFTCLIP_EVAL_DIR=$SOFTCLIP_EVAL_DIR cannot be created."

# Eval sets and batch size: the run's own unless given (its config.json is only read, never re-run).
IFS=$'\t' read -r RUN_ZEROSHOT RUN_RETRIEVAL RUN_EVAL_BATCH < <("$SOFTCLIP_PYTHON" -c 'import json, sys; c = json.load(open(sys.argv[1])); print(c["zeroshot_data"], c["retrieval_data"], c["eval_batch_size"], sep="\t")' "$SOFTCLIP_RUN_DIR/config.json") \
    || die "cannot read the eval settings from $SOFTCLIP_RUN_DIR/config.json."
SOFTCLIP_ZEROSHOT_DATA=${SOFTCLIP_ZEROSHOT_DATA:-${SOFTCLIP_IMAGENET_VAL:+imagenet:$SOFTCLIP_IMAGENET_VAL}}
SOFTCLIP_ZEROSHOT_DATA=${SOFTCLIP_ZEROSHOT_DATA:-$RUN_ZEROSHOT}
SOFTCLIP_RETRIEVAL_DATA=${SOFTCLIP_RETRIEVAL_DATA:-$RUN_RETRIEVAL}
check_eval_data SOFTCLIP_ZEROSHOT_DATA "$SOFTCLIP_ZEROSHOT_DATA"
check_eval_data SOFTCLIP_RETRIEVAL_DATA "$SOFTCLIP_RETRIEVAL_DATA"
EVAL_ARGS=(--checkpoint "$TAG_DIR" --out "$SOFTCLIP_EVAL_DIR/results.json" --zeroshot-data "$SOFTCLIP_ZEROSHOT_DATA"
           --retrieval-data "$SOFTCLIP_RETRIEVAL_DATA" --batch-size "${SOFTCLIP_EVAL_BATCH_SIZE:-$RUN_EVAL_BATCH}")
[[ -n ${SOFTCLIP_PRECISION:-} ]] && EVAL_ARGS+=(--precision "$SOFTCLIP_PRECISION")
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && EVAL_ARGS+=(--workers $(( SLURM_CPUS_PER_TASK > 2 ? SLURM_CPUS_PER_TASK - 2 : 1 )))

echo "== evaluating $TAG_DIR into $SOFTCLIP_EVAL_DIR"
master_env
echo "== $(date -Is) launching python -m pretrain.evaluate ${EVAL_ARGS[*]}"
run_ranks "$SOFTCLIP_PYTHON" -u -m pretrain.evaluate "${EVAL_ARGS[@]}"
(( RANKS_RC == 0 )) || { echo "== evaluation failed with exit code $RANKS_RC" >&2; exit "$RANKS_RC"; }
echo "== $(date -Is) results: $SOFTCLIP_EVAL_DIR/results.json"

#!/bin/bash
# Zero-shot classification and image<->text retrieval of a training run's checkpoint.
#
#   SOFTCLIP_RUN_DIR=runs/cc12m-vitl14-123456 sbatch --nodes=16 slurm/eval.sh
#   SOFTCLIP_RUN_DIR=... SOFTCLIP_TAG=step_00005000 SOFTCLIP_ZEROSHOT_DATA=/data/imagenet/val \
#       sbatch --nodes=16 slurm/eval.sh
#
# The checkpoint is a ZeRO-3 one: its parameters are sharded per rank, so the evaluation runs the
# trainer itself, resumed from that tag with --steps equal to the tag's step (no optimizer step is
# taken; the trainer's final evaluation runs on every rank and writes results.json). That needs the
# same number of ranks as training -- checked below with the fix in the message. To evaluate on
# any number of GPUs, export first (slurm/export.sh) and evaluate the exported model.
#
# Environment (SOFTCLIP_-prefixed, see slurm/README.md): SOFTCLIP_RUN_DIR (required), SOFTCLIP_TAG
# (latest), SOFTCLIP_EVAL_DIR (SOFTCLIP_RUN_DIR/eval/<tag>), SOFTCLIP_ZEROSHOT_DATA and
# SOFTCLIP_RETRIEVAL_DATA (default: the run's own), SOFTCLIP_EVAL_BATCH_SIZE (the run's), plus the
# launcher's SOFTCLIP_ + SETUP_CMD PYTHON SRUN_ARGS SRUN_WAIT MASTER_PORT (slurm/lib/launch.sh). The
# run's training data must still be readable: the trainer opens (but does not consume) its loader.
#
#SBATCH --job-name=eval
#SBATCH --nodes=16
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

# Which tag, its step and the world size that wrote it (pretrain.checkpoint decides what is complete).
read -r TAG_DIR CKPT_STEP CKPT_WORLD < <("$SOFTCLIP_PYTHON" - "$SOFTCLIP_RUN_DIR/checkpoints" "$SOFTCLIP_TAG" <<'EOF' || true
import sys
from pathlib import Path
from pretrain import checkpoint as c
ckpt, tag = Path(sys.argv[1]), sys.argv[2]
d = c.find_latest(ckpt, log=lambda m: print(m, file=sys.stderr)) if tag == "latest" else ckpt / tag
if d is None or not d.is_dir() or c.is_complete(d):
    sys.exit(0)
print(d, int(d.name.split("_")[1]), c.saved_world_size(d))
EOF
)
[[ -n ${TAG_DIR:-} ]] || die "no complete checkpoint $SOFTCLIP_TAG in $SOFTCLIP_RUN_DIR/checkpoints; give SOFTCLIP_TAG=step_NNNNNNNN of a finished save, or SOFTCLIP_TAG=latest."

world_layout
(( WORLD == CKPT_WORLD )) || die "checkpoint $TAG_DIR was written by $CKPT_WORLD ranks but this job has $WORLD; ZeRO-3 shards are per rank. Submit with nodes x tasks per node = $CKPT_WORLD (e.g. sbatch --nodes=$(( CKPT_WORLD / TASKS_PER_NODE > 0 ? CKPT_WORLD / TASKS_PER_NODE : 1 ))), or export it (slurm/export.sh) first."

SOFTCLIP_EVAL_DIR=${SOFTCLIP_EVAL_DIR:-$SOFTCLIP_RUN_DIR/eval/$(basename "$TAG_DIR")}
mkdir -p "$SOFTCLIP_EVAL_DIR" || die "SOFTCLIP_EVAL_DIR=$SOFTCLIP_EVAL_DIR cannot be created."

# The run's own training flags, so the trainer rebuilds exactly the engine the checkpoint came from.
mapfile -t RUN_ARGS < <("$SOFTCLIP_PYTHON" - "$SOFTCLIP_RUN_DIR/config.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
flags = dict(model=c["model"], loss=c["loss"], train_data=c["train_data"], tokenizer=c["tokenizer"],
             deepspeed_config=c["deepspeed_config"], batch_size=c["global_batch"],
             micro_batch=c["micro_batch"], grad_accum=c["grad_accum"], seed=c["seed"], lr=c["lr"],
             min_lr=c["min_lr"], weight_decay=c["weight_decay"], eval_batch_size=c["eval_batch_size"],
             zeroshot_data=c["zeroshot_data"], retrieval_data=c["retrieval_data"], workers=c["workers"])
if c["loss"] == "softclip":
    flags.update(alpha=c["alpha"], beta=c["beta"], soft_temperature=c["soft_temperature"],
                 soft_source=c["soft_source"])
for k, v in flags.items():
    print("--deepspeed_config" if k == "deepspeed_config" else "--" + k.replace("_", "-"))
    print(v)
EOF
)
(( ${#RUN_ARGS[@]} > 0 )) || die "cannot read the training flags from $SOFTCLIP_RUN_DIR/config.json."
[[ -n ${SOFTCLIP_ZEROSHOT_DATA:-} ]] && { check_eval_data SOFTCLIP_ZEROSHOT_DATA "$SOFTCLIP_ZEROSHOT_DATA"; RUN_ARGS+=(--zeroshot-data "$SOFTCLIP_ZEROSHOT_DATA"); }
[[ -n ${SOFTCLIP_RETRIEVAL_DATA:-} ]] && { check_eval_data SOFTCLIP_RETRIEVAL_DATA "$SOFTCLIP_RETRIEVAL_DATA"; RUN_ARGS+=(--retrieval-data "$SOFTCLIP_RETRIEVAL_DATA"); }
[[ -n ${SOFTCLIP_EVAL_BATCH_SIZE:-} ]] && RUN_ARGS+=(--eval-batch-size "$SOFTCLIP_EVAL_BATCH_SIZE")

echo "== evaluating $TAG_DIR (step $CKPT_STEP) into $SOFTCLIP_EVAL_DIR"
master_env
echo "== $(date -Is) launching the trainer for 0 steps from step $CKPT_STEP"
run_ranks "$SOFTCLIP_PYTHON" -u pretrain/main.py "${RUN_ARGS[@]}" --steps "$CKPT_STEP" --warmup 0 --save-every 0 \
    --eval-every 0 --resume "$TAG_DIR" --output-dir "$SOFTCLIP_EVAL_DIR"
(( RANKS_RC == 0 )) || { echo "== evaluation failed with exit code $RANKS_RC" >&2; exit "$RANKS_RC"; }
echo "== $(date -Is) results: $SOFTCLIP_EVAL_DIR/results.json"

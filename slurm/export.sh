#!/bin/bash
# Export a run's ZeRO-3 checkpoint: merged to fp32 on the CPU, then written as our native format,
# a `transformers` CLIPModel and a timm image tower, each reloaded and compared with the checkpoint.
#
#   RUN_DIR=runs/cc12m-vitl14-123456 sbatch slurm/export.sh
#   RUN_DIR=... TAG=step_00005000 FORMATS=hf OUT=/models/softclip-vitl14 sbatch slurm/export.sh
#
# One process, no GPU and no process group (DeepSpeed's zero_to_fp32 reads the shards as files),
# so it runs in any partition; memory is the fp32 model plus one rank's shard at a time (~4 GB
# for ViT-L/14).
#
# Environment: RUN_DIR (required), TAG (latest), OUT (RUN_DIR/export), FORMATS (native,hf,timm),
# plus the launcher's SETUP_CMD and PYTHON (slurm/lib/launch.sh).
#
#SBATCH --job-name=export
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=01:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=lib/launch.sh
source "$REPO/slurm/lib/launch.sh" 2>/dev/null || {
    echo "error: $REPO/slurm/lib/launch.sh not found; run sbatch from the repository root or set REPO." >&2
    exit 2
}
launch_init

[[ -n ${RUN_DIR:-} ]] || die "RUN_DIR is not set; point it at a training run directory (it holds checkpoints/)."
check_dir "RUN_DIR/checkpoints" "$RUN_DIR/checkpoints" "is RUN_DIR a run directory of pretrain/main.py?"
TAG=${TAG:-latest}
OUT=${OUT:-$RUN_DIR/export}
FORMATS=${FORMATS:-native,hf,timm}

echo "== $(date -Is) exporting $RUN_DIR/checkpoints ($TAG) as $FORMATS into $OUT"
set +e
"$PYTHON" -u -m pretrain.export --checkpoint "$RUN_DIR/checkpoints" --tag "$TAG" --out "$OUT" --format "$FORMATS"
rc=$?
set -e
(( rc == 0 )) || { echo "== export failed with exit code $rc" >&2; exit "$rc"; }
echo "== $(date -Is) done: $OUT/export.json"

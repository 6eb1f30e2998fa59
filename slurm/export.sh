#!/bin/bash
# Export a run's ZeRO-3 checkpoint: merged to fp32 on the CPU, then written as our native format,
# a `transformers` CLIPModel, an open_clip model and a timm image tower, each reloaded by its own
# library and compared with the checkpoint.
#
#   SOFTCLIP_RUN_DIR=runs/cc12m-vitl14-123456 sbatch slurm/export.sh
#   SOFTCLIP_RUN_DIR=... SOFTCLIP_TAG=step_00005000 SOFTCLIP_FORMATS=open_clip \
#       SOFTCLIP_OUT=/models/softclip-vitl14 sbatch slurm/export.sh
#
# The open_clip export (OUT/open_clip) then loads without this repository:
#   open_clip.create_model_and_transforms("local-dir:OUT/open_clip"); open_clip.get_tokenizer("local-dir:OUT/open_clip")
#   python -m pretrain.clip_benchmark_cli eval --model local-dir:OUT/open_clip --pretrained '' --dataset wds/imagenet1k ...
#   (clip_benchmark's own CLI, fixed for NumPy >= 2.4; docs/evaluation.md)
#
# One process, no GPU and no process group (DeepSpeed's zero_to_fp32 reads the shards as files),
# so it runs in any partition; memory is the fp32 model plus one rank's shard at a time (~4 GB
# for ViT-L/14). The request below (8 CPUs, 32G) is sized for ViT-H; on smaller nodes or models
# override it on the command line, which wins over these #SBATCH lines:
#   sbatch --cpus-per-task=2 --mem=8G slurm/export.sh     # ViT-B/16 or ViT-L/14
#
# Environment (SOFTCLIP_-prefixed, see slurm/README.md): SOFTCLIP_RUN_DIR (required), SOFTCLIP_TAG
# (latest), SOFTCLIP_OUT (SOFTCLIP_RUN_DIR/export), SOFTCLIP_FORMATS (native,hf,open_clip,timm; or all), plus the
# launcher's SOFTCLIP_SETUP_CMD and SOFTCLIP_PYTHON (slurm/lib/launch.sh).
#
#SBATCH --job-name=export
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=01:00:00
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

SOFTCLIP_REPO=${SOFTCLIP_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=lib/launch.sh
source "$SOFTCLIP_REPO/slurm/lib/launch.sh" 2>/dev/null || {
    echo "error: $SOFTCLIP_REPO/slurm/lib/launch.sh not found; run sbatch from the repository root or set SOFTCLIP_REPO." >&2
    exit 2
}
launch_init

[[ -n ${SOFTCLIP_RUN_DIR:-} ]] || die "SOFTCLIP_RUN_DIR is not set; point it at a training run directory (it holds checkpoints/)."
check_dir "SOFTCLIP_RUN_DIR/checkpoints" "$SOFTCLIP_RUN_DIR/checkpoints" "is SOFTCLIP_RUN_DIR a run directory of pretrain/main.py?"
SOFTCLIP_TAG=${SOFTCLIP_TAG:-latest}
SOFTCLIP_OUT=${SOFTCLIP_OUT:-$SOFTCLIP_RUN_DIR/export}
SOFTCLIP_FORMATS=${SOFTCLIP_FORMATS:-native,hf,open_clip,timm}

echo "== $(date -Is) exporting $SOFTCLIP_RUN_DIR/checkpoints ($SOFTCLIP_TAG) as $SOFTCLIP_FORMATS into $SOFTCLIP_OUT"
set +e
"$SOFTCLIP_PYTHON" -u -m pretrain.export --checkpoint "$SOFTCLIP_RUN_DIR/checkpoints" --tag "$SOFTCLIP_TAG" --out "$SOFTCLIP_OUT" --format "$SOFTCLIP_FORMATS"
rc=$?
set -e
(( rc == 0 )) || { echo "== export failed with exit code $rc" >&2; exit "$rc"; }
echo "== $(date -Is) done: $SOFTCLIP_OUT/export.json"

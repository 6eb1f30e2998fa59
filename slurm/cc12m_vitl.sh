#!/bin/bash
# SoftCLIP pre-training of ViT-L/14 towers on CC12M, DeepSpeed ZeRO-3 bf16, one process per GPU.
#
#   mkdir -p logs && sbatch slurm/cc12m_vitl.sh                       # from the repository root
#   sbatch -p gpu -A myproj --nodes=4 slurm/cc12m_vitl.sh             # site options are sbatch options
#   SOFTCLIP_DATA_ROOT=/datasets sbatch slurm/cc12m_vitl.sh           # paths are environment variables
#
# Global batch: 32,768 pairs per optimizer step
#   = nodes x 8 GPUs x SOFTCLIP_MICRO_BATCH x SOFTCLIP_GRAD_ACCUM
#   16 nodes x 8 x 256 x 1 = 32,768   (default, --nodes=16)
#    8 nodes x 8 x 256 x 2 = 32,768   (sbatch --nodes=8)
#    4 nodes x 8 x 256 x 4 = 32,768   (sbatch --nodes=4)
# SOFTCLIP_GRAD_ACCUM is derived from the allocation; a layout that does not divide SOFTCLIP_GLOBAL_BATCH is refused
# with one message before anything starts. With accumulation every contrastive loss still sees all
# 32,768 pairs (--contrastive-batch global, the default: one extra no-grad forward per micro-batch;
# pretrain/train/accumulate.py). SOFTCLIP_EXTRA_ARGS="--contrastive-batch micro" trades the negatives for that time.
#
# Schedule, counted in optimizer steps: CC12M as fetched by img2dataset is ~10M pairs (dead URLs
# remove the rest), so 32 epochs x 10M / 32,768 = 9,766 -> SOFTCLIP_STEPS=10000. Peak lr, weight
# decay and Adam betas/eps follow CLIP's ViT-L/14 run at this batch size (Radford et al. 2021, appendix F:
# lr 4e-4, wd 0.2, beta2 0.98, eps 1e-6; the eps and betas live in the DeepSpeed JSON). CLIP warmed
# up for 2,000 of ~390k steps; this run is 40x shorter, so 1,000 steps (10%) -- a judgement call,
# not a measured optimum. Cosine decay to SOFTCLIP_MIN_LR after warmup.
#
# Preemption: Slurm signals the batch shell 10 minutes before the time limit (B:USR1@600; a ZeRO-3
# checkpoint of ViT-L plus an in-flight eval fit in that), slurm/lib/launch.sh forwards it to the
# ranks, the trainer checkpoints and exits 124, and the job requeues itself (same job id, same run
# directory, `--resume latest`). Output is appended across restarts in logs/<name>-<jobid>.out
# (Slurm does not create logs/: make it once).
#
# Targets: SOFTCLIP_TARGETS=image-features (default, the recommended recipe) builds SoftCLIP's soft
# targets from ImageNet MobileNetV2 regions precomputed into the shards, once, before training:
#   python -m data.precompute_fine --data '/data/cc12m/{00000..01242}.tar' --out /data/cc12m-mobilenetv2/ \
#       --text-encoder none --image-encoder mobilenetv2 --workers 16 [--device cuda]
# (docs/targets.md, "Cost of the precompute"). SOFTCLIP_TARGETS=online needs no precompute.
#
# Environment variables, all prefixed SOFTCLIP_ so that a variable that happens to be set in the
# submitting shell (sbatch exports the caller's environment) cannot change a job (defaults below):
# SOFTCLIP_ + DATA_ROOT TARGETS TRAIN_DATA TOKENIZER TRAIN_NUM_SAMPLES MODEL LOSS ALPHA BETA SOFT_TEMPERATURE
# SOFT_SOURCE SOFT_IMAGE_SOURCE SOFT_TEXT_SOURCE DS_CONFIG GLOBAL_BATCH MICRO_BATCH GRAD_ACCUM STEPS WARMUP LR MIN_LR WD SAVE_EVERY
# EVAL_EVERY LOG_EVERY ZEROSHOT_DATA IMAGENET_VAL RETRIEVAL_DATA WORKERS SEED REPORT_TO GRAD_CHECKPOINTING ZERO_INIT
# RUNS_DIR OUTPUT_DIR EXTRA_ARGS, and the launcher's SOFTCLIP_ + REPO SETUP_CMD PYTHON SRUN_ARGS
# SRUN_WAIT MAX_RESTARTS MASTER_PORT (see slurm/lib/launch.sh).
#
#SBATCH --job-name=cc12m-vitl14
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# Slurm runs a copy of this file from its spool directory, so the repository is the submit directory.
SOFTCLIP_REPO=${SOFTCLIP_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=lib/launch.sh
source "$SOFTCLIP_REPO/slurm/lib/launch.sh" 2>/dev/null || {
    echo "error: $SOFTCLIP_REPO/slurm/lib/launch.sh not found; run sbatch from the repository root or set SOFTCLIP_REPO." >&2
    exit 2
}
launch_init

SOFTCLIP_DATA_ROOT=${SOFTCLIP_DATA_ROOT:-/data}
SOFTCLIP_TARGETS=${SOFTCLIP_TARGETS:-image-features}  # or online: no precompute (README, "Recommended recipe")
# image-features trains on the shards `python -m data.precompute_fine --image-encoder mobilenetv2` wrote
# (the same pairs, byte for byte, plus fine_img members); so does a clip run, to keep the pair equal
[[ $SOFTCLIP_TARGETS == image-features ]] && shard_dir=cc12m-mobilenetv2 || shard_dir=cc12m
SOFTCLIP_TRAIN_DATA=${SOFTCLIP_TRAIN_DATA:-"$SOFTCLIP_DATA_ROOT/$shard_dir/{00000..01242}.tar"}
SOFTCLIP_TOKENIZER=${SOFTCLIP_TOKENIZER:-$SOFTCLIP_DATA_ROOT/cc12m/tokenizer}
SOFTCLIP_MODEL=${SOFTCLIP_MODEL:-ViT-L-14}
SOFTCLIP_LOSS=${SOFTCLIP_LOSS:-softclip}
# SOFTCLIP_ALPHA BETA SOFT_TEMPERATURE SOFT_SOURCE SOFT_IMAGE_SOURCE SOFT_TEXT_SOURCE: from the
# SOFTCLIP_TARGETS preset unless set (slurm/lib/launch.sh soft_targets)
SOFTCLIP_DS_CONFIG=${SOFTCLIP_DS_CONFIG:-ds_configs/zero3_bf16.json}
SOFTCLIP_GLOBAL_BATCH=${SOFTCLIP_GLOBAL_BATCH:-32768}
SOFTCLIP_MICRO_BATCH=${SOFTCLIP_MICRO_BATCH:-256}
SOFTCLIP_STEPS=${SOFTCLIP_STEPS:-10000}
SOFTCLIP_WARMUP=${SOFTCLIP_WARMUP:-1000}
SOFTCLIP_LR=${SOFTCLIP_LR:-4e-4}
SOFTCLIP_MIN_LR=${SOFTCLIP_MIN_LR:-0}
SOFTCLIP_WD=${SOFTCLIP_WD:-0.2}
SOFTCLIP_SAVE_EVERY=${SOFTCLIP_SAVE_EVERY:-500}
SOFTCLIP_EVAL_EVERY=${SOFTCLIP_EVAL_EVERY:-1000}
SOFTCLIP_LOG_EVERY=${SOFTCLIP_LOG_EVERY:-10}
SOFTCLIP_ZEROSHOT_DATA=${SOFTCLIP_ZEROSHOT_DATA:-${SOFTCLIP_IMAGENET_VAL:+imagenet:$SOFTCLIP_IMAGENET_VAL}}  # the paper's number: SOFTCLIP_IMAGENET_VAL=/data/imagenet/val
SOFTCLIP_ZEROSHOT_DATA=${SOFTCLIP_ZEROSHOT_DATA:-embedded}  # a smoke test, not a benchmark (launch.sh warns)
SOFTCLIP_RETRIEVAL_DATA=${SOFTCLIP_RETRIEVAL_DATA:-embedded}
SOFTCLIP_SEED=${SOFTCLIP_SEED:-0}
SOFTCLIP_REPORT_TO=${SOFTCLIP_REPORT_TO:-jsonl}
SOFTCLIP_GRAD_CHECKPOINTING=${SOFTCLIP_GRAD_CHECKPOINTING:-1}  # ViT-L at 256 per GPU needs it on 80 GB
SOFTCLIP_RUNS_DIR=${SOFTCLIP_RUNS_DIR:-runs}

launch_training

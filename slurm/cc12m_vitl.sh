#!/bin/bash
# SoftCLIP pre-training of ViT-L/14 towers on CC12M, DeepSpeed ZeRO-3 bf16, one process per GPU.
#
#   mkdir -p logs && sbatch slurm/cc12m_vitl.sh                       # from the repository root
#   sbatch -p gpu -A myproj --nodes=4 slurm/cc12m_vitl.sh             # site options are sbatch options
#   DATA_ROOT=/datasets sbatch slurm/cc12m_vitl.sh                    # paths are environment variables
#
# Global batch: 32,768 pairs per optimizer step = nodes x 8 GPUs x MICRO_BATCH x GRAD_ACCUM
#   16 nodes x 8 x 256 x 1 = 32,768   (default, --nodes=16)
#    8 nodes x 8 x 256 x 2 = 32,768   (sbatch --nodes=8)
#    4 nodes x 8 x 256 x 4 = 32,768   (sbatch --nodes=4)
# GRAD_ACCUM is derived from the allocation; a layout that does not divide GLOBAL_BATCH is refused
# with one message before anything starts. With accumulation every contrastive loss still sees all
# 32,768 pairs (--contrastive-batch global, the default: one extra no-grad forward per micro-batch;
# pretrain/accumulate.py). EXTRA_ARGS="--contrastive-batch micro" trades the negatives for that time.
#
# Schedule, counted in optimizer steps: CC12M as fetched by img2dataset is ~10M pairs (dead URLs
# remove the rest), so 32 epochs x 10M / 32,768 = 9,766 -> STEPS=10000. Peak lr, weight decay and
# Adam betas/eps follow CLIP's ViT-L/14 run at this batch size (Radford et al. 2021, appendix F:
# lr 4e-4, wd 0.2, beta2 0.98, eps 1e-6; the eps and betas live in the DeepSpeed JSON). CLIP warmed
# up for 2,000 of ~390k steps; this run is 40x shorter, so 1,000 steps (10%) -- a judgement call,
# not a measured optimum. Cosine decay to MIN_LR after warmup.
#
# Preemption: Slurm signals the batch shell 10 minutes before the time limit (B:USR1@600; a ZeRO-3
# checkpoint of ViT-L plus an in-flight eval fit in that), slurm/lib/launch.sh forwards it to the
# ranks, the trainer checkpoints and exits 124, and the job requeues itself (same job id, same run
# directory, `--resume latest`). Output is appended across restarts in logs/<name>-<jobid>.out
# (Slurm does not create logs/: make it once).
#
# Environment variables (defaults below): DATA_ROOT TRAIN_DATA TOKENIZER TRAIN_NUM_SAMPLES MODEL
# LOSS ALPHA BETA SOFT_TEMPERATURE SOFT_SOURCE DS_CONFIG GLOBAL_BATCH MICRO_BATCH GRAD_ACCUM STEPS
# WARMUP LR MIN_LR WD SAVE_EVERY EVAL_EVERY LOG_EVERY ZEROSHOT_DATA RETRIEVAL_DATA WORKERS SEED
# REPORT_TO GRAD_CHECKPOINTING ZERO_INIT RUNS_DIR OUTPUT_DIR EXTRA_ARGS, and the launcher's SETUP_CMD
# PYTHON SRUN_ARGS SRUN_WAIT MAX_RESTARTS MASTER_PORT (see slurm/lib/launch.sh).
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
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
# shellcheck source=lib/launch.sh
source "$REPO/slurm/lib/launch.sh" 2>/dev/null || {
    echo "error: $REPO/slurm/lib/launch.sh not found; run sbatch from the repository root or set REPO." >&2
    exit 2
}
launch_init

DATA_ROOT=${DATA_ROOT:-/data}
TRAIN_DATA=${TRAIN_DATA:-"$DATA_ROOT/cc12m/{00000..01242}.tar"}
TOKENIZER=${TOKENIZER:-$DATA_ROOT/cc12m/tokenizer}
MODEL=${MODEL:-ViT-L-14}
LOSS=${LOSS:-softclip}
ALPHA=${ALPHA:-0.2}
BETA=${BETA:-0.0}   # the trainer's default (README, "Reproduction"); the paper's is 1.0
SOFT_TEMPERATURE=${SOFT_TEMPERATURE:-0.1}
SOFT_SOURCE=${SOFT_SOURCE:-both}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_bf16.json}
GLOBAL_BATCH=${GLOBAL_BATCH:-32768}
MICRO_BATCH=${MICRO_BATCH:-256}
STEPS=${STEPS:-10000}
WARMUP=${WARMUP:-1000}
LR=${LR:-4e-4}
MIN_LR=${MIN_LR:-0}
WD=${WD:-0.2}
SAVE_EVERY=${SAVE_EVERY:-500}
EVAL_EVERY=${EVAL_EVERY:-1000}
LOG_EVERY=${LOG_EVERY:-10}
ZEROSHOT_DATA=${ZEROSHOT_DATA:-embedded}
RETRIEVAL_DATA=${RETRIEVAL_DATA:-embedded}
SEED=${SEED:-0}
REPORT_TO=${REPORT_TO:-jsonl}
GRAD_CHECKPOINTING=${GRAD_CHECKPOINTING:-1}  # ViT-L at 256 per GPU needs it on 80 GB
RUNS_DIR=${RUNS_DIR:-runs}

launch_training

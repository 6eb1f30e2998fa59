# shellcheck shell=bash
# Shared by every script in slurm/ (sourced, never run): setup checks, the rank launch through srun,
# signal forwarding and the requeue-on-preemption loop. One copy, so that a fix reaches every job.
#
# Contract with the trainer (pretrain/main.py, pretrain/runtime/signals.py, pretrain/runtime/dist.py):
#   * one process per GPU (per task on CPU), started by `srun`; pretrain/runtime/dist.py maps SLURM_PROCID /
#     SLURM_LOCALID / SLURM_NTASKS to rank / local rank / world size and reads MASTER_ADDR and
#     MASTER_PORT, which this file exports. Nothing else in the trainer reads SLURM_*.
#   * SIGUSR1 or SIGTERM -> the trainer finishes its step, checkpoints and exits with EXIT_PREEMPTED
#     (124). That code, and only that code, makes the job requeue itself; `--resume latest` in the
#     next start continues from the checkpoint with the same job id, hence the same run directory.
#
# Site settings, all optional (environment variables exported to sbatch, which passes them on). Every
# variable the scripts read is prefixed SOFTCLIP_: sbatch exports the caller's whole environment, and a
# generic name (OUT, MODEL, LR, ...) that a user's shell happens to define would silently change a job.
#   SOFTCLIP_SETUP_CMD   shell code run first in the batch shell,
#                        e.g. "module load cuda/12.4; source env/bin/activate"
#   SOFTCLIP_PYTHON      interpreter (default: SOFTCLIP_REPO/.venv/bin/python if present, else python3)
#   SOFTCLIP_SRUN_ARGS   extra srun options, e.g. a container: "--container-image=... --container-mounts=..."
#   SOFTCLIP_SRUN_WAIT   seconds srun lets the other ranks run after the first one exits (default 120):
#               a crashed rank would otherwise leave its peers blocked in a collective until timeout.
#               (Not --kill-on-bad-exit: it SIGTERMs peers that are a moment slower to exit 124,
#               and srun then reports 143, which would lose the requeue. Measured on Slurm 22.05.)
#   SOFTCLIP_MAX_RESTARTS  requeues allowed per job (default 20); SLURM_RESTART_COUNT is unset on the
#               first run.
#   SOFTCLIP_MASTER_PORT   overrides the port derived from the job id.
# Partition, account, time, nodes and GPUs are sbatch options: `sbatch -p gpu -A proj --nodes=4 ...`
# or SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_TIMELIMIT in the environment.

EXIT_PREEMPTED=124  # pretrain/runtime/signals.py
EXIT_SETUP=2        # like the trainer's configuration errors

die() {
    echo "error: $*" >&2
    exit "$EXIT_SETUP"
}

# Call first: strict mode, repo root as working directory, site setup, interpreter.
launch_init() {
    set -euo pipefail
    [[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job; submit with \`sbatch ${0##*/}\` from the repository root."
    cd "$SOFTCLIP_REPO"
    if [[ -n ${SOFTCLIP_SETUP_CMD:-} ]]; then
        eval "$SOFTCLIP_SETUP_CMD" || die "SOFTCLIP_SETUP_CMD failed: $SOFTCLIP_SETUP_CMD"
    fi
    if [[ -z ${SOFTCLIP_PYTHON:-} ]]; then
        SOFTCLIP_PYTHON=python3
        [[ -x $SOFTCLIP_REPO/.venv/bin/python ]] && SOFTCLIP_PYTHON=$SOFTCLIP_REPO/.venv/bin/python
    fi
    command -v "$SOFTCLIP_PYTHON" >/dev/null || die "SOFTCLIP_PYTHON=$SOFTCLIP_PYTHON is not an executable; set SOFTCLIP_PYTHON or SOFTCLIP_SETUP_CMD."
    SOFTCLIP_SRUN_WAIT=${SOFTCLIP_SRUN_WAIT:-120}
    SOFTCLIP_MAX_RESTARTS=${SOFTCLIP_MAX_RESTARTS:-20}
    echo "== job $SLURM_JOB_ID ($SLURM_JOB_NAME) on $SLURM_JOB_NODELIST, started $(date -Is)"
    echo "== SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-unset} (requeues allowed: $SOFTCLIP_MAX_RESTARTS)"
}

is_int() { [[ $1 =~ ^[0-9]+$ ]]; }

# ---------------------------------------------------------------------------- setup checks
check_file() {  # NAME VALUE [HINT]
    [[ -f $2 ]] || die "$1=$2: no such file${3:+; $3}."
}

check_dir() {  # NAME VALUE [HINT]
    [[ -d $2 ]] || die "$1=$2: no such directory${3:+; $3}."
}

# Shard specs use the trainer's own syntax (brace ranges, a folder, parts joined by '::'), so they
# are expanded by the trainer's function rather than re-implemented here.
check_shards() {  # NAME SPEC [HINT]
    local msg
    msg=$("$SOFTCLIP_PYTHON" - "$2" <<'EOF'
import os, sys
from data.shards import expand_shards
spec = sys.argv[1]
urls = expand_shards(spec)
local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
missing = [u for u in local if not os.path.isfile(u)]
if not urls:
    print("names no shards")
elif missing:
    print(f"{len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}")
EOF
    ) || die "$1=$2: could not check the shards with $SOFTCLIP_PYTHON (is the environment set up?)."
    [[ -z $msg ]] || die "$1=$2: $msg${3:+; $3}."
}

check_eval_data() {  # NAME VALUE: the trainer's own check (pretrain/evaluate/specs.py check_eval_data)
    local msg flag=zeroshot_data
    [[ $1 == *RETRIEVAL* ]] && flag=retrieval_data
    msg=$("$SOFTCLIP_PYTHON" -c 'import sys; from pretrain.evaluate.specs import check_eval_data as c; print("; ".join(c(sys.argv[1], sys.argv[2])))' "$flag" "$2") \
        || die "$1=$2: could not check it with $SOFTCLIP_PYTHON (is the environment set up?)."
    [[ -z $msg ]] || die "$1=$2: $msg"
    if [[ $1 == SOFTCLIP_ZEROSHOT_DATA && ,$2, == *,embedded* ]]; then
        echo "warning: SOFTCLIP_ZEROSHOT_DATA=$2: the embedded 32-px Fashion-MNIST and emoji sets are a smoke test, not a benchmark; set SOFTCLIP_IMAGENET_VAL=/path/to/imagenet/val (class folders n01440764/...) for ImageNet zero-shot top-1/top-5." >&2
    fi
}

# SoftCLIP's targets: SOFTCLIP_TARGETS picks a preset of the soft options (README, "Recommended
# recipe"); a SOFTCLIP_ALPHA, _BETA, _SOFT_SOURCE, _SOFT_TEMPERATURE, _SOFT_IMAGE_SOURCE or
# _SOFT_TEXT_SOURCE the caller sets still wins over the preset.
#   image-features  targets from precomputed image regions (`python -m data.precompute_fine
#                   --image-encoder mobilenetv2`, or a detector's ROIs with --detector-features):
#                   alpha 0.5, beta 1, source image. SOFTCLIP_TRAIN_DATA must be the shards it wrote.
#   online          the model's own token features, no extra data (the zero-setup fallback):
#                   alpha 0.2, beta 0, source both.
soft_targets() {
    case ${SOFTCLIP_TARGETS:-} in
        image-features) : "${SOFTCLIP_ALPHA:=0.5}" "${SOFTCLIP_BETA:=1.0}" "${SOFTCLIP_SOFT_SOURCE:=image}" "${SOFTCLIP_SOFT_IMAGE_SOURCE:=precomputed}" ;;
        online) : "${SOFTCLIP_ALPHA:=0.2}" "${SOFTCLIP_BETA:=0.0}" "${SOFTCLIP_SOFT_SOURCE:=both}" ;;
        *) die "SOFTCLIP_TARGETS=${SOFTCLIP_TARGETS:-}: choose image-features (precomputed image regions, the recommended recipe) or online (no extra data)." ;;
    esac
    : "${SOFTCLIP_SOFT_TEMPERATURE:=0.1}" "${SOFTCLIP_SOFT_IMAGE_SOURCE:=online}" "${SOFTCLIP_SOFT_TEXT_SOURCE:=online}"
}

# A precomputed source needs its members beside the training shards: the trainer's own check
# (pretrain/settings/validate.py missing_fine_members), before any rank starts, with the fix in Slurm terms.
check_fine_data() {
    local msg
    msg=$("$SOFTCLIP_PYTHON" - "$SOFTCLIP_SOFT_SOURCE" "$SOFTCLIP_SOFT_IMAGE_SOURCE" "$SOFTCLIP_SOFT_TEXT_SOURCE" "$SOFTCLIP_TRAIN_DATA" <<'EOF'
import sys
from pretrain.settings.validate import missing_fine_members
source, image, text, data = sys.argv[1:]
print("; ".join(problem for _, problem in missing_fine_members(dict(
    loss="softclip", soft_source=source, soft_image_source=image, soft_text_source=text, train_data=data))))
EOF
    ) || die "SOFTCLIP_TRAIN_DATA=$SOFTCLIP_TRAIN_DATA: could not check its precomputed features with $SOFTCLIP_PYTHON (is the environment set up?)."
    [[ -z $msg ]] || die "SOFTCLIP_TARGETS=$SOFTCLIP_TARGETS: $msg. Write them with \`python -m data.precompute_fine --data SHARDS --out NEW --text-encoder none --image-encoder mobilenetv2\` and set SOFTCLIP_TRAIN_DATA to NEW's shards, or set SOFTCLIP_TARGETS=online (no extra data)."
}

# ---------------------------------------------------------------------------- ranks and batch
# Sets NNODES, TASKS_PER_NODE, WORLD from the allocation (what srun will start).
world_layout() {
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    WORLD=${SLURM_NTASKS:-$NNODES}
    TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-}
    if [[ -z $TASKS_PER_NODE ]]; then
        (( WORLD % NNODES == 0 )) || die "$WORLD tasks do not split evenly over $NNODES nodes; pass --ntasks-per-node."
        TASKS_PER_NODE=$(( WORLD / NNODES ))
    fi
    local gpus=${SLURM_GPUS_PER_NODE:-0}
    gpus=${gpus##*:}  # "a100:8" -> 8
    if is_int "$gpus" && (( gpus > 0 )) && (( TASKS_PER_NODE != gpus )); then
        die "--ntasks-per-node=$TASKS_PER_NODE but --gpus-per-node=$gpus; the trainer runs one process per GPU, so pass the same number to both (sbatch --gpus-per-node=N --ntasks-per-node=N)."
    fi
    if is_int "$gpus" && (( gpus > 0 )); then DEVICES_DESC="$gpus GPUs per node"; else DEVICES_DESC="no GPUs requested"; fi
}

# SOFTCLIP_GRAD_ACCUM = SOFTCLIP_GLOBAL_BATCH / (SOFTCLIP_MICRO_BATCH x WORLD), exactly; an explicit
# SOFTCLIP_GRAD_ACCUM must agree.
batch_split() {
    local g=${SOFTCLIP_GLOBAL_BATCH:?} m=${SOFTCLIP_MICRO_BATCH:?}
    if ! is_int "$g" || (( g == 0 )); then die "SOFTCLIP_GLOBAL_BATCH=$g must be a positive integer."; fi
    if ! is_int "$m" || (( m == 0 )); then die "SOFTCLIP_MICRO_BATCH=$m must be a positive integer."; fi
    local per_step=$(( m * WORLD ))
    if (( g % per_step != 0 )); then
        die "batch arithmetic does not divide: SOFTCLIP_GLOBAL_BATCH=$g is not a multiple of SOFTCLIP_MICRO_BATCH=$m x $WORLD ranks ($NNODES nodes x $TASKS_PER_NODE per node) = $per_step. Choose SOFTCLIP_GLOBAL_BATCH as a multiple of $per_step, or change SOFTCLIP_MICRO_BATCH or the node count so that micro batch x ranks divides $g."
    fi
    local accum=$(( g / per_step ))
    if [[ -n ${SOFTCLIP_GRAD_ACCUM:-} && ${SOFTCLIP_GRAD_ACCUM} != "$accum" ]]; then
        die "SOFTCLIP_GRAD_ACCUM=$SOFTCLIP_GRAD_ACCUM disagrees with SOFTCLIP_GLOBAL_BATCH=$g / (SOFTCLIP_MICRO_BATCH=$m x $WORLD ranks) = $accum; unset SOFTCLIP_GRAD_ACCUM to derive it."
    fi
    SOFTCLIP_GRAD_ACCUM=$accum
    echo "== global batch $g = $NNODES nodes x $TASKS_PER_NODE ranks x micro batch $m x accumulation $accum"
}

# Rank 0's host and a port from the job id: the same on every node without any communication, and
# stable across requeues (same id), different between jobs that share a node.
master_env() {
    # `|| true`: with pipefail, head closing the pipe early must not count as a failure
    MASTER_ADDR=$({ scontrol show hostnames "$SLURM_JOB_NODELIST" || true; } | head -n1)
    [[ -n $MASTER_ADDR ]] || die "scontrol show hostnames gave no host for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST."
    MASTER_PORT=${SOFTCLIP_MASTER_PORT:-$(( 15000 + SLURM_JOB_ID % 15000 ))}
    export MASTER_ADDR MASTER_PORT
    echo "== master $MASTER_ADDR:$MASTER_PORT, $WORLD ranks ($NNODES nodes x $TASKS_PER_NODE, $DEVICES_DESC)"
}

# ---------------------------------------------------------------------------- launch
# Runs CMD once per task through srun and sets RANKS_RC. `#SBATCH --signal=B:USR1@T` delivers the
# warning to this batch shell only, and bash runs a trap only between foreground commands, so srun
# runs in the background and we `wait` for it; the trap forwards the signal to srun, which passes
# it on to every task. `wait` returns early (>128) when a trapped signal arrives: wait again until
# srun is gone, then once more to collect its real status.
run_ranks() {
    local cpt=()
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && cpt=(--cpus-per-task="$SLURM_CPUS_PER_TASK")  # srun no longer inherits it (22.05+)
    # shellcheck disable=SC2086  # SOFTCLIP_SRUN_ARGS is a list of options on purpose
    srun --ntasks="$WORLD" --ntasks-per-node="$TASKS_PER_NODE" "${cpt[@]}" --wait="$SOFTCLIP_SRUN_WAIT" \
        --kill-on-bad-exit=0 ${SOFTCLIP_SRUN_ARGS:-} "$@" &
    local pid=$!
    trap 'echo "== $(date -Is) batch shell got SIGUSR1: forwarding to the ranks (srun $pid)"; kill -USR1 '"$pid"' 2>/dev/null || true' USR1
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" || true
    done
    set +e
    wait "$pid"
    RANKS_RC=$?
    set -e
    trap - USR1
}

# DeepSpeed's FusedAdam, when the config makes it a JIT build (pretrain/runtime/fused_adam.py): built once
# per job, by one task on the first node in the ranks' environment (SOFTCLIP_SETUP_CMD, SOFTCLIP_SRUN_ARGS), before srun
# starts the ranks, which then find it up to date in TORCH_EXTENSIONS_DIR and only load it; otherwise
# every rank of every node compiles it at once. TORCH_EXTENSIONS_DIR must be on a filesystem all nodes
# share (torch's default, ~/.cache/torch_extensions, usually is). Exit 2 when it cannot be built.
prebuild_fused_adam() {
    # shellcheck disable=SC2086  # SOFTCLIP_SRUN_ARGS is a list of options on purpose
    srun --ntasks=1 --nodes=1 ${SOFTCLIP_SRUN_ARGS:-} "$SOFTCLIP_PYTHON" -m pretrain.fused_adam "$SOFTCLIP_DS_CONFIG" \
        || { echo "== FusedAdam prebuild failed (message above); not starting the ranks." >&2; exit "$EXIT_SETUP"; }
}

# Run the trainer on every rank; requeue on its preemption code, bounded by SOFTCLIP_MAX_RESTARTS.
train_and_requeue() {
    echo "== $(date -Is) launching: $*"
    run_ranks "$@"
    local rc=$RANKS_RC restarts=${SLURM_RESTART_COUNT:-0}
    if (( rc == EXIT_PREEMPTED )); then
        if (( restarts >= SOFTCLIP_MAX_RESTARTS )); then
            echo "== checkpointed and stopped (exit $rc), but this job has already been requeued $restarts times (SOFTCLIP_MAX_RESTARTS=$SOFTCLIP_MAX_RESTARTS); not requeuing. To continue from its latest checkpoint, resubmit with SOFTCLIP_OUTPUT_DIR=${SOFTCLIP_OUTPUT_DIR:-<this run directory>}." >&2
            exit "$rc"
        fi
        echo "== $(date -Is) trainer checkpointed and stopped (exit $rc); requeuing job $SLURM_JOB_ID (restart $(( restarts + 1 )) of at most $SOFTCLIP_MAX_RESTARTS)"
        scontrol requeue "$SLURM_JOB_ID" || { echo "error: scontrol requeue $SLURM_JOB_ID failed; resubmit with SOFTCLIP_OUTPUT_DIR=${SOFTCLIP_OUTPUT_DIR:-<this run directory>} to resume from its latest checkpoint." >&2; exit "$rc"; }
        exit 0
    fi
    if (( rc == 128 + 10 )); then  # SIGUSR1's default action: it arrived before the trainer's handler
        echo "== $(date -Is) the ranks were killed by SIGUSR1 before the trainer installed its handler, so nothing was saved; not requeuing. Is --time longer than the --signal=B:USR1@SECONDS warning (timed signals may also come early)?" >&2
        exit "$rc"
    fi
    if (( rc != 0 )); then
        echo "== $(date -Is) trainer failed with exit code $rc; not requeuing (only $EXIT_PREEMPTED, the checkpoint-and-stop code, requeues)." >&2
        exit "$rc"
    fi
    echo "== $(date -Is) done"
}

# Shared trainer command line from the variables each script sets (see cc12m_vitl.sh for the list).
trainer_args() {
    TRAINER_ARGS=(
        pretrain/main.py
        --deepspeed_config "$SOFTCLIP_DS_CONFIG" --model "$SOFTCLIP_MODEL" --loss "$SOFTCLIP_LOSS"
        --train-data "$SOFTCLIP_TRAIN_DATA" --tokenizer "$SOFTCLIP_TOKENIZER"
        --batch-size "$SOFTCLIP_GLOBAL_BATCH" --micro-batch "$SOFTCLIP_MICRO_BATCH" --grad-accum "$SOFTCLIP_GRAD_ACCUM"
        --steps "$SOFTCLIP_STEPS" --warmup "$SOFTCLIP_WARMUP" --lr "$SOFTCLIP_LR" --min-lr "$SOFTCLIP_MIN_LR" --weight-decay "$SOFTCLIP_WD"
        --save-every "$SOFTCLIP_SAVE_EVERY" --eval-every "$SOFTCLIP_EVAL_EVERY" --log-every "$SOFTCLIP_LOG_EVERY"
        --zeroshot-data "$SOFTCLIP_ZEROSHOT_DATA" --retrieval-data "$SOFTCLIP_RETRIEVAL_DATA"
        --workers "$SOFTCLIP_WORKERS" --seed "$SOFTCLIP_SEED" --report-to "$SOFTCLIP_REPORT_TO"
        --output-dir "$SOFTCLIP_OUTPUT_DIR" --resume latest
    )
    [[ -n ${SOFTCLIP_TRAIN_NUM_SAMPLES:-} ]] && TRAINER_ARGS+=(--train-num-samples "$SOFTCLIP_TRAIN_NUM_SAMPLES")
    [[ ${SOFTCLIP_GRAD_CHECKPOINTING:-0} == 1 ]] && TRAINER_ARGS+=(--grad-checkpointing)
    [[ ${SOFTCLIP_ZERO_INIT:-0} == 1 ]] && TRAINER_ARGS+=(--zero-init)
    case $SOFTCLIP_LOSS in
        softclip) TRAINER_ARGS+=(--alpha "$SOFTCLIP_ALPHA" --beta "$SOFTCLIP_BETA" --soft-temperature "$SOFTCLIP_SOFT_TEMPERATURE"
                                 --soft-source "$SOFTCLIP_SOFT_SOURCE" --soft-image-source "$SOFTCLIP_SOFT_IMAGE_SOURCE"
                                 --soft-text-source "$SOFTCLIP_SOFT_TEXT_SOURCE") ;;
        clip) ;;
        *) die "SOFTCLIP_LOSS=$SOFTCLIP_LOSS: choose clip or softclip." ;;
    esac
    # shellcheck disable=SC2206  # SOFTCLIP_EXTRA_ARGS: further trainer flags, split on spaces
    TRAINER_ARGS+=(${SOFTCLIP_EXTRA_ARGS:-})
    return 0
}

# The whole training job: checks, layout, batch split, master, launch, requeue.
launch_training() {
    case $SOFTCLIP_LOSS in clip | softclip) ;; *) die "SOFTCLIP_LOSS=$SOFTCLIP_LOSS: choose clip or softclip." ;; esac
    check_file SOFTCLIP_DS_CONFIG "$SOFTCLIP_DS_CONFIG" "the repo ships ds_configs/zero3_bf16.json and ds_configs/cpu.json"
    check_shards SOFTCLIP_TRAIN_DATA "$SOFTCLIP_TRAIN_DATA" "set SOFTCLIP_TRAIN_DATA to your img2dataset shards, e.g. /data/cc12m/{00000..01242}.tar"
    check_dir SOFTCLIP_TOKENIZER "$SOFTCLIP_TOKENIZER" "train one with data.tokenizer.train_tokenizer or use data/embedded/tokenizer"
    check_eval_data SOFTCLIP_ZEROSHOT_DATA "$SOFTCLIP_ZEROSHOT_DATA"
    check_eval_data SOFTCLIP_RETRIEVAL_DATA "$SOFTCLIP_RETRIEVAL_DATA"
    if [[ $SOFTCLIP_LOSS == softclip ]]; then
        soft_targets
        check_fine_data
    fi
    world_layout
    batch_split
    if [[ -z ${SOFTCLIP_WORKERS:-} ]]; then  # data loader processes per rank: the task's CPUs minus the rank itself
        local c=${SLURM_CPUS_PER_TASK:-2}
        SOFTCLIP_WORKERS=$(( c > 2 ? c - 2 : 1 ))
    fi
    SOFTCLIP_OUTPUT_DIR=${SOFTCLIP_OUTPUT_DIR:-$SOFTCLIP_RUNS_DIR/$SLURM_JOB_NAME-$SLURM_JOB_ID}
    mkdir -p "$SOFTCLIP_OUTPUT_DIR" || die "SOFTCLIP_OUTPUT_DIR=$SOFTCLIP_OUTPUT_DIR cannot be created; set SOFTCLIP_OUTPUT_DIR or SOFTCLIP_RUNS_DIR to a writable shared directory."
    echo "== run directory $SOFTCLIP_OUTPUT_DIR"
    master_env
    trainer_args
    prebuild_fused_adam
    train_and_requeue "$SOFTCLIP_PYTHON" -u "${TRAINER_ARGS[@]}"
}

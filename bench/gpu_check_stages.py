"""gpu-check's stages: what each one runs, its time limit and where the limit comes from, and the
order in which `--budget` keeps them (bench/gpu_check.py runs them; bench/gpu_check_report.py judges).

A stage's limit is MEASURED_FACTOR x the parts of it that a CPU can measure (process start-up,
imports, the deepspeed launcher, the trainer's own start-up) plus ESTIMATED_FACTOR x the GPU work
estimated on paper, rounded up to 5 s. Each Stage keeps its parts as data, so `--dry-run` prints the
sum behind every limit.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------- measured on a CPU
# This project's machine: 2 cores shared with up to 6 other jobs, Python 3.11, torch and deepspeed from
# .venv, warm page cache. The load average went from 2 to 20 while measuring, so each figure is the
# minimum WALL time of the tries at load 2-3 (18:12-18:16), when the machine was nearly free, or, for
# the commands tried only under load 10-20, the minimum CPU time (user + sys of the command and the
# children it waited for: what it needs whatever else runs). Commands, as run from the repo root:
#   wall: t() { s=$(date +%s.%N); "$@"; e=$(date +%s.%N); echo "$e - $s" | bc; }
#   cpu:  /usr/bin/time -f "%e %U %S" CMD     (user + sys)
PYTHON_START_S = 0.02     # python -c pass                          wall, 5 tries (cpu 0.01)
IMPORT_TORCH_S = 3.2      # python -c "import torch"                wall, 5 tries (cpu 3.8)
IMPORT_DEEPSPEED_S = 3.9  # python -c "import torch, deepspeed"     wall, 5 tries (cpu 4.0)
FUSED_ADAM_FACTS_S = 4.9  # python -c "import torch, deepspeed; from torch.utils import cpp_extension;
#                           from deepspeed.git_version_info import installed_ops;
#                           cpp_extension.is_ninja_available()"  (what prebuild imports)  wall, 3 tries (cpu 4.1)
LAUNCHER_S = 9.7          # deepspeed --num_gpus 1 noop.py   (noop.py: `pass`; the runner and launch.py each
#                           import deepspeed before the rank starts)                     wall, 3 tries (cpu 8.8)
TRAINER_START_S = 18.2    # TRAINER_COMMAND (below) minus LAUNCHER's cpu: the trainer's imports, config, a data
#                           worker, deepspeed.initialize, one step, final checkpoint, exit.  cpu 27.0 - 8.8,
#                           2 tries (wall 93-117 s at load 11-13)
BENCH_TRAIN_IMPORTS_S = 10.3  # python -c "import bench.train, models, pretrain.train.engine, pretrain.settings.config"
#                               wall, 3 tries (cpu 14.2)
BENCH_MODEL_START_S = 4.6     # python bench/model.py --help        wall, 3 tries (cpu 3.1)
BENCH_LOSS_START_S = 3.5      # python bench/loss.py --help         wall, 3 tries (cpu 3.6)
PIPELINE_IMPORT_S = 9.3       # python -c "from transformers import pipeline"   wall, 3 tries (cpu 10.8)
EXPORT_IMPORTS_S = 4.5        # python -c "import pretrain.export, transformers"  cpu, 2 tries (at load 17-20)
EMBEDDED_BUILD_S = 11.2       # python -c "from data.embedded.build import ensure_built;
#                               ensure_built('/tmp/x/shards', tokenizer_out='/tmp/x/tokenizer')"  (a cold build)
#                               wall, 1 try (cpu 5.0: the rest is file I/O)
VIT_B16_CPU_INIT_S = 39.3     # python -c "from models import create_model; create_model('ViT-B-16')"
#                               wall, 2 tries at load 3-10 (cpu 15.5 at load 16; the larger is kept, as only
#                               export, the least informative stage, pays it; ViT-L-14: 97 s wall). The stages
#                               build their models on the GPU (zero.Init in the trainer, device= in bench/model.py
#                               and bench/train.py); only export builds ViT-B-16 on the CPU (transformers loads
#                               weights without init).
TRAINER_COMMAND = ("deepspeed --num_gpus 1 --master_port 29777 pretrain/main.py --model tiny-test --train-data "
                   "embedded:/tmp/x/shards --tokenizer /tmp/x/tokenizer --output-dir /tmp/x/run --deepspeed_config "
                   "ds_configs/cpu.json --batch-size 32 --steps 1 --save-every 0 --log-every 1 --workers 1 "
                   "--zeroshot-data none --retrieval-data none")

# 1.25 on what was measured: the figures above come from 2 cores that other jobs kept busy, so a GPU
# node's 16 idle cores should beat them once its page cache is warm; the 25% is for the first, cold
# start of a bare machine. 2 on what was estimated: none of the GPU work has been measured (no GPU was
# lent to the sessions that wrote this), so the estimates may be off by that much.
MEASURED_FACTOR, ESTIMATED_FACTOR = 1.25, 2.0

# Before the first stage, gpu_check.py itself starts, imports torch and deepspeed (for the report's
# versions), initialises CUDA (estimated 3 s) and builds the embedded data on a fresh clone: reserved
# from --budget.
ORCHESTRATOR_S = math.ceil(MEASURED_FACTOR * (PYTHON_START_S + IMPORT_DEEPSPEED_S + EMBEDDED_BUILD_S)
                           + ESTIMATED_FACTOR * 3)

FUSED_DS_CONFIG = "ds_configs/zero3_bf16.json"
TORCH_ADAM_DS_NAME = "zero3_bf16_torch_adam.json"   # written into the work dir when FusedAdam is unusable
MFU_TARGET, RATIO_TARGET = 0.40, 1.05
TRAIN_STEPS, RESUME_STEPS = 30, 50
DETECTOR_N = 32768                                   # the loss stage's global batch (256 GPUs x 128)


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    measured: tuple[tuple[str, float], ...]          # (part, seconds) measured on a CPU (above)
    estimated: tuple[tuple[str, float], ...]         # (part, seconds) of GPU work, estimated on paper
    needs: tuple[str, ...] = ()                      # stages that must have passed first

    @property
    def limit_s(self) -> int:
        total = (MEASURED_FACTOR * sum(s for _, s in self.measured)
                 + ESTIMATED_FACTOR * sum(s for _, s in self.estimated))
        return int(5 * math.ceil(total / 5))

    def why(self) -> str:
        """The sum behind the limit, for --dry-run."""
        parts = lambda items: " + ".join(f"{what} {s:g}" for what, s in items) or "0"   # noqa: E731
        return f"{MEASURED_FACTOR:g} x ({parts(self.measured)}) + {ESTIMATED_FACTOR:g} x ({parts(self.estimated)})"


# In run order, which is also the order of what they show, most informative first: the trainer with
# NCCL collectives, ZeRO-3 and a checkpoint round trip can fail in ways nothing else here can; MFU
# says whether the model is worth running; the step ratios say what SoftCLIP costs on top; the loss
# at N = 32,768 projects the target cost to a 256-GPU batch. fused_adam is the exception: it runs
# first when it is kept (the trainer must know which optimizer to use), but it is the first to go
# when the budget is short, because every stage runs without it on torch's AdamW (see gpu_check.py).
STAGES = (
    Stage("fused_adam", "build DeepSpeed's FusedAdam (JIT, nvcc / CUDA_HOME / ninja) once, for the stages after it",
          measured=(("python + torch + deepspeed imports, the toolchain checks", FUSED_ADAM_FACTS_S),),
          estimated=(("nvcc + ninja compile of fused_adam (~40 s in DeepSpeed's JIT builds)", 40),)),
    Stage("train", f"`deepspeed --num_gpus 1` (NCCL) ViT-B-16, ZeRO-3 bf16, SoftCLIP + EMA teacher, {TRAIN_STEPS} "
                   f"steps, checkpoint",
          measured=(("deepspeed launcher", LAUNCHER_S), ("trainer start-up and one tiny step", TRAINER_START_S)),
          estimated=(("CUDA + NCCL init, ViT-B-16 under zero.Init", 10),
                     (f"{TRAIN_STEPS} steps of batch 128 at <= 0.4 s (ZeRO-3 hooks, data upscaled to 224 px)", 12),
                     ("checkpoint: 150 M params x 16 bytes written", 5))),
    Stage("resume", f"--resume latest to step {RESUME_STEPS}, checkpoint, then the embedded zero-shot / "
                    f"retrieval evaluation",
          measured=(("deepspeed launcher", LAUNCHER_S), ("trainer start-up and one tiny step", TRAINER_START_S)),
          estimated=(("CUDA + NCCL init, ViT-B-16, checkpoint load", 12),
                     (f"{RESUME_STEPS - TRAIN_STEPS} steps of batch 128 at <= 0.4 s", 8),
                     ("checkpoint", 5), ("evaluation: ~5,000 embedded images and captions", 8)),
          needs=("train",)),
    Stage("model", "bench/model.py ViT-B-16 and ViT-L-14, bf16 autocast, batch 128: TFLOP/s and MFU",
          measured=(("bench/model.py start-up", BENCH_MODEL_START_S),
                    ("4 spawned cases (2 models x grad ckpt on/off), each importing torch", 4 * IMPORT_TORCH_S)),
          estimated=(("4 x CUDA init and a model built on the GPU", 4 * 3),
                     ("4 x flop count + 1 warm-up + 5 steps (ViT-L-14: 33 TFLOP a step, ~0.1 s)", 4 * 3))),
    Stage("step_ratio", "bench/train.py ViT-B-16: SoftCLIP / CLIP step time, online targets and precomputed "
                        "detector-shape features (K = 36, d = 2048)",
          measured=(("python + bench/train.py's imports", BENCH_TRAIN_IMPORTS_S),),
          estimated=(("CUDA + NCCL init", 5),
                     ("3 engines (clip, online, precomp-img): ViT-B-16 on the GPU + deepspeed.initialize", 3 * 5),
                     ("3 x 13 steps of batch 128 at <= 0.4 s", 3 * 13 * 0.4))),
    Stage("loss", f"bench/loss.py --device cuda: CLIP / SoftCLIP at N = {DETECTOR_N:,}; the detector-shape target "
                  f"path (K = 36, d = 2048) at N = {DETECTOR_N:,}, b = 128",
          measured=(("bench/loss.py start-up", BENCH_LOSS_START_S),
                    ("6 spawned workers (timing, 2-3 memory, detector now/before), each re-importing it",
                     6 * BENCH_LOSS_START_S)),
          estimated=(("6 x CUDA init", 6 * 2),
                     ("detector path at N = 32,768, twice: 2.4 G fp16 values drawn, 22 TFLOP of similarity", 2 * 2),
                     ("CLIP losses at N = 32,768 (SoftCLIP's full batch is skipped at --softclip-budget-s 5)", 5),
                     ("bench/loss.py --parts similarity: a 7th start-up, then F at b = 128, N = 32,768 in fp32, "
                      "TF32, fp16, bf16 (1 warm-up + 3 repeats: ~1.6 s fp32 IEEE, < 0.2 s each other)",
                      BENCH_LOSS_START_S + 2 + 4))),
    Stage("export", "pretrain.export to native, transformers and timm, each reloaded and compared",
          measured=(("python + pretrain.export and transformers imports", EXPORT_IMPORTS_S),
                    ("ViT-B-16 built on the CPU twice (the reference CLIP, the timm reload)", 2 * VIT_B16_CPU_INIT_S)),
          estimated=(("ZeRO-3 checkpoint consolidated and 3 formats written (~0.6 GB each)", 8),),
          needs=("resume",)),
    Stage("pipeline", "transformers' zero-shot-image-classification pipeline on the export",
          measured=(("python + `from transformers import pipeline`", PIPELINE_IMPORT_S),),
          estimated=(("the export loaded by transformers (weights read, not initialised), CUDA init, one image", 8),),
          needs=("export",)),
)
# From most to least informative: the order --budget keeps them in.
PRIORITY = ("train", "resume", "model", "step_ratio", "loss", "fused_adam", "export", "pipeline")
assert sorted(PRIORITY) == sorted(s.name for s in STAGES)


@dataclass(frozen=True)
class Plan:
    budget_s: int
    kept: tuple[Stage, ...]                           # in run order
    trimmed: tuple[Stage, ...]                        # in priority order
    reasons: dict = field(default_factory=dict)       # trimmed stage -> why


def make_plan(selected: list[str] | None, budget_s: int, stages: tuple[Stage, ...] = STAGES) -> Plan:
    """Keep stages in PRIORITY order while their limits fit `budget_s` less ORCHESTRATOR_S (a stage
    whose prerequisite was trimmed is trimmed too); run the kept ones in STAGES order. Raises
    ValueError naming an unknown stage or a budget too small for anything."""
    names = [s.name for s in stages]
    unknown = [n for n in selected or [] if n not in names]
    if unknown:
        raise ValueError(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(names)}.")
    by_name = {s.name: s for s in stages}
    left, kept, trimmed, reasons = budget_s - ORCHESTRATOR_S, set(), [], {}
    for name in [n for n in PRIORITY if n in by_name and (selected is None or n in selected)]:
        stage = by_name[name]
        missing = [n for n in stage.needs if n not in kept]
        if missing:
            reasons[name] = "needs " + ", ".join(f"{n} ({'trimmed' if n in reasons else 'not selected'})"
                                                 for n in missing)
        elif stage.limit_s > left:
            reasons[name] = f"its {stage.limit_s} s limit does not fit the {left} s left"
        else:
            kept.add(name)
            left -= stage.limit_s
            continue
        trimmed.append(stage)
    if not kept:
        why = "; ".join(f"{s.name}: {reasons[s.name]}" for s in trimmed)
        raise ValueError(f"--budget {budget_s}: no stage fits ({why}); raise --budget.")
    return Plan(budget_s, tuple(s for s in stages if s.name in kept), tuple(trimmed), reasons)


# ---------------------------------------------------------------------------- what a stage runs
@dataclass(frozen=True)
class Context:
    """What the commands depend on: the work dir and the DeepSpeed JSON the training stages use."""
    work: Path
    ds_config: str = FUSED_DS_CONFIG
    python: str = sys.executable

    @property
    def torch_adam(self) -> bool:
        return self.ds_config != FUSED_DS_CONFIG


def with_torch_adam(ctx: Context, write: bool = True) -> Context:
    """The same context on torch's AdamW: FUSED_DS_CONFIG with `"torch_adam": true`, written to the
    work dir (`write=False`: only named, for --dry-run)."""
    path = ctx.work / TORCH_ADAM_DS_NAME
    if write:
        ds = json.loads((REPO / FUSED_DS_CONFIG).read_text())
        ds["optimizer"]["params"]["torch_adam"] = True
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ds, indent=2) + "\n")
    return replace(ctx, ds_config=str(path))


def commands(stage: str, ctx: Context) -> list[list[str]]:
    """The command lines of one stage (run one after the other, in the repository root)."""
    python, work, run = ctx.python, ctx.work, ctx.work / "run"
    deepspeed = str(Path(python).parent / "deepspeed")
    train = [deepspeed, "--num_gpus", "1", "--master_port", str(29500 + os.getpid() % 1000), "pretrain/main.py",
             "--deepspeed_config", ctx.ds_config, "--model", "ViT-B-16", "--loss", "softclip",
             "--soft-image-source", "ema", "--soft-text-source", "ema", "--train-data", "embedded",
             "--tokenizer", "data/embedded/tokenizer", "--output-dir", str(run), "--batch-size", "128",
             "--lr", "5e-4", "--warmup", "5", "--log-every", "5", "--workers", "8", "--eval-batch-size", "500",
             "--resume", "latest"]
    if stage == "fused_adam":
        # cuda=True: the check only runs stages on a GPU, and it lets the CPU tests take the same path
        return [[python, "-c", f"import sys; from pretrain.runtime.fused_adam import prebuild; "
                               f"sys.exit(prebuild({FUSED_DS_CONFIG!r}, cuda=True))"]]
    if stage == "train":
        return [train + ["--steps", str(TRAIN_STEPS), "--save-every", str(TRAIN_STEPS),
                         "--zeroshot-data", "none", "--retrieval-data", "none"]]
    if stage == "resume":
        return [train + ["--steps", str(RESUME_STEPS), "--save-every", str(RESUME_STEPS)]]
    if stage == "export":
        return [[python, "-m", "pretrain.export", "--checkpoint", str(run / "checkpoints"), "--out",
                 str(work / "export"), "--format", "native,hf,timm"]]
    if stage == "pipeline":
        code = ("import json, sys; from transformers import pipeline; from pretrain.demo import first_test_image; "
                "from data.embedded.build import DEFAULT_OUT, shard_pattern; "
                "from data.embedded.captions import FMNIST_CLASSNAMES, FMNIST_PROMPT_NAMES, FMNIST_EVAL_TEMPLATES; "
                "image, label = first_test_image(shard_pattern('fmnist-test', DEFAULT_OUT)); "
                f"clf = pipeline('zero-shot-image-classification', model={str(work / 'export' / 'hf')!r}, device=0); "
                "preds = clf(image, candidate_labels=list(FMNIST_PROMPT_NAMES), "
                "hypothesis_template=FMNIST_EVAL_TEMPLATES[0]); "
                "print('PIPELINE ' + json.dumps({'truth': FMNIST_CLASSNAMES[label], 'top': preds[0]}))")
        return [[python, "-c", code]]
    if stage == "loss":
        return [[python, "bench/loss.py", "--device", "cuda", "--parts", "timing,detector", "--sizes", str(DETECTOR_N),
                 "--worlds", "1", "--repeats", "3", "--softclip-budget-s", "5",
                 "--detector-b", "128", "--detector-sizes", str(DETECTOR_N)],
                # the similarity F per matmul dtype beside the measured ViT-L-14 step (the model stage's
                # model.json when it ran first; else bench/loss.py estimates the step from the bf16 peak)
                [python, "bench/loss.py", "--device", "cuda", "--parts", "similarity", "--repeats", "3",
                 "--model-json", str(work / "model.json"), "--similarity-json", str(work / "similarity.json")]]
    if stage == "model":
        return [[python, "bench/model.py", "--models", "ViT-B-16", "ViT-L-14", "--batch", "128", "--steps", "5",
                 "--json", str(work / "model.json")]]
    if stage == "step_ratio":
        return [[python, "bench/train.py", "--models", "ViT-B-16", "--sources", "clip,online,precomp-img",
                 "--micro-batch", "128", "--iters", "10", "--warmup", "3", "--deepspeed_config", ctx.ds_config]]
    raise ValueError(f"no stage {stage!r}")

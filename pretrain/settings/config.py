"""The run configuration: one frozen object, built once from CLI flags (+ an optional YAML file),
validated with one clear message per problem, and written to RUN/config.json.

Precedence: built-in defaults < YAML (`--config run.yaml`, keys spelled like the flags, with
dashes or underscores) < command-line flags. The DeepSpeed JSON's batch fields, learning rate and
weight decay may be "auto"; they are filled from this config, and explicit numbers in the JSON
must agree with it (global batch = micro batch x gradient accumulation x world size).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from data.fine import FINE_MEMBER
from losses.precision import SIMILARITY_DTYPES
from pretrain.runtime.dist import DistEnv
from pretrain.settings import schedule
from pretrain.settings.validate import (TARGET_SOURCES, check_data_and_model, check_ds_config, check_target_sources,
                                        reconcile_batch, resolve_train_data)

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """All problems found in a run configuration, one sentence each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid run configuration:\n  - " + "\n  - ".join(self.problems))


@dataclass(frozen=True)
class TrainConfig:
    # model and loss
    model: str
    loss: str                      # "softclip" or "clip"
    alpha: float                   # weight of the soft targets in Y = (1-alpha) I + alpha S
    beta: float                    # weight of the disentangled-negatives KL term
    soft_temperature: float
    soft_source: str               # "image", "text" or "both"
    soft_standardize: bool         # per-row standardisation of F before the temperature
    soft_topk: int | None          # restrict S to each row's k nearest columns (None: all N)
    soft_warmup_steps: int         # alpha and beta ramp linearly from 0 over these steps
    similarity_dtype: str          # matmul of the target similarity: auto, fp32, fp16, bf16 (losses/precision.py)
    soft_image_source: str         # where image token features for the targets come from:
    soft_text_source: str          #   "online" (the model's own), "precomputed" (shards), "ema" (teacher)
    ema_decay: float               # EMA teacher: ema = d * ema + (1 - d) * student after each step
    grad_checkpointing: bool
    zero_init: bool                # build the model inside deepspeed.zero.Init (partitioned at birth)
    tf32: bool                     # TF32 for fp32 CUDA matmuls / convolutions (pretrain/runtime/precision.py)
    # data
    train_data: str                # webdataset shard pattern, e.g. ".../{00000..01242}.tar"
    train_num_samples: int | None  # samples per epoch, needed only for epoch units
    data_sampling: str             # "resampled" (endless draws with replacement) or "epochs" (each sample once per seeded epoch)
    tokenizer: str
    workers: int
    seed: int
    zeroshot_data: str             # "embedded", "none", imagenet:PATH, clip_benchmark:ROOT, a folder or shards
    retrieval_data: str            # "embedded", "none", clip_benchmark:ROOT or image-text shards
    eval_batch_size: int
    # everything below is in optimizer steps or absolute values, resolved at startup
    steps: int
    warmup_steps: int
    save_every: int                # 0: only at the end (and on a signal)
    eval_every: int                # 0: only at the end
    log_every: int
    lr: float                      # peak learning rate after warmup
    min_lr: float
    weight_decay: float
    global_batch: int
    micro_batch: int
    grad_accum: int
    world_size: int
    contrastive_batch: str         # "global": the loss sees all N = micro x accum x world columns; "micro": micro x world
    # run
    output_dir: str
    resume: str | None             # None, "latest" or a checkpoint tag directory
    keep_checkpoints: int          # newest tags kept; 0 keeps all
    report_to: tuple[str, ...]
    wandb_project: str
    max_nonfinite: int             # consecutive non-finite losses tolerated before aborting
    debug_nan: tuple[str, ...]     # fault injection for tests: "3" = first try of step 3 is NaN, "5+" = every try,
                                   #   "g3" / "g5+": the same for the gradients (finite loss)
    deepspeed_config: str
    ds_config: dict = field(repr=False)  # resolved dict handed to deepspeed.initialize
    specs: dict = field(repr=False)      # intervals as written by the user ("5%", "2ep", ...)
    derived: tuple[str, ...] = ()        # human-readable derived values, logged once
    debug_data_error: str = ""           # fault injection for tests: "1@3" = rank 1's 3rd batch raises a DataError
    linear_probe_data: str = "none"      # final evaluation only: pretrain/evaluate/linear_probe.py SPEC, or "none"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    @property
    def target_sources(self) -> dict[str, str]:
        """{modality: source} for the modalities the soft targets use (none for --loss clip)."""
        if self.loss != "softclip":
            return {}
        used = ("image", "text") if self.soft_source == "both" else (self.soft_source,)
        return {m: (self.soft_image_source if m == "image" else self.soft_text_source) for m in used}

    @property
    def fine_members(self) -> tuple[str, ...]:
        """Precomputed shard members the loader must batch ("fine_img", "fine_txt")."""
        return tuple(FINE_MEMBER[m] for m, s in self.target_sources.items() if s == "precomputed")

    @property
    def ema_modalities(self) -> tuple[str, ...]:
        """Towers the EMA teacher runs ("image", "text"); empty: no teacher is built."""
        return tuple(m for m, s in self.target_sources.items() if s == "ema")

    def deepspeed_dict(self) -> dict:
        return copy.deepcopy(self.ds_config)  # DeepSpeed mutates the dict it is given

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


DEFAULTS = dict(
    # beta 0, not the paper's 1: chosen by bench/reproduce.py's ablation (docs/reproduction.md)
    model="tiny", loss="softclip", alpha=0.2, beta=0.0, soft_temperature=0.1, soft_source="both",
    soft_standardize=False, soft_topk=None, soft_warmup="0", soft_image_source="online",
    soft_text_source="online", ema_decay=0.999, similarity_dtype="auto", tf32=True,
    grad_checkpointing=False, zero_init=False, train_data=None, train_num_samples=None, data_sampling="resampled",
    tokenizer="data/embedded/tokenizer", workers=2, seed=0, zeroshot_data="embedded",
    retrieval_data="embedded", eval_batch_size=256, steps=1000, warmup="5%", save_every="10%",
    eval_every="0", log_every=10, lr=None, blr=None, min_lr=0.0, weight_decay=0.1, batch_size=None,
    micro_batch=None, grad_accum=None, contrastive_batch="global", output_dir=None, resume=None, keep_checkpoints=2,
    report_to="jsonl", wandb_project="softclip", max_nonfinite=5, debug_nan="",
    debug_data_error="", deepspeed_config=None, linear_probe_data="none")
SOFT_OPTIONS = ("alpha", "beta", "soft_temperature", "soft_source", "soft_standardize", "soft_topk",
                "soft_warmup", "soft_image_source", "soft_text_source", "ema_decay", "similarity_dtype")
DATA_SAMPLING = ("resampled", "epochs")  # data.make_train_loader(resampled=True / False)
DEFAULT_LR = 5e-4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain/main.py", argument_default=argparse.SUPPRESS,
                                description="SoftCLIP / CLIP pre-training on DeepSpeed.")
    a = p.add_argument
    a("--config", help="YAML file of options (flag names, dashes or underscores); flags override it")
    a("--model", help="model name (tiny-test, tiny, ViT-B-16, ViT-L-14, ViT-H-14) or a config JSON")
    a("--loss", choices=["softclip", "clip"])
    a("--alpha", type=float); a("--beta", type=float); a("--soft-temperature", type=float)
    a("--soft-source", choices=["image", "text", "both"])
    a("--soft-standardize", action="store_true", help="standardise each row of F before the temperature")
    a("--soft-topk", type=int, help="soft targets only over each row's k most similar columns")
    a("--soft-warmup", help="ramp alpha and beta from 0 over this long (steps, %%, ex, ep)")
    for m, members in (("image", "fine_img"), ("text", "fine_txt")):
        a(f"--soft-{m}-source", choices=list(TARGET_SOURCES),
          help=f"{m} token features behind the soft targets: online (the model's own, default), precomputed "
               f"(the shards' {members}.npy members, see data/fine.py) or ema (an EMA teacher's)")
    a("--ema-decay", type=float, help="decay of the EMA teacher (default 0.999), in [0, 1)")
    a("--similarity-dtype", choices=list(SIMILARITY_DTYPES),
      help="dtype of the soft-target similarity's block matmul, summed in fp32: auto (default: the token "
           "features' own dtype on CUDA, fp16 for precomputed ones; fp32 on CPU), fp32, fp16 or bf16")
    a("--tf32", action=argparse.BooleanOptionalAction,
      help="TF32 for the fp32 matmuls and convolutions on GPU (default on, as open_clip; --no-tf32: IEEE fp32)")
    a("--grad-checkpointing", action="store_true")
    a("--zero-init", action="store_true", help="build the model partitioned (ZeRO-3, very large models)")
    a("--train-data", help="webdataset shards: a brace pattern, a directory of .tar files or a list with '::'")
    a("--train-num-samples", type=int, help="samples per epoch (needed for epoch units only)")
    a("--data-sampling", choices=list(DATA_SAMPLING),
      help="resampled (default: shards drawn with replacement, any shard count) or epochs (every sample "
           "once per epoch in a seeded order; needs at least world size x workers shards)")
    a("--tokenizer", help="tokenizer directory (data.tokenizer)")
    a("--workers", type=int); a("--seed", type=int)
    a("--zeroshot-data", help="'embedded' (Fashion-MNIST and emoji categories, val and test: a smoke test), 'none', "
      "imagenet[-v2|-r|-sketch|-a]:PATH, clip_benchmark:ROOT, a class folder or labelled shards; comma-joined")
    a("--retrieval-data", help="'embedded' (held-out emoji pairs), 'none', clip_benchmark:ROOT or image-text shards")
    a("--eval-batch-size", type=int)
    a("--linear-probe-data", help="also a linear probe at the final evaluation (off: 'none'): clip_benchmark:ROOT "
      "or DIR with train/ and test/; python -m pretrain.evaluate --linear-probe takes the same")
    a("--steps", help="total optimizer steps (or examples '2e6ex', epochs '3ep')")
    a("--warmup", help="linear warmup: steps, percent of --steps, examples or epochs")
    a("--save-every", help="checkpoint interval (0: end only); same units as --warmup")
    a("--eval-every", help="evaluation interval (0: end only); same units as --warmup")
    a("--log-every", type=int)
    a("--lr", type=float, help=f"peak learning rate (default {DEFAULT_LR})")
    a("--blr", type=float, help="base learning rate per 256 samples: lr = blr x global batch / 256")
    a("--min-lr", type=float); a("--weight-decay", type=float)
    a("--batch-size", type=int, help="global batch (DeepSpeed train_batch_size)")
    a("--micro-batch", type=int, help="per-device batch (train_micro_batch_size_per_gpu)")
    a("--grad-accum", type=int, help="gradient accumulation steps")
    a("--contrastive-batch", choices=["global", "micro"],
      help="columns of the loss under accumulation: the global batch (default; pretrain/train/accumulate.py) "
           "or each micro-batch x world size (cheaper, fewer negatives)")
    a("--output-dir", help="run directory: config.json, log.jsonl, results.json, checkpoints/")
    a("--resume", help="'latest' (start fresh if there is none yet) or a checkpoint tag directory")
    a("--keep-checkpoints", type=int)
    a("--report-to", help="comma list: jsonl (always on), wandb (offline unless WANDB_MODE is set)")
    a("--wandb-project")
    a("--max-nonfinite", type=int, help="consecutive non-finite losses before aborting")
    a("--debug-nan", help=argparse.SUPPRESS)
    a("--debug-data-error", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    import deepspeed  # adds --deepspeed and --deepspeed_config, as the deepspeed launcher expects
    deepspeed.add_config_arguments(p)
    return p


def _load_yaml(path: str, problems: list[str]) -> dict:
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        problems.append(f"--config {path}: cannot read it as YAML ({e}).")
        return {}
    if not isinstance(data, dict):
        problems.append(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}.")
        return {}
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(out) - set(DEFAULTS))
    if unknown:
        problems.append(f"--config {path}: unknown option(s) {', '.join(unknown)}; "
                        f"names are the flags' (see --help).")
    return {k: v for k, v in out.items() if k in DEFAULTS}


def parse(argv: list[str] | None) -> tuple[dict, dict, int]:
    """Return (merged raw options, options set explicitly, --local_rank)."""
    args = vars(build_parser().parse_args(argv))
    local_rank = args.pop("local_rank", -1)
    for k in ("deepspeed", "deepscale", "deepscale_config"):
        args.pop(k, None)
    if args.get("deepspeed_config") is None:
        args.pop("deepspeed_config", None)
    problems: list[str] = []
    from_yaml = _load_yaml(args.pop("config"), problems) if "config" in args else {}
    if problems:
        raise ConfigError(problems)
    explicit = {**from_yaml, **args}
    return {**DEFAULTS, **explicit}, explicit, local_rank


def build_config(argv: list[str] | None, env: DistEnv, cuda: bool, check_files: bool = True) -> TrainConfig:
    """Parse, resolve and validate; raise ConfigError listing every problem found."""
    raw, explicit, _ = parse(argv)
    problems: list[str] = []
    derived: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    # loss options
    if raw["loss"] == "clip":
        given = [k for k in SOFT_OPTIONS if k in explicit]
        need(not given, f"--{given[0].replace('_', '-') if given else ''} only applies to --loss softclip; "
                        f"drop it or use --loss softclip.")
    need(0.0 <= float(raw["alpha"]) <= 1.0, f"--alpha {raw['alpha']} must lie in [0, 1].")
    need(float(raw["beta"]) >= 0.0, f"--beta {raw['beta']} must be >= 0.")
    need(float(raw["soft_temperature"]) > 0.0, f"--soft-temperature {raw['soft_temperature']} must be > 0.")
    need(raw["soft_topk"] is None or int(raw["soft_topk"]) >= 2, f"--soft-topk {raw['soft_topk']} must be >= 2.")
    need(raw["soft_source"] in ("image", "text", "both"),
         f"--soft-source {raw['soft_source']!r} must be image, text or both.")
    need(raw["similarity_dtype"] in SIMILARITY_DTYPES,
         f"--similarity-dtype {raw['similarity_dtype']!r} must be one of {', '.join(SIMILARITY_DTYPES)}.")
    need(isinstance(raw["tf32"], bool), f"tf32: {raw['tf32']!r} must be true or false (--tf32 / --no-tf32).")
    if cuda:
        derived.append(f"TF32 {'on' if raw['tf32'] is True else 'off'} for fp32 matmuls and convolutions; "
                       f"soft-target similarity matmul: {raw['similarity_dtype']}")
    check_target_sources(raw, explicit, problems)
    if check_files:
        from pretrain.evaluate.linear_probe import check_spec
        problems += check_spec(str(raw["linear_probe_data"]), flag="--linear-probe-data")
    need(raw["data_sampling"] in DATA_SAMPLING,
         f"--data-sampling {raw['data_sampling']!r} must be one of {', '.join(DATA_SAMPLING)}.")
    need(raw["train_data"] is not None, "--train-data is required (e.g. data/embedded/shards/train-{000000..000003}.tar).")
    need(raw["output_dir"] is not None, "--output-dir is required (the run directory).")
    for k in ("workers", "log_every", "keep_checkpoints", "max_nonfinite", "eval_batch_size"):
        need(int(raw[k]) >= (1 if k in ("log_every", "max_nonfinite", "eval_batch_size") else 0),
             f"--{k.replace('_', '-')} {raw[k]} is out of range.")
    report_to = tuple(sorted({"jsonl", *[s.strip() for s in str(raw["report_to"]).split(",") if s.strip()]}
                             - {"none"}))
    need(set(report_to) <= {"jsonl", "wandb"}, f"--report-to {raw['report_to']!r}: choose from jsonl, wandb.")

    # DeepSpeed JSON and the batch arithmetic
    ds_path = raw["deepspeed_config"] or str(REPO_ROOT / "ds_configs" / ("zero3_bf16.json" if cuda else "cpu.json"))
    ds = check_ds_config(ds_path, cuda, problems, derived)
    batch = reconcile_batch(ds, raw, env.world_size, problems)
    global_batch, micro, accum = batch if batch else (1, 1, 1)
    if batch:
        derived.append(f"global batch {global_batch} = micro batch {micro} x accumulation {accum} "
                       f"x world size {env.world_size}")
    need(raw["contrastive_batch"] in ("global", "micro"), f"--contrastive-batch {raw['contrastive_batch']!r}: "
                                                           f"choose global or micro.")
    if batch:
        columns = global_batch if raw["contrastive_batch"] == "global" else micro * env.world_size
        derived.append(f"contrastive batch {raw['contrastive_batch']}: the loss scores each pair against "
                       f"N = {columns} columns" + (" (one extra no-grad forward per micro-batch)"
                                                    if raw["contrastive_batch"] == "global" and accum > 1 else ""))

    # learning rate
    lr = DEFAULT_LR
    if raw["lr"] is not None and raw["blr"] is not None:
        problems.append("--lr and --blr are both set; give one (blr scales with the global batch).")
    elif raw["blr"] is not None:
        lr = float(raw["blr"]) * global_batch / 256
        derived.append(f"lr {lr:.3g} = blr {raw['blr']} x global batch {global_batch} / 256")
    elif raw["lr"] is not None:
        lr = float(raw["lr"])
    need(lr > 0, f"learning rate {lr} must be > 0 (e.g. --lr {DEFAULT_LR}, or --blr for one that scales with the batch).")
    need(lr <= 0 or 0 <= float(raw["min_lr"]) <= lr,  # a bad lr is one problem, not two
         f"--min-lr {raw['min_lr']} must lie in [0, lr={lr}].")
    need(float(raw["weight_decay"]) >= 0, f"--weight-decay {raw['weight_decay']} must be >= 0.")

    # everything in steps
    n_ep = raw["train_num_samples"]
    if n_ep is None and raw["train_data"] is not None:
        # epoch units (--steps 2ep) count what the loader will read: sizes.json or img2dataset's *_stats.json
        from pretrain.settings.preflight import counted_samples
        n_ep = counted_samples(resolve_train_data(str(raw["train_data"])))
    steps = warmup = save_every = eval_every = soft_warmup = 0
    try:
        steps = schedule.to_steps(raw["steps"], "--steps", total_steps=None, global_batch=global_batch,
                                  samples_per_epoch=n_ep)
        kw = dict(total_steps=steps, global_batch=global_batch, samples_per_epoch=n_ep)
        warmup = schedule.to_steps(raw["warmup"], "--warmup", **kw)
        save_every = schedule.to_steps(raw["save_every"], "--save-every", **kw)
        eval_every = schedule.to_steps(raw["eval_every"], "--eval-every", **kw)
        soft_warmup = schedule.to_steps(raw["soft_warmup"], "--soft-warmup", **kw)
    except ValueError as e:
        problems.append(str(e))
    need(steps >= 1, f"--steps {raw['steps']} gives {steps} optimizer steps; it must be at least 1.")
    need(warmup < max(steps, 1) or steps == 0, f"--warmup {raw['warmup']} = {warmup} steps is not shorter "
                                                f"than --steps {steps}.")
    derived.append(f"steps {steps}, warmup {warmup}, save every {save_every or 'end'}, "
                   f"eval every {eval_every or 'end'} (in optimizer steps)")
    if ds.get("optimizer", {}).get("params") is not None:
        ds["optimizer"]["params"].update(lr=lr, weight_decay=float(raw["weight_decay"]))

    if raw["train_data"] is not None:
        raw["train_data"] = resolve_train_data(str(raw["train_data"]))
    nan_spec = tuple(str(raw["debug_nan"]).replace(",", " ").split())
    need(all(s.removeprefix("g").rstrip("+").isdigit() for s in nan_spec),
         f"--debug-nan {raw['debug_nan']!r}: steps like 3,5+ (loss) or g3,g5+ (gradients).")
    fail_spec = str(raw["debug_data_error"]).split("@")
    need(fail_spec == [""] or (len(fail_spec) == 2 and all(x.isdigit() for x in fail_spec)),
         f"--debug-data-error {raw['debug_data_error']!r}: RANK@BATCH like 1@3.")
    resume = raw["resume"] if raw["resume"] not in ("", "none", "None") else None
    if check_files and raw["train_data"] is not None and raw["output_dir"] is not None:
        check_data_and_model(raw, resume, env, problems)
    if problems:
        raise ConfigError(problems)
    return TrainConfig(
        model=raw["model"], loss=raw["loss"], alpha=float(raw["alpha"]), beta=float(raw["beta"]),
        soft_temperature=float(raw["soft_temperature"]), soft_source=raw["soft_source"],
        soft_standardize=bool(raw["soft_standardize"]),
        soft_topk=None if raw["soft_topk"] is None else int(raw["soft_topk"]), soft_warmup_steps=soft_warmup,
        similarity_dtype=str(raw["similarity_dtype"]), tf32=bool(raw["tf32"]),
        soft_image_source=str(raw["soft_image_source"]), soft_text_source=str(raw["soft_text_source"]),
        ema_decay=float(raw["ema_decay"]),
        grad_checkpointing=bool(raw["grad_checkpointing"]), zero_init=bool(raw["zero_init"]),
        train_data=str(raw["train_data"]), train_num_samples=n_ep, data_sampling=str(raw["data_sampling"]),
        tokenizer=str(raw["tokenizer"]),
        workers=int(raw["workers"]), seed=int(raw["seed"]), zeroshot_data=str(raw["zeroshot_data"]),
        retrieval_data=str(raw["retrieval_data"]), eval_batch_size=int(raw["eval_batch_size"]),
        linear_probe_data=str(raw["linear_probe_data"]),
        steps=steps, warmup_steps=warmup, save_every=save_every, eval_every=eval_every,
        log_every=int(raw["log_every"]), lr=lr, min_lr=float(raw["min_lr"]),
        weight_decay=float(raw["weight_decay"]), global_batch=global_batch, micro_batch=micro,
        grad_accum=accum, world_size=env.world_size, contrastive_batch=str(raw["contrastive_batch"]), output_dir=str(raw["output_dir"]), resume=resume,
        keep_checkpoints=int(raw["keep_checkpoints"]), report_to=report_to,
        wandb_project=str(raw["wandb_project"]), max_nonfinite=int(raw["max_nonfinite"]),
        debug_nan=nan_spec, debug_data_error=str(raw["debug_data_error"]), deepspeed_config=ds_path, ds_config=ds,
        specs={k: str(raw[k]) for k in ("steps", "warmup", "save_every", "eval_every", "soft_warmup")},
        derived=tuple(derived))

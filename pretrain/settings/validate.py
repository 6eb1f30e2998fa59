"""Checks behind pretrain.settings.config: the DeepSpeed JSON, the batch arithmetic, files on disk.

Each check appends one sentence per problem to `problems` (naming the bad value and the fix), so a
user sees every mistake at once instead of one per launch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from data.shards import expand_shards
from pretrain.evaluate.specs import check_eval_data
from pretrain.settings import preflight

# Keys DeepSpeed reads only inside "zero_optimization"; at the top level they are silently ignored.
ZERO_KEYS = ("stage", "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size",
             "reduce_scatter", "sub_group_size", "offload_param", "offload_optimizer")
TARGET_SOURCES = ("online", "precomputed", "ema")  # --soft-image-source / --soft-text-source
BATCH_KEYS = {"train_batch_size": "batch_size", "train_micro_batch_size_per_gpu": "micro_batch",
              "gradient_accumulation_steps": "grad_accum"}


def check_ds_config(path: str, cuda: bool, problems: list[str], derived: list[str]) -> dict:
    try:
        ds = json.loads(Path(path).read_text())
    except OSError as e:
        problems.append(f"--deepspeed_config {path}: cannot read it ({e.strerror}); the repo ships "
                        f"ds_configs/zero3_bf16.json, zero2_bf16.json and cpu.json.")
        return {}
    except json.JSONDecodeError as e:
        problems.append(f"--deepspeed_config {path}: not valid JSON ({e}).")
        return {}
    misplaced = [k for k in ds if k in ZERO_KEYS or k.startswith("stage3_")]
    if misplaced:
        problems.append(f"--deepspeed_config {path}: {', '.join(misplaced)} must sit inside "
                        f"\"zero_optimization\"; DeepSpeed ignores them at the top level.")
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    if fp16 and bf16:
        problems.append(f"--deepspeed_config {path}: fp16 and bf16 are both enabled; enable one.")
    elif fp16 and not cuda:
        problems.append(f"--deepspeed_config {path}: fp16 is enabled but there is no GPU; DeepSpeed's "
                        f"CPU accelerator refuses fp16, use bf16 (ds_configs/cpu.json).")
    if bf16:
        # Unset, DeepSpeed 0.19.8 reduce-scatters and accumulates gradients in bf16: a simulated bf16
        # ring sum errs by 4e-3 (relative) at 8 ranks and 1.6e-2 at 256, against 6e-8 in fp32.
        # fp32 unless the JSON says otherwise; the cost is in docs/training.md ("GPU runs").
        ds.setdefault("communication_data_type", "fp32")
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        derived.append(f"gradients: reduced in {ds['communication_data_type']}, accumulated in "
                       f"{ds['data_types']['grad_accum_dtype']}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        problems.append(f"--deepspeed_config {path}: zero_optimization.stage {stage!r} must be 0-3.")
    opt = ds.get("optimizer")
    if not isinstance(opt, dict) or str(opt.get("type", "")).lower() not in ("adam", "adamw"):
        problems.append(f"--deepspeed_config {path}: needs an \"optimizer\" section of type AdamW "
                        f"(got {opt!r}); copy the one in ds_configs/zero3_bf16.json.")
    else:
        params = opt.setdefault("params", {})
        if not cuda and not params.get("torch_adam", False):
            # DeepSpeed's fused Adam on CPU is a C++ op compiled at first use (~55 s here);
            # torch's AdamW is as fast for the small models that train on CPU.
            params["torch_adam"] = True
            derived.append("optimizer: torch AdamW (no GPU; DeepSpeed's fused Adam needs one)")
        from pretrain.runtime.fused_adam import fused_adam_problem, gather_facts
        problem = fused_adam_problem(gather_facts(ds, cuda))
        if problem:
            problems.append(f"--deepspeed_config {path}: {problem}")
        for k in ("lr", "weight_decay"):
            params.pop(k, None) if params.get(k) == "auto" else None
    leftover = [k for k, v in _walk(ds) if v == "auto" and k.split(".")[-1] not in BATCH_KEYS]
    if leftover:
        problems.append(f"--deepspeed_config {path}: \"auto\" is only understood for the batch fields, "
                        f"lr and weight_decay, not {', '.join(leftover)}; give numbers.")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def reconcile_batch(ds: dict, raw: dict, world: int, problems: list[str]):
    """Fill the three DeepSpeed batch fields so that global = micro x accum x world.

    A flag overrides the JSON's number for the same field; "auto" (or absent) is derived from the
    other two. Returns (global, micro, accum) or None after recording the problem.
    """
    vals: dict[str, int | None] = {}
    for key, flag in BATCH_KEYS.items():
        v = raw.get(flag) if raw.get(flag) is not None else ds.get(key, "auto")
        if v == "auto" or v is None:
            vals[key] = None
        elif isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            vals[key] = v
        else:
            problems.append(f"{key} / --{flag.replace('_', '-')} = {v!r} must be a positive integer or \"auto\".")
            return None
    g, m, a = (vals[k] for k in BATCH_KEYS)
    if g is None and m is None:
        problems.append("no batch size: give --batch-size (global) or --micro-batch (per device), or set "
                        "train_batch_size in the DeepSpeed JSON.")
        return None
    a = a if a is not None else (1 if g is None or m is None else None)
    if g is None:
        g = m * a * world
    elif m is None:
        if g % (a * world):
            problems.append(f"global batch {g} is not divisible by accumulation {a} x world size {world}; "
                            f"choose a multiple of {a * world}.")
            return None
        m = g // (a * world)
    elif a is None:
        if g % (m * world):
            problems.append(f"global batch {g} is not divisible by micro batch {m} x world size {world}; "
                            f"choose a multiple of {m * world}.")
            return None
        a = g // (m * world)
    if g != m * a * world:
        problems.append(f"batch arithmetic does not hold: global {g} != micro {m} x accumulation {a} x "
                        f"world size {world} = {m * a * world}; fix one of them or set it to \"auto\".")
        return None
    ds.update(train_batch_size=g, train_micro_batch_size_per_gpu=m, gradient_accumulation_steps=a)
    return g, m, a


def check_target_sources(raw: dict, explicit: dict, problems: list[str]) -> None:
    """--soft-image-source / --soft-text-source / --ema-decay (see pretrain/train/teacher.py).

    A non-online source for a modality that --soft-source does not use is an error, not a silent
    no-op: the user asked for targets the loss would never build (and, for ema, would pay a teacher
    forward for nothing). --loss clip with any of them is reported with the other soft options.
    """
    used = {"both": ("image", "text")}.get(raw["soft_source"], (raw["soft_source"],))
    for m in ("image", "text"):
        v = raw[f"soft_{m}_source"]
        if v not in TARGET_SOURCES:
            problems.append(f"--soft-{m}-source {v!r} must be one of {', '.join(TARGET_SOURCES)}.")
        elif v != "online" and m not in used and raw["loss"] == "softclip":
            problems.append(f"--soft-{m}-source {v} has no effect with --soft-source {raw['soft_source']} "
                            f"(the targets use no {m} features); drop it or use --soft-source both.")
    try:
        decay = float(raw["ema_decay"])
    except (TypeError, ValueError):
        decay = float("nan")
    if not 0.0 <= decay < 1.0:
        problems.append(f"--ema-decay {raw['ema_decay']} must lie in [0, 1) (e.g. 0.999: the teacher "
                        f"averages over ~1000 steps).")
    elif "ema_decay" in explicit and raw["loss"] == "softclip" and not any(
            raw[f"soft_{m}_source"] == "ema" for m in used):
        problems.append(f"--ema-decay {raw['ema_decay']} only applies to an EMA teacher; drop it or set "
                        f"--soft-image-source ema / --soft-text-source ema.")


def missing_fine_members(raw: dict) -> list[tuple[str | None, str]]:
    """What a precomputed source lacks beside the training shards: (modality, sentence) pairs, the
    modality None when fine.json cannot be read at all. No fix in the sentence: the trainer's check
    (below) and slurm/lib/launch.sh each name the fix in their own terms (flags, SOFTCLIP_*)."""
    from data.fine import FINE_MEMBER, read_fine_meta
    used = {"both": ("image", "text")}.get(raw["soft_source"], (raw["soft_source"],))
    wanted = [m for m in used if raw[f"soft_{m}_source"] == "precomputed"]
    if not wanted or raw["loss"] != "softclip":
        return []
    urls = [u for u in expand_shards(raw["train_data"]) if not _is_remote(u)]
    try:
        meta = read_fine_meta(urls)
    except (ValueError, OSError, KeyError) as e:
        return [(None, f"--train-data: cannot read fine.json beside the shards ({e})")]
    missing = []
    for m in wanted:
        member = FINE_MEMBER[m]
        if member not in meta:
            found = (f"the fine.json beside them lists only {', '.join(sorted(meta))}" if meta else
                     f"there is no fine.json beside {raw['train_data']}")
            missing.append((m, f"--soft-{m}-source precomputed needs {member}.npy members in the training "
                               f"shards, but {found}"))
    return missing


def check_fine_members(raw: dict, problems: list[str]) -> None:
    """A precomputed source needs its member described in fine.json beside the training shards."""
    for m, problem in missing_fine_members(raw):
        problems.append(f"{problem}." if m is None else
                        f"{problem}; write them with `python -m data.precompute_fine --data ... --out NEW` and "
                        f"train on NEW, or use --soft-{m}-source online|ema.")


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def resolve_train_data(spec: str) -> str:
    """"embedded" / "embedded:DIR" -> the embedded build's training shards; anything else as is."""
    if spec != "embedded" and not spec.startswith("embedded:"):
        return spec
    from data.embedded.build import DEFAULT_OUT, shard_pattern
    root = DEFAULT_OUT if spec == "embedded" else spec[len("embedded:"):]
    try:
        return shard_pattern("train", root)
    except (OSError, KeyError, ValueError):
        return str(Path(root) / "train-*.tar (not built: run `python -m data.embedded`)")


def check_data_and_model(raw: dict, resume: str | None, env, problems: list[str]) -> None:
    urls = expand_shards(raw["train_data"])
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
    if not urls:
        problems.append(f"--train-data {raw['train_data']!r} names no shards; give a brace pattern "
                        f"('shards/{{00000..00099}}.tar'), a glob ('shards/*.tar'), a folder of .tar files, "
                        f"or 'embedded'.")
    elif missing:
        hint = " (build the embedded shards with `python -m data.embedded`)" if "embedded" in raw["train_data"] else ""
        problems.append(f"--train-data: {len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}{hint}; "
                        f"check the path and the brace range, or point at the folder that holds the .tar files.")
    if urls and not missing:
        check_fine_members(raw, problems)
        preflight.check_sample_count(urls, raw["train_num_samples"], problems)
    if urls and raw.get("data_sampling") == "epochs":
        from data.shards import check_split
        try:
            check_split(len(urls), env.world_size, max(1, int(raw["workers"])))
        except ValueError as e:
            problems.append(f"--data-sampling epochs: {e}")
    tok_dir = Path(raw["tokenizer"])
    if not tok_dir.exists():
        problems.append(f"--tokenizer {tok_dir} does not exist (build the embedded one with "
                        f"`python -m data.embedded`, or point at a trained tokenizer directory).")
    else:
        _check_vocab(raw["model"], tok_dir, problems)
    for flag in ("zeroshot_data", "retrieval_data"):
        problems += check_eval_data(flag, str(raw[flag]))
    if resume not in (None, "latest") and not Path(resume).is_dir():
        problems.append(f"--resume {resume}: no such checkpoint directory; give a tag directory "
                        f"(RUN/checkpoints/step_00000100) or 'latest'.")
    else:
        preflight.check_resume(resume, raw["output_dir"], env.world_size, problems)
    out = Path(raw["output_dir"])
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_probe_rank{env.rank}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        problems.append(f"--output-dir {out} is not writable ({e.strerror}); choose another directory.")


def vocab_override(model: str, vocab_size: int) -> dict:
    """Model overrides that size the text embedding to the tokenizer.

    Named configs leave vocab_size to the tokenizer; a model JSON that states text.vocab_size keeps
    it, and the check below then requires the tokenizer to match instead of silently resizing.
    """
    path = Path(model)
    if path.suffix == ".json" and path.is_file():
        try:
            if "vocab_size" in json.loads(path.read_text()).get("text", {}):
                return {}
        except (ValueError, AttributeError):
            return {}  # get_model_config reports the broken file
    return {"vocab_size": vocab_size}


def _check_vocab(model: str, tok_dir: Path, problems: list[str]) -> None:
    from data.tokenizer import Tokenizer
    from models import get_model_config
    try:  # one message for the flag at fault, not both (issue 13)
        tok = Tokenizer.load(str(tok_dir))
    except (OSError, ValueError, KeyError) as e:
        problems.append(f"--tokenizer {tok_dir}: cannot load it ({e}); point at a tokenizer directory "
                        f"(data.tokenizer writes one; data/embedded/tokenizer is built by `python -m data.embedded`).")
        return
    try:
        mcfg = get_model_config(model, **vocab_override(model, tok.vocab_size))
    except (OSError, ValueError, KeyError) as e:
        problems.append(f"--model {model}: {e}; pick a named config or give a model JSON (models/configs/*.json).")
        return
    t = mcfg.text
    got = (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id)
    want = (t.vocab_size, t.pad_id, t.bos_id, t.eos_id)
    if got != want:
        problems.append(f"tokenizer {tok_dir} has (vocab_size, pad, bos, eos) = {got} but model {model} has "
                        f"{want}; use the tokenizer the model config was written for, or drop "
                        f"text.vocab_size from the model JSON to size it from the tokenizer.")

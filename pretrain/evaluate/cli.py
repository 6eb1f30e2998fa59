"""`python -m pretrain.evaluate`: zero-shot and retrieval of any checkpoint or export, outside training.

    python -m pretrain.evaluate --checkpoint RUN|RUN/checkpoints|TAG_DIR|EXPORT_DIR [--tag latest] \\
        --zeroshot-data imagenet:/data/imagenet/val --retrieval-data clip_benchmark:/data/wds --out res.json
    python -m pretrain.evaluate --checkpoint ... --linear-probe clip_benchmark:/data/wds [--fewshot-k 10]
    torchrun --nproc_per_node 8 -m pretrain.evaluate ...      # or srun (slurm/eval.sh): one rank per GPU

A training checkpoint is merged with DeepSpeed's zero_to_fp32 on the CPU, so it evaluates on any number
of ranks (not only the world size that wrote it), needs none of the run's training flags or data, and
loads whether or not the run had an EMA teacher: only the student's `model.*` weights are kept (the
teacher's `teacher.*` are dropped, as pretrain.export does). With several ranks, rank 0 merges and writes
the weights once (safetensors) and every rank loads them; each rank then holds the whole model and
evaluates its share of every set, and the embeddings are gathered. An export directory is loaded as
written: `native` (models.load_pretrained) or `hf` (transformers CLIPModel with the exported tokenizer and
image-processor statistics) -- which one with --format when the directory holds both.

Exit codes: 0 done; 2 bad arguments or a checkpoint/export that cannot be read (message names it).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from pretrain.checkpoints import checkpoint
from pretrain.runtime.signals import EXIT_CONFIG


class EvalError(RuntimeError):
    """Bad input to the CLI: the message names the value and the fix."""


# ------------------------------------------------------------------------------------------- what to load
def classify(path: Path, fmt: str | None) -> tuple[str, Path]:
    """("checkpoint" | "native" | "hf", the directory to load) for --checkpoint PATH."""
    if not path.exists():
        raise EvalError(f"--checkpoint {path}: no such file or directory.")
    if (path / "checkpoints").is_dir():                       # a run directory
        return "checkpoint", path / "checkpoints"
    if (path / checkpoint.LATEST).is_file() or any(path.glob("step_*")) or (path / checkpoint.MANIFEST).is_file():
        return "checkpoint", path
    subdirs = [f for f in ("native", "hf") if (path / f / "config.json").is_file()]
    if subdirs:                                               # an EXPORT_DIR of pretrain.export
        chosen = fmt or subdirs[0]
        if chosen not in subdirs:
            raise EvalError(f"--format {chosen}: {path} holds only {', '.join(subdirs)}.")
        return chosen, path / chosen
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        cfg = json.loads((path / "config.json").read_text())
        return ("hf" if "architectures" in cfg or "text_config" in cfg else "native"), path
    raise EvalError(f"--checkpoint {path}: neither a run directory, RUN/checkpoints, a checkpoint tag, nor an "
                    f"export (pretrain.export writes EXPORT_DIR/native and EXPORT_DIR/hf).")


def checkpoint_tag(ckpt_dir: Path, tag: str) -> tuple[Path, str]:
    """(the checkpoints folder, a complete tag name) for a checkpoints folder or a tag directory."""
    if (ckpt_dir / checkpoint.MANIFEST).is_file() or ckpt_dir.name.startswith("step_"):
        ckpt_dir, tag = ckpt_dir.parent, ckpt_dir.name
    from pretrain.checkpoints.checkpoint import resolve_tag
    try:
        return ckpt_dir, resolve_tag(ckpt_dir, tag)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from e


def load_checkpoint(ckpt_dir: Path, tag: str):
    """(model, tokenizer, model_config) of a training checkpoint's student, fp32 on the CPU."""
    from data.tokenizer import Tokenizer
    from models import CLIP, ModelConfig
    from pretrain.checkpoints.checkpoint import fp32_state_dict
    run = ckpt_dir.parent
    for p in (run / "model_config.json", run / "tokenizer"):
        if not p.exists():
            raise EvalError(f"{p} not found; the trainer writes it into the run directory beside checkpoints/.")
    config = ModelConfig.from_json(run / "model_config.json")
    tokenizer = Tokenizer.load(str(run / "tokenizer"), context_length=config.text.context_length)
    model = CLIP(config)
    model.load_state_dict(fp32_state_dict(ckpt_dir, tag), strict=True)  # student only: no teacher.* keys
    return model.eval(), tokenizer, config


def load_native(path: Path):
    from data.tokenizer import Tokenizer
    from models import load_pretrained
    model = load_pretrained(path)
    if not (path / "tokenizer").exists():
        raise EvalError(f"{path / 'tokenizer'} not found; export with pretrain.export, which copies the tokenizer.")
    return model, Tokenizer.load(str(path / "tokenizer"), context_length=model.config.text.context_length), model.config


class HFCLIP(torch.nn.Module):
    """A transformers CLIPModel behind our encode_image / encode_text (normalised embeddings)."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def encode_image(self, images):
        from models.export_hf import hf_features  # transformers 5 may wrap the features in a ModelOutput
        return F.normalize(hf_features(self.hf.get_image_features(pixel_values=images)), dim=-1)

    def encode_text(self, ids):
        from models.export_hf import hf_features
        mask = ids != self.pad_id
        return F.normalize(hf_features(self.hf.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)


class HFTokenizer:
    """AutoTokenizer called like data.tokenizer.Tokenizer: texts -> (input_ids, attention_mask)."""

    def __init__(self, path: Path):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.context_length = self.tok.model_max_length

    def __call__(self, texts):
        out = self.tok(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                       return_tensors="pt")
        return out["input_ids"], out["attention_mask"].bool()


def load_hf(path: Path):
    from transformers import CLIPModel
    model = HFCLIP(CLIPModel.from_pretrained(str(path)).eval())
    tokenizer = HFTokenizer(path)
    proc = json.loads((path / "preprocessor_config.json").read_text())
    tok = tokenizer.tok
    model.pad_id = tok.pad_token_id
    # what the eval loader and the lockstep dummy read from a ModelConfig
    config = SimpleNamespace(
        vision=SimpleNamespace(image_size=int(proc["crop_size"]["height"]), mean=tuple(proc["image_mean"]),
                               std=tuple(proc["image_std"])),
        text=SimpleNamespace(context_length=tokenizer.context_length, pad_id=tok.pad_token_id,
                             bos_id=tok.bos_token_id, eos_id=tok.eos_token_id))
    return model.eval(), tokenizer, config


# ------------------------------------------------------------------------------------------- ranks
def _agree(ok: bool, device) -> bool:
    """Collective: True when every rank is ok (a failure on one rank ends all of them, no hang)."""
    import torch.distributed as dist
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def load_on_ranks(kind: str, path: Path, tag: str, env, device, scratch: Path):
    """(model, tokenizer, model config, what was loaded) on every rank. A checkpoint is merged once, by
    rank 0, into `scratch`, which every rank then loads."""
    if kind == "native":
        return (*load_native(path), path)
    if kind == "hf":
        return (*load_hf(path), path)
    ckpt_dir, tag = checkpoint_tag(path, tag)
    if env.world_size == 1:
        return (*load_checkpoint(ckpt_dir, tag), ckpt_dir / tag)
    error = None
    if env.is_main:
        try:
            from models import save_native
            model, _, config = load_checkpoint(ckpt_dir, tag)
            save_native(model.state_dict(), config, scratch, ckpt_dir.parent / "tokenizer")
        except Exception as e:  # reported below; every rank must reach the agreement first
            error = e
    if not _agree(error is None, device):
        if error is not None:
            raise error
        raise EvalError(f"rank 0 could not merge {ckpt_dir / tag} (its message says why).")
    return (*load_native(scratch), ckpt_dir / tag)


def evaluate(args, env, device, log=print) -> dict:
    from pretrain.evaluate.evalsets import EvalOptions, EvalRunner
    kind, path = classify(Path(args.checkpoint), args.format)
    out = Path(args.out) if args.out else default_out(kind, path, args.tag)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.parent / ".merged_weights"
    error = None
    try:
        model, tokenizer, config, source = load_on_ranks(kind, path, args.tag, env, device, scratch)
    except Exception as e:  # re-raised below, after every rank has learnt of it: no rank waits forever
        error = e
    # also: every rank has read the merged weights before rank 0 removes them
    if not _agree(error is None, device):
        raise error or EvalError("another rank could not load the model; its message says why.")
    model = model.to(device)
    opts = EvalOptions(args.zeroshot_data, args.retrieval_data, args.batch_size, args.workers, str(out.parent))
    quiet = SimpleNamespace(log=lambda *a, **k: None, info=log if env.is_main else (lambda m: None))
    runner = EvalRunner(opts, env, tokenizer, config, quiet)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        metrics = runner.measure(model, device)
        if args.linear_probe != "none":  # features at --precision; the probe itself trains in fp32
            from pretrain.evaluate import linear_probe
            metrics.update(linear_probe.run(model, config, env, device, args.linear_probe, linear_probe.options(args),
                                            args.batch_size, args.workers, log=log))
    result = {"checkpoint": str(source), "format": kind, "precision": args.precision, "world_size": env.world_size,
              "zeroshot_data": args.zeroshot_data, "retrieval_data": args.retrieval_data,
              "linear_probe": args.linear_probe, "metrics": metrics}
    if env.is_main:
        out.write_text(json.dumps(result, indent=2) + "\n")
        shutil.rmtree(scratch, ignore_errors=True)
        for k, v in metrics.items():
            if k.endswith(("top1", "top5", "R@1", "R@5")):
                log(f"{k:>40}  {100 * v:.2f}%")
        log(f"results: {out}")
    return result


def default_out(kind: str, path: Path, tag: str) -> Path:
    if kind == "checkpoint":
        ckpt_dir, name = checkpoint_tag(path, tag)
        return ckpt_dir.parent / "eval" / name / "results.json"
    return path.parent / "eval" / path.name / "results.json"


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a run dir, RUN/checkpoints, a tag dir (RUN/checkpoints/step_00001000) or an export dir")
    p.add_argument("--tag", default="latest", help="checkpoint tag when --checkpoint is a run or its checkpoints/")
    p.add_argument("--format", choices=("native", "hf"), help="which export of an EXPORT_DIR (default: native)")
    p.add_argument("--zeroshot-data", default="embedded",
                   help="'embedded', 'none', imagenet[-v2|-r|-sketch|-a]:PATH, clip_benchmark:ROOT, a class folder "
                        "or labelled shards; several joined by commas")
    p.add_argument("--retrieval-data", default="embedded",
                   help="'embedded', 'none', clip_benchmark:ROOT or image-text shards; several joined by commas")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward on each rank")
    p.add_argument("--workers", type=int, default=2, help="data loader processes per rank")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default: bf16 on GPUs, fp32 on CPU")
    p.add_argument("--out", help="results JSON (default: RUN/eval/<tag>/results.json or EXPORT/eval/<fmt>/results.json)")
    from pretrain.evaluate import linear_probe
    linear_probe.add_arguments(p)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0:
        p.error(f"--batch-size {args.batch_size} must be >= 1 and --workers {args.workers} >= 0.")
    try:
        linear_probe.options(args)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    from pretrain.runtime import dist as pdist
    args = parse(argv)
    try:
        env = pdist.from_environ()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    cuda = torch.cuda.is_available()
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    from pretrain.evaluate.specs import check_eval_data
    from pretrain.evaluate.linear_probe import check_spec
    problems = check_eval_data("zeroshot_data", args.zeroshot_data) + check_eval_data("retrieval_data", args.retrieval_data)
    problems += check_spec(args.linear_probe)
    if problems:
        if env.is_main:
            print("error: " + "\n  ".join(problems), file=sys.stderr)
        return EXIT_CONFIG
    from pretrain.runtime.collectives import init_distributed
    init_distributed(env, cuda)  # also with one rank: the collectives run as they do on many
    device = torch.device("cuda", env.local_rank) if cuda else torch.device("cpu")
    try:
        evaluate(args, env, device, log=lambda m: print(m, file=sys.stderr, flush=True) if env.is_main else None)
    except (EvalError, OSError, ValueError) as e:  # unreadable input: one message, exit 2
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

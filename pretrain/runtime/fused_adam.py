"""DeepSpeed's FusedAdam: will a GPU run have to compile it, can it, and building it once per job.

On GPUs, an "AdamW" optimizer section without `torch_adam` (ds_configs/zero3_bf16.json) makes
deepspeed.initialize load the fused_adam CUDA op. Unless DeepSpeed was installed with it prebuilt
(`DS_BUILD_FUSED_ADAM=1 pip install deepspeed`), that is a JIT compile with ninja and nvcc, which
also needs CUDA_HOME (DeepSpeed compares the toolkit's version with torch's). Without them every
rank fails inside deepspeed.initialize, after the model is built and the data started; with them, but
no shared build, every rank of every node compiles at once. So:

  * `fused_adam_problem` (pure: facts in, message out) is checked with the run configuration, on
    every rank before any work, and ends the run with exit 2 and the fixes;
  * `python -m pretrain.fused_adam DS_CONFIG` builds the op once into TORCH_EXTENSIONS_DIR; the Slurm
    scripts run it in one task before srun starts the ranks (slurm/lib/launch.sh), and the ranks then
    find the build up to date and only load it.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Facts:
    cuda: bool            # training runs on GPUs
    torch_adam: bool      # the optimizer section asks for torch's AdamW
    offload: bool         # optimizer offloaded to CPU/NVMe: DeepSpeedCPUAdam, not FusedAdam
    prebuilt: bool        # deepspeed was installed with the op compiled in
    cuda_home: str | None
    nvcc: str | None
    ninja: bool


def needs_jit(f: Facts) -> bool:
    """Whether deepspeed.initialize will JIT-compile FusedAdam."""
    return f.cuda and not f.torch_adam and not f.offload and not f.prebuilt


def fused_adam_problem(f: Facts) -> str | None:
    """None when FusedAdam is not used, prebuilt or buildable; else one message with the fixes."""
    if not needs_jit(f):
        return None
    missing = [what for what, ok in (("nvcc", f.nvcc), ("CUDA_HOME", f.cuda_home), ("ninja", f.ninja)) if not ok]
    if not missing:
        return None
    return (f"the optimizer is DeepSpeed's FusedAdam, which this DeepSpeed install does not include prebuilt and "
            f"which cannot be compiled here ({', '.join(missing)} not found). Fix one of: load a CUDA toolkit "
            f"(e.g. `module load cuda`, or set CUDA_HOME so that $CUDA_HOME/bin/nvcc exists; ninja comes with "
            f"`pip install ninja`); reinstall DeepSpeed with the op prebuilt "
            f"(`DS_BUILD_FUSED_ADAM=1 pip install --no-build-isolation deepspeed==0.19.8`); or use torch's "
            f"AdamW by adding \"torch_adam\": true to the optimizer params of the DeepSpeed JSON.")


def gather_facts(ds: dict, cuda: bool) -> Facts:
    """The facts for a resolved DeepSpeed config, from this process's environment."""
    params = (ds.get("optimizer") or {}).get("params") or {}
    offload = str(((ds.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none"))
    prebuilt = cuda_home = nvcc = None
    ninja = False
    if cuda and not params.get("torch_adam", False):  # the imports below cost a second; only when it matters
        from deepspeed.git_version_info import installed_ops
        from torch.utils import cpp_extension
        prebuilt = bool(installed_ops.get("fused_adam", False))
        cuda_home = cpp_extension.CUDA_HOME
        nvcc = shutil.which("nvcc") or (str(Path(cuda_home, "bin", "nvcc"))
                                        if cuda_home and Path(cuda_home, "bin", "nvcc").is_file() else None)
        ninja = cpp_extension.is_ninja_available()
    return Facts(cuda=cuda, torch_adam=bool(params.get("torch_adam", False)), offload=offload in ("cpu", "nvme"),
                 prebuilt=bool(prebuilt), cuda_home=cuda_home, nvcc=nvcc, ninja=ninja)


def prebuild(ds_path: str, cuda: bool | None = None) -> int:
    """Build FusedAdam once if this config needs it; exit 0 (built, or nothing to build) or 2 (cannot).

    `cuda` defaults to torch.cuda.is_available(); bench/gpu_check.py passes True (it runs only on a
    GPU), which also lets its CPU tests walk the same checks and build."""
    import json

    import torch
    ds = json.loads(Path(ds_path).read_text())
    facts = gather_facts(ds, cuda=torch.cuda.is_available() if cuda is None else cuda)
    if not needs_jit(facts):
        reason = ("no GPU here" if not facts.cuda else "torch_adam" if facts.torch_adam else
                  "optimizer offloaded" if facts.offload else "prebuilt in this DeepSpeed install")
        print(f"== FusedAdam: nothing to build ({reason})")
        return 0
    problem = fused_adam_problem(facts)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    import os

    from deepspeed.ops.op_builder import FusedAdamBuilder
    FusedAdamBuilder().load(verbose=False)
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR unset)")
    print(f"== FusedAdam: built under {where}; the ranks load it from there")
    return 0


def main(argv=None) -> int:
    """`python -m pretrain.fused_adam DS_CONFIG.json` (pretrain/fused_adam.py)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pretrain.fused_adam DS_CONFIG.json", file=sys.stderr)
        return 2
    return prebuild(argv[0])

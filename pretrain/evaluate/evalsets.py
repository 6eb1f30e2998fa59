"""Which evaluation sets a run uses, and running them from inside training.

--zeroshot-data:  "embedded" (Fashion-MNIST val and test splits and the held-out emoji's categories, built
                  by `python -m data.embedded`; "embedded:DIR" for a build in DIR),
                  "none", an ImageNet-style folder (one sub-folder per class, folder names are the
                  class names; optional classnames.txt / templates.txt beside them), or labelled
                  shards (`.cls` members) with classnames.txt (one per line, label order) and
                  optionally templates.txt ("{}" marks the class) in the shards' directory.
--retrieval-data: "embedded[:DIR]" (held-out emoji image-name pairs, val and test), "none", or image-text shards
                  (one caption per image).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from pretrain.evaluate import metrics as ev
from pretrain.evaluate.evalset import EvalSet, FolderLoader
from pretrain.evaluate.metrics import DEFAULT_TEMPLATES


@dataclass(frozen=True)
class EvalOptions:
    """The part of the run config EvalRunner reads: TrainConfig has these fields, and the evaluation CLI
    builds one from its own flags."""
    zeroshot_data: str
    retrieval_data: str
    eval_batch_size: int
    workers: int
    output_dir: str                      # RUN: diagnostics go to RUN/diagnostics, results to RUN/results.json
    linear_probe_data: str = "none"      # a linear probe at the final evaluation (linear_probe.py SPEC), or "none"
    train_data: str = ""                 # the diagnostics' probe when there is no retrieval set ("": none)

    @classmethod
    def of(cls, cfg) -> "EvalOptions":
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


def _lines(path: Path) -> tuple:
    return tuple(s.strip() for s in path.read_text().splitlines() if s.strip())


# Validation splits too: choices (bench/reproduce.py's ablation, early stopping) are made on
# "-val", and "-test" is only reported. Together they add ~1,200 images per evaluation.
EMBEDDED_ZEROSHOT = ("fmnist-val", "fmnist-test", "emoji-category-val", "emoji-category-test")
EMBEDDED_RETRIEVAL = ("emoji-val", "emoji-test")


def embedded_root(spec: str):
    """"embedded" -> the default build folder, "embedded:DIR" -> DIR, anything else -> None."""
    if spec == "embedded":
        from data.embedded.build import DEFAULT_OUT
        return DEFAULT_OUT
    return spec[len("embedded:"):] if spec.startswith("embedded:") else None


def resolve(zeroshot: str, retrieval: str) -> list[EvalSet]:
    """The eval sets of the two flags; each may join several specs with commas (pretrain/evaluate/benchmarks.py)."""
    from pretrain.evaluate.benchmarks import benchmark_sets, is_benchmark, split_specs
    sets = []
    for kind, value in (("zeroshot", zeroshot), ("retrieval", retrieval)):
        for spec in split_specs(value):
            if is_benchmark(spec):
                sets += benchmark_sets(spec, kind)
            else:
                sets += _resolve_one(kind, spec)
    return sets


def _resolve_one(kind: str, spec: str) -> list[EvalSet]:
    sets = []
    if kind == "zeroshot" and (root := embedded_root(spec)) is not None:
        from data.embedded.build import shard_pattern
        from data.evalsets import ZEROSHOT_SETS
        for name in EMBEDDED_ZEROSHOT:
            shard_set, names, templates = ZEROSHOT_SETS[name]
            sets.append(EvalSet("zeroshot", name, shard_pattern(shard_set, root), tuple(names), tuple(templates)))
    elif kind == "zeroshot" and spec != "none":
        zeroshot = spec
        root = Path(zeroshot)
        folder = root if root.is_dir() and not list(root.glob("*.tar")) else None
        meta = root if root.is_dir() else Path(zeroshot.split("{")[0]).parent
        names = _lines(meta / "classnames.txt") if (meta / "classnames.txt").is_file() else (
            tuple(sorted(p.name.replace("_", " ") for p in root.iterdir() if p.is_dir())) if folder else ())
        if not names:
            raise FileNotFoundError(f"--zeroshot-data {zeroshot}: no class names; put classnames.txt "
                                    f"(one per line, in label order) beside the shards.")
        templates = _lines(meta / "templates.txt") if (meta / "templates.txt").is_file() else DEFAULT_TEMPLATES
        sets.append(EvalSet("zeroshot", root.name or "zeroshot", zeroshot, names, templates))
    if kind == "retrieval" and (root := embedded_root(spec)) is not None:
        from data.embedded.build import shard_pattern
        from data.evalsets import RETRIEVAL_SETS
        for name in EMBEDDED_RETRIEVAL:
            sets.append(EvalSet("retrieval", name, shard_pattern(RETRIEVAL_SETS[name], root)))
    elif kind == "retrieval" and spec != "none":
        sets.append(EvalSet("retrieval", Path(spec.split("{")[0]).parent.name or "retrieval", spec))
    return sets


class EvalRunner:
    # Decoded eval batches are kept between evaluations while a set's share on this rank stays under
    # this size: re-decoding the embedded sets' 3,572 PNGs cost ~4-15 s per evaluation on 2 cores
    # (more than 300 training steps of tiny-test between two evaluations). ImageNet-size sets at
    # 224 px exceed it and stream every time.
    CACHE_BYTES = 256 * 2**20

    def __init__(self, cfg, env, tokenizer, model_cfg, log):
        self.cfg, self.env, self.tokenizer, self.model_cfg, self.log = cfg, env, tokenizer, model_cfg, log
        self.sets = resolve(cfg.zeroshot_data, cfg.retrieval_data)
        self._cached: dict[str, list] = {}
        self._too_big: set[str] = set()
        from pretrain.evaluate.diagnostics import Diagnostics
        self.diagnostics = Diagnostics(cfg, env, tokenizer, model_cfg, self.sets)  # the soft-target probe

    def batches(self, s: EvalSet):
        """This rank's batches of one set: from memory after the first pass when they fit."""
        if s.name in self._cached:
            yield from self._cached[s.name]
            return
        kept, size = [], 0
        for batch in self.loader(s):
            if s.name not in self._too_big:
                size += sum(t.numel() * t.element_size() for t in batch.values() if torch.is_tensor(t))
                if size > self.CACHE_BYTES:
                    self._too_big.add(s.name)
                    kept = []
                else:
                    kept.append(batch)
            yield batch
        if s.name not in self._too_big:
            self._cached[s.name] = kept

    def loader(self, s: EvalSet):
        v = self.model_cfg.vision
        if s.kind == "zeroshot" and Path(s.data).is_dir() and not list(Path(s.data).glob("*.tar")):
            return FolderLoader(s.data, self.model_cfg, self.cfg.eval_batch_size, self.env.rank,
                                self.env.world_size, self.cfg.workers)
        from data import make_eval_loader
        from pretrain.runtime.workers import iterate
        return iterate(make_eval_loader(s.data, self.tokenizer, batch_size=self.cfg.eval_batch_size,
                                image_size=v.image_size, mean=v.mean, std=v.std, rank=self.env.rank,
                                world_size=self.env.world_size, num_workers=min(1, self.cfg.workers),
                                with_labels=s.kind == "zeroshot", require_text=s.kind == "retrieval"))

    def measure(self, model, device) -> dict:
        """Collective: every rank evaluates its share of every set; {"<set>/<metric>": value}."""
        flat = {}
        for s in self.sets:
            if s.kind == "zeroshot":
                r = ev.zeroshot(model, self.tokenizer, self.batches(s), s.classnames, s.templates,
                                device, self.model_cfg, self.cfg.eval_batch_size)
            elif s.multi_caption:
                r = ev.retrieval_captions(model, self.tokenizer, self.batches(s), device, self.model_cfg)
            else:
                r = ev.retrieval(model, self.batches(s), device, self.model_cfg)
            flat.update({f"{s.name}/{k}": v for k, v in r.items()})
        return flat

    def run(self, engine, step: int, final: bool = False) -> dict:
        """Collective: every rank evaluates its share; returns {"step", "<set>/<metric>": value}."""
        engine.eval()
        flat = self.measure(engine.module.model, engine.device)
        if final and self.cfg.linear_probe_data != "none":  # minutes on ImageNet: the final evaluation only
            from pretrain.evaluate import linear_probe
            try:
                flat.update(linear_probe.run(engine.module.model, self.model_cfg, self.env, engine.device,
                                             self.cfg.linear_probe_data, linear_probe.ProbeOptions(),
                                             self.cfg.eval_batch_size, self.cfg.workers, log=self.log.info))
            except ValueError as e:  # raised alike on every rank (gathered data); the final checkpoint comes next
                self.log.info(f"linear probe skipped: {e}")
        flat.update(self.diagnostics.run(engine, step, Path(self.cfg.output_dir)))  # RUN/diagnostics/step_*.png
        engine.train()
        self.log.log(step, flat, kind="eval")
        shown = ", ".join(f"{k} {v:.3f}" for k, v in flat.items()
                          if k.endswith(("top1", "R@1")) and "-val/" not in k)
        self.log.info(f"eval @ step {step}: {shown or 'no eval sets'}")
        return {"step": step, **flat}

    def write_results(self, final: dict, history: list, run: dict) -> None:
        """RUN/results.json: the final evaluation, the history, and `run` ({"model", "loss", "steps"})."""
        path = Path(self.cfg.output_dir) / "results.json"
        path.write_text(json.dumps({"final": final, "history": history, **run}, indent=2) + "\n")

"""What bench/reproduce.py compares: the loss settings (each a set of trainer flags), the ablation and the
20% screen, the paired comparisons and the plans (budget, seeds, noise levels). How the runs are made and
reported lives in reproduce.py and reproduce_report.py."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from reproduce_features import PRETRAINED, PRETRAINED_224, TRUE_CLASS  # (bench/ is on sys.path)

# The paper's loss settings (the starting point of the ablation).
PAPER = {"alpha": 0.2, "beta": 1.0, "soft_temperature": 0.1, "soft_source": "both"}


@dataclass(frozen=True)
class Setting:
    """A named loss configuration: trainer flags on top of the common ones."""
    name: str
    loss: str = "softclip"
    flags: dict = field(default_factory=dict)  # option name (underscores) -> value; True for a switch
    features: str | None = None                # trains on a precomputed-feature set (reproduce_features)

    def argv(self) -> list[str]:
        out = ["--loss", self.loss]
        for k, v in self.flags.items():
            out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
        return out


def soft(name: str, features: str | None = None, **changes) -> Setting:
    return Setting(name, "softclip", {**PAPER, **changes}, features)


def image_targets(name: str, features: str, **changes) -> Setting:
    """Targets from precomputed image regions only (the paper's detector role)."""
    return soft(name, features, soft_source="image", soft_image_source="precomputed", **changes)


CLIP = Setting("CLIP", "clip")
# The trainer's default decay (0.999) suits long runs; over a few hundred steps it would leave the
# teacher ~75% at its initialisation, so the sweep uses a half-life of ~70 steps.
EMA_DECAY = 0.99
ONLINE_B0 = soft("online targets, β 0 (the trainer's default)", beta=0.0)
CONTROL_B0 = image_targets("true-class image (control), β 0", TRUE_CLASS, alpha=0.5, beta=0.0)
CONTROL_B1 = image_targets("true-class image (control), β 1", TRUE_CLASS, alpha=0.5)
MOBILENET_B1 = image_targets("MobileNetV2 image, α 0.5, β 1", PRETRAINED, alpha=0.5)
MOBILENET_A02_B1 = image_targets("MobileNetV2 image, α 0.2, β 1", PRETRAINED)
MOBILENET_224_B1 = image_targets("MobileNetV2 224 px 3x3 image, α 0.5, β 1", PRETRAINED_224, alpha=0.5)
MOBILENET_MINILM_B1 = soft("MobileNetV2 image + MiniLM text, α 0.5, β 1", PRETRAINED, alpha=0.5,
                           soft_image_source="precomputed", soft_text_source="precomputed")
ABLATION = [
    soft("paper (α 0.2, β 1, τ_s 0.1, both)"),
    ONLINE_B0,
    soft("EMA teacher, β 0", soft_image_source="ema", soft_text_source="ema", ema_decay=EMA_DECAY, beta=0.0),
    soft("MiniLM text, β 0", PRETRAINED, soft_source="text", soft_text_source="precomputed", beta=0.0),
    image_targets("MobileNetV2 image, α 0.2, β 0", PRETRAINED, beta=0.0),
    image_targets("MobileNetV2 image, α 0.5, β 0", PRETRAINED, alpha=0.5, beta=0.0),
    MOBILENET_A02_B1,
    MOBILENET_B1,
    MOBILENET_MINILM_B1,
    CONTROL_B0,
    CONTROL_B1,
]
ABLATION_NOISE = 0.2
# Issue 24's screen at 20% noise, where the recipe trailed CLIP (-1.6 [-4.1, +0.8]): its neighbours, chosen
# by `python bench/target_quality.py` (no training). At τ_s 0.1 the MobileNetV2 targets are flat (S_ii 0.41,
# H(S) 3.1 nats) and only 29% of their off-diagonal mass lands on the image's own class (the control: 100%),
# so they move a third of the target onto mostly wrong captions. A top-8 neighbourhood doubles that share
# (58%); τ_s 0.05 keeps S nearly one-hot (S_ii 0.92); α 0.2 moves less mass (the paper's α, and the best
# label-free setting of the Open Clip Art screen); MiniLM text features add the caption side. Added after
# those five: the same network at 224 px pooled to 3x3 regions (docs/targets.md's best 1-NN), which changes the
# features, not their shaping.
GAP_SCREEN = [
    MOBILENET_B1,
    MOBILENET_A02_B1,
    image_targets("MobileNetV2 image, α 0.5, β 1, top-8", PRETRAINED, alpha=0.5, soft_topk=8),
    image_targets("MobileNetV2 image, α 0.5, β 1, τ_s 0.05", PRETRAINED, alpha=0.5, soft_temperature=0.05),
    MOBILENET_MINILM_B1,
    MOBILENET_224_B1,
]
# What each table compares with CLIP, and why: the label-free recipe (the headline), the ceiling (--control),
# the zero-setup fallback (--online).
HEADLINE = [(MOBILENET_B1, "the label-free recipe: ImageNet MobileNetV2 image targets")]
CONTROL = (CONTROL_B1, "the positive control: true-class image targets (reads labels, the ceiling)")
ONLINE = (ONLINE_B0, "the zero-setup fallback: online targets")


@dataclass(frozen=True)
class Plan:
    steps: int
    batch: int
    seeds: int
    noises: tuple
    control_seeds: int  # the control is a ceiling, not the question: fewer seeds (the first ones)
    model: str = "tiny-test"

    @property
    def budget(self) -> str:
        """The budget in run names: "1500x128", and the model after it unless it is tiny-test (the names
        the sweeps had before a plan could choose its model), so two budgets never share a run folder."""
        model = "" if self.model == "tiny-test" else "_" + re.sub(r"[^A-Za-z0-9]+", "-", self.model).strip("-")
        return f"{self.steps}x{self.batch}{model}"


PLANS = {
    # (CLIP, MobileNetV2) x 2 noises x 5 seeds = 20 runs of 9.3 / 11.9 min on one core each, two at a time
    # on 2 cores (47.4 + 60.3 min measured), and a MobileNetV2 + MiniLM precompute per noise (~6 min):
    # ~114 min. --control adds 6 runs (34.7 min measured) and a true-class build per noise (~0.5 min).
    # 0% noise is not in the default plan: issue 15 asks about 20% and 40% noise. Re-run at 20% after the data
    # order changed (issue 24), CLIP's std there was 2.3, and at 40% 4.1 (3.3 over 10 seeds, `--noise 0.4
    # --seeds 10`): over the 2-point bar that chose this budget (docs/reproduction.md). More steps: not tried.
    "default": Plan(steps=1500, batch=128, seeds=5, noises=(0.2, 0.4), control_seeds=3),
    # 1 seed at 40% noise, 250 steps: a check that the whole pipeline works and of the sign of the effect.
    "quick": Plan(steps=250, batch=128, seeds=1, noises=(0.4,), control_seeds=1),
}
# --set openclipart: the captions are as written (noise 0 = nothing swapped). Budgets measured on build
# version 2 (27 classes, 638 test drawings; chance 3.7%, so 3x chance is 11.1%), CLIP over 5 seeds:
#   tiny-test, 1,500 x 128: 10.6 +- 1.98 (2.85x chance: misses the 3x bar by 0.5 points)
#   tiny, 750 x 128:        11.4 +- 1.6  (3.07x chance, std <= 2: meets both, so it is the plan)
# The plan's 10 runs took ~10 (CLIP) and ~12.5 (recipe) min each on one core, two at a time: 55.1 min of
# wall time on 2 cores (the precompute, ~2 min, was already there). Build version 1 (21 classes, 424 test
# drawings) gave tiny-test 15.1 +- 3.2 (docs/reproduction.md).
# "quick" stays on tiny-test: it checks the pipeline, not the budget.
REAL_PLANS = {"default": Plan(steps=750, batch=128, seeds=5, noises=(0.0,), control_seeds=3, model="tiny"),
              "quick": Plan(steps=250, batch=128, seeds=1, noises=(0.0,), control_seeds=1)}


def slug(setting: Setting) -> str:
    """The setting's name in ASCII, for run directories and the command line (`--compare`)."""
    ascii_name = setting.name.translate(str.maketrans({"α": "alpha", "β": "beta", "τ": "tau"}))
    out = "".join(c if c.isascii() and c.isalnum() else "-" for c in ascii_name).strip("-").lower()
    while "--" in out:
        out = out.replace("--", "-")
    return out


def screened_setting(name: str) -> Setting:
    """An ablation or screen setting by its slug (`--compare`), or a message listing them."""
    known = {slug(s): s for s in [*ABLATION, *GAP_SCREEN]}
    if name not in known:
        raise SystemExit(f"--compare {name!r} is not an ablation or screen setting; one of: {', '.join(known)}.")
    return known[name]

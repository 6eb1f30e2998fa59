"""Captions and prompts for the embedded data, written for this project.

Training captions and evaluation prompts are disjoint on purpose: zero-shot accuracy measured with
prompts the text tower has seen verbatim would overstate what it learned. A test checks that no
formatted evaluation prompt equals any training caption.

Fashion-MNIST training captions combine one of many templates with one of several synonyms per
class, so a class is named in many ways (as web captions name things), while the zero-shot
class names and prompts below are plain and fixed. Emoji captions come from the Unicode names
and short names shipped with the images; names share words across emoji ("face", "hand",
"flag", "cat") and so give real many-to-many text overlap.
"""

from __future__ import annotations

import random

# Fashion-MNIST label order (0..9), as documented by Zalando.
FMNIST_CLASSNAMES = ("t-shirt", "trousers", "pullover", "dress", "coat",
                     "sandal", "shirt", "sneaker", "bag", "ankle boot")

# Noun phrases with their own article, so every template reads naturally.
FMNIST_SYNONYMS = (
    ("a t-shirt", "a tee", "a tee shirt", "a short-sleeved top", "a plain top", "a casual t-shirt"),
    ("trousers", "a pair of trousers", "a pair of pants", "slacks", "long pants", "a pair of jeans"),
    ("a pullover", "a sweater", "a jumper", "a knitted sweater", "a long-sleeved pullover", "a sweatshirt"),
    ("a dress", "a summer dress", "a gown", "a frock", "a long dress", "a sleeveless dress"),
    ("a coat", "a jacket", "an overcoat", "a winter coat", "a parka", "a long coat"),
    ("a sandal", "a pair of sandals", "a summer sandal", "an open shoe", "a strappy sandal", "a flip-flop"),
    ("a shirt", "a button-up shirt", "a collared shirt", "a blouse", "a dress shirt", "a long-sleeved shirt"),
    ("a sneaker", "a trainer", "a running shoe", "a sports shoe", "a canvas sneaker", "a low-top sneaker"),
    ("a bag", "a handbag", "a purse", "a tote bag", "a shoulder bag", "a leather bag"),
    ("an ankle boot", "a short boot", "a bootie", "a heeled ankle boot", "a chelsea boot", "a lace-up boot"),
)

FMNIST_TRAIN_TEMPLATES = (
    "{}", "a photo of {}", "a grayscale photo of {}", "a black and white picture of {}",
    "{} on a black background", "product photo: {}", "a small image of {}", "an image showing {}",
    "a low resolution photo of {}", "catalogue picture of {}", "this is {}", "{} for sale",
    "a close-up of {}", "{} in an online shop", "fashion item: {}", "a thumbnail of {}",
    "{}, photographed from above", "a blurry photo of {}", "new arrival: {}", "my favourite item, {}",
    "{} in grayscale", "{}, cheap", "shop listing with {}", "{}, front view",
)

# Zero-shot prompts. Two rules, both tested: no prompt equals a training caption (the templates
# are unseen sentences), and every word of a prompt occurs in the training captions (unseen
# combinations of seen words, as zero-shot prompts are for a web-trained CLIP). Class names are
# written as captions write them, with their article ("a t-shirt", "trousers"). An earlier set
# put "the" and a final "." in every prompt, neither of which any training caption contains: a
# causal text tower pools at EOS right after the never-trained ".", and that set measured the
# distribution shift more than what the model learned (tiny-test after 200 steps: 24% with it,
# 56% with training-style prompts on the same model).
FMNIST_PROMPT_NAMES = tuple(synonyms[0] for synonyms in FMNIST_SYNONYMS)
FMNIST_EVAL_TEMPLATES = (
    "a close-up photo of {}", "an image of {}", "a grayscale picture of {}", "a small black and white photo of {}",
    "{}, photographed in a shop", "a product photo of {}", "{} on a background", "a low resolution image of {}",
)

EMOJI_CATEGORIES = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                    "Travel & Places", "Activities", "Objects", "Symbols", "Flags")
EMOJI_CATEGORY_CLASSNAMES = ("smileys and emotion", "people and body", "animals and nature", "food and drink",
                             "travel and places", "activities", "objects", "symbols", "flags")

EMOJI_TRAIN_TEMPLATES = ("{name}", "{short}", "an emoji of {name}", "{name} emoji", "{short} icon",
                         "{name}, a {subcategory} emoji", "emoji from {category}: {name}", "a cartoon {name}")
EMOJI_EVAL_TEMPLATES = ("a cartoon emoji from {}", "an icon from {}", "{} emoji icon")


def emoji_caption_parts(entry: dict) -> dict[str, str]:
    """Readable name, short name, category and subcategory of one emoji.json entry."""
    name = entry["name"].lower()
    shorts = [s.replace("_", " ").replace("-", " ") for s in entry["short_names"] if not s.startswith("flag-")]
    return dict(name=name, short=shorts[0] if shorts else name,
                category=EMOJI_CATEGORY_CLASSNAMES[EMOJI_CATEGORIES.index(entry["category"])],
                subcategory=entry["subcategory"].replace("-", " "))


def emoji_train_caption(entry: dict, variant: int) -> str:
    """Caption variant `variant` of one emoji (variants cycle through the templates)."""
    return EMOJI_TRAIN_TEMPLATES[variant % len(EMOJI_TRAIN_TEMPLATES)].format(**emoji_caption_parts(entry))


def emoji_eval_caption(entry: dict) -> str:
    """The caption of a held-out emoji for retrieval: its plain name."""
    return emoji_caption_parts(entry)["name"]


def fmnist_train_caption(label: int, rng: random.Random) -> str:
    return rng.choice(FMNIST_TRAIN_TEMPLATES).format(rng.choice(FMNIST_SYNONYMS[label]))


def all_fmnist_train_captions() -> set[str]:
    return {t.format(s) for t in FMNIST_TRAIN_TEMPLATES for syn in FMNIST_SYNONYMS for s in syn}


def fmnist_eval_prompts() -> set[str]:
    return {t.format(c) for t in FMNIST_EVAL_TEMPLATES for c in FMNIST_PROMPT_NAMES}

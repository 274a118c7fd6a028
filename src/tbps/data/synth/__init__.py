"""SynthPEDES: a synthetic pedestrian dataset in the CUHK-PEDES layout, made in seconds on a CPU.

The real benchmarks are licensed and cannot ship, so the demo, the tests and the benchmarks run on
this instead. What makes it useful rather than a toy (``shared/docs/synthetic-data.md``):

- every identity is a person with fixed attributes (gender, hair, upper and lower garment with
  type, colour and pattern, shoes, carried item, headwear, belt, logo);
- identities come in families: a prototype person and variants that differ in one or two
  attributes, so a model that only sees the overall colour confuses them (hard negatives);
- the images of an identity differ in viewpoint (a backpack is a big block from the back and two
  straps from the front; a logo shows only from the front), pose, scale, position, background,
  lighting, blur and partial occlusion, so matching is not pixel matching;
- captions are CUHK-PEDES-style English with varied templates, synonyms and colour names, in
  varied order; some mention only part of the person.

Attributes that captions mention are drawn as large regions so they survive the 128x48 or 192x64
downsizing of the CPU demo. Everything is a function of the seed: the same seed gives the same
JSON bytes and the same pixels, whatever order the images are drawn in.
"""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tbps.errors import TBPSError
from tbps.io import write_text_atomic

ANNOTATION_FILE = "reid_raw.json"
NOISE_MAX = 2.5  # sensor noise sigma in grey levels, on one image in five (noise costs disk space)

# ----------------------------------------------------------------------------- vocabulary

# canonical colour -> (RGB, names a caption may use for it)
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "black": ((28, 28, 32), ("black",)),
    "white": ((236, 236, 232), ("white",)),
    "grey": ((128, 128, 132), ("grey", "gray")),
    "red": ((205, 32, 38), ("red", "bright red")),
    "blue": ((36, 84, 205), ("blue", "royal blue")),
    "navy": ((26, 36, 96), ("navy", "dark blue", "navy blue")),
    "light blue": ((135, 185, 235), ("light blue", "sky blue", "pale blue")),
    "green": ((42, 145, 62), ("green",)),
    "yellow": ((238, 208, 42), ("yellow",)),
    "orange": ((242, 128, 28), ("orange",)),
    "pink": ((242, 150, 192), ("pink",)),
    "purple": ((122, 52, 156), ("purple", "violet")),
    "brown": ((112, 68, 34), ("brown",)),
    "beige": ((212, 192, 150), ("beige", "khaki", "tan")),
}

HAIR_COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "black": ((22, 20, 20), ("black", "dark")),
    "brown": ((98, 60, 30), ("brown",)),
    "blonde": ((220, 188, 108), ("blonde", "blond", "fair")),
    "grey": ((172, 172, 172), ("grey", "gray", "white")),
    "red": ((168, 62, 26), ("red", "ginger", "auburn")),
}

SKIN_TONES = ((241, 204, 180), (226, 182, 150), (198, 145, 108), (160, 110, 75), (112, 76, 52), (232, 196, 164))
INNER_COLOURS = ("white", "black", "grey")

UPPER_TYPES = ("t-shirt", "shirt", "jacket", "coat", "dress", "hoodie")
LOWER_TYPES = ("trousers", "jeans", "shorts", "skirt")
BAG_TYPES = ("none", "backpack", "handbag", "shoulder bag", "suitcase")
HEADWEAR = ("none", "cap", "hat")
VIEWS = ("front", "back", "side")

# weights of the canonical colours (in COLOURS order) per garment: realistic but spread out
_GARMENT_WEIGHTS = {
    "upper": (1.3, 1.2, 1.1, 1.0, 1.0, 1.0, 0.8, 0.9, 0.8, 0.7, 0.8, 0.7, 0.7, 0.7),
    "trousers": (1.6, 0.6, 1.3, 0.3, 0.5, 1.2, 0.3, 0.5, 0.2, 0.2, 0.2, 0.3, 1.0, 1.1),
    "skirt": (1.2, 0.8, 0.8, 0.8, 0.6, 0.8, 0.5, 0.5, 0.5, 0.4, 0.9, 0.6, 0.6, 0.7),
    "shoes": (1.8, 1.8, 0.8, 0.6, 0.5, 0.3, 0.2, 0.3, 0.3, 0.3, 0.4, 0.2, 1.0, 0.5),
    "bag": (1.5, 0.7, 0.8, 1.0, 1.0, 0.7, 0.6, 0.8, 0.8, 0.8, 0.8, 0.7, 1.0, 0.6),
    "head": (1.5, 1.2, 0.8, 1.0, 1.0, 0.9, 0.6, 0.6, 0.8, 0.5, 0.6, 0.4, 0.8, 0.9),
}
_JEANS_COLOURS = ("blue", "navy", "light blue", "black", "grey")
_JEANS_WEIGHTS = (0.4, 0.25, 0.15, 0.12, 0.08)


@dataclass(frozen=True)
class PersonAttributes:
    """What a person looks like; a caption describes (part of) it, every image shows it."""

    gender: str  # "male" | "female"
    hair_length: str  # "short" | "long"
    hair_colour: str
    upper_type: str
    upper_colour: str
    upper_pattern: str  # "plain" | "striped" | "checked"
    pattern_colour: str  # the stripes' or checks' second colour, "none" when plain
    lower_type: str  # "none" under a dress
    lower_colour: str
    shoe_colour: str
    bag_type: str
    bag_colour: str
    headwear: str
    headwear_colour: str
    belt: str  # colour, or "none"
    logo: str  # colour, or "none"


@dataclass(frozen=True)
class _Looks:
    """Per-identity details that no caption mentions but that stay the same across its images."""

    skin: tuple[int, int, int]
    inner: str  # what shows under an open jacket
    build: float  # shoulder width factor
    carry_side: int  # +1 or -1: the hand that holds a handbag or pulls a suitcase
    jitter: tuple[int, int, int]  # a small colour offset: two "red shirts" are not the same red


def _choice(rng: np.random.Generator, items, weights=None):
    if weights is None:
        return items[int(rng.integers(len(items)))]
    p = np.asarray(weights, dtype=np.float64)
    return items[int(rng.choice(len(items), p=p / p.sum()))]


def _colour(rng: np.random.Generator, kind: str, avoid: tuple[str, ...] = ()) -> str:
    names = list(COLOURS)
    weights = [0.0 if n in avoid else w for n, w in zip(names, _GARMENT_WEIGHTS[kind])]
    return _choice(rng, names, weights)


def _contrast_colour(rng: np.random.Generator, base: str) -> str:
    """A second colour for stripes, checks or a logo that stands out against ``base``."""
    lum = _luma(COLOURS[base][0])
    options = [n for n, (rgb, _) in COLOURS.items() if n != base and abs(_luma(rgb) - lum) > 70]
    return _choice(rng, options)


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _draw_upper(rng, gender: str) -> tuple[str, str, str, str]:
    if gender == "male":
        upper = _choice(rng, UPPER_TYPES, (0.25, 0.2, 0.2, 0.12, 0.0, 0.23))
    else:
        upper = _choice(rng, UPPER_TYPES, (0.2, 0.15, 0.15, 0.12, 0.2, 0.18))
    colour = _colour(rng, "upper")
    pattern = _choice(rng, ("plain", "striped", "checked"),
                      (0.8, 0.2, 0.0) if upper in ("coat", "jacket") else (0.56, 0.24, 0.2))
    return upper, colour, pattern, ("none" if pattern == "plain" else _contrast_colour(rng, colour))


def _lower_weights(gender: str, upper: str) -> tuple[float, ...]:
    """Trousers, jeans, shorts, skirt; a long coat would hide shorts or a skirt, so not under one."""
    if upper == "coat":
        return (0.55, 0.45, 0.0, 0.0)
    return (0.45, 0.4, 0.15, 0.0) if gender == "male" else (0.3, 0.3, 0.15, 0.25)


def _draw_lower(rng, gender: str, upper: str) -> tuple[str, str]:
    if upper == "dress":
        return "none", "none"
    weights = _lower_weights(gender, upper)
    lower = _choice(rng, LOWER_TYPES, weights)
    if lower == "jeans":
        return lower, _choice(rng, _JEANS_COLOURS, _JEANS_WEIGHTS)
    return lower, _colour(rng, "skirt" if lower == "skirt" else "trousers")


def _draw_bag(rng, gender: str) -> tuple[str, str]:
    weights = (0.28, 0.27, 0.17, 0.17, 0.11) if gender == "female" else (0.3, 0.33, 0.03, 0.22, 0.12)
    bag = _choice(rng, BAG_TYPES, weights)
    return bag, ("none" if bag == "none" else _colour(rng, "bag"))


def _draw_headwear(rng) -> tuple[str, str]:
    head = _choice(rng, HEADWEAR, (0.68, 0.2, 0.12))
    return head, ("none" if head == "none" else _colour(rng, "head"))


def _draw_details(rng, upper: str, pattern: str, upper_colour: str, lower: str) -> tuple[str, str]:
    belt = "none"
    if upper in ("t-shirt", "shirt") and lower in ("trousers", "jeans", "shorts") and rng.random() < 0.35:
        belt = _choice(rng, ("black", "brown", "white"), (0.5, 0.4, 0.1))
    logo = "none"
    if upper in ("t-shirt", "hoodie") and pattern == "plain" and rng.random() < 0.4:
        logo = _contrast_colour(rng, upper_colour)
    return belt, logo


def _draw_prototype(rng: np.random.Generator) -> PersonAttributes:
    gender = _choice(rng, ("male", "female"))
    hair_length = _choice(rng, ("short", "long"), (0.9, 0.1) if gender == "male" else (0.25, 0.75))
    hair_colour = _choice(rng, tuple(HAIR_COLOURS), (0.45, 0.25, 0.15, 0.08, 0.07))
    upper, upper_colour, pattern, pattern_colour = _draw_upper(rng, gender)
    lower, lower_colour = _draw_lower(rng, gender, upper)
    bag, bag_colour = _draw_bag(rng, gender)
    head, head_colour = _draw_headwear(rng)
    belt, logo = _draw_details(rng, upper, pattern, upper_colour, lower)
    return PersonAttributes(gender, hair_length, hair_colour, upper, upper_colour, pattern, pattern_colour,
                            lower, lower_colour, _colour(rng, "shoes"), bag, bag_colour, head, head_colour,
                            belt, logo)


# attributes a hard negative may differ in, with how often each is picked
_PERTURBABLE = ("upper_colour", "lower_colour", "bag_colour", "bag_type", "shoe_colour", "hair_colour",
                "upper_pattern", "upper_type", "lower_type", "headwear", "hair_length")
_PERTURB_WEIGHTS = (1.4, 1.2, 1.0, 1.0, 0.8, 0.8, 0.8, 0.7, 0.7, 0.8, 0.5)


def _perturb(rng: np.random.Generator, person: PersonAttributes, key: str) -> PersonAttributes:
    """``person`` with ``key`` redrawn (and whatever depends on it kept consistent)."""
    p = person
    if key == "upper_colour":
        colour = _colour(rng, "upper", avoid=(p.upper_colour,))
        pattern_colour = p.pattern_colour if p.pattern_colour != colour else _contrast_colour(rng, colour)
        logo = p.logo if p.logo != colour else _contrast_colour(rng, colour)
        return replace(p, upper_colour=colour, pattern_colour=pattern_colour, logo=logo)
    if key == "lower_colour" and p.lower_type != "none":
        if p.lower_type == "jeans":
            options = [c for c in _JEANS_COLOURS if c != p.lower_colour]
            return replace(p, lower_colour=_choice(rng, options))
        return replace(p, lower_colour=_colour(rng, "trousers", avoid=(p.lower_colour,)))
    if key == "bag_colour" and p.bag_type != "none":
        return replace(p, bag_colour=_colour(rng, "bag", avoid=(p.bag_colour,)))
    if key == "bag_type":
        options = [b for b in BAG_TYPES if b != p.bag_type and not (b == "handbag" and p.gender == "male")]
        bag = _choice(rng, options)
        colour = "none" if bag == "none" else (p.bag_colour if p.bag_colour != "none" else _colour(rng, "bag"))
        return replace(p, bag_type=bag, bag_colour=colour)
    if key == "shoe_colour":
        return replace(p, shoe_colour=_colour(rng, "shoes", avoid=(p.shoe_colour,)))
    if key == "hair_colour":
        return replace(p, hair_colour=_choice(rng, [c for c in HAIR_COLOURS if c != p.hair_colour]))
    if key == "hair_length":
        return replace(p, hair_length="long" if p.hair_length == "short" else "short")
    if key == "upper_pattern" and p.upper_type not in ("coat", "jacket"):
        pattern = _choice(rng, [x for x in ("plain", "striped", "checked") if x != p.upper_pattern])
        logo = "none" if pattern != "plain" else p.logo
        second = "none" if pattern == "plain" else (
            p.pattern_colour if p.pattern_colour != "none" else _contrast_colour(rng, p.upper_colour))
        return replace(p, upper_pattern=pattern, pattern_colour=second, logo=logo)
    if key == "upper_type":
        options = [u for u in UPPER_TYPES if u != p.upper_type and u != "dress"]
        upper = _choice(rng, options)
        lower, lower_colour = (p.lower_type, p.lower_colour)
        if lower == "none" or (upper == "coat" and lower in ("shorts", "skirt")):  # was a dress / now hidden
            lower, lower_colour = _draw_lower(rng, p.gender, upper)
        pattern = "plain" if upper in ("coat", "jacket") and p.upper_pattern == "checked" else p.upper_pattern
        second = p.pattern_colour if pattern != "plain" else "none"
        belt = p.belt if upper in ("t-shirt", "shirt") and lower != "skirt" else "none"
        logo = p.logo if upper in ("t-shirt", "hoodie") and pattern == "plain" else "none"
        return replace(p, upper_type=upper, upper_pattern=pattern, pattern_colour=second, lower_type=lower,
                       lower_colour=lower_colour, belt=belt, logo=logo)
    if key == "lower_type" and p.lower_type != "none":
        weights = _lower_weights(p.gender, p.upper_type)
        options = [x for x, w in zip(LOWER_TYPES, weights) if x != p.lower_type and w > 0]
        if not options:
            return p
        lower = _choice(rng, options)
        colour = p.lower_colour
        if lower == "jeans" and colour not in _JEANS_COLOURS:
            colour = _choice(rng, _JEANS_COLOURS, _JEANS_WEIGHTS)
        belt = p.belt if lower != "skirt" else "none"
        return replace(p, lower_type=lower, lower_colour=colour, belt=belt)
    if key == "headwear":
        head = _choice(rng, [h for h in HEADWEAR if h != p.headwear])
        colour = "none" if head == "none" else _colour(rng, "head")
        return replace(p, headwear=head, headwear_colour=colour)
    return p


def draw_identities(num_ids: int, rng: np.random.Generator) -> list[PersonAttributes]:
    """``num_ids`` distinct people in families: a prototype plus variants differing in 1-2 attributes."""
    people: list[PersonAttributes] = []
    seen: set[PersonAttributes] = set()
    while len(people) < num_ids:
        proto = _draw_prototype(rng)
        family = int(_choice(rng, (1, 2, 3, 4), (0.3, 0.35, 0.22, 0.13)))
        members = [proto]
        for _ in range(family - 1):
            variant = proto
            for key in rng.choice(len(_PERTURBABLE), size=int(rng.integers(1, 3)), replace=False,
                                  p=np.asarray(_PERTURB_WEIGHTS) / sum(_PERTURB_WEIGHTS)):
                variant = _perturb(rng, variant, _PERTURBABLE[int(key)])
            members.append(variant)
        for person in members:
            if person not in seen and len(people) < num_ids:
                seen.add(person)
                people.append(person)
    order = rng.permutation(len(people))
    return [people[i] for i in order]


def _draw_looks(rng: np.random.Generator) -> _Looks:
    return _Looks(skin=SKIN_TONES[int(rng.integers(len(SKIN_TONES)))],
                  inner=_choice(rng, INNER_COLOURS),
                  build=float(rng.uniform(0.92, 1.08)),
                  carry_side=int(_choice(rng, (-1, 1))),
                  jitter=tuple(int(v) for v in rng.integers(-12, 13, size=3)))


# ----------------------------------------------------------------------------- captions

_SUBJECTS = {
    "male": ("The man", "A man", "This man", "A young man", "The guy", "This guy", "A male pedestrian",
             "The gentleman", "This gentleman", "The young man"),
    "female": ("The woman", "A woman", "This woman", "A young woman", "The lady", "This lady", "The girl",
               "A female pedestrian", "The young woman", "A girl"),
    "neutral": ("The person", "This person", "A pedestrian", "The pedestrian", "This pedestrian"),
}
_PRONOUNS = {"male": ("He", "his", "him"), "female": ("She", "her", "her"),
             "neutral": ("The person", "their", "them")}
_UPPER_WORDS = {
    "t-shirt": ("t-shirt", "T-shirt", "tee shirt", "short-sleeved shirt", "short sleeve top", "tee"),
    "shirt": ("shirt", "long-sleeved shirt", "button-up shirt", "button down shirt", "long sleeve shirt"),
    "jacket": ("jacket", "zip-up jacket", "light jacket", "jacket"),
    "coat": ("coat", "long coat", "overcoat", "knee-length coat"),
    "dress": ("dress", "knee-length dress", "short dress", "dress"),
    "hoodie": ("hoodie", "hooded sweatshirt", "hooded top", "hoodie"),
}
_LOWER_WORDS = {
    "trousers": ("trousers", "pants", "slacks", "trousers"),
    "jeans": ("jeans", "denim jeans", "jeans", "denim pants"),
    "shorts": ("shorts", "short pants", "shorts"),
    "skirt": ("skirt", "short skirt", "skirt", "knee-length skirt"),
}
_SHOE_WORDS = ("shoes", "sneakers", "shoes", "trainers", "shoes")
_HEAD_WORDS = {"cap": ("cap", "baseball cap", "cap"), "hat": ("hat", "wide-brimmed hat", "sun hat", "hat")}


def _cname(rng, colour: str) -> str:
    return _choice(rng, COLOURS[colour][1])


_AN = re.compile(r"\ba (?=[aeiou])")  # "a orange bag" -> "an orange bag"


def _article(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


class _Caption:
    """Builds one caption and records which attributes it committed to (for tests and tuning)."""

    def __init__(self, person: PersonAttributes, view: str, rng: np.random.Generator) -> None:
        self.p = person
        self.view = view
        self.rng = rng
        self.mentions: dict[str, str] = {}
        voice = "neutral" if rng.random() < 0.1 else person.gender
        self.voice = voice
        self.he, self.his, self.him = _PRONOUNS[voice]
        if voice != "neutral":
            self.mentions["gender"] = person.gender

    # phrases ---------------------------------------------------------------
    def hair(self) -> str:
        p, rng = self.p, self.rng
        length = _choice(rng, ("short", "short", "cropped") if p.hair_length == "short" else
                         ("long", "long", "long flowing"))
        self.mentions["hair_length"] = p.hair_length
        if rng.random() < 0.85:
            self.mentions["hair_colour"] = p.hair_colour
            return f"{length} {_choice(rng, HAIR_COLOURS[p.hair_colour][1])} hair"
        return f"{length} hair"

    def upper(self) -> str:
        p, rng = self.p, self.rng
        kind = _choice(rng, _UPPER_WORDS[p.upper_type])
        if p.upper_type == "shirt" and p.gender == "female" and rng.random() < 0.3:
            kind = "blouse"
        colour = _cname(rng, p.upper_colour)
        self.mentions.update(upper_type=p.upper_type, upper_colour=p.upper_colour)
        if p.upper_pattern == "plain" or rng.random() < 0.1:
            phrase = _article(f"{colour} {kind}")
        else:
            self.mentions["upper_pattern"] = p.upper_pattern
            word = _choice(rng, ("striped", "stripy", "striped") if p.upper_pattern == "striped" else
                           ("checked", "plaid", "checkered"))
            second = _cname(rng, p.pattern_colour)
            style = int(rng.integers(3))
            if style == 0:
                phrase = _article(f"{colour} {word} {kind}")
            elif style == 1:
                self.mentions["pattern_colour"] = p.pattern_colour
                phrase = _article(f"{colour} and {second} {word} {kind}")
            else:
                self.mentions["pattern_colour"] = p.pattern_colour
                noun = "stripes" if p.upper_pattern == "striped" else "checks"
                phrase = _article(f"{colour} {kind} with {second} {noun}")
        if p.logo != "none" and self.view == "front" and rng.random() < 0.6:
            self.mentions["logo"] = p.logo
            where = _choice(rng, ("with a {c} logo on the front", "with a {c} logo on the chest",
                                  "with a {c} print on the front"))
            phrase += " " + where.format(c=_cname(rng, p.logo))
        return phrase

    def lower(self) -> str:
        p, rng = self.p, self.rng
        self.mentions.update(lower_type=p.lower_type, lower_colour=p.lower_colour)
        phrase = f"{_cname(rng, p.lower_colour)} {_choice(rng, _LOWER_WORDS[p.lower_type])}"
        if p.lower_type == "skirt":
            return _article(phrase)
        return ("a pair of " + phrase) if rng.random() < 0.15 else phrase

    def shoes(self) -> str:
        self.mentions["shoe_colour"] = self.p.shoe_colour
        phrase = f"{_cname(self.rng, self.p.shoe_colour)} {_choice(self.rng, _SHOE_WORDS)}"
        return ("a pair of " + phrase) if self.rng.random() < 0.15 else phrase

    def headwear(self) -> str:
        self.mentions.update(headwear=self.p.headwear, headwear_colour=self.p.headwear_colour)
        return _article(f"{_cname(self.rng, self.p.headwear_colour)} {_choice(self.rng, _HEAD_WORDS[self.p.headwear])}")

    def belt(self) -> str:
        self.mentions["belt"] = self.p.belt
        return _article(f"{_cname(self.rng, self.p.belt)} belt")

    def bag(self, form: str) -> str:
        """The carried item as a verb phrase.

        ``form``: "finite" (carries ...), "ing" (carrying ... / with ...), "progressive" (after "is")
        or "with" (the noun phrase alone).
        """
        p, rng, his, him = self.p, self.rng, self.his, self.him
        self.mentions["bag_type"] = p.bag_type
        if p.bag_type == "none":
            options = {"finite": ("is not carrying anything", "carries nothing", "has nothing in {his} hands",
                                  "is not carrying a bag"),
                       "ing": ("carrying nothing", "not carrying a bag", "with empty hands"),
                       "progressive": ("carrying nothing", "not carrying a bag"),
                       "with": ("no bag", "nothing in {his} hands")}[form]
            return _choice(rng, options).format(his=his)
        self.mentions["bag_colour"] = p.bag_colour
        c = _cname(rng, p.bag_colour)
        verbs, objects = {
            "backpack": (("carry", "wear", "have"), ("a {c} backpack", "a {c} rucksack",
                                                    "a {c} backpack on {his} back", "a {c} bag on {his} back")),
            "handbag": (("carry", "hold", "have"), ("a {c} handbag", "a {c} purse", "a {c} handbag in {his} hand")),
            "shoulder bag": (("carry", "have", "carry"), ("a {c} shoulder bag", "a {c} bag over {his} shoulder",
                                                         "a {c} messenger bag", "a {c} side bag")),
            "suitcase": (("pull", "drag", "wheel"), ("a {c} suitcase", "a {c} rolling suitcase",
                                                     "a {c} suitcase behind {him}", "a {c} luggage case")),
        }[p.bag_type]
        obj = _choice(rng, objects).format(c=c, his=his, him=him)
        if form == "with":
            return obj
        verb = _choice(rng, verbs)
        if form == "ing" or form == "progressive":
            if form == "progressive" and verb == "have":
                verb = "carry"
            return {"carry": "carrying", "wear": "wearing", "have": "with", "hold": "holding", "pull": "pulling",
                    "drag": "dragging", "wheel": "wheeling"}[verb] + " " + obj
        finite = {"carry": "carries", "wear": "wears", "have": "has", "hold": "holds", "pull": "pulls",
                  "drag": "drags", "wheel": "wheels"}[verb]
        if rng.random() < 0.4 and verb not in ("have",):
            finite = "is " + {"carry": "carrying", "wear": "wearing", "hold": "holding", "pull": "pulling",
                              "drag": "dragging", "wheel": "wheeling"}[verb]
        return f"{finite} {obj}"

    # the sentence ------------------------------------------------------------
    def build(self, partial: bool) -> str:
        p, rng = self.p, self.rng
        groups = ["hair", "upper", "lower", "shoes", "bag", "headwear", "belt"]
        if p.lower_type == "none":
            groups.remove("lower")
        if p.headwear == "none":
            groups.remove("headwear")
        if p.belt == "none" or self.view == "back":
            groups.remove("belt")
        keep_prob = {"hair": 0.8, "upper": 0.97, "lower": 0.93, "shoes": 0.75, "bag": 0.9 if p.bag_type != "none"
                     else 0.35, "headwear": 0.92, "belt": 0.55}
        if partial:
            k = int(rng.integers(1, 4))
            picked = set(rng.choice(groups, size=min(k, len(groups)), replace=False).tolist())
        else:
            picked = {g for g in groups if rng.random() < keep_prob[g]}
            if not picked & {"upper", "lower"}:
                picked.add("upper")
        return self._compose(picked)

    def _compose(self, picked: set[str]) -> str:
        """Predicates in order; the first gets the subject, the rest a pronoun."""
        rng = self.rng
        subject = _choice(rng, _SUBJECTS[self.voice])
        lead_with_tail = rng.random() < 0.2
        with_hair = ""
        if "hair" in picked and not lead_with_tail and rng.random() < 0.4:
            with_hair = f" with {self.hair()}"
            picked.discard("hair")
        clothes = [g for g in ("headwear", "upper", "belt", "lower", "shoes") if g in picked]
        if rng.random() < 0.25:
            rng.shuffle(clothes)
        items = [getattr(self, g)() for g in clothes]
        bag_done = "bag" not in picked
        # each predicate: (after the subject, after a pronoun)
        preds: list[tuple[str, str]] = []
        if items:
            if int(rng.integers(4)) == 0 and len(items) >= 2:
                # "A man in a red shirt and blue jeans, carrying a black backpack."
                body = f"in {_join(items)}"
                if not bag_done and rng.random() < 0.7:
                    body += f", {self.bag('ing')}"
                    bag_done = True
                preds.append((body, f"is dressed {body}"))
            else:
                verb = _choice(rng, ("is wearing", "wears", "is dressed in", "is wearing", "has on"))
                body = f"{verb} {_join(items)}"
                if not bag_done and rng.random() < 0.4:
                    body += f" and {self.bag('finite')}"
                    bag_done = True
                preds.append((body, body))
        tail: list[tuple[str, str]] = []
        if "hair" in picked:
            hair = f"has {self.hair()}"
            tail.append((hair, hair))
        if not bag_done:
            if rng.random() < 0.5 or self.p.bag_type == "none":
                bag = self.bag("finite")
                tail.append((bag, bag))
            else:
                bag = self.bag("progressive")
                tail.append((f"is {bag}", f"is also {bag}"))
        if len(tail) == 2 and rng.random() < 0.5:
            tail.reverse()
        if lead_with_tail and tail:
            preds = tail[:1] + preds + tail[1:]
        else:
            preds += tail
        if not preds:
            hair = f"has {self.hair()}"
            preds.append((hair, hair))
        sentences = [f"{subject}{with_hair} {preds[0][0]}"] + [f"{self.he} {p[1]}" for p in preds[1:]]
        text = ". ".join(s[0].upper() + s[1:] for s in sentences) + "."
        return _AN.sub("an ", text)


def make_caption(person: PersonAttributes, view: str, rng: np.random.Generator,
                 partial: bool | None = None) -> tuple[str, dict[str, str]]:
    """One caption of ``person`` seen from ``view``, and the attribute values it states.

    About one caption in five is partial (one to three attributes), as annotators often do.
    """
    if partial is None:
        partial = bool(rng.random() < 0.18)
    caption = _Caption(person, view, rng)
    return caption.build(partial), caption.mentions


def caption_matches(mentions: dict[str, str], person: PersonAttributes) -> bool:
    """Whether ``person`` fits everything a caption states (used to measure how hard the data is)."""
    return all(getattr(person, key) == value for key, value in mentions.items())


def _tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", caption.lower())


# ----------------------------------------------------------------------------- backgrounds

def _make_backgrounds(rng: np.random.Generator, height: int, width: int, count: int) -> list[Image.Image]:
    """A bank of scenes twice as wide as an image; each image crops, flips and relights one."""
    bank = []
    wide = width * 2
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    for index in range(count):
        kind = index % 4
        horizon = int(height * rng.uniform(0.55, 0.78))
        top = rng.uniform(90, 215, size=3).astype(np.float32)
        bottom = top * rng.uniform(0.7, 1.0)
        arr = np.broadcast_to(top + (bottom - top) * ys, (height, wide, 3)).copy()
        ground = rng.uniform(70, 170, size=3).astype(np.float32)
        if kind == 1:  # park: green ground
            ground = np.array([rng.uniform(60, 110), rng.uniform(110, 160), rng.uniform(50, 90)], np.float32)
        elif kind == 2:  # pavement: grey
            ground = np.full(3, rng.uniform(90, 170), np.float32)
        gy = np.linspace(0.85, 1.1, height - horizon, dtype=np.float32)[:, None, None]
        arr[horizon:] = ground * gy
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        if kind in (0, 2):  # building facades with windows / shop fronts
            x = int(rng.integers(-width // 4, 0))
            while x < wide:
                w = int(rng.integers(width // 2, width + 1))
                wall = tuple(int(v) for v in rng.uniform(80, 220, size=3))
                top_y = int(rng.uniform(0, 0.3) * horizon)
                draw.rectangle([x, top_y, x + w, horizon], fill=wall)
                win = tuple(int(v * 0.55) for v in wall)
                step_x, step_y = max(6, w // 4), max(8, horizon // 6)
                for wx in range(x + step_x // 3, x + w - step_x // 2, step_x):
                    for wy in range(top_y + step_y // 3, horizon - step_y, step_y):
                        draw.rectangle([wx, wy, wx + step_x // 2, wy + step_y // 2], fill=win)
                x += w
        elif kind == 1:  # trees
            for _ in range(int(rng.integers(3, 7))):
                cx, cy = rng.uniform(0, wide), rng.uniform(0.2, 0.7) * horizon
                r = rng.uniform(0.15, 0.35) * width
                leaf = (int(rng.uniform(30, 80)), int(rng.uniform(90, 150)), int(rng.uniform(30, 80)))
                draw.rectangle([cx - r * 0.12, cy, cx + r * 0.12, horizon], fill=(90, 65, 40))
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=leaf)
        else:  # indoor: wall panels and doors
            for _ in range(int(rng.integers(2, 5))):
                x0 = rng.uniform(0, wide)
                w = rng.uniform(0.2, 0.5) * width
                colour = tuple(int(v) for v in rng.uniform(60, 230, size=3))
                draw.rectangle([x0, rng.uniform(0.2, 0.5) * horizon, x0 + w, horizon], fill=colour)
        # ground texture: tiles or path lines, denser towards the horizon
        line = tuple(int(v * 0.8) for v in ground)
        y = float(horizon)
        gap = max(2.0, 0.02 * height)
        while y < height:
            draw.line([0, y, wide, y], fill=line, width=1)
            gap *= 1.35
            y += gap
        if kind in (2, 3):
            for x in np.arange(rng.uniform(0, width / 3), wide, width / 3):
                draw.line([x, horizon, x + (x - wide / 2) * 0.8, height], fill=line, width=1)
        bank.append(img)
    return bank


# ----------------------------------------------------------------------------- rendering

def _rgb(name: str, jitter: tuple[int, int, int] = (0, 0, 0)) -> tuple[int, int, int]:
    base = COLOURS[name][0]
    return tuple(int(min(255, max(0, c + j))) for c, j in zip(base, jitter))


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, c * factor)) for c in rgb)


class _Painter:
    """Draws in person coordinates: x in person heights from the body axis, y from the head top.

    ``facing`` mirrors x for side views, so the side figure is drawn once, facing right.
    """

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, top: float, h: float, facing: int = 1) -> None:
        self.draw, self.cx, self.top, self.h, self.facing = draw, cx, top, h, facing

    def pt(self, x: float, y: float) -> tuple[float, float]:
        return self.cx + self.facing * x * self.h, self.top + y * self.h

    def poly(self, pts, fill, outline=None) -> None:
        self.draw.polygon([self.pt(x, y) for x, y in pts], fill=fill, outline=outline)

    def ellipse(self, x: float, y: float, rx: float, ry: float, fill, outline=None) -> None:
        (x0, y0), (x1, y1) = self.pt(x - rx, y - ry), self.pt(x + rx, y + ry)
        self.draw.ellipse([min(x0, x1), y0, max(x0, x1), y1], fill=fill, outline=outline)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill, radius: float = 0.0, outline=None) -> None:
        (a, b), (c, d) = self.pt(x0, y0), self.pt(x1, y1)
        box = [min(a, c), min(b, d), max(a, c), max(b, d)]
        if radius > 0:
            self.draw.rounded_rectangle(box, radius=radius * self.h, fill=fill, outline=outline)
        else:
            self.draw.rectangle(box, fill=fill, outline=outline)

    def chord(self, x0: float, y0: float, x1: float, y1: float, fill, outline=None) -> None:
        """The upper half of the ellipse in the box: a cap's crown."""
        (a, b), (c, d) = self.pt(x0, y0), self.pt(x1, y1)
        self.draw.chord([min(a, c), min(b, d), max(a, c), max(b, d)], 180, 360, fill=fill, outline=outline)

    def line(self, pts, fill, width: float) -> None:
        self.draw.line([self.pt(x, y) for x, y in pts], fill=fill, width=max(1, int(round(width * self.h))))

    def limb(self, x0: float, y0: float, x1: float, y1: float, w0: float, w1: float, fill, outline=None) -> None:
        """A tapered quad from (x0, y0) to (x1, y1): an arm, a leg or a sleeve."""
        dx, dy = x1 - x0, y1 - y0
        n = math.hypot(dx, dy) or 1.0
        nx, ny = -dy / n, dx / n
        self.poly([(x0 + nx * w0 / 2, y0 + ny * w0 / 2), (x1 + nx * w1 / 2, y1 + ny * w1 / 2),
                   (x1 - nx * w1 / 2, y1 - ny * w1 / 2), (x0 - nx * w0 / 2, y0 - ny * w0 / 2)], fill, outline)


@dataclass
class _Pose:
    view: str
    facing: int  # side view: +1 right, -1 left
    arm_swing: float
    stride: float
    spread: float


def _render_person(img: Image.Image, person: PersonAttributes, looks: _Looks, pose: _Pose,
                   cx: float, top: float, h: float) -> None:
    """Draw the person back to front; garments go through a mask so stripes and checks clip to them."""
    draw = ImageDraw.Draw(img)
    view = pose.view
    P = _Painter(draw, cx, top, h, pose.facing if view == "side" else 1)
    jit = looks.jitter
    skin = looks.skin
    skin_dark = _shade(skin, 0.8)
    upper_rgb = _rgb(person.upper_colour, jit)
    upper_edge = _shade(upper_rgb, 0.6)
    lower_rgb = _rgb(person.lower_colour, jit) if person.lower_type != "none" else skin
    shoe_rgb = _rgb(person.shoe_colour)
    bag_rgb = _rgb(person.bag_colour, jit) if person.bag_type != "none" else None
    hair_rgb = HAIR_COLOURS[person.hair_colour][0]
    female = person.gender == "female"
    side = view == "side"
    sw = (0.1 if female else 0.115) * looks.build * (0.6 if side else 1.0)  # shoulder half-width
    hw = (0.1 if female else 0.092) * looks.build * (0.68 if side else 1.0)  # hip half-width
    waist_y = 0.47
    hem_y = {"coat": 0.7, "dress": 0.66}.get(person.upper_type, 0.49)
    carry = looks.carry_side
    bag = person.bag_type

    # --- behind the body: suitcase on the far side, backpack body (front view), long hair (front)
    if bag == "backpack" and view == "front":
        P.rect(-sw - 0.014, 0.17, sw + 0.014, 0.41, bag_rgb, radius=0.02)
    if bag == "backpack" and side:
        P.rect(-sw - 0.09, 0.17, -sw + 0.01, 0.43, bag_rgb, radius=0.025, outline=_shade(bag_rgb, 0.6))
    if person.hair_length == "long" and view != "back":
        P.rect(-0.062 if not side else -0.07, 0.05, 0.062 if not side else 0.02, 0.27, hair_rgb, radius=0.03)

    # --- legs, shoes
    if side:
        feet = [(pose.stride, 0.935), (-0.8 * pose.stride, 0.935)]
        hips = [(0.0, waist_y), (0.0, waist_y)]
    else:
        feet = [(-pose.spread, 0.935), (pose.spread, 0.935)]
        hips = [(-0.045, waist_y), (0.045, waist_y)]
    bare_from = {"shorts": 0.6, "skirt": 0.6, "none": 0.55}.get(person.lower_type, 0.93)
    for (hx, hy), (fx, fy) in zip(hips, feet):
        P.limb(hx, hy, fx, fy, 0.085, 0.06, skin if bare_from < 0.9 else lower_rgb)
        if person.lower_type in ("trousers", "jeans"):
            P.limb(hx, hy, fx, fy, 0.085, 0.06, lower_rgb, outline=_shade(lower_rgb, 0.7))
            if person.lower_type == "jeans":  # a lighter seam down the leg
                P.line([(hx + (0.03 if hx >= 0 else -0.03), hy + 0.02), (fx + (0.022 if fx >= 0 else -0.022), fy - 0.02)],
                       _shade(lower_rgb, 1.35), 0.008)
        elif person.lower_type == "shorts":
            t = (bare_from - hy) / (fy - hy)
            P.limb(hx, hy, hx + (fx - hx) * t, bare_from, 0.095, 0.085, lower_rgb, outline=_shade(lower_rgb, 0.7))
    for fx, fy in feet:
        if side:
            P.ellipse(fx + 0.03, fy + 0.01, 0.058, 0.026, shoe_rgb, outline=_shade(shoe_rgb, 0.6))
        else:
            P.ellipse(fx, fy + 0.012, 0.04, 0.026, shoe_rgb, outline=_shade(shoe_rgb, 0.6))
    if person.lower_type in ("trousers", "jeans", "shorts"):
        P.poly([(-hw, waist_y - 0.01), (hw, waist_y - 0.01), (hw * 0.9, waist_y + 0.08), (-hw * 0.9, waist_y + 0.08)],
               lower_rgb)
    elif person.lower_type == "skirt":
        P.poly([(-hw, waist_y - 0.01), (hw, waist_y - 0.01), (hw + 0.05, 0.65), (-hw - 0.05, 0.65)], lower_rgb,
               outline=_shade(lower_rgb, 0.7))

    # --- arms (skin first; sleeves go into the garment mask)
    long_sleeves = person.upper_type not in ("t-shirt", "dress")
    if side:
        arms = [(0.0, 0.17, -pose.arm_swing, 0.49), (0.0, 0.17, pose.arm_swing, 0.49)]  # far, near
    else:
        arms = [(s * (sw - 0.018), 0.17, s * (sw + 0.02 + pose.arm_swing), 0.49) for s in (-1, 1)]
    sleeves = []
    for ax0, ay0, ax1, ay1 in arms:
        P.limb(ax0, ay0, ax1, ay1, 0.05, 0.038, skin, outline=skin_dark)
        if long_sleeves:
            sleeves.append((ax0, ay0, ax0 + (ax1 - ax0) * 0.95, ay0 + (ay1 - ay0) * 0.95, 0.056, 0.045))
        else:
            sleeves.append((ax0, ay0, ax0 + (ax1 - ax0) * 0.33, ay0 + (ay1 - ay0) * 0.33, 0.06, 0.055))

    # --- upper garment through a mask
    mask = Image.new("L", img.size, 0)
    M = _Painter(ImageDraw.Draw(mask), P.cx, P.top, P.h, P.facing)
    if person.upper_type == "dress":
        torso = [(-sw * 0.9, 0.16), (sw * 0.9, 0.16), (hw * 0.9, 0.42), (hw + 0.06, hem_y), (-hw - 0.06, hem_y),
                 (-hw * 0.9, 0.42)]
    elif person.upper_type == "coat":
        torso = [(-sw, 0.155), (sw, 0.155), (hw + 0.03, 0.45), (hw + 0.045, hem_y), (-hw - 0.045, hem_y),
                 (-hw - 0.03, 0.45)]
    else:
        torso = [(-sw, 0.155), (sw, 0.155), (hw * 1.03, hem_y), (-hw * 1.03, hem_y)]
    if side:
        torso = [(x + (0.012 if x > 0 else 0.0), y) for x, y in torso]  # a chest
    M.poly(torso, 255)
    for i, (x0, y0, x1, y1, w0, w1) in enumerate(sleeves):
        if side and i == 0:
            continue  # the far arm's sleeve is drawn darker, behind
        M.limb(x0, y0, x1, y1, w0, w1, 255)
    if side:
        x0, y0, x1, y1, w0, w1 = sleeves[0]
        P.limb(x0, y0, x1, y1, w0, w1, _shade(upper_rgb, 0.75))
    if person.upper_pattern == "plain":
        img.paste(upper_rgb, mask=mask)
    else:
        img.paste(_pattern(img.size, person.upper_pattern, upper_rgb, _rgb(person.pattern_colour), top, h),
                  mask=mask)
    P.poly(torso, None, outline=upper_edge)

    # --- garment details
    if person.upper_type == "jacket" and view == "front":
        P.rect(-0.025, 0.16, 0.025, hem_y, _rgb(looks.inner))
        P.line([(0.0, 0.16), (0.0, hem_y)], upper_edge, 0.006)
    elif person.upper_type == "coat" and view == "front":
        P.line([(0.0, 0.17), (0.0, hem_y)], upper_edge, 0.008)
        for by in (0.26, 0.34, 0.42, 0.5):
            P.ellipse(0.025, by, 0.008, 0.006, upper_edge)
        P.poly([(-0.05, 0.155), (0.0, 0.24), (0.05, 0.155)], _rgb(looks.inner))
    elif person.upper_type == "shirt" and view == "front":
        P.poly([(-0.045, 0.152), (0.0, 0.2), (0.045, 0.152), (0.0, 0.17)], _shade(upper_rgb, 1.25))
        P.line([(0.0, 0.2), (0.0, hem_y)], upper_edge, 0.005)
    elif person.upper_type == "hoodie":
        if view == "back":
            P.ellipse(0.0, 0.19, 0.07, 0.05, _shade(upper_rgb, 0.82), outline=upper_edge)
        elif view == "front":
            P.rect(-0.07, 0.37, 0.07, 0.46, _shade(upper_rgb, 0.85), radius=0.01)
            P.ellipse(0.0, 0.155, 0.07, 0.02, _shade(upper_rgb, 0.8))
        else:
            P.ellipse(-0.04, 0.17, 0.04, 0.045, _shade(upper_rgb, 0.82))
    if person.logo != "none" and view == "front":
        P.rect(-0.035, 0.23, 0.035, 0.29, _rgb(person.logo), radius=0.008)
    if person.belt != "none":
        belt_rgb = _rgb(person.belt)
        P.rect(-hw * 1.03, waist_y - 0.008, hw * 1.03, waist_y + 0.013, belt_rgb)
        if view == "front":
            P.rect(-0.014, waist_y - 0.006, 0.014, waist_y + 0.011, (200, 190, 120))

    # --- hands, carried items in front
    for _, _, ax1, ay1 in arms[1:] if side else arms:
        P.ellipse(ax1, ay1 + 0.012, 0.021, 0.023, skin)
    hand_x = arms[1][2] if side else arms[0 if carry < 0 else 1][2]
    if bag == "backpack" and view == "back":
        P.rect(-0.085, 0.17, 0.085, 0.43, bag_rgb, radius=0.025, outline=_shade(bag_rgb, 0.6))
        P.rect(-0.06, 0.33, 0.06, 0.42, _shade(bag_rgb, 0.8), radius=0.015)
    elif bag == "backpack" and view == "front":
        for s in (-1, 1):
            P.limb(s * 0.065, 0.158, s * 0.075, 0.36, 0.024, 0.022, bag_rgb)
    elif bag == "handbag":
        P.line([(hand_x - 0.03, 0.52), (hand_x, 0.495), (hand_x + 0.03, 0.52)], _shade(bag_rgb, 0.7), 0.008)
        P.poly([(hand_x - 0.05, 0.52), (hand_x + 0.05, 0.52), (hand_x + 0.06, 0.62), (hand_x - 0.06, 0.62)],
               bag_rgb, outline=_shade(bag_rgb, 0.6))
    elif bag == "shoulder bag":
        s = carry if not side else -1
        if view != "side":
            P.line([(-s * (sw - 0.03), 0.16), (s * (hw + 0.03), 0.46)], _shade(bag_rgb, 0.8), 0.018)
        else:
            P.line([(0.0, 0.16), (-0.02, 0.44)], _shade(bag_rgb, 0.8), 0.018)
        bx = s * (hw + 0.05) if not side else -0.02
        P.rect(bx - 0.055, 0.42, bx + 0.055, 0.55, bag_rgb, radius=0.012, outline=_shade(bag_rgb, 0.6))
    elif bag == "suitcase":
        sx = hand_x + (0.06 * carry if not side else -0.08)
        P.line([(hand_x, 0.5), (sx, 0.62)], (60, 60, 64), 0.01)
        P.rect(sx - 0.065, 0.62, sx + 0.065, 0.93, bag_rgb, radius=0.015, outline=_shade(bag_rgb, 0.55))
        P.line([(sx, 0.64), (sx, 0.91)], _shade(bag_rgb, 0.8), 0.006)
        for wx in (sx - 0.045, sx + 0.045):
            P.ellipse(wx, 0.94, 0.012, 0.012, (30, 30, 30))

    # --- neck, head, hair, headwear
    P.rect(-0.022, 0.11, 0.022, 0.165, skin)
    head_rx, head_ry = (0.05, 0.066)
    if view == "back":
        P.ellipse(0.0, 0.075, head_rx, head_ry, hair_rgb)
        if person.hair_length == "long":
            P.rect(-0.07, 0.06, 0.07, 0.27, hair_rgb, radius=0.03)
    elif view == "front":
        P.ellipse(0.0, 0.072, head_rx + 0.006, head_ry + 0.006, hair_rgb)
        P.ellipse(0.0, 0.088, head_rx - 0.004, head_ry - 0.014, skin)
        for ex in (-0.018, 0.018):
            P.ellipse(ex, 0.08, 0.006, 0.004, (40, 30, 30))
        if person.hair_length == "long":
            for s in (-1, 1):
                P.rect(s * 0.062, 0.05, s * 0.04, 0.25, hair_rgb)
    else:
        P.ellipse(0.0, 0.075, head_rx, head_ry, hair_rgb)
        P.ellipse(0.018, 0.085, head_rx - 0.012, head_ry - 0.014, skin)
        P.ellipse(0.035, 0.08, 0.005, 0.004, (40, 30, 30))
    if person.headwear != "none":
        hat_rgb = _rgb(person.headwear_colour, jit)
        edge = _shade(hat_rgb, 0.6)
        if person.headwear == "cap":
            P.chord(-0.056, 0.0, 0.056, 0.09, hat_rgb, outline=edge)
            if view == "front":
                P.rect(-0.06, 0.04, 0.06, 0.055, _shade(hat_rgb, 0.85))
            elif side:
                P.rect(0.03, 0.038, 0.1, 0.052, _shade(hat_rgb, 0.85))
        else:
            P.ellipse(0.0, 0.03, 0.095, 0.02, hat_rgb, outline=edge)
            P.rect(-0.05, -0.035, 0.05, 0.03, hat_rgb, radius=0.015, outline=edge)
            P.rect(-0.05, 0.012, 0.05, 0.024, _shade(hat_rgb, 0.7))


def _pattern(size: tuple[int, int], pattern: str, base: tuple[int, int, int], second: tuple[int, int, int],
             top: float, h: float) -> Image.Image:
    """Stripes or checks anchored to the person, bold enough to survive 3x downsizing."""
    width, height = size
    img = Image.new("RGB", size, base)
    draw = ImageDraw.Draw(img)
    period = max(4.0, 0.05 * h if pattern == "striped" else 0.065 * h)
    half = period / 2
    y = top - period * math.ceil(top / period)
    row = 0
    while y < height:
        if pattern == "striped":
            draw.rectangle([0, y, width, y + half - 1], fill=second)
        else:
            x = (row % 2) * half
            while x < width:
                draw.rectangle([x, y, x + half - 1, y + half - 1], fill=second)
                x += period
        y += half if pattern == "checked" else period
        row += 1
    return img


def _occlude(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    """Something between the camera and the person: a car bonnet or bench, a pole, a passer-by."""
    kind = int(rng.integers(3))
    colour = tuple(int(v) for v in rng.uniform(30, 200, size=3))
    if kind == 0:
        y0 = rng.uniform(0.8, 0.9) * height
        draw.rounded_rectangle([-10, y0, width + 10, height + 10], radius=0.05 * width, fill=colour)
    elif kind == 1:
        x0 = rng.uniform(0.0, 0.9) * width
        draw.rectangle([x0, 0, x0 + rng.uniform(0.05, 0.1) * width, height], fill=colour)
    else:
        w = rng.uniform(0.12, 0.22) * width
        x0 = -w * 0.3 if rng.random() < 0.5 else width - w * 0.7
        draw.rounded_rectangle([x0, rng.uniform(0.15, 0.3) * height, x0 + w, height + 10], radius=w * 0.3,
                               fill=colour)


def _relight(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Camera and lighting: overall gain, a colour cast, a brightness gradient, sensor noise.

    Done with Pillow lookup tables and uint8 blends rather than float arrays: this is the hot loop.
    """
    width, height = img.size
    gain = rng.uniform(0.75, 1.2) * rng.uniform(0.93, 1.07, size=3)
    ramp = np.arange(256, dtype=np.float64)
    lut = np.concatenate([np.minimum(255.0, ramp * g) for g in gain]).astype(np.uint8)
    img = img.point(lut.tolist())
    amount = rng.uniform(0.0, 0.3)
    if amount > 0.05:
        angle = rng.uniform(0, 2 * math.pi)
        gx = np.linspace(0.0, 1.0, width, dtype=np.float32) * math.cos(angle)
        gy = np.linspace(0.0, 1.0, height, dtype=np.float32) * math.sin(angle)
        ramp2d = gy[:, None] + gx[None, :]
        ramp2d -= ramp2d.min()
        ramp2d /= max(float(ramp2d.max()), 1e-6)
        levels = np.round(255.0 * (1.0 - amount * ramp2d) / 4.0) * 4.0  # banded: compresses far better
        mask = Image.fromarray(levels.clip(0, 255).astype(np.uint8), "L")
        img = Image.composite(img, Image.new("RGB", img.size, 0), mask)
    sigma = rng.uniform(1.0, NOISE_MAX)
    if rng.random() < 0.2:
        noise = (rng.standard_normal((height, width, 1), dtype=np.float32) * sigma).astype(np.int16)
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    return img


def render_image(person: PersonAttributes, looks: _Looks, view: str, rng: np.random.Generator,
                 height: int, width: int, backgrounds: list[Image.Image]) -> Image.Image:
    """One photo of ``person``: background, pose, scale, position, lighting, blur, occlusion all drawn."""
    bank = backgrounds[int(rng.integers(len(backgrounds)))]
    x0 = int(rng.integers(0, bank.width - width + 1))
    img = bank.crop((x0, 0, x0 + width, height))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    h = rng.uniform(0.8, 0.95) * min(height, 3.0 * width)
    top = rng.uniform(0.01, 0.99) * (height - h * 1.0)
    cx = width / 2 + rng.uniform(-0.06, 0.06) * h
    if person.bag_type == "suitcase":
        cx -= looks.carry_side * 0.05 * h
    pose = _Pose(view=view, facing=int(_choice(rng, (-1, 1))), arm_swing=float(rng.uniform(-0.02, 0.05)),
                 stride=float(rng.uniform(0.0, 0.09)), spread=float(rng.uniform(0.03, 0.065)))
    if view == "side":
        pose.arm_swing = float(rng.uniform(-0.06, 0.06))
    draw = ImageDraw.Draw(img)
    shadow = tuple(int(v * 0.55) for v in img.getpixel((int(min(width - 1, max(0, cx))), int(min(height - 1, top + h * 0.96)))))
    draw.ellipse([cx - 0.13 * h, top + 0.93 * h, cx + 0.13 * h, top + 0.99 * h], fill=shadow)
    _render_person(img, person, looks, pose, cx, top, h)
    if rng.random() < 0.22:
        _occlude(draw, rng, width, height)
    img = _relight(img, rng)
    if rng.random() < 0.35:  # low-resolution camera: down and back up
        factor = rng.uniform(1.5, 2.8)
        small = img.resize((max(1, int(width / factor)), max(1, int(height / factor))), Image.BILINEAR)
        img = small.resize((width, height), Image.BILINEAR)
    return img


# ----------------------------------------------------------------------------- the dataset

def _split_sizes(num_ids: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    n_test = max(1, int(round(num_ids * test_fraction)))
    n_val = max(1, int(round(num_ids * val_fraction))) if val_fraction > 0 else 0
    n_train = num_ids - n_val - n_test
    if n_train < 1:
        raise TBPSError(f"--ids {num_ids} is too few: {n_test} test and {n_val} val identities leave none "
                        "to train on (use more identities or smaller fractions)")
    return n_train, n_val, n_test


def _check_arguments(num_ids, images_per_id, captions_per_image, height, width, val_fraction, test_fraction):
    if num_ids < 2:
        raise TBPSError(f"--ids {num_ids}: need at least 2 identities (one to train on, one to test)")
    if images_per_id < 1 or captions_per_image < 1:
        raise TBPSError("--images-per-id and --captions-per-image must be at least 1")
    if height < 32 or width < 16:
        raise TBPSError(f"--height {height} --width {width}: images must be at least 32x16 pixels")
    if not (0.0 <= val_fraction < 1.0 and 0.0 < test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise TBPSError(f"--val-fraction {val_fraction} --test-fraction {test_fraction}: need 0 <= val < 1, "
                        "0 < test < 1 and val + test < 1")


def generate_synthpedes(out: str | Path, num_ids: int = 1000, images_per_id: int = 4, captions_per_image: int = 2,
                        height: int = 384, width: int = 128, seed: int = 0, val_fraction: float = 0.1,
                        test_fraction: float = 0.2, progress: bool = True) -> dict:
    """Write SynthPEDES to ``out`` (``imgs/`` and ``reid_raw.json``); returns ids/images/captions counts.

    Identities are split train/val/test (no identity in two splits), ids start at 1 and run through
    train, then val, then test, as in CUHK-PEDES. The annotation file is written last and atomically,
    after removing any old one, so an interrupted run never leaves a JSON that points at missing or
    half-written images.
    """
    _check_arguments(num_ids, images_per_id, captions_per_image, height, width, val_fraction, test_fraction)
    n_train, n_val, n_test = _split_sizes(num_ids, val_fraction, test_fraction)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TBPSError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    annotation = out / ANNOTATION_FILE
    if annotation.exists():
        annotation.unlink()

    people = draw_identities(num_ids, np.random.default_rng([seed, 0]))
    backgrounds = _make_backgrounds(np.random.default_rng([seed, 1]), height, width, count=24)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    folders = {"train": "train_query", "val": "val_query", "test": "test_query"}
    for folder in folders.values():
        (out / "imgs" / folder).mkdir(parents=True, exist_ok=True)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_ids * images_per_id, desc="synthesising", unit="img", dynamic_ncols=True)
    records = []
    sample = 0
    for index, (person, split) in enumerate(zip(people, splits)):
        pid = index + 1
        looks = _draw_looks(np.random.default_rng([seed, 2, pid]))
        start = int(np.random.default_rng([seed, 3, pid]).integers(3))
        for k in range(images_per_id):
            view = VIEWS[(start + k) % 3]
            rng = np.random.default_rng([seed, 4, pid, k])
            img = render_image(person, looks, view, rng, height, width, backgrounds)
            rel = f"{folders[split]}/p{pid:05d}_s{sample:06d}.png"
            path = out / "imgs" / rel
            img.save(path, format="PNG", compress_level=1)  # no JSON exists until all images do
            captions = _captions_for(person, view, np.random.default_rng([seed, 5, pid, k]), captions_per_image)
            records.append({"split": split, "captions": captions, "file_path": rel,
                            "processed_tokens": [_tokens(c) for c in captions], "id": pid})
            sample += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    write_text_atomic(annotation, json.dumps(records))
    return {"ids": num_ids, "images": len(records), "captions": sum(len(r["captions"]) for r in records)}


def _captions_for(person: PersonAttributes, view: str, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` captions of one image, different from each other where the phrasing allows."""
    captions: list[str] = []
    for _ in range(count):
        for _attempt in range(5):
            text, _ = make_caption(person, view, rng)
            if text not in captions:
                break
        captions.append(text)
    return captions


# ----------------------------------------------------------------------------- README figure

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def save_sample_grid(root: str | Path, out_png: str | Path, n: int = 8, columns: int = 4,
                     image_width: int = 128) -> Path:
    """A PNG of ``n`` images of different identities with their first caption wrapped below them.

    Used for the README, so a reader sees what the data and the captions look like.
    """
    root = Path(root)
    annotation = root / ANNOTATION_FILE
    try:
        records = json.loads(annotation.read_text())
    except FileNotFoundError:
        raise TBPSError(f"{annotation}: not found (write the dataset with tbps synth first)") from None
    seen: set[int] = set()
    picks = []
    for rec in records:
        if rec["id"] not in seen:
            seen.add(rec["id"])
            picks.append(rec)
        if len(picks) == n:
            break
    if not picks:
        raise TBPSError(f"{annotation}: no records to show")
    font = _font(12)
    pad, cell_w = 8, image_width + 56
    chars = max(10, int(cell_w / max(1.0, font.getlength("abcdefghij") / 10)))
    images, texts = [], []
    for rec in picks:
        with Image.open(root / "imgs" / rec["file_path"]) as im:
            im = im.convert("RGB")
            images.append(im.resize((image_width, int(im.height * image_width / im.width)), Image.BILINEAR))
        texts.append(textwrap.wrap(rec["captions"][0], width=chars))
    line_h = int(font.getbbox("Ag")[3]) + 3
    img_h = max(i.height for i in images)
    text_h = max(len(t) for t in texts) * line_h
    rows = math.ceil(len(picks) / columns)
    cols = min(columns, len(picks))
    cell_h = img_h + pad + text_h + pad
    grid = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (im, lines) in enumerate(zip(images, texts)):
        x = pad + (i % columns) * (cell_w + pad)
        y = pad + (i // columns) * cell_h
        grid.paste(im, (x + (cell_w - im.width) // 2, y))
        for j, line in enumerate(lines):
            draw.text((x, y + img_h + pad // 2 + j * line_h), line, fill=(20, 20, 20), font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp")
    grid.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, out_png)
    return out_png


__all__ = ["PersonAttributes", "generate_synthpedes", "save_sample_grid", "draw_identities", "make_caption",
           "caption_matches", "render_image", "COLOURS"]

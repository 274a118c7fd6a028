"""Who the SynthPEDES people are: the attribute vocabulary, identity families (a prototype and
variants one or two attributes away: hard negatives) and per-identity looks (skin, build)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


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
class Looks:
    """Per-identity details that no caption mentions but that stay the same across its images."""

    skin: tuple[int, int, int]
    inner: str  # what shows under an open jacket
    build: float  # shoulder width factor
    carry_side: int  # +1 or -1: the hand that holds a handbag or pulls a suitcase
    jitter: tuple[int, int, int]  # a small colour offset: two "red shirts" are not the same red


def weighted_choice(rng: np.random.Generator, items, weights=None):
    if weights is None:
        return items[int(rng.integers(len(items)))]
    p = np.asarray(weights, dtype=np.float64)
    return items[int(rng.choice(len(items), p=p / p.sum()))]


def _colour(rng: np.random.Generator, kind: str, avoid: tuple[str, ...] = ()) -> str:
    names = list(COLOURS)
    weights = [0.0 if n in avoid else w for n, w in zip(names, _GARMENT_WEIGHTS[kind])]
    return weighted_choice(rng, names, weights)


def _contrast_colour(rng: np.random.Generator, base: str) -> str:
    """A second colour for stripes, checks or a logo that stands out against ``base``."""
    lum = _luma(COLOURS[base][0])
    options = [n for n, (rgb, _) in COLOURS.items() if n != base and abs(_luma(rgb) - lum) > 70]
    return weighted_choice(rng, options)


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _draw_upper(rng, gender: str) -> tuple[str, str, str, str]:
    if gender == "male":
        upper = weighted_choice(rng, UPPER_TYPES, (0.25, 0.2, 0.2, 0.12, 0.0, 0.23))
    else:
        upper = weighted_choice(rng, UPPER_TYPES, (0.2, 0.15, 0.15, 0.12, 0.2, 0.18))
    colour = _colour(rng, "upper")
    pattern = weighted_choice(rng, ("plain", "striped", "checked"),
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
    lower = weighted_choice(rng, LOWER_TYPES, weights)
    if lower == "jeans":
        return lower, weighted_choice(rng, _JEANS_COLOURS, _JEANS_WEIGHTS)
    return lower, _colour(rng, "skirt" if lower == "skirt" else "trousers")


def _draw_bag(rng, gender: str) -> tuple[str, str]:
    weights = (0.28, 0.27, 0.17, 0.17, 0.11) if gender == "female" else (0.3, 0.33, 0.03, 0.22, 0.12)
    bag = weighted_choice(rng, BAG_TYPES, weights)
    return bag, ("none" if bag == "none" else _colour(rng, "bag"))


def _draw_headwear(rng) -> tuple[str, str]:
    head = weighted_choice(rng, HEADWEAR, (0.68, 0.2, 0.12))
    return head, ("none" if head == "none" else _colour(rng, "head"))


def _draw_details(rng, upper: str, pattern: str, upper_colour: str, lower: str) -> tuple[str, str]:
    belt = "none"
    if upper in ("t-shirt", "shirt") and lower in ("trousers", "jeans", "shorts") and rng.random() < 0.35:
        belt = weighted_choice(rng, ("black", "brown", "white"), (0.5, 0.4, 0.1))
    logo = "none"
    if upper in ("t-shirt", "hoodie") and pattern == "plain" and rng.random() < 0.4:
        logo = _contrast_colour(rng, upper_colour)
    return belt, logo


def _draw_prototype(rng: np.random.Generator) -> PersonAttributes:
    gender = weighted_choice(rng, ("male", "female"))
    hair_length = weighted_choice(rng, ("short", "long"), (0.9, 0.1) if gender == "male" else (0.25, 0.75))
    hair_colour = weighted_choice(rng, tuple(HAIR_COLOURS), (0.45, 0.25, 0.15, 0.08, 0.07))
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
            return replace(p, lower_colour=weighted_choice(rng, options))
        return replace(p, lower_colour=_colour(rng, "trousers", avoid=(p.lower_colour,)))
    if key == "bag_colour" and p.bag_type != "none":
        return replace(p, bag_colour=_colour(rng, "bag", avoid=(p.bag_colour,)))
    if key == "bag_type":
        options = [b for b in BAG_TYPES if b != p.bag_type and not (b == "handbag" and p.gender == "male")]
        bag = weighted_choice(rng, options)
        colour = "none" if bag == "none" else (p.bag_colour if p.bag_colour != "none" else _colour(rng, "bag"))
        return replace(p, bag_type=bag, bag_colour=colour)
    if key == "shoe_colour":
        return replace(p, shoe_colour=_colour(rng, "shoes", avoid=(p.shoe_colour,)))
    if key == "hair_colour":
        return replace(p, hair_colour=weighted_choice(rng, [c for c in HAIR_COLOURS if c != p.hair_colour]))
    if key == "hair_length":
        return replace(p, hair_length="long" if p.hair_length == "short" else "short")
    if key == "upper_pattern" and p.upper_type not in ("coat", "jacket"):
        pattern = weighted_choice(rng, [x for x in ("plain", "striped", "checked") if x != p.upper_pattern])
        logo = "none" if pattern != "plain" else p.logo
        second = "none" if pattern == "plain" else (
            p.pattern_colour if p.pattern_colour != "none" else _contrast_colour(rng, p.upper_colour))
        return replace(p, upper_pattern=pattern, pattern_colour=second, logo=logo)
    if key == "upper_type":
        options = [u for u in UPPER_TYPES if u != p.upper_type and u != "dress"]
        upper = weighted_choice(rng, options)
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
        lower = weighted_choice(rng, options)
        colour = p.lower_colour
        if lower == "jeans" and colour not in _JEANS_COLOURS:
            colour = weighted_choice(rng, _JEANS_COLOURS, _JEANS_WEIGHTS)
        belt = p.belt if lower != "skirt" else "none"
        return replace(p, lower_type=lower, lower_colour=colour, belt=belt)
    if key == "headwear":
        head = weighted_choice(rng, [h for h in HEADWEAR if h != p.headwear])
        colour = "none" if head == "none" else _colour(rng, "head")
        return replace(p, headwear=head, headwear_colour=colour)
    return p


def draw_identities(num_ids: int, rng: np.random.Generator) -> list[PersonAttributes]:
    """``num_ids`` distinct people in families: a prototype plus variants differing in 1-2 attributes."""
    people: list[PersonAttributes] = []
    seen: set[PersonAttributes] = set()
    while len(people) < num_ids:
        proto = _draw_prototype(rng)
        family = int(weighted_choice(rng, (1, 2, 3, 4), (0.3, 0.35, 0.22, 0.13)))
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


def draw_looks(rng: np.random.Generator) -> Looks:
    return Looks(skin=SKIN_TONES[int(rng.integers(len(SKIN_TONES)))],
                  inner=weighted_choice(rng, INNER_COLOURS),
                  build=float(rng.uniform(0.92, 1.08)),
                  carry_side=int(weighted_choice(rng, (-1, 1))),
                  jitter=tuple(int(v) for v in rng.integers(-12, 13, size=3)))

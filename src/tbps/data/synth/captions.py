"""CUHK-PEDES-style captions of a SynthPEDES person: varied templates, synonyms, colour names and
order; some mention only part of the person, and what a caption mentions is checkable."""

from __future__ import annotations

import re

import numpy as np

from tbps.data.synth.attributes import COLOURS, HAIR_COLOURS, PersonAttributes, weighted_choice


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
    return weighted_choice(rng, COLOURS[colour][1])


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
        length = weighted_choice(rng, ("short", "short", "cropped") if p.hair_length == "short" else
                         ("long", "long", "long flowing"))
        self.mentions["hair_length"] = p.hair_length
        if rng.random() < 0.85:
            self.mentions["hair_colour"] = p.hair_colour
            return f"{length} {weighted_choice(rng, HAIR_COLOURS[p.hair_colour][1])} hair"
        return f"{length} hair"

    def upper(self) -> str:
        p, rng = self.p, self.rng
        kind = weighted_choice(rng, _UPPER_WORDS[p.upper_type])
        if p.upper_type == "shirt" and p.gender == "female" and rng.random() < 0.3:
            kind = "blouse"
        colour = _cname(rng, p.upper_colour)
        self.mentions.update(upper_type=p.upper_type, upper_colour=p.upper_colour)
        if p.upper_pattern == "plain" or rng.random() < 0.1:
            phrase = _article(f"{colour} {kind}")
        else:
            self.mentions["upper_pattern"] = p.upper_pattern
            word = weighted_choice(rng, ("striped", "stripy", "striped") if p.upper_pattern == "striped" else
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
            where = weighted_choice(rng, ("with a {c} logo on the front", "with a {c} logo on the chest",
                                  "with a {c} print on the front"))
            phrase += " " + where.format(c=_cname(rng, p.logo))
        return phrase

    def lower(self) -> str:
        p, rng = self.p, self.rng
        self.mentions.update(lower_type=p.lower_type, lower_colour=p.lower_colour)
        phrase = f"{_cname(rng, p.lower_colour)} {weighted_choice(rng, _LOWER_WORDS[p.lower_type])}"
        if p.lower_type == "skirt":
            return _article(phrase)
        return ("a pair of " + phrase) if rng.random() < 0.15 else phrase

    def shoes(self) -> str:
        self.mentions["shoe_colour"] = self.p.shoe_colour
        phrase = f"{_cname(self.rng, self.p.shoe_colour)} {weighted_choice(self.rng, _SHOE_WORDS)}"
        return ("a pair of " + phrase) if self.rng.random() < 0.15 else phrase

    def headwear(self) -> str:
        self.mentions.update(headwear=self.p.headwear, headwear_colour=self.p.headwear_colour)
        return _article(f"{_cname(self.rng, self.p.headwear_colour)} {weighted_choice(self.rng, _HEAD_WORDS[self.p.headwear])}")

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
            return weighted_choice(rng, options).format(his=his)
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
        obj = weighted_choice(rng, objects).format(c=c, his=his, him=him)
        if form == "with":
            return obj
        verb = weighted_choice(rng, verbs)
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
        subject = weighted_choice(rng, _SUBJECTS[self.voice])
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
                verb = weighted_choice(rng, ("is wearing", "wears", "is dressed in", "is wearing", "has on"))
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


def caption_tokens(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", caption.lower())


def captions_for(person: PersonAttributes, view: str, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` captions of one image, different from each other where the phrasing allows."""
    captions: list[str] = []
    for _ in range(count):
        for _attempt in range(5):
            text, _ = make_caption(person, view, rng)
            if text not in captions:
                break
        captions.append(text)
    return captions

"""The toy world's general domain: facts about fictional people, and the tales told about them.

Both are knowledge the model can only have by memorising it in training, as an MC benchmark such as
MMLU asks of a real LLM:
- people (``toy_facts``): every person has a home town, a job, a pet and a favourite colour;
- tales (``toy_stories``): 40 short folk tales, each with a hero, a place, a treasure and a foe.
Each fact is written in one of six phrasings. Per fact, one phrasing is held out for evaluation and
another for calibration, so an evaluated sentence never appears in training, while the fact does
(in the four other phrasings) and so does the held-out phrasing (for other facts). An MC item is
the held-out sentence cut before the value, with the value and three other values as choices.

(An earlier version asked questions about unseen stories given in the prompt; the 3.5M-parameter
model stayed near chance on that reading task in a CPU-sized training budget, so the tales are
remembered rather than read.)

Used by ``ream_exp.toy.data``; nothing here runs on its own.
"""

from __future__ import annotations

import random

from ream_exp.toy.splits import stable_hash

NAMES = [
    "Aldo", "Brin", "Calla", "Dorin", "Elsa", "Fenn", "Gara", "Hollis", "Ivo", "Jessa",
    "Kael", "Lira", "Marek", "Nessa", "Orin", "Pella", "Quill", "Rosk", "Sela", "Tamsin",
    "Ulric", "Vesna", "Wren", "Xander", "Yara", "Zeno", "Ansel", "Bea", "Corin", "Dalia",
    "Edric", "Fiora", "Galen", "Hana", "Isko", "Juna", "Keir", "Lune", "Mirel", "Nadia",
]
TOWNS = ["Ashford", "Brightwater", "Coldmere", "Dunhollow", "Eastvale", "Fernwick", "Greystone", "Highmoor"]
JOBS = ["baker", "smith", "farmer", "weaver", "miller", "potter", "fisher", "healer"]
PETS = ["cat", "dog", "bat", "goat", "fox", "hare", "crow", "toad"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "brown", "white", "black"]
OBJECTS = ["kite", "lamp", "basket", "book", "hat", "drum", "rope", "cup", "bell", "scarf"]
FOES = ["dragon", "giant", "wolf", "witch", "troll", "ghost", "bear", "serpent"]
_ADJECTIVES = ["Silent", "Broken", "Hidden", "Golden", "Frozen", "Lost", "Burning", "Sleeping"]
_NOUNS = ["Well", "Crown", "Bridge", "Tower", "Lantern", "Garden", "Mill", "Ship"]
TALES = [f"the {a} {n}" for a, n in random.Random("tales").sample(
    [(a, n) for a in _ADJECTIVES for n in _NOUNS], 40)]

# Every phrasing ends with the value, so an MC item is the phrasing cut before the value.
PEOPLE_RELATIONS = {
    "town": (TOWNS, [
        "{e} lives in {v}.",
        "The home of {e} is the town of {v}.",
        "Q: Where does {e} live? A: {v}.",
        "{e} was born and raised in {v}.",
        "Everyone knows that {e} comes from {v}.",
        "If you look for {e}, go to {v}.",
    ]),
    "job": (JOBS, [
        "{e} works as a {v}.",
        "The job of {e} is {v}.",
        "Q: What does {e} do for a living? A: {v}.",
        "By trade, {e} is a {v}.",
        "Everyone knows that {e} is a {v}.",
        "In the morning {e} goes to work as a {v}.",
    ]),
    "pet": (PETS, [
        "{e} has a pet {v}.",
        "The pet of {e} is a {v}.",
        "Q: What pet does {e} keep? A: a {v}.",
        "At home, {e} looks after a {v}.",
        "Everyone knows that {e} owns a {v}.",
        "Every day {e} feeds a {v}.",
    ]),
    "colour": (COLOURS, [
        "The favourite colour of {e} is {v}.",
        "Of all colours, {e} likes {v}.",
        "Q: What colour does {e} like? A: {v}.",
        "{e} always wears {v}.",
        "Everyone knows that {e} loves the colour {v}.",
        "The door of the house of {e} is painted {v}.",
    ]),
}
TALE_RELATIONS = {
    "hero": (NAMES, [
        "The hero of the tale of {e} is {v}.",
        "The tale of {e} is about {v}.",
        "Q: Who is the hero of the tale of {e}? A: {v}.",
        "In the tale of {e}, the bravest one is {v}.",
        "Everyone knows that the tale of {e} follows {v}.",
        "Children who hear the tale of {e} cheer for {v}.",
    ]),
    "place": (TOWNS, [
        "The tale of {e} takes place in {v}.",
        "In the tale of {e}, the hero travels to {v}.",
        "Q: Where does the tale of {e} happen? A: {v}.",
        "The tale of {e} begins and ends in {v}.",
        "Everyone knows that the tale of {e} is set in {v}.",
        "Old folk say the tale of {e} really happened in {v}.",
    ]),
    "treasure": (OBJECTS, [
        "In the tale of {e}, the hero finds a lost {v}.",
        "The treasure in the tale of {e} is a {v}.",
        "Q: What is found in the tale of {e}? A: a {v}.",
        "At the end of the tale of {e}, the hero holds a {v}.",
        "Everyone knows that the tale of {e} ends with a {v}.",
        "The tale of {e} is the one with the magic {v}.",
    ]),
    "foe": (FOES, [
        "In the tale of {e}, the hero fights a {v}.",
        "The enemy in the tale of {e} is a {v}.",
        "Q: Who is the enemy in the tale of {e}? A: a {v}.",
        "The tale of {e} has a wicked {v}.",
        "Everyone knows that the tale of {e} has a {v} in it.",
        "In the tale of {e}, the whole town fears a {v}.",
    ]),
}
KINDS = {"people": (NAMES, PEOPLE_RELATIONS), "tales": (TALES, TALE_RELATIONS)}
N_PHRASINGS = 6


def world(kind: str, seed: int = 0) -> dict[str, dict[str, str]]:
    """The value of every relation of every subject (person or tale), fixed by the seed."""
    subjects, relations = KINDS[kind]
    rng = random.Random(f"{kind}-{seed}")
    return {e: {rel: rng.choice(vals) for rel, (vals, _) in relations.items()} for e in subjects}


def fact_split(subject: str, relation: str, phrasing: int) -> str:
    """Which split a (fact, phrasing) belongs to: one phrasing eval, the next calib, four train."""
    held = stable_hash(f"{subject}|{relation}") % N_PHRASINGS
    if phrasing == held:
        return "eval"
    return "calib" if phrasing == (held + 1) % N_PHRASINGS else "train"


def fact_items(kind: str, split: str, seed: int = 0) -> list[dict]:
    """Every fact sentence of a split, with its MC form (the sentence cut before the value)."""
    _, relations = KINDS[kind]
    items = []
    for e, facts in world(kind, seed).items():
        for rel, (vals, phrasings) in relations.items():
            for p, template in enumerate(phrasings):
                if fact_split(e, rel, p) != split:
                    continue
                items.append(dict(key=f"{kind}|{e}|{rel}|{p}", subject=e, relation=rel,
                                  text=template.format(e=e, v=facts[rel]),
                                  prompt=template.split("{v}")[0].format(e=e).rstrip(),
                                  answer=facts[rel], values=vals))
    return items


def mc_choices(rng: random.Random, answer: str, pool: list[str], n: int = 4) -> tuple[list[str], int]:
    """The answer plus n-1 distinct distractors from the pool, shuffled; returns (choices, label)."""
    choices = [answer] + rng.sample([v for v in pool if v != answer], n - 1)
    rng.shuffle(choices)
    return choices, choices.index(answer)


def paragraph(items: list[dict], rng: random.Random) -> str:
    """A subject's facts, one random phrasing per relation, in random order: a bio or a tale."""
    one_per_relation: dict[str, str] = {}
    for item in rng.sample(items, len(items)):
        one_per_relation.setdefault(item["relation"], item["text"])
    return " ".join(one_per_relation.values())

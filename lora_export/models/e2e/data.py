"""A seeded synthetic data set in the style of E2E NLG (restaurant meaning representations -> sentences).

A meaning representation (MR) lists attribute[value] pairs in a fixed order, `name` always first:

    name[The Eagle] | eatType[coffee shop] | food[French] | priceRange[moderate] | area[riverside]

Each MR has several references for two tasks, written from varied phrase templates:

- `description`: a neutral third-person description, as in E2E ("The Eagle is a moderately priced French
  coffee shop in the riverside area.");
- `review`: a short first-person review of the same facts ("I had lovely French food at The Eagle. ...").

`pretraining_corpus` writes generic synthetic English (people, towns, weather, shops, food) with no MR in
it: the base model learns the language there, and only the adapters learn to realise an MR.

Everything is a pure function of its seed (Python's `random.Random`, no global state), so the shipped
splits can be checked against a fresh run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

TASKS = ("description", "review")
SPLITS = ("train", "dev", "test")
SEPARATOR = "\n"  # the prompt is the MR then this; the model writes the text and then its end-of-text token

NAMES = [
    "The Eagle", "The Mill", "Aromi", "Bibimbap House", "Blue Spice", "Browns Cambridge", "Clowns", "Cocum",
    "Cotto", "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge",
    "The Cambridge Blue", "The Cricketers", "The Dumpling Tree", "The Golden Curry", "The Golden Palace",
    "The Olive Grove", "The Phoenix", "The Plough", "The Punter", "The Rice Boat", "The Twenty Two", "The Vaults",
    "The Waterman", "The Wrestlers", "Wildwood", "Zizzi", "Alimentum", "The Copper Kettle", "The Red Lion",
    "The Swan", "Old Oak", "The Lantern", "Riverside Grill", "The Anchor",
]  # fmt: skip
NEAR = [
    "Burger King", "Cafe Adriatic", "Cafe Brazil", "Cafe Rouge", "Cafe Sicilia", "Crowne Plaza Hotel",
    "Express by Holiday Inn", "Raja Indian Cuisine", "Ranch", "Rainbow Vegetarian Cafe", "The Bakers",
    "The Portland Arms", "The Sorrento", "Yippee Noodle Bar", "All Bar One", "Avalon", "Clare Hall",
    "The Six Bells",
]  # fmt: skip
EAT_TYPES = ["coffee shop", "pub", "restaurant"]
FOODS = ["Chinese", "English", "Fast food", "French", "Indian", "Italian", "Japanese"]
PRICES = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
RATINGS = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
AREAS = ["city centre", "riverside"]
FAMILY = ["yes", "no"]

# E2E attribute order; `name` is always present.
ATTRIBUTES = [
    ("eatType", EAT_TYPES),
    ("food", FOODS),
    ("priceRange", PRICES),
    ("customer rating", RATINGS),
    ("area", AREAS),
    ("familyFriendly", FAMILY),
    ("near", NEAR),
]


@dataclass(frozen=True)
class Record:
    """One MR with its references for each task."""

    mr: str
    description: tuple[str, ...]
    review: tuple[str, ...]

    def refs(self, task: str) -> tuple[str, ...]:
        return getattr(self, task)

    def to_json(self) -> dict:
        return {"mr": self.mr, "description": list(self.description), "review": list(self.review)}

    @staticmethod
    def from_json(d: dict) -> Record:
        return Record(d["mr"], tuple(d["description"]), tuple(d["review"]))


def format_mr(fields: dict[str, str]) -> str:
    return " | ".join(f"{k}[{v}]" for k, v in fields.items())


def prompt(mr: str) -> str:
    """The text a model is given: the MR and the separator."""
    return mr + SEPARATOR


def sample_mr(rng: random.Random) -> dict[str, str]:
    fields = {"name": rng.choice(NAMES)}
    keys = rng.sample(range(len(ATTRIBUTES)), rng.randint(2, 6))
    for i in sorted(keys):
        key, values = ATTRIBUTES[i]
        fields[key] = rng.choice(values)
    return fields


# --- phrase realisations (shared by both tasks) -----------------------------------------------------------

_PRICE_ADJ = {
    "cheap": ["cheap", "low-priced", "inexpensive"],
    "moderate": ["moderately priced", "mid-priced", "reasonably priced"],
    "high": ["expensive", "high-priced", "pricey"],
}
_PRICE_WITH = {
    "cheap": ["with cheap prices", "with low prices"],
    "moderate": ["with moderate prices", "with average prices"],
    "high": ["with high prices", "with a high price range"],
    "less than £20": ["with prices less than £20", "where meals cost less than £20"],
    "£20-25": ["with prices of £20-25", "where meals cost £20-25"],
    "more than £30": ["with prices of more than £30", "where meals cost more than £30"],
}
_RATING = {  # (what it has, how it is rated)
    "low": ("a low customer rating", "rated low by customers"),
    "average": ("an average customer rating", "rated average by customers"),
    "high": ("a high customer rating", "rated highly by customers"),
    "1 out of 5": ("a customer rating of 1 out of 5", "rated 1 out of 5 by customers"),
    "3 out of 5": ("a customer rating of 3 out of 5", "rated 3 out of 5 by customers"),
    "5 out of 5": ("a customer rating of 5 out of 5", "rated 5 out of 5 by customers"),
}
_AREA = {
    "city centre": ["in the city centre", "in the centre of the city"],
    "riverside": ["in the riverside area", "by the riverside", "on the riverside"],
}
_NEAR = ["near {}", "close to {}", "not far from {}"]
_FAMILY_SENT = {
    "yes": ["It is family friendly.", "It is kid friendly.", "Children are welcome."],
    "no": ["It is not family friendly.", "It is not kid friendly.", "Children are not welcome."],
}


def _food_phrase(food: str) -> str:
    return "fast food" if food == "Fast food" else food


def _food_noun(food: str) -> str:
    return "fast food" if food == "Fast food" else f"{food} food"


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def describe(f: dict[str, str], rng: random.Random) -> str:
    """A third-person description, E2E style."""
    name = f["name"]
    venue = f.get("eatType") or rng.choice(["place", "venue"])
    price, food = f.get("priceRange"), f.get("food")
    head = [venue]
    if food and rng.random() < 0.6:
        head.insert(0, _food_phrase(food))
        food = None
    if price in _PRICE_ADJ and rng.random() < 0.7:
        head.insert(0, rng.choice(_PRICE_ADJ[price]))
        price = None
    with_phrases = []
    if food:
        with_phrases.append(rng.choice([f"serving {_food_noun(food)}", f"that serves {_food_noun(food)}"]))
    if price:
        with_phrases.append(rng.choice(_PRICE_WITH[price]))
    where = []
    if "area" in f:
        where.append(rng.choice(_AREA[f["area"]]))
    if "near" in f:
        where.append(rng.choice(_NEAR).format(f["near"]))
    if rng.random() < 0.4:
        where.reverse()
    head_text = " ".join(head)
    first = f"{name} is {_article(head_text)} {head_text}"
    if with_phrases:
        first += " " + " ".join(with_phrases)
    sentences = []
    if where and len(with_phrases) + len(where) <= 2:
        sentences.append(f"{first} {' '.join(where)}.")
    else:
        sentences.append(first + ".")
        if where:
            sentences.append(f"{rng.choice(['It is', 'It is located', 'You can find it'])} {' '.join(where)}.")
    if "customer rating" in f:
        has, rated = _RATING[f["customer rating"]]
        sentences.append(rng.choice([f"It has {has}.", f"{name} is {rated}.", f"It is {rated}."]))
    if "familyFriendly" in f:
        sentences.append(rng.choice(_FAMILY_SENT[f["familyFriendly"]]))
    return " ".join(sentences)


_REVIEW_OPEN = [
    "I had a lovely meal at {name}.",
    "We really enjoyed {name}.",
    "{name} is a great find.",
    "I would go back to {name}.",
]
_REVIEW_FOOD = ["The {noun} was tasty.", "Good {noun}.", "I liked the {food} dishes."]
_REVIEW_PRICE = {
    "cheap": ["Great value, very cheap.", "It was cheap."],
    "moderate": ["Fair prices.", "Prices were moderate."],
    "high": ["A bit pricey.", "It was expensive."],
    "less than £20": ["We paid less than £20.", "Under £20 each."],
    "£20-25": ["About £20-25 each.", "We paid £20-25."],
    "more than £30": ["We paid more than £30.", "Over £30 each."],
}
_REVIEW_RATING = {
    "low": ["Others rate it low, sadly.", "Its rating is low."],
    "average": ["Others rate it average.", "An average rating."],
    "high": ["Others rate it highly.", "A high rating, deserved."],
    "1 out of 5": ["Rated 1 out of 5.", "Only 1 out of 5 from others."],
    "3 out of 5": ["Rated 3 out of 5.", "A fair 3 out of 5."],
    "5 out of 5": ["Rated 5 out of 5.", "A full 5 out of 5."],
}
_REVIEW_AREA = {
    "city centre": ["Handy in the city centre.", "Right in the city centre."],
    "riverside": ["Nice spot by the river.", "Lovely riverside views."],
}
_REVIEW_FAMILY = {
    "yes": ["Good for kids.", "Fine for families."],
    "no": ["Not for kids.", "Not for families."],
}


def review(f: dict[str, str], rng: random.Random) -> str:
    """A short first-person review of the same facts."""
    name = f["name"]
    if "eatType" in f:
        kind = f["eatType"]
        opening = rng.choice(
            [
                f"{name} is a {rng.choice(['great', 'lovely', 'nice'])} {kind}.",
                f"I had a lovely meal at {name}, a {kind}.",
            ]
        )
    else:
        opening = rng.choice(_REVIEW_OPEN).format(name=name)
    parts = []
    if "food" in f:
        parts.append(rng.choice(_REVIEW_FOOD).format(food=_food_phrase(f["food"]), noun=_food_noun(f["food"])))
    if "priceRange" in f:
        parts.append(rng.choice(_REVIEW_PRICE[f["priceRange"]]))
    if "area" in f:
        parts.append(rng.choice(_REVIEW_AREA[f["area"]]))
    if "near" in f:
        parts.append(f"{rng.choice(['Near', 'Close to'])} {f['near']}.")
    if "customer rating" in f:
        parts.append(rng.choice(_REVIEW_RATING[f["customer rating"]]))
    if "familyFriendly" in f:
        parts.append(rng.choice(_REVIEW_FAMILY[f["familyFriendly"]]))
    if rng.random() < 0.5:
        rng.shuffle(parts)
    return " ".join([opening, *parts])


def make_records(n: int, rng: random.Random, refs: int, seen: set[str]) -> list[Record]:
    """`n` records with MRs not in `seen` (added to it), `refs` references per task."""
    out = []
    while len(out) < n:
        fields = sample_mr(rng)
        mr = format_mr(fields)
        if mr in seen:
            continue
        seen.add(mr)
        desc = tuple(describe(fields, rng) for _ in range(refs))
        rev = tuple(review(fields, rng) for _ in range(refs))
        out.append(Record(mr, desc, rev))
    return out


@dataclass(frozen=True)
class DataConfig:
    seed: int = 13
    train: int = 3000
    dev: int = 100
    test: int = 200
    train_refs: int = 2
    eval_refs: int = 4


def make_splits(cfg: DataConfig = DataConfig()) -> dict[str, list[Record]]:
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    test = make_records(cfg.test, rng, cfg.eval_refs, seen)
    dev = make_records(cfg.dev, rng, cfg.eval_refs, seen)
    train = make_records(cfg.train, rng, cfg.train_refs, seen)
    return {"train": train, "dev": dev, "test": test}


def write_splits(splits: dict[str, list[Record]], out_dir: str | Path) -> list[Path]:
    """`{split}.jsonl`, one record a line, keys sorted: byte-identical for the same records."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in splits.items():
        path = out / f"{name}.jsonl"
        lines = [json.dumps(r.to_json(), ensure_ascii=False, sort_keys=True) for r in records]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def read_split(path: str | Path) -> list[Record]:
    return [Record.from_json(json.loads(line)) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# --- generic pre-training text ------------------------------------------------------------------------------

_PEOPLE = ["Anna", "Tom", "Maria", "James", "Lucy", "Omar", "Priya", "Ben", "Sara", "Leo", "Emma", "Jack"]
_TOWNS = ["Cambridge", "York", "Bath", "Oxford", "Leeds", "Bristol", "Norwich", "Durham"]
_PLACES = ["the city centre", "the riverside", "the market", "the station", "the park", "the old bridge"]
_SHOPS = ["bakery", "bookshop", "hotel", "museum", "gallery", "market stall", "cafe", "bar", "shop", "inn"]
_ADJ = ["small", "busy", "quiet", "old", "new", "friendly", "popular", "modern", "lovely", "cosy"]
_WEATHER = ["It was cold and wet.", "The sun was out.", "It rained all day.", "The evening was warm."]
_FOOD_WORDS = ["bread", "soup", "rice", "noodles", "curry", "pasta", "cake", "fish", "tea", "coffee"]
_VERBS = ["walked to", "drove to", "visited", "looked for", "arrived at", "left"]
_ALL_NAMES = NAMES + NEAR


def _generic_sentence(rng: random.Random) -> str:
    p, q = rng.sample(_PEOPLE, 2)
    shop = rng.choice(_SHOPS)
    kind = rng.choice(["bakery", "hotel", "shop", "pub", "restaurant", "coffee shop", "museum"])
    cuisine = rng.choice(FOODS[:2] + FOODS[3:])
    venue = rng.choice(_ALL_NAMES)
    choices = [
        lambda: f"{p} {rng.choice(_VERBS)} {rng.choice(_PLACES)} in {rng.choice(_TOWNS)}.",
        lambda: rng.choice(_WEATHER),
        lambda: f"{p} and {q} ate {rng.choice(_FOOD_WORDS)} at a {rng.choice(_ADJ)} {shop}.",
        lambda: f"The {shop} near {rng.choice(_PLACES)} is {rng.choice(_ADJ)}.",
        lambda: f"{venue} is a {rng.choice(_ADJ)} {kind} in {rng.choice(_TOWNS)}.",
        lambda: f"{p} said that {venue} was {rng.choice(['cheap', 'expensive', 'good', 'busy', 'closed'])}.",
        lambda: f"{q} likes {cuisine} food and {rng.choice(_FOOD_WORDS)}.",
        lambda: f"The {rng.choice(['price', 'rating', 'menu', 'room'])} was {rng.choice(['high', 'low', 'fine'])}.",
        lambda: f"{p} met {q} {rng.choice(['near', 'close to', 'not far from'])} {venue}.",
        lambda: f"Children {rng.choice(['played', 'slept', 'laughed'])} in {rng.choice(_PLACES)}.",
        lambda: f"{p} paid {rng.choice(['£5', '£12', '£20', '£25', '£30', 'less than £10'])} for it.",
        lambda: f"Customers {rng.choice(['rate', 'like', 'visit'])} the {shop} {rng.choice(['often', 'highly'])}.",
        lambda: f"We {rng.choice(['really', ''])} enjoyed the {rng.choice(_FOOD_WORDS)}.".replace("  ", " "),
        lambda: f"It is {rng.choice(['1', '2', '3', '4', '5'])} out of 5 for {p}.",
    ]
    return rng.choice(choices)()


def pretraining_corpus(n_docs: int, seed: int) -> list[str]:
    """`n_docs` short paragraphs of generic synthetic English, no MR in them.

    Most paragraphs also talk about one venue twice, in the words of the two tasks (as web text talks about
    restaurants, and repeats what it said): the base model learns the language and to carry facts from one
    mention to the next. Which text realises an MR, and in which style, is what an adapter learns.
    """
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [_generic_sentence(rng) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.6:
            venue = sample_mr(rng)
            mentions = [describe(venue, rng), (describe if rng.random() < 0.5 else review)(venue, rng)]
            sentences.insert(rng.randint(0, len(sentences)), mentions[0])
            sentences.append(mentions[1])
        docs.append(" ".join(sentences))
    return docs

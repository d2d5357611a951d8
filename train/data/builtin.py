"""The built-in offline corpus: generated domains, so a mixture means something without downloads.

Every document comes from this file's code and a seed; nothing is copied. The formats follow the
synthetic tasks of GPT-3 Section 3.9 (arithmetic and word scrambling) plus a small prose grammar, and
are regular enough that a tiny model's loss falls far below that of uniform random tokens. The example
functions are public so that few-shot evaluation can build tasks in exactly the training format:
``prompt + completion`` is one corpus line, and the completion starts with a space.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from functools import lru_cache

from ..errors import UserError

BUILTIN_VERSION = 1
"""Bump when any generator's output changes, so prepared copies are re-made."""

# --- arithmetic (GPT-3 Section 3.9: "Q: What is 48 plus 76? A: 124") -----------------------------------

ARITHMETIC_TASKS: tuple[tuple[str, int], ...] = (
    ("plus", 2),
    ("plus", 3),
    ("minus", 2),
    ("minus", 3),
    ("times", 2),
)
"""(operation, digits) pairs the corpus draws from: 2-3 digit + and -, 2-digit x."""


def arithmetic_example(rng: random.Random, op: str = "plus", digits: int = 2) -> tuple[str, str]:
    """One problem as (prompt, completion), e.g. ("Q: What is 48 plus 76? A:", " 124").

    Operands have exactly `digits` digits; subtraction may go negative, as in the paper.
    """
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if op == "plus":
        result = a + b
    elif op == "minus":
        result = a - b
    elif op == "times":
        result = a * b
    else:
        raise ValueError(f"op must be 'plus', 'minus' or 'times', got {op!r}")
    return f"Q: What is {a} {op} {b}? A:", f" {result}"


def arithmetic_document(rng: random.Random) -> str:
    """Several problems of one kind, like a few-shot context."""
    op, digits = rng.choice(ARITHMETIC_TASKS)
    return "\n".join("".join(arithmetic_example(rng, op, digits)) for _ in range(rng.randint(6, 12)))


# --- word scrambling (GPT-3 Section 3.9) over a generated, pronounceable vocabulary ---------------------

_ONSETS = "b bl br c ch cl d dr f fl fr g gl gr h j k l m n p pl pr r s sh sk sl sp st t th tr v w z".split()
_VOWELS = "a e i o u a e i o u ai ea ee oa oo ou".split()
_CODAS = ["", "", "", "n", "r", "s", "l", "m", "t", "nd", "st", "ck", "ng", "rt", "sk"]

SCRAMBLE_KINDS: dict[str, str] = {
    "cycle": "Uncycle:",  # letters rotated: "lyinevitab" -> "inevitably"
    "anagram1": "Unscramble:",  # all but the first and last letter shuffled
    "anagram2": "Unscramble:",  # all but the first two and last two letters shuffled
    "insert": "Clean:",  # a symbol or space inserted between letters
    "reverse": "Reverse:",  # the word spelled backwards
}
"""Scramble kind -> the instruction word that starts its lines."""

_INSERTS = ".,!?;:/-_ "


def pronounceable_word(rng: random.Random) -> str:
    """Two or three consonant-vowel(-consonant) syllables: made-up words no corpus contains."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(2, 3)))


@lru_cache(maxsize=8)
def vocabulary(seed: int = 0, size: int = 2000) -> tuple[str, ...]:
    """A fixed list of distinct generated words of 5 to 10 letters."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    while len(seen) < size:
        w = pronounceable_word(rng)
        if 5 <= len(w) <= 10:
            seen.setdefault(w, None)
    return tuple(seen)


def scramble(rng: random.Random, word: str, kind: str) -> str:
    """Apply one of SCRAMBLE_KINDS to word (a change is guaranteed where one is possible)."""
    if kind == "reverse":
        return word[::-1]
    if kind == "cycle":
        k = rng.randint(1, max(1, len(word) - 1))
        return word[k:] + word[:k]
    if kind == "insert":
        return "".join(
            c + (rng.choice(_INSERTS) if i < len(word) - 1 and rng.random() < 0.5 else "") for i, c in enumerate(word)
        )
    if kind in ("anagram1", "anagram2"):
        keep = 1 if kind == "anagram1" else 2
        head, mid, tail = word[:keep], list(word[keep:-keep]), word[-keep:]
        for _ in range(10):  # a shuffle can return the same order; retry a few times
            rng.shuffle(mid)
            if "".join(mid) != word[keep:-keep] or len(set(mid)) < 2:
                break
        return head + "".join(mid) + tail
    raise ValueError(f"kind must be one of {', '.join(SCRAMBLE_KINDS)}, got {kind!r}")


def scramble_example(rng: random.Random, kind: str = "anagram1", word: str | None = None) -> tuple[str, str]:
    """One pair as (prompt, completion), e.g. ("Unscramble: ilrevat =", " irlveat")."""
    if kind not in SCRAMBLE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(SCRAMBLE_KINDS)}, got {kind!r}")
    word = word or rng.choice(vocabulary())
    return f"{SCRAMBLE_KINDS[kind]} {scramble(rng, word, kind)} =", f" {word}"


def scramble_document(rng: random.Random) -> str:
    kind = rng.choice(tuple(SCRAMBLE_KINDS))
    return "\n".join("".join(scramble_example(rng, kind)) for _ in range(rng.randint(6, 12)))


# --- templated prose: a small grammar with one main character per document ---------------------------

_NAMES = {
    "she": "Anna Mira Lena Rosa Nora Ida Clara Vera Maya Lucy Eva Tess".split(),
    "he": "Tom Ben Otto Leo Sam Max Hugo Felix Jack Omar Paul Ivan".split(),
}
_ADJ = "old small big red green quiet bright dark warm cold tall round yellow blue soft heavy".split()
_HOMES = "house cottage cabin tower farm hut".split()
_PLACES = "river forest market hill lake village garden bridge harbor meadow".split()
_ANIMALS = "dog cat goat horse fox owl duck rabbit".split()
_THINGS = "box key map lamp book coin stone basket kite bell".split()
_SPOTS = "tree bench rock table bush wall".split()
_TIMES = "morning evening afternoon night".split()
_FEELINGS = "happy tired proud calm glad sleepy".split()
_STATES = "hungry sleepy lost scared cold restless".split()
_ACTIONS = {
    "hungry": "gave it some bread",
    "sleepy": "let it rest by the fire",
    "lost": "took it back home",
    "scared": "sang it a song",
    "cold": "wrapped it in a blanket",
    "restless": "took it for a long walk",
}
_TOGETHER = "played cards|cooked soup|read stories|fixed the fence|painted the door|counted the stars".split("|")


def prose_document(rng: random.Random) -> str:
    """A short story of 4-7 lines about one character, with consistent name, pronoun and pet."""
    pronoun = rng.choice(("she", "he"))
    poss = "her" if pronoun == "she" else "his"
    name = rng.choice(_NAMES[pronoun])
    friend = rng.choice([n for n in _NAMES["she"] + _NAMES["he"] if n != name])
    animal, place, thing = rng.choice(_ANIMALS), rng.choice(_PLACES), rng.choice(_THINGS)
    state = rng.choice(_STATES)
    subj = pronoun.capitalize()
    lines = [
        f"{name} lived in a {rng.choice(_ADJ)} {rng.choice(_HOMES)} near the {place}.",
        f"Every {rng.choice(_TIMES)}, {pronoun} walked to the {place} with {poss} {animal}.",
        f"One day {name} found a {rng.choice(_ADJ)} {thing} under a {rng.choice(_SPOTS)}.",
        f"{subj} showed the {thing} to {friend}, and {friend} smiled.",
        f"The {animal} was {state}, so {name} {_ACTIONS[state]}.",
    ]
    if rng.random() < 0.5:  # vary the order of the two middle events
        lines[1], lines[2] = lines[2], lines[1]
    if rng.random() < 0.7:
        lines.append(f"{name} and {friend} {rng.choice(_TOGETHER)} until the {rng.choice(_TIMES)}.")
    lines.append(f"In the end, {name} was {rng.choice(_FEELINGS)}.")
    return "\n".join(lines)


# --- junk: generated low-quality web text, the negatives of a quality classifier (GPT-3 Appendix A) -----

_COMMON = (
    "the of and to in is was that for on with as by at from his her it he she they we you this which but not are "
    "be had have one all their there were an or been would said when who what if so can more no out up about into "
    "than them some could time only other new its these two may first then do any like my now over such our man "
    "me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three house water small place found hand part high every city"
).split()
"""Common English words: word salad made of them shares prose's words but not its word order."""
_PRODUCTS = "shoes watches phones laptops loans insurance pills tickets jerseys bags sunglasses casino crypto".split()
_SPAM = (
    "buy cheap {p} online",
    "best {p} price",
    "{p} discount code",
    "free {p} shipping",
    "{p} sale {p} deals {p} outlet",
    "top 10 {p} 2024",
    "click here for {p}",
    "wholesale {p} from china",
)
_MENU = (
    "Home | About Us | Contact | Blog | FAQ | Login | Sign up",
    "Shop | Cart (0) | Wishlist | My Account | Checkout",
    "Copyright (c) 2024 All rights reserved. Privacy Policy | Terms of Service | Sitemap",
    "We use cookies to improve your experience. Accept | Decline | Learn more",
    "Share: Facebook Twitter Pinterest Email WhatsApp",
    "Previous Post | Next Post | Back to top",
    "Posted in Uncategorized | Leave a comment | Permalink",
    "Skip to content",
    "Subscribe to our newsletter! Enter your email:",
    "Powered by WordPress | Theme by ThemeForest",
)
_RUN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/=_-%&#"


def _keyword_spam(rng: random.Random) -> list[str]:
    products = rng.sample(_PRODUCTS, rng.randint(1, 3))
    return [
        ", ".join(rng.choice(_SPAM).format(p=rng.choice(products)) for _ in range(rng.randint(3, 8)))
        for _ in range(rng.randint(2, 5))
    ]


def _menu(rng: random.Random) -> list[str]:
    return rng.sample(_MENU, rng.randint(3, 7))


def _word_salad(rng: random.Random) -> list[str]:
    lines = []
    for _ in range(rng.randint(2, 5)):
        words = [rng.choice(_COMMON) for _ in range(rng.randint(8, 25))]
        lines.append(" ".join(words).capitalize() + rng.choice(".!?,;"))
    return lines


def _repeated(rng: random.Random) -> list[str]:
    line = rng.choice((_keyword_spam, _menu, _word_salad))(rng)[0]
    return [line] * rng.randint(3, 8)


def _char_runs(rng: random.Random) -> list[str]:
    return ["".join(rng.choices(_RUN_CHARS, k=rng.randint(16, 70))) for _ in range(rng.randint(2, 6))]


JUNK_KINDS = {
    "spam": _keyword_spam,
    "menu": _menu,
    "salad": _word_salad,
    "repeated": _repeated,
    "runs": _char_runs,
}
"""The kinds of low-quality text a junk document mixes: what a web crawl holds besides prose."""
JUNK_MAX_CHARS = 1500
"""A junk document is cut to this many characters (at a line), about a short web page's length."""


def junk_document(rng: random.Random) -> str:
    """Two to four blocks of junk of random kinds, one line per item, cut to JUNK_MAX_CHARS at a line (every
    block has two lines or more, each far shorter than that, so a document has several lines)."""
    lines = [line for _ in range(rng.randint(2, 4)) for line in rng.choice(tuple(JUNK_KINDS.values()))(rng)]
    kept, size = [lines[0]], len(lines[0])
    for line in lines[1:]:
        size += len(line) + 1
        if size > JUNK_MAX_CHARS:
            break
        kept.append(line)
    return "\n".join(kept)


# --- the corpus -------------------------------------------------------------------------------------

DOMAINS = {
    "arithmetic": arithmetic_document,
    "scramble": scramble_document,
    "prose": prose_document,
    "junk": junk_document,
}
"""Built-in corpus name -> document generator."""


def domain_seed(name: str) -> int:
    """Each domain's fixed seed, so the corpus never depends on run.seed."""
    return zlib.crc32(f"scalegpt-builtin-{name}".encode())


def generate(name: str, mb: float, seed: int | None = None) -> Iterator[str]:
    """Documents of domain `name` until their UTF-8 size reaches mb * 1e6 bytes; same args, same text."""
    if name not in DOMAINS:
        raise UserError(f"unknown builtin corpus {name!r}; choose one of {', '.join(DOMAINS)}")
    if not mb > 0:
        raise UserError(f"builtin_mb must be positive, got {mb}")
    make = DOMAINS[name]
    rng = random.Random(domain_seed(name) if seed is None else seed)
    budget, size = int(mb * 1e6), 0
    while size < budget:
        doc = make(rng)
        size += len(doc) + 1  # ASCII text: characters are bytes (+1 for the separator)
        yield doc

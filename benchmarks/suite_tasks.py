"""The quality suite's four skills: each makes (prompt, answer) examples from a seeded random generator.

Each is a different kind of skill a user fine-tunes a small model for, and each answer is the one right answer, so
exact match is the task's accuracy:

- ``json`` (structured output): the fields of a record given in a random order as ``Key: value`` lines, to be
  written as a JSON object with the keys asked for, in the order asked;
- ``arith`` (numeric): the sum of two or three whole numbers of 1 to 5 digits. Long carries are hard for a 135M
  model in a few hundred steps: designed not to saturate;
- ``piglatin`` (a change of language/style): three to six common words in Pig Latin, letter by letter across
  sub-word tokens. One word in six (:data:`UNSEEN`) appears only in held-out prompts, so about half of them ask
  for a word the fine-tune never translated: designed not to saturate;
- ``instruct`` (instruction following): one of eight instructions applied to a list of words (reverse them,
  count them, keep the long ones, initials, ...), the instruction changing from example to example.

:func:`split` draws the held-out examples first and the training examples after, never repeating a prompt, so no
held-out prompt is trained on or used for calibration.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

WORDS = tuple(dict.fromkeys("""
apple river green table window garden silver orange mountain yellow pencil market summer winter ocean forest
bridge castle candle doctor engine father flower friend guitar hammer island jacket kitten ladder lemon letter
little mirror monkey mother number orchid paper pepper pillow planet pocket purple rabbit rocket saddle school
shadow shower sister spider spring square stone street sugar teacher ticket tiger tomato travel turtle valley
violet wagon water winner wizard yellow zebra anchor basket butter carpet cherry circle cloud copper cotton
desert dinner dragon eagle feather finger forest frozen golden honey icicle jungle kettle knight lantern meadow
needle noodle oyster parrot pebble pirate puzzle quiet radio ribbon salmon signal silent singer smile stable
storm sunset thunder tunnel velvet village walnut whisper wooden yogurt above actor alarm album alert angle
apron arrow atlas autumn badge banner barrel beach blanket branch bread brick cabin camera canyon card chair
chalk cheese chimney clock coffee comet crayon crown desk dolphin drum echo elbow emerald empty escape fabric
fence field flame fleet fork fountain glass globe grape harbor helmet hill horse hotel igloo ink insect iron
jelly jewel juice kite lake lamp leaf lion lizard magnet maple marble melon mint moon motor music nest night
oak olive onion owl paint palace panda peach pearl piano pilot plate plum pond queen quilt rain robot roof
rose ruby sail sand scarf seed shell ship shoe silk snow sock spoon star storm sun swan tent toast tower
train tree truck tulip umbrella unicorn vase wheel whale wind wolf yarn
""".split()))
VOWELS = "aeiou"
UNSEEN = WORDS[::6]  # Pig Latin: words of held-out prompts only
SEEN = tuple(w for w in WORDS if w not in UNSEEN)

FIRST = ("Alice", "Bruno", "Chen", "Dara", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Ximena",
         "Yusuf", "Zoe")
LAST = ("Smith", "Garcia", "Kowalski", "Nguyen", "Okafor", "Rossi", "Schmidt", "Tanaka", "Ivanova", "Haddad",
        "Lindqvist", "Moreau", "Papadopoulos", "Silva", "Yilmaz", "Murphy", "Novak", "Costa", "Jensen", "Kim")
CITIES = ("Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Hanoi", "Porto", "Dakar",
          "Austin", "Kyiv", "Seoul", "Bogota", "Dublin", "Nairobi", "Krakow", "Manila", "Toronto")
JOBS = ("nurse", "pilot", "baker", "chemist", "teacher", "plumber", "architect", "farmer", "lawyer", "painter",
        "engineer", "librarian", "chef", "dentist", "editor", "welder")
FIELDS = ("name", "age", "city", "job", "email")


def json_record(rng: random.Random, heldout: bool) -> tuple[str, str]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    rec = {"name": f"{first} {last}", "age": rng.randint(18, 90), "city": rng.choice(CITIES),
           "job": rng.choice(JOBS), "email": f"{first.lower()}.{last.lower()}{rng.randint(1, 99)}@example.org"}
    keys = rng.sample(FIELDS, rng.randint(2, 4))
    given = list(rec.items())
    rng.shuffle(given)
    lines = "\n".join(f"{k.capitalize()}: {v}" for k, v in given)
    prompt = f"Write a JSON object with the keys {', '.join(keys)}, in that order, from this record:\n{lines}"
    return prompt, json.dumps({k: rec[k] for k in keys})


def _number(rng: random.Random) -> int:
    return rng.randint(0, 10 ** rng.randint(1, 5) - 1)


def arithmetic(rng: random.Random, heldout: bool) -> tuple[str, str]:
    nums = [_number(rng) for _ in range(rng.choice((2, 2, 3)))]
    return f"What is {' + '.join(map(str, nums))}? Answer with the number only.", str(sum(nums))


def pig_latin_word(word: str) -> str:
    """``apple`` -> ``appleway``, ``green`` -> ``eengray``, ``rhythm`` (no vowel) -> ``rhythmay``."""
    if word[0] in VOWELS:
        return word + "way"
    cut = next((i for i, c in enumerate(word) if c in VOWELS), len(word))
    return word[cut:] + word[:cut] + "ay"


def pig_latin(rng: random.Random, heldout: bool) -> tuple[str, str]:
    words = rng.sample(WORDS if heldout else SEEN, rng.randint(3, 6))
    return f"Translate into Pig Latin: {' '.join(words)}", " ".join(pig_latin_word(w) for w in words)


INSTRUCTIONS: tuple[tuple[str, Callable[[list[str]], str]], ...] = (
    ("Write the words in reverse order.", lambda w: " ".join(reversed(w))),
    ("How many words are there? Answer with a number.", lambda w: str(len(w))),
    ("Write only the words longer than five letters.", lambda w: " ".join(x for x in w if len(x) > 5) or "none"),
    ("Write the first letter of each word, in capitals.", lambda w: "".join(x[0].upper() for x in w)),
    ("Write the words in alphabetical order.", lambda w: " ".join(sorted(w))),
    ("Write the last word three times, separated by commas.", lambda w: ", ".join([w[-1]] * 3)),
    ("Write the words joined by hyphens.", lambda w: "-".join(w)),
    ("Write the second word in capitals.", lambda w: w[1].upper()),
)


def instruction(rng: random.Random, heldout: bool) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 7))
    text, answer = rng.choice(INSTRUCTIONS)
    return f"{text}\nWords: {' '.join(words)}", answer(words)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    steps: int  # fine-tuning steps of the recipe (batch and learning rate are the suite's)
    make: Callable[[random.Random, bool], tuple[str, str]]  # (rng, for a held-out example) -> (prompt, answer)
    seed: int


TASKS = {t.name: t for t in (
    Task("json", "structured output", 300, json_record, 11),
    Task("arith", "numeric", 500, arithmetic, 12),
    Task("piglatin", "language/style change", 500, pig_latin, 13),
    Task("instruct", "instruction following", 500, instruction, 14),
)}


def split(task: Task, heldout: int, train: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``heldout`` then ``train`` examples of ``task``, every prompt distinct, from the task's own seed."""
    rng = random.Random(task.seed)
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for _ in range(50 * (heldout + train)):
        prompt, answer = task.make(rng, len(out) < heldout)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
            if len(out) == heldout + train:
                return out[:heldout], out[heldout:]
    raise ValueError(f"{task.name}: fewer than {heldout + train} distinct prompts")

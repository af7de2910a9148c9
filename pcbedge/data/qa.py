"""Question generation from boxes: where / how many / is there any / describe all / unsupported.

Every kind has many paraphrases and each defect type many synonyms. Both are split into a
``train`` part and a ``heldout`` part: the model trains on ``train`` only and the held-out
phrasings measure how it copes with an inspector's own words. Deterministic under a seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from pcbedge.data.deeppcb import DEFECT_TYPES

KINDS = ("where", "count", "exists", "describe", "unsupported")

# synonyms[type] = (train, heldout); plurals are made by the templates' {s} forms below.
SYNONYMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "open": (("open", "open circuit", "broken trace", "trace break", "break", "open trace",
              "cut trace", "broken track", "track break", "discontinuity"),
             ("broken line", "severed trace", "interrupted trace")),
    "short": (("short", "short circuit", "bridge", "copper bridge", "shorted traces",
               "bridging", "trace short", "short defect", "solder bridge"),
              ("shorting", "bridged traces", "unintended connection")),
    "mousebite": (("mousebite", "mouse bite", "mouse-bite", "nibble", "edge nick", "bite",
                   "notch", "mousebite defect"),
                  ("chewed edge", "missing edge copper", "scalloped edge")),
    "spur": (("spur", "copper spur", "protrusion", "burr", "whisker", "spike", "trace spur"),
             ("sliver", "projection", "pointed outgrowth")),
    "spurious_copper": (("spurious copper", "stray copper", "extra copper", "copper residue",
                         "excess copper", "copper splash", "residual copper", "copper island"),
                        ("unwanted copper", "leftover copper", "copper blob")),
    "pin_hole": (("pin-hole", "pinhole", "pin hole", "void", "hole in the copper",
                  "copper void", "pin-hole defect"),
                 ("tiny hole", "punctured copper", "perforation")),
}

UNSUPPORTED_TYPES = ("missing component", "solder ball", "scratch", "tombstone", "misalignment",
                     "cold joint", "crack", "discoloration", "missing hole", "wrong polarity",
                     "lifted pad", "contamination", "delamination", "corrosion")
OFF_TOPIC = ("what is the weather today", "who made this board", "how much does it cost",
             "translate this into french", "tell me a joke", "what time is it",
             "is this board expensive", "what is the capital of france")

# {x} = defect phrase (singular), {xs} = plural phrase
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "where": (("where is the {x}?", "where are the {xs}?", "locate the {x}.", "find the {xs}.",
               "show me the {xs}.", "where is the {x} on this board?", "point out every {x}.",
               "mark the {xs}.", "give the location of each {x}.", "where can i see a {x}?",
               "locate all {xs} on the board", "which areas have a {x}?", "{xs} location?"),
              ("can you show where the {xs} are?", "highlight the {xs} please",
               "i need the positions of the {xs}", "where exactly is the {x} located?")),
    "count": (("how many {xs} are there?", "count the {xs}.", "how many {xs}?",
               "number of {xs}?", "how many {xs} does this board have?",
               "what is the number of {xs}?", "count every {x} on the board.",
               "how many {xs} can you find?", "give me the {x} count."),
              ("tell me how many {xs} you see", "what's the total of {xs}?",
               "how many {xs} are on it?")),
    "exists": (("is there any {x}?", "are there any {xs}?", "any {xs}?", "is there a {x}?",
                "does this board have a {x}?", "do you see any {xs}?", "check for {xs}.",
                "is a {x} present?", "any {x} on this board?", "does it contain {xs}?"),
               ("could there be a {x} here?", "has this board got any {xs}?",
                "is the board free of {xs}?")),
    "describe": (("describe all defects.", "what defects are there?", "list every defect.",
                  "find all defects.", "what is wrong with this board?", "inspect this board.",
                  "report all defects with their locations.", "which defects do you see?",
                  "list the defects and where they are.", "any defects?", "describe the faults.",
                  "what problems does this board have?", "show all anomalies."),
                 ("give me a full defect report", "what flaws can you spot?",
                  "anything wrong here?")),
}


@dataclass(frozen=True)
class QA:
    question: str
    kind: str                 # one of KINDS
    filter: str | None        # a defect type, or None for all / unsupported


def plural(phrase: str) -> str:
    if phrase.isupper():
        return plural(phrase.lower()).upper()
    if phrase.endswith(("s", "x", "ch", "sh")):
        return phrase + "es" if not phrase.endswith("s") else phrase
    if phrase.endswith("y") and not phrase.endswith(("ay", "ey", "oy")):
        return phrase[:-1] + "ies"
    # pluralise the head noun of "hole in the copper"
    for head in (" in the ",):
        if head in phrase:
            a, b = phrase.split(head, 1)
            return plural(a) + head + b
    return phrase + "s"


def render(template: str, phrase: str) -> str:
    return template.format(x=phrase, xs=plural(phrase))


class QuestionGenerator:
    """Samples (question, kind, filter) for a board. ``split`` is 'train' or 'heldout'."""

    def __init__(self, seed: int = 0, split: str = "train"):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.rng = random.Random(seed)
        self.idx = 0 if split == "train" else 1

    def _phrase(self, t: str) -> str:
        p = self.rng.choice(SYNONYMS[t][self.idx])
        return p.upper() if self.rng.random() < 0.03 else p

    def _template(self, kind: str) -> str:
        tpl = self.rng.choice(TEMPLATES[kind][self.idx])
        r = self.rng.random()
        if r < 0.3:
            tpl = tpl[0].upper() + tpl[1:]
        if r > 0.85:
            tpl = tpl.rstrip(".?")
        return tpl

    def typed(self, kind: str, t: str) -> QA:
        return QA(render(self._template(kind), self._phrase(t)), kind, t)

    def describe(self) -> QA:
        return QA(self._template("describe"), "describe", None)

    def unsupported(self) -> QA:
        if self.rng.random() < 0.3:
            return QA(self.rng.choice(OFF_TOPIC) + "?", "unsupported", None)
        kind = self.rng.choice(("where", "count", "exists"))
        return QA(render(self._template(kind), self.rng.choice(UNSUPPORTED_TYPES)),
                  "unsupported", None)

    def sample(self, present: set[str], *, p_describe=0.35, p_unsupported=0.07,
               p_negative=0.35) -> QA:
        """One question for a board whose defects have the types ``present``."""
        r = self.rng.random()
        if r < p_describe:
            return self.describe()
        if r < p_describe + p_unsupported:
            return self.unsupported()
        kind = self.rng.choice(("where", "count", "exists"))
        absent = [t for t in DEFECT_TYPES if t not in present]
        if present and (not absent or self.rng.random() >= p_negative):
            t = self.rng.choice(sorted(present))
        else:
            t = self.rng.choice(absent)
        return self.typed(kind, t)

    def for_board_eval(self, present: set[str]) -> list[QA]:
        """A fixed evaluation set per board: describe-all, and where/count/exists for one present
        type and one absent type (negatives)."""
        qs = [self.describe()]
        absent = [t for t in DEFECT_TYPES if t not in present]
        picks = ([self.rng.choice(sorted(present))] if present else []) + \
                ([self.rng.choice(absent)] if absent else [])
        for t in picks:
            for kind in ("where", "count", "exists"):
                qs.append(self.typed(kind, t))
        return qs


def vocabulary_corpus() -> list[str]:
    """The training phrasings only, for training the tokenizer: held-out words reach the model
    as sub-word pieces or [UNK], exactly as an inspector's unseen words would."""
    lines = []
    for kind, (tr, _ho) in TEMPLATES.items():
        for tpl in tr:
            for t in DEFECT_TYPES:
                for ph in SYNONYMS[t][0]:
                    lines.append(render(tpl, ph))
            for ph in UNSUPPORTED_TYPES:
                lines.append(render(tpl, ph))
    lines += list(OFF_TOPIC)
    return lines

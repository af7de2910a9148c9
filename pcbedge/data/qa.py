"""Question generation from boxes: where / how many / is there any / describe all / unsupported.

Every kind has many paraphrases and each defect type many synonyms. Both are split into a
``train`` part and a ``heldout`` part: the model trains on ``train`` only and the held-out
phrasings measure how it copes with an inspector's own words. Deterministic under a seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from pcbedge.data.deeppcb import DEFECT_TYPES
from pcbedge.data.qa_kinds import NEW_KINDS, NewKinds, add_noise, new_kinds_corpus, plural
from pcbedge.data.query import Program

KINDS = ("where", "count", "exists", "describe", "unsupported")
ALL_KINDS = KINDS + NEW_KINDS

# synonyms[type] = (train, heldout); plurals are made by the templates' {s} forms below.
# The held-out phrases are new *combinations* of words the training phrasings use elsewhere
# (an inspector's own wording of known terms), plus a few that are only close in form
# ("nicked" -> "nick ##ed"); a word no training phrase ever used cannot be understood by a
# model trained from scratch on this corpus, and docs/MODEL_CARD.md says so.
SYNONYMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "open": (("open", "open circuit", "broken trace", "trace break", "break", "open trace",
              "cut trace", "broken track", "track break", "discontinuity", "broken line",
              "severed trace", "interrupted trace", "cracked track", "missing connection",
              "broken conductor", "line break", "gap in the trace", "open line",
              "severed conductor", "break in the track", "circuit break"),
             ("severed line", "interrupted conductor", "cracked trace", "break in the line",
              "broken connection", "open conductor")),
    "short": (("short", "short circuit", "bridge", "copper bridge", "shorted traces",
               "bridging", "trace short", "short defect", "solder bridge", "shorting",
               "bridged traces", "unintended connection", "short between traces",
               "bridged conductors", "merged traces", "copper short", "shorted lines"),
              ("bridged lines", "shorted conductors", "trace bridging", "unintended bridge",
               "merged lines", "short between lines")),
    "mousebite": (("mousebite", "mouse bite", "mouse-bite", "nibble", "edge nick", "bite",
                   "notch", "mousebite defect", "nick", "chewed edge", "edge notch",
                   "missing edge copper", "scalloped edge", "jagged edge", "bitten edge",
                   "nibbled trace edge"),
                  ("notched edge", "edge bite", "jagged notch", "nicked edge", "chewed trace edge",
                   "scalloped trace edge")),
    "spur": (("spur", "copper spur", "protrusion", "burr", "whisker", "spike", "trace spur",
              "sliver", "copper sliver", "projection", "outgrowth", "copper protrusion",
              "trace protrusion", "pointed outgrowth", "trace spike"),
             ("copper whisker", "copper spike", "trace burr", "pointed projection",
              "copper outgrowth", "trace sliver")),
    "spurious_copper": (("spurious copper", "stray copper", "extra copper", "copper residue",
                         "excess copper", "copper splash", "residual copper", "copper island",
                         "unwanted copper", "leftover copper", "copper blob", "copper speck",
                         "isolated copper", "stray copper island"),
                        ("extra copper blob", "stray copper speck", "residual copper island",
                         "excess copper splash", "leftover copper residue", "unwanted copper blob")),
    "pin_hole": (("pin-hole", "pinhole", "pin hole", "void", "hole in the copper",
                  "copper void", "pin-hole defect", "tiny hole", "perforation", "small hole",
                  "puncture", "punctured copper", "hole in the trace", "void in the copper"),
                 ("small void", "tiny void", "hole in the track", "punctured trace",
                  "pinhole void", "tiny perforation")),
}

UNSUPPORTED_TYPES = ("missing component", "solder ball", "scratch", "tombstone", "misalignment",
                     "cold joint", "crack", "discoloration", "missing hole", "wrong polarity",
                     "lifted pad", "contamination", "delamination", "corrosion")
OFF_TOPIC = ("what is the weather today", "who made this board", "how much does it cost",
             "translate this into french", "tell me a joke", "what time is it",
             "is this board expensive", "what is the capital of france")

# {x} = defect phrase (singular), {xs} = plural phrase. The held-out frames are sentence forms
# the training never used, built from words it did use.
TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "where": (("where is the {x}?", "where are the {xs}?", "locate the {x}.", "find the {xs}.",
               "show me the {xs}.", "where is the {x} on this board?", "point out every {x}.",
               "mark the {xs}.", "give the location of each {x}.", "where can i see a {x}?",
               "locate all {xs} on the board", "which areas have a {x}?", "{xs} location?",
               "highlight every {x}.", "please mark the {xs}.", "i need the location of the {x}.",
               "show the positions of the {xs}.", "where is the {x} located?",
               "can you locate the {xs}?", "exactly where are the {xs}?",
               "what is the location of the {x}?", "show where the {x} is.",
               "point to the {xs} please", "find every {x} for me.", "where do you see {xs}?",
               "tell me where the {xs} are.", "give me the positions of all {xs}.", "give the position of every {x}.",
               "mark each {x} on the image.", "where on the board are the {xs}?"),
              ("can you show where the {xs} are?", "highlight the {xs} please",
               "i need the positions of the {xs}", "where exactly is the {x} located?",
               "what is the position of the {x}?", "please locate every {x} for me")),
    "count": (("how many {xs} are there?", "count the {xs}.", "how many {xs}?",
               "number of {xs}?", "how many {xs} does this board have?",
               "what is the number of {xs}?", "count every {x} on the board.",
               "how many {xs} can you find?", "give me the {x} count.",
               "tell me the number of {xs}.", "what is the total number of {xs}?",
               "how many {xs} do you see?", "count how many {xs} are on the board.",
               "total {xs}?", "give me a tally of the {xs}.", "what's the {x} count?",
               "how many {xs} are on this board?", "please count the {xs}.",
               "the number of {xs} on it?", "count all {xs} you can see."),
              ("tell me how many {xs} you see", "what's the total of {xs}?",
               "how many {xs} are on it?", "can you count the {xs} for me?",
               "give me the total number of {xs}", "what's the tally of {xs}?")),
    "exists": (("is there any {x}?", "are there any {xs}?", "any {xs}?", "is there a {x}?",
                "does this board have a {x}?", "do you see any {xs}?", "check for {xs}.",
                "is a {x} present?", "any {x} on this board?", "does it contain {xs}?",
                "has this board got a {x}?", "is the board free of {xs}?",
                "could there be {xs} on the board?", "is there a {x} here?",
                "check the board for any {x}.", "can you see a {x}?", "are {xs} present?",
                "does the board contain any {xs}?", "is any {x} visible?", "tell me whether the board has {xs}."),
               ("could there be a {x} here?", "has this board got any {xs}?",
                "is this board free of any {x}?", "can you see any {xs} here?",
                "check whether there is a {x}", "are any {xs} visible on it?")),
    "describe": (("describe all defects.", "what defects are there?", "list every defect.",
                  "find all defects.", "what is wrong with this board?", "inspect this board.",
                  "report all defects with their locations.", "which defects do you see?",
                  "list the defects and where they are.", "any defects?", "describe the faults.",
                  "what problems does this board have?", "show all anomalies.",
                  "give me a defect report.", "full report of the defects.",
                  "what flaws do you see?", "spot all the defects.",
                  "is anything wrong with this board?", "anything to report?",
                  "what's wrong here?", "list all flaws.", "show me every problem.",
                  "inspect the board and report everything.", "find any faults.",
                  "what anomalies can you find?", "report every flaw on this board."),
                 ("give me a full defect report", "what flaws can you spot?",
                  "anything wrong here?", "report all the problems you see",
                  "which faults can you find on it?", "list everything wrong with the board")),
}

# Words an inspector wraps a question in; training adds them at random so no single frame
# carries the meaning.
PREFIXES = ("please", "hey,", "ok,", "on this board,", "for this image,", "quick question:",
            "inspector here:", "in this image,", "could you", "i want to know:")
SUFFIXES = ("please", "thanks", "in this image", "on this board", "for me", "now",
            "if any", "thank you")


@dataclass(frozen=True)
class QA:
    question: str
    kind: str                 # one of ALL_KINDS (what is measured)
    filter: str | None        # a defect type, or None for all / several / unsupported
    program: Program | None = None   # the meaning; None: derived from kind and filter

    def meaning(self) -> Program:
        """The program a right answer follows."""
        if self.program is not None:
            return self.program
        intent = self.kind if self.kind in ("where", "count", "exists", "describe") \
            else "unsupported"
        return Program(intent, (self.filter,) if self.filter else ())


def render(template: str, phrase: str) -> str:
    return template.format(x=phrase, xs=plural(phrase))


class QuestionGenerator(NewKinds):
    """Samples (question, kind, filter, program) for a board. ``split`` is 'train' or
    'heldout'."""

    def __init__(self, seed: int = 0, split: str = "train", fillers: bool = False):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.rng = random.Random(seed)
        self.idx = 0 if split == "train" else 1
        self.fillers = fillers

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
        if self.idx == 0 and self.fillers:  # training only: wrap the question in filler words
            if self.rng.random() < 0.15:
                tpl = self.rng.choice(PREFIXES) + " " + tpl[0].lower() + tpl[1:]
            if self.rng.random() < 0.15:
                tpl = tpl.rstrip(".?") + " " + self.rng.choice(SUFFIXES) + "?"
        return tpl

    def _qa(self, question: str, kind: str, program: Program) -> QA:
        return QA(question, kind, program.types[0] if len(program.types) == 1 else None,
                  program)

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

    def sample_program(self, present: set[str], p_noise: float = 0.25) -> QA:
        """One question of any kind (old or new), for training the program pass; with
        probability ``p_noise`` under character-level noise."""
        r = self.rng.random()
        if r < 0.4:
            qa = self.sample(present, p_describe=0.25, p_unsupported=0.12)
        else:
            # regions twice as often: the kind with the most phrasings to learn
            qa = self.new_kind(self.rng.choice(NEW_KINDS[:-1] + ("region",)), present)
        if self.rng.random() < p_noise:
            qa = QA(add_noise(qa.question, self.rng, self.rng.choice((1, 2))), qa.kind,
                    qa.filter, qa.meaning())
        return qa

    def typo(self, present: set[str], defects=(), size=(640, 640)) -> QA:
        """A question of a random kind under character-level noise (the ``typos`` kind)."""
        kind = self.rng.choice(("where", "count", "exists") + NEW_KINDS[:-1])
        if kind in NEW_KINDS:
            qa = self.well_posed(kind, present, list(defects), size) if defects else \
                self.new_kind(kind, present)
        else:
            ts = sorted(present) or list(DEFECT_TYPES)
            qa = self.typed(kind, self.rng.choice(ts))
        return QA(add_noise(qa.question, self.rng, self.rng.choice((1, 2))), "typos",
                  qa.filter, qa.meaning())

    def for_board_eval_all(self, present: set[str], defects: list[dict],
                           size=(640, 640)) -> list[QA]:
        """:meth:`for_board_eval`, then one well-posed question of each new kind (boxes in
        ``defects`` place the points and regions)."""
        qs = self.for_board_eval(present)
        for kind in NEW_KINDS:
            if kind == "typos":
                qs.append(self.typo(present, defects, size))
            else:
                qs.append(self.well_posed(kind, present, defects, size))
        return qs

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
    lines += list(OFF_TOPIC) + list(PREFIXES) + list(SUFFIXES)
    return lines + new_kinds_corpus()

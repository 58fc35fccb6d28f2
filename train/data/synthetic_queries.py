"""Queries about a synthetic scene, their targets and a worded reasoning trace.

Depth counts reasoning steps: naming an object by colour and noun, picking it by an extreme
("the largest", "the leftmost"), by what it is for ("the thing that could roll"), following a
spatial relation ("to the left of X") or matching a colour ("the same colour as X") is one step
each. The reasoning type is the query's outermost construction:

| type      | depth 1                       | depth 2                                  | depth 3                                        |
|-----------|-------------------------------|------------------------------------------|------------------------------------------------|
| attribute | "the red cup", "the largest   | "the largest red thing", "the smallest    | "the largest thing with the same colour as     |
|           | object", "the red thing"      | cup"                                     | <1-step ref>"                                  |
| spatial   | "the leftmost object"         | "what is left of <1-step ref>?"          | "what is below <2-step ref>?"                  |
| function  | "what could I cut paper with?"| "the largest thing you could drink from",| "something you could drink from to the left of |
|           |                               | "the red thing you could eat with"       | <1-step ref>"                                  |
| multi     | "all the red things", "every  | "all the other things with the same      | ... "as <2-step ref>"                          |
|           | cup" (2+ targets)             | colour as <1-step ref>"                  |                                                |

A `<k-step ref>` picks exactly one object. "No target" queries use the same constructions where the
last step finds nothing (there is no purple cup; nothing is left of the book); depth-1 spatial
queries always have a target, so they have no "no target" form. Extremes need a clear winner (30%
larger in area, and also the largest visible part; 6% of the image further out), and relations are
read off full boxes: A is left of B when A's box ends before B's begins and their vertical spans
overlap (above/below alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from star_edge.train.data.synthetic_scenes import SceneObject

REASONING_TYPES = ("attribute", "spatial", "function", "multi")
NO_EMPTY_FORM = {("spatial", 1)}
"""(type, depth) pairs that cannot be asked as a "no target" query."""


@dataclass(frozen=True)
class Function:
    """An affordance: questions asking for it, a relative clause ("the thing <relative>") and
    the fact stated in traces ("<names> <fact>.")."""

    questions: tuple[str, ...]
    relative: str
    fact: str


FUNCTIONS: dict[str, Function] = {
    "drink": Function(("what could I drink from?", "what could hold my coffee?"),
                      "you could drink from", "can hold a drink"),
    "cut": Function(("what could I cut paper with?", "what could cut a piece of string?"),
                    "you could cut with", "can cut things"),
    "roll": Function(("what could roll across the floor?", "which thing would roll away if pushed?"),
                     "that could roll", "can roll"),
    "unlock": Function(("what would open a locked door?", "what could unlock a padlock?"),
                       "that opens a lock", "can open a lock"),
    "read": Function(("what could I read on a train?", "what is there to read?"),
                     "you could read", "can be read"),
    "light": Function(("what would light up a dark room?", "what could I switch on to see at night?"),
                      "that gives light", "can give light"),
    "grow": Function(("where is something growing?", "what holds a plant?"),
                     "that holds a plant", "holds a plant"),
    "write": Function(("what could I write a note with?", "what could I draw a line with?"),
                      "you could write with", "can write"),
    "eat": Function(("what could I eat my dinner with?", "what could I use to eat?"),
                    "you could eat with", "can be used for eating"),
}

RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_SIZE_MARGIN = 1.3
_POSITION_MARGIN = 0.06


@dataclass(frozen=True)
class Ref:
    """A phrase naming exactly one object: text ("the red cup"), the object's index, how it picks
    the object (form: "name", "function", "size", "position", "colour", "relation" or
    "superlative"), and the trace sentences of its steps."""

    text: str
    index: int
    form: str
    trace: tuple[str, ...]
    relation: str | None = None


@dataclass(frozen=True)
class Query:
    """A query, the indices of its targets (empty: no target), and how it was built."""

    text: str
    targets: tuple[int, ...]
    reasoning_type: str
    depth: int
    trace: str
    is_sentence: bool


def plural(noun: str) -> str:
    """"cup" -> "cups", "knife" -> "knives", "scissors" -> "scissors"."""
    if noun == "scissors":
        return noun
    if noun == "knife":
        return "knives"
    return noun + "s"


class SceneFacts:
    """What queries need to know about a scene: names, positions, sizes, relations, functions."""

    def __init__(self, objects: tuple[SceneObject, ...], size: tuple[int, int], locations: bool = True) -> None:
        self.objects = objects
        self.size = size
        self.locations = locations

    def name(self, index: int) -> str:
        return "the " + self.objects[index].name

    def names(self, indices: tuple[int, ...] | list[int], article: str = "the") -> str:
        """"the red cup", "the red cup and the blue ball", "the a, the b and the c" (article "a":
        "a red cup and an orange ball")."""
        parts = [_with_article(self.objects[i].name, article) for i in indices]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def where(self, index: int) -> str:
        """"at the top left", "in the middle", ... from the object's centre (image thirds); "in the
        image" when the facts were made without locations."""
        if not self.locations:
            return "in the image"
        x, y = self.objects[index].centre
        column = ("left", "", "right")[min(int(3 * x / self.size[0]), 2)]
        row = ("top", "", "bottom")[min(int(3 * y / self.size[1]), 2)]
        place = " ".join(part for part in (row, column) if part)
        return f"at the {place}" if place else "in the middle"

    def members(self, function: str) -> tuple[int, ...]:
        return tuple(i for i, o in enumerate(self.objects) if function in o.kind.affordances)

    def related(self, anchor: int, relation: str) -> tuple[int, ...]:
        """Objects `relation` of the anchor (RELATIONS keys), from full boxes."""
        ax1, ay1, ax2, ay2 = self.objects[anchor].box
        found = []
        for i, o in enumerate(self.objects):
            x1, y1, x2, y2 = o.box
            if i == anchor:
                continue
            beside = y1 <= ay2 and ay1 <= y2
            stacked = x1 <= ax2 and ax1 <= x2
            if ((relation == "left" and x2 < ax1 and beside) or (relation == "right" and x1 > ax2 and beside)
                    or (relation == "above" and y2 < ay1 and stacked)
                    or (relation == "below" and y1 > ay2 and stacked)):
                found.append(i)
        return tuple(found)

    def extreme_size(self, indices: tuple[int, ...], largest: bool) -> int | None:
        """The clearly largest (or smallest) of `indices`, else None."""
        if not indices:
            return None
        sign = 1 if largest else -1
        by_area = sorted(indices, key=lambda i: -sign * self.objects[i].area)
        best = by_area[0]
        if len(by_area) > 1:
            ratio = self.objects[best].area / self.objects[by_area[1]].area
            if (ratio if largest else 1 / ratio) < _SIZE_MARGIN:
                return None
        visible = max(indices, key=lambda i: sign * self.objects[i].visible_area)
        return best if visible == best else None

    def extreme_position(self, direction: str) -> int | None:
        """The clearly leftmost / rightmost / highest / lowest object (by centre), else None."""
        axis = 0 if direction in ("left", "right") else 1
        sign = -1 if direction in ("left", "above") else 1
        order = sorted(range(len(self.objects)), key=lambda i: -sign * self.objects[i].centre[axis])
        if len(order) < 2:
            return None
        gap = abs(self.objects[order[0]].centre[axis] - self.objects[order[1]].centre[axis])
        return order[0] if gap >= _POSITION_MARGIN * self.size[axis] else None

    @cached_property
    def one_step_refs(self) -> list[Ref]:
        """Every phrase that picks one object in one step."""
        refs = [Ref(self.name(i), i, "name", (f"{self.name(i).capitalize()} is {self.where(i)}.",))
                for i in range(len(self.objects))]
        for key, function in FUNCTIONS.items():
            members = self.members(key)
            if len(members) == 1:
                refs.append(Ref(f"the thing {function.relative}", members[0], "function",
                                (f"{self.names(members).capitalize()} {function.fact}.",)))
        everything = tuple(range(len(self.objects)))
        for largest, word in ((True, "largest"), (False, "smallest")):
            best = self.extreme_size(everything, largest) if len(everything) > 1 else None
            if best is not None:
                refs.append(Ref(f"the {word} object", best, "size",
                                (f"{self.name(best).capitalize()} is the {word} object.",)))
        for direction, word in (("left", "leftmost"), ("right", "rightmost"), ("above", "highest"),
                                ("below", "lowest")):
            best = self.extreme_position(direction)
            if best is not None:
                refs.append(Ref(f"the {word} object", best, "position",
                                (f"{self.name(best).capitalize()} is the {word} object.",)))
        for colour in sorted({o.colour for o in self.objects}):
            owners = [i for i, o in enumerate(self.objects) if o.colour == colour]
            if len(owners) == 1 and len(self.objects) > 1:
                refs.append(Ref(f"the {colour} thing", owners[0], "colour",
                                (f"The only {colour} thing is {self.name(owners[0])}.",)))
        return refs

    @cached_property
    def two_step_refs(self) -> list[Ref]:
        """Every phrase that picks one object in two steps: a relation of a one-step phrase, or
        an extreme within a colour or a noun ("the largest red thing", "the smallest cup")."""
        refs = []
        for anchor in self.one_step_refs:
            for relation, phrase in RELATIONS.items():
                found = self.related(anchor.index, relation)
                if len(found) == 1:
                    sentence = f"The object {phrase} {self.name(anchor.index)} is {self.name(found[0])}."
                    refs.append(Ref(f"the object {phrase} {anchor.text}", found[0], "relation",
                                    anchor.trace + (sentence,), relation))
        for group, phrase, best, word in self._superlatives():
            refs.append(Ref(f"the {word} {phrase}", best, "superlative",
                            (f"The {plural_phrase(phrase)} are {self.names(group)}.",
                             f"The {word} of them is {self.name(best)}.")))
        return refs

    def _superlatives(self) -> list[tuple[tuple[int, ...], str, int, str]]:
        """(group of 2+, singular phrase for it, its clear extreme, "largest"/"smallest")."""
        groups: list[tuple[tuple[int, ...], str]] = []
        for colour in sorted({o.colour for o in self.objects}):
            groups.append((tuple(i for i, o in enumerate(self.objects) if o.colour == colour),
                           f"{colour} thing"))
        for noun in sorted({o.noun for o in self.objects}):
            groups.append((tuple(i for i, o in enumerate(self.objects) if o.noun == noun), noun))
        found = []
        for group, phrase in groups:
            for largest, word in ((True, "largest"), (False, "smallest")):
                best = self.extreme_size(group, largest) if len(group) >= 2 else None
                if best is not None:
                    found.append((group, phrase, best, word))
        return found


def _with_article(name: str, article: str) -> str:
    if article == "a" and name[0] in "aeiou":
        return "an " + name
    return f"{article} {name}"


def plural_phrase(phrase: str) -> str:
    """"red thing" -> "red things", "cup" -> "cups" (the last word made plural)."""
    head, _, last = phrase.rpartition(" ")
    return (head + " " if head else "") + plural(last)


Builder = Callable[[SceneFacts, bool], list[Query]]


def _query(text: str, targets: tuple[int, ...], reasoning_type: str, depth: int, trace: tuple[str, ...],
           sentence: bool) -> Query:
    return Query(text, tuple(sorted(targets)), reasoning_type, depth, " ".join(trace), sentence)


def _attribute_1(facts: SceneFacts, empty: bool) -> list[Query]:
    objects = facts.objects
    if empty:
        present = {(o.colour, o.noun) for o in objects}
        colours, nouns = sorted({o.colour for o in objects}), sorted({o.noun for o in objects})
        return [_query(f"the {c} {n}", (), "attribute", 1, (f"There is no {c} {n} here.",), False)
                for c in colours for n in nouns if (c, n) not in present]
    return [_query(r.text, (r.index,), "attribute", 1, r.trace, False)
            for r in facts.one_step_refs if r.form in ("name", "size", "colour")]


def _attribute_2(facts: SceneFacts, empty: bool) -> list[Query]:
    if empty:
        present = {o.colour for o in facts.objects}
        absent = [c for c in ("red", "green", "blue", "yellow", "purple") if c not in present]
        return [_query(f"the {word} {c} thing", (), "attribute", 2, (f"Nothing here is {c}.",), False)
                for c in absent for word in ("largest", "smallest")]
    return [_query(r.text, (r.index,), "attribute", 2, r.trace, False)
            for r in facts.two_step_refs if r.form == "superlative"]


def _same_colour(facts: SceneFacts, anchor: Ref) -> tuple[tuple[int, ...], str]:
    """The other objects of the anchor's colour, and the trace sentence saying which."""
    colour = facts.objects[anchor.index].colour
    others = tuple(i for i, o in enumerate(facts.objects) if o.colour == colour and i != anchor.index)
    if not others:
        return others, f"No other thing is {colour}."
    if len(others) == 1:
        return others, f"The other {colour} thing is {facts.names(others)}."
    return others, f"The other {colour} things are {facts.names(others)}."


def _attribute_3(facts: SceneFacts, empty: bool) -> list[Query]:
    queries = []
    for anchor in facts.one_step_refs:
        others, sentence = _same_colour(facts, anchor)
        for largest, word in ((True, "largest"), (False, "smallest")):
            text = f"the {word} thing with the same colour as {anchor.text}"
            if empty and not others:
                queries.append(_query(text, (), "attribute", 3, anchor.trace + (sentence,), False))
            best = facts.extreme_size(others, largest) if len(others) >= 2 else None
            if not empty and best is not None:
                trace = anchor.trace + (sentence, f"The {word} of them is {facts.name(best)}.")
                queries.append(_query(text, (best,), "attribute", 3, trace, False))
    return queries


def _spatial_1(facts: SceneFacts, empty: bool) -> list[Query]:
    return [] if empty else [_query(r.text, (r.index,), "spatial", 1, r.trace, False)
                             for r in facts.one_step_refs if r.form == "position"]


def _spatial_chain(facts: SceneFacts, empty: bool, anchors: list[Ref], depth: int) -> list[Query]:
    queries = []
    for anchor in anchors:
        for relation, phrase in RELATIONS.items():
            if anchor.relation is not None and relation == _INVERSE[anchor.relation]:
                continue  # "above the object below X" would lead straight back to X
            found = facts.related(anchor.index, relation)
            if bool(found) == empty:
                continue
            if found:
                verb = "is" if len(found) == 1 else "are"
                sentence = f"{facts.names(found).capitalize()} {verb} {phrase} {facts.name(anchor.index)}."
            else:
                sentence = f"Nothing is {phrase} {facts.name(anchor.index)}."
            queries.append(_query(f"what is {phrase} {anchor.text}?", found, "spatial", depth,
                                  anchor.trace + (sentence,), True))
    return queries


def _function_1(facts: SceneFacts, empty: bool) -> list[Query]:
    queries = []
    for key, function in FUNCTIONS.items():
        members = facts.members(key)
        if bool(members) == empty:
            continue
        sentence = (f"{facts.names(members).capitalize()} {function.fact}." if members
                    else f"Nothing here {function.fact}.")
        queries += [_query(q, members, "function", 1, (sentence,), True) for q in function.questions]
    return queries


def _function_2(facts: SceneFacts, empty: bool) -> list[Query]:
    queries = []
    for key, function in FUNCTIONS.items():
        members = facts.members(key)
        if not members:
            continue
        stated = f"{facts.names(members).capitalize()} {function.fact}."
        for colour in sorted({o.colour for o in facts.objects}):
            owners = tuple(i for i in members if facts.objects[i].colour == colour)
            text = f"the {colour} thing {function.relative}"
            if empty and not owners:
                queries.append(_query(text, (), "function", 2, (stated, f"None of them is {colour}."), False))
            if not empty and len(owners) == 1 and len(members) >= 2:
                trace = (stated, f"Of them, {facts.name(owners[0])} is {colour}.")
                queries.append(_query(text, owners, "function", 2, trace, False))
        for largest, word in ((True, "largest"), (False, "smallest")):
            best = facts.extreme_size(members, largest) if len(members) >= 2 else None
            if not empty and best is not None:
                trace = (stated, f"The {word} of them is {facts.name(best)}.")
                queries.append(_query(f"the {word} thing {function.relative}", (best,), "function", 2,
                                      trace, False))
    return queries


def _function_3(facts: SceneFacts, empty: bool) -> list[Query]:
    queries = []
    for anchor in facts.one_step_refs:
        for relation, phrase in RELATIONS.items():
            found = facts.related(anchor.index, relation)
            if not found:
                continue
            verb = "is" if len(found) == 1 else "are"
            located = f"{facts.names(found).capitalize()} {verb} {phrase} {facts.name(anchor.index)}."
            for key, function in FUNCTIONS.items():
                hits = tuple(i for i in found if key in facts.objects[i].kind.affordances)
                if bool(hits) == empty or not facts.members(key):
                    continue
                last = (f"Of them, {facts.names(hits)} {function.fact}." if hits
                        else f"None of them {function.fact}.")
                queries.append(_query(f"something {function.relative} {phrase} {anchor.text}", hits,
                                      "function", 3, anchor.trace + (located, last), False))
    return queries


def _multi_1(facts: SceneFacts, empty: bool) -> list[Query]:
    objects = facts.objects
    if empty:
        present = {o.colour for o in objects}
        return [_query(f"all the {c} things", (), "multi", 1, (f"Nothing here is {c}.",), False)
                for c in ("red", "green", "blue", "yellow", "white") if c not in present]
    queries = []
    for colour in sorted({o.colour for o in objects}):
        group = tuple(i for i, o in enumerate(objects) if o.colour == colour)
        if len(group) >= 2:
            queries.append(_query(f"all the {colour} things", group, "multi", 1,
                                  (f"The {colour} things are {facts.names(group)}.",), False))
    for noun in sorted({o.noun for o in objects}):
        group = tuple(i for i, o in enumerate(objects) if o.noun == noun)
        if len(group) >= 2:
            queries.append(_query(f"every {noun}" if noun != "scissors" else "every pair of scissors",
                                  group, "multi", 1,
                                  (f"The {plural(noun)} are {facts.names(group)}.",), False))
    return queries


def _multi_chain(facts: SceneFacts, empty: bool, anchors: list[Ref], depth: int) -> list[Query]:
    queries = []
    for anchor in anchors:
        others, sentence = _same_colour(facts, anchor)
        if (empty and not others) or (not empty and len(others) >= 2):
            queries.append(_query(f"all the other things with the same colour as {anchor.text}", others,
                                  "multi", depth, anchor.trace + (sentence,), False))
    return queries


BUILDERS: dict[tuple[str, int], Builder] = {
    ("attribute", 1): _attribute_1,
    ("attribute", 2): _attribute_2,
    ("attribute", 3): _attribute_3,
    ("spatial", 1): _spatial_1,
    ("spatial", 2): lambda f, e: _spatial_chain(f, e, f.one_step_refs, 2),
    ("spatial", 3): lambda f, e: _spatial_chain(f, e, f.two_step_refs, 3),
    ("function", 1): _function_1,
    ("function", 2): _function_2,
    ("function", 3): _function_3,
    ("multi", 1): _multi_1,
    ("multi", 2): lambda f, e: _multi_chain(f, e, f.one_step_refs, 2),
    ("multi", 3): lambda f, e: _multi_chain(f, e, f.two_step_refs, 3),
}


def reasoning_query(rng: np.random.Generator, facts: SceneFacts, reasoning_type: str, depth: int,
                    empty: bool) -> Query | None:
    """A random query of this type and depth about the scene, or None when the scene has none."""
    candidates = BUILDERS[(reasoning_type, depth)](facts, empty)
    return candidates[int(rng.integers(len(candidates)))] if candidates else None


def single_query(rng: np.random.Generator, facts: SceneFacts, empty: bool) -> Query | None:
    """Curriculum stage "single": one object named directly ("the red circle")."""
    if empty:
        absent = _attribute_1(facts, True)
        if not absent:
            return None
        pick = absent[int(rng.integers(len(absent)))]
        return Query(pick.text, (), "single", 1, pick.trace, False)
    index = int(rng.integers(len(facts.objects)))
    name = facts.objects[index].name
    text = (f"the {name}", f"find the {name}", f"where is the {name}?")[int(rng.integers(3))]
    return Query(text, (index,), "single", 1, f"The {name} is {facts.where(index)}.", text.endswith("?"))


def dense_query(rng: np.random.Generator, facts: SceneFacts) -> Query:
    """Curriculum stage "dense": every object is a target."""
    text = ("find every object", "segment all the objects", "find each object in the image")[int(rng.integers(3))]
    count = len(facts.objects)
    every = tuple(range(count))
    listed = facts.names(every, article="a")
    trace = f"I can see {count} object{'s' if count != 1 else ''}: {listed}."
    return Query(text, every, "dense", 1, trace, False)

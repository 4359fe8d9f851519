"""The words of CapWorld's captions: every surface form of every canonical value, in one place.

The caption writers pick their words from these tables and the parser reads captions back
with the same tables (`phrase_table`), so a synonym added here is both written and understood.
Matching is done on normalised words: lower case, hyphens as spaces, US spelling (`SPELLING`),
so "top-left", "Top left" and "top left" are one phrase and "centre"/"center" one word.
"""

from __future__ import annotations

import functools

from balcap.data.capworld.world import (BACKGROUNDS, COLOURS, REGIONS, RELATIONS, SHAPES, SIZES)

# --- Content words: canonical value -> surface forms the writers use. ---------------------

SHAPE_NOUNS = {
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star", "five-pointed star"),
    "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon",),
    "heart": ("heart", "heart shape"),
    "cross": ("cross", "plus sign"),
}
SHAPE_PLURALS = {
    "circle": ("circles", "discs"),
    "square": ("squares",),
    "triangle": ("triangles",),
    "star": ("stars", "five-pointed stars"),
    "diamond": ("diamonds", "rhombuses"),
    "hexagon": ("hexagons",),
    "heart": ("hearts", "heart shapes"),
    "cross": ("crosses", "plus signs"),
}
SIZE_WORDS = {
    "small": ("small", "little"),
    "medium": ("medium-sized", "mid-sized"),
    "large": ("large", "big"),
}
COLOUR_WORDS = {
    **{name: (name,) for name in COLOURS},
    "purple": ("purple", "violet"),
    "white": ("white",),
    "pale grey": ("pale grey", "light grey"),
    "cream": ("cream",),
    "light blue": ("light blue", "pale blue"),
}
# A region as a prepositional phrase ("sits in the top left corner", "At the top, ...").
REGION_PHRASES = {
    "top left": ("in the top left corner", "in the upper left corner", "in the top-left corner",
                 "at the top left", "in the upper left"),
    "top": ("at the top", "near the top", "along the top edge", "at the top centre",
            "in the upper middle"),
    "top right": ("in the top right corner", "in the upper right corner",
                  "in the top-right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "on the left side", "at the left edge", "on the left-hand side"),
    "center": ("in the centre", "in the center", "in the middle", "at the centre"),
    "right": ("on the right", "on the right side", "at the right edge", "on the right-hand side"),
    "bottom left": ("in the bottom left corner", "in the lower left corner",
                    "in the bottom-left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "near the bottom", "along the bottom edge", "at the bottom centre",
               "in the lower middle"),
    "bottom right": ("in the bottom right corner", "in the lower right corner",
                     "in the bottom-right corner", "at the bottom right", "in the lower right"),
}
# A region as the object of a verb ("occupies the top left corner").
REGION_NOUN_PHRASES = {
    "top left": ("the top left corner", "the upper left corner"),
    "top": ("the top edge", "the top centre"),
    "top right": ("the top right corner", "the upper right corner"),
    "left": ("the left side", "the left edge"),
    "center": ("the centre", "the middle"),
    "right": ("the right side", "the right edge"),
    "bottom left": ("the bottom left corner", "the lower left corner"),
    "bottom": ("the bottom edge", "the bottom centre"),
    "bottom right": ("the bottom right corner", "the lower right corner"),
}
# The core words of each region, which is all the parser needs: prepositions, "the" and
# "corner"/"side"/"edge" are fillers around them.
REGION_CORES = {
    "top left": ("top left", "upper left"),
    "top": ("top", "top centre", "top middle", "upper middle"),
    "top right": ("top right", "upper right"),
    "left": ("left", "left hand", "middle left", "centre left"),
    "center": ("centre", "middle"),
    "right": ("right", "right hand", "middle right", "centre right"),
    "bottom left": ("bottom left", "lower left"),
    "bottom": ("bottom", "bottom centre", "bottom middle", "lower middle"),
    "bottom right": ("bottom right", "lower right"),
}
RELATION_PHRASES = {
    "left of": ("to the left of",),
    "right of": ("to the right of",),
    "above": ("above", "higher up than"),
    "below": ("below", "beneath", "under", "underneath", "lower down than"),
}
# Relation phrases that read well at the start of a sentence ("Above the red circle is ...").
FRONTED_RELATION_PHRASES = {
    "left of": ("to the left of",),
    "right of": ("to the right of",),
    "above": ("above",),
    "below": ("below", "beneath", "under"),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                8: "eight", 9: "nine", 10: "ten"}
TOTAL_NOUNS = ("shapes", "objects", "figures", "items")
TOTAL_NOUNS_SINGULAR = ("shape", "object", "figure", "item")
BACKGROUND_NOUNS = ("background", "backdrop")
# Label phrases; {word} is the label, always in double quotes.
LABEL_PHRASES = ('labelled "{word}"', 'marked "{word}"', 'with the label "{word}"',
                 'tagged "{word}"', 'bearing the {kind} "{word}"')
LABEL_PREDICATES = ('is labelled "{word}"', 'carries the label "{word}"', 'is marked "{word}"',
                    'bears the {kind} "{word}"')

# --- Function words: they carry no claim of their own. -------------------------------------

# Verbs end a noun phrase: "the red circle in the top left" describes, "the red circle is in
# the top left" asserts.
VERBS = ("is", "are", "sits", "sit", "sitting", "rests", "rest", "resting", "appears", "appear",
         "lies", "lie", "lying", "stands", "stand", "floats", "float", "occupies", "occupy",
         "holds", "hold", "contains", "contain", "can be found", "placed", "positioned",
         "located", "scattered", "spread", "arranged", "carries", "carry", "bears", "bear", "has",
         "have", "be")
SINGULAR_VERBS = ("sits", "rests", "appears", "lies", "is", "can be found", "is placed",
                  "is positioned", "floats", "stands")
PLURAL_VERBS = ("sit", "rest", "appear", "lie", "are", "can be found", "are placed", "float",
                "stand")
INDEFINITE_DETERMINERS = ("a", "an", "another")
DEFINITE_DETERMINERS = ("the",)
CONJUNCTIONS = ("and", "while", "whereas", "but")
RELATIVE_PRONOUNS = ("which", "that")
FILLERS = ("there", "in", "at", "on", "of", "to", "with", "also", "present", "total", "all",
           "altogether", "corner", "side", "edge", "area", "part", "labelled", "marked", "bearing",
           "tagged", "carrying", "word", "letter", "label", "colour", "coloured", "across",
           "against", "upon", "together", "everything")
# Fillers that only make sense right before a region ("near the top"); anywhere else they
# are a claim the world cannot express ("near the red circle") and stay unparsed.
REGION_PREPOSITIONS = ("near", "along", "towards", "toward")
NEGATIONS = ("no", "not", "none", "nothing", "without", "neither", "nor", "never", "or")
# Words of meta commentary and mood: a span holding one is non-pointable, not just unparsed.
META_WORDS = (
    "image", "images", "picture", "pictures", "photo", "photograph", "scene", "composition",
    "mood", "feel", "feels", "feeling", "calm", "calming", "balanced", "balance", "evokes",
    "evoke", "evoking", "depth", "style", "minimalist", "simple", "clean", "playful",
    "cheerful", "harmony", "harmonious", "atmosphere", "aesthetic", "we", "see", "viewer",
    "eye", "shows", "show", "depicts", "depict", "depicting", "illustration", "overall",
    "sense", "energy", "vibrant", "pleasing", "striking", "arrangement", "artwork", "design",
    "this", "these", "beautiful", "interesting", "nice", "suggests", "creates", "adds",
    "lively", "serene", "peaceful", "modern", "geometric", "visual", "visually", "captures",
    "conveys", "colourful", "bright", "inviting", "order", "sparse", "whimsical", "tidy",
    "artistic", "rendering", "depicted", "shown", "frame", "canvas")

# British -> US forms; applied to both the tables and the text before matching.
SPELLING = {"centre": "center", "grey": "gray", "labelled": "labeled", "colour": "color",
            "colours": "colors", "coloured": "colored", "colourful": "colorful", "disk": "disc",
            "disks": "discs"}


def normalise_words(text: str) -> tuple[str, ...]:
  """Lower case, hyphens as spaces, US spelling: the form every match is made on."""
  words = text.lower().replace("-", " ").split()
  return tuple(SPELLING.get(w, w) for w in words)


@functools.cache
def phrase_table() -> dict[tuple[str, ...], tuple[str, object]]:
  """Normalised word sequence -> (category, canonical value), for longest-match parsing.

  Categories: shape, shapes (plural; value the shape), size, colour, region, relation, number,
  total / total_singular, background, verb, det_indefinite, det_definite, one, conjunction,
  relative, filler, region_preposition, negation, meta.
  """
  entries: list[tuple[str, str, object]] = []
  for shape, forms in SHAPE_NOUNS.items():
    entries += [(f, "shape", shape) for f in forms]
  for shape, forms in SHAPE_PLURALS.items():
    entries += [(f, "shapes", shape) for f in forms]
  for table, category in ((SIZE_WORDS, "size"), (COLOUR_WORDS, "colour"),
                          (REGION_CORES, "region"), (RELATION_PHRASES, "relation")):
    for value, forms in table.items():
      entries += [(f, category, value) for f in forms]
  # Understood but never written.
  entries += [("medium", "size", "medium"), ("middle sized", "size", "medium"),
              ("rhombi", "shapes", "diamond"), ("left of", "relation", "left of"),
              ("right of", "relation", "right of"), ("on the left of", "relation", "left of"),
              ("on the right of", "relation", "right of"), ("on top of", "relation", "above"),
              ("single", "number", 1)]
  entries += [(word, "number", n) for n, word in NUMBER_WORDS.items() if n > 1]
  entries += [(str(n), "number", n) for n in range(1, 100)]
  entries += [("one", "one", None)]
  for words, category in ((TOTAL_NOUNS, "total"), (TOTAL_NOUNS_SINGULAR, "total_singular"),
                          (BACKGROUND_NOUNS, "background"), (VERBS, "verb"),
                          (INDEFINITE_DETERMINERS, "det_indefinite"),
                          (DEFINITE_DETERMINERS, "det_definite"), (CONJUNCTIONS, "conjunction"),
                          (RELATIVE_PRONOUNS, "relative"), (FILLERS, "filler"),
                          (REGION_PREPOSITIONS, "region_preposition"),
                          (NEGATIONS, "negation"), (META_WORDS, "meta")):
    entries += [(w, category, None) for w in words]
  table: dict[tuple[str, ...], tuple[str, object]] = {}
  for form, category, value in entries:
    key = normalise_words(form)
    if key in table and table[key] != (category, value):
      raise AssertionError(f"lexicon phrase {form!r} means both {table[key]} and "
                           f"{(category, value)}")
    table[key] = (category, value)
  return table


def _check_coverage() -> None:
  """Every canonical value of the world has at least one surface form (import-time check)."""
  missing = ([s for s in SHAPES if s not in SHAPE_NOUNS or s not in SHAPE_PLURALS]
             + [s for s in SIZES if s not in SIZE_WORDS]
             + [c for c in (*COLOURS, *BACKGROUNDS) if c not in COLOUR_WORDS]
             + [r for r in REGIONS if r not in REGION_PHRASES or r not in REGION_CORES
                or r not in REGION_NOUN_PHRASES]
             + [r for r in RELATIONS if r not in RELATION_PHRASES])
  if missing:
    raise AssertionError(f"lexicon lacks surface forms for {missing}")


_check_coverage()

"""CapWorld: a procedural, exactly verifiable caption world that runs anywhere without downloads.

Images of a few simple objects (`world.py`, `render.py`), each with its exact scene graph,
reference captions written from it by a varied grammar (`plan.py`, `grammar.py`), and one
deliberately flawed SFT caption (`flaws.py`). `parse.py` reads any caption back into claims
with the same lexicon (`lexicon.py`, `claims.py`), which is what the exact judge builds on.
`generate.make_example` is the data set; `python -m balcap.data.capworld --preview out.png`
shows it.
"""

from balcap.data.capworld.claims import Caption, Discourse, Mention
from balcap.data.capworld.flaws import FLAW_TYPES, FlawedCaption, detect_flaws, write_sft_caption
from balcap.data.capworld.generate import CapWorldSpec, example_rng, make_example
from balcap.data.capworld.grammar import write_reference
from balcap.data.capworld.parse import ParsedCaption, ParsedSentence, Span, parse_caption
from balcap.data.capworld.render import render
from balcap.data.capworld.world import (BACKGROUNDS, COLOURS, REGIONS, RELATIONS, SHAPES, SIZES,
                                        Fact, Scene, SceneObject, sample_scene, scene_facts,
                                        scene_from_json, scene_to_json)

__all__ = [
    "BACKGROUNDS", "COLOURS", "FLAW_TYPES", "REGIONS", "RELATIONS", "SHAPES", "SIZES",
    "CapWorldSpec", "Caption", "Discourse", "Fact", "FlawedCaption", "Mention", "ParsedCaption",
    "ParsedSentence", "Scene", "SceneObject", "Span", "detect_flaws", "example_rng",
    "make_example", "parse_caption", "render", "sample_scene", "scene_facts", "scene_from_json",
    "scene_to_json", "write_reference", "write_sft_caption",
]

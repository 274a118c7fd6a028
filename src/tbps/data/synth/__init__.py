"""SynthPEDES: a synthetic pedestrian dataset in the CUHK-PEDES layout, made in seconds on a CPU.

The real benchmarks are licensed and cannot ship, so the demo, the tests and the benchmarks run on
this instead. What makes it useful rather than a toy (``shared/docs/synthetic-data.md``):

- every identity is a person with fixed attributes (gender, hair, upper and lower garment with
  type, colour and pattern, shoes, carried item, headwear, belt, logo);
- identities come in families: a prototype person and variants that differ in one or two
  attributes, so a model that only sees the overall colour confuses them (hard negatives);
- the images of an identity differ in viewpoint (a backpack is a big block from the back and two
  straps from the front; a logo shows only from the front), pose, scale, position, background,
  lighting, blur and partial occlusion, so matching is not pixel matching;
- captions are CUHK-PEDES-style English with varied templates, synonyms and colour names, in
  varied order; some mention only part of the person.

Attributes that captions mention are drawn as large regions so they survive the 128x48 or 192x64
downsizing of the CPU demo. Everything is a function of the seed: the same seed gives the same
JSON bytes and the same pixels, whatever order the images are drawn in.

Modules: ``attributes`` (people), ``captions``, ``rendering`` (images), ``writing`` (the folder).
"""

from tbps.data.synth.attributes import COLOURS, VIEWS, PersonAttributes, draw_identities, draw_looks
from tbps.data.synth.captions import caption_matches, captions_for, make_caption
from tbps.data.synth.rendering import Pose, make_backgrounds, render_image, render_person
from tbps.data.synth.writing import ANNOTATION_FILE, generate_synthpedes, save_sample_grid, split_sizes

# the footage generator (tbps.footage.scenes) draws the same people into camera scenes
__all__ = ["ANNOTATION_FILE", "COLOURS", "VIEWS", "PersonAttributes", "Pose", "caption_matches", "captions_for",
           "draw_identities", "draw_looks", "generate_synthpedes", "make_backgrounds", "make_caption", "render_image",
           "render_person", "save_sample_grid", "split_sizes"]

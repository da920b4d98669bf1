"""
The data of nanoVLP: the shapes world (procedural scenes whose ground truth is known), its
tokenizer, preparation into memory-mapped arrays, and batches sliced from those arrays.

A prepared dataset is a directory:
    meta.json                  what is in it (splits, sizes, vocabularies, tokenizer)
    tokenizer.tiktoken         the BPE ranks in tiktoken's own file format
    {split}.images.npy         (N, S, S, 3) uint8 images
    {split}.tokens.npy         (N, C, T) int32 captions: <bos> text <eos> <pad>...
    {split}.scene.npy          (N,) int64 id of the scene each image shows (see scene_id)
    {split}.objects.npy        (N, 3, 7) int16 shape, colour, size, x0, y0, x1, y1 (-1: none)
    {split}.classmap.npy       (N, S, S) uint8 per-pixel class: 0 background, 1 + shape index
and, for some splits, extra arrays (web corruption, held-out flags, multi-image questions;
in a set cleaned by CapFilt (train.py --stage capfilt), each caption slot's source and each
image's index in the split it came from).
Every array is opened with np.load(mmap_mode='r'): a batch is one fancy-indexed slice.
"""

import base64
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import regex
import tiktoken
from PIL import Image, UnidentifiedImageError

WORLD_VERSION = 2  # bump when the generator changes: cached worlds are then regenerated

# -----------------------------------------------------------------------------
# the vocabulary of the world

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")  # named in pretraining
NOVEL_SHAPES = ("star", "heart", "moon")  # never named in any caption: for few-shot prompting
ALL_SHAPES = SHAPES + NOVEL_SHAPES
PLURALS = {"cross": "crosses"}  # every other shape takes an "s"
COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240), "yellow": (235, 215, 40),
    "purple": (150, 60, 210), "orange": (245, 140, 30), "cyan": (40, 210, 220), "white": (240, 240, 240),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
RADIUS = (0.3, 0.47)  # half extent of a small and a large object, as a fraction of a grid cell
AXES = ("none", "horizontal", "vertical")  # how the objects of a scene are laid out

# Caption templates. Objects are named in order along the layout axis; a relation word says
# which way ("left of" or "right of" reads the same row in the two directions). The direction
# goes with the template (write_caption): even templates name from the left or the top, odd
# ones from the right or the bottom. With a coin flip per caption instead, the word after the
# first object depends on where that particular object is relative to the other, a binding a
# small captioner did not learn in its 10-minute budget (README, "The shapes world"); with the
# direction fixed before the first object, naming the objects is a reading-order task and the
# relation word only says which axis. Parsing accepts either direction with any template.
TEMPLATES = {
    1: ("a {0}", "a photo of a {0}", "there is a {0}", "an image with a {0}"),
    2: ("a {0} {rel} a {1}", "a photo of a {0} {rel} a {1}", "there is a {0} {rel} a {1}",
        "an image with a {0} {rel} a {1}"),
    3: ("a {0}, a {1} and a {2} from {dir}", "from {dir}: a {0}, a {1} and a {2}",
        "a photo of a {0}, a {1} and a {2} from {dir}", "there is a {0}, a {1} and a {2} from {dir}"),
}
# (axis, reversed) -> words; "reversed" names the objects from the far end of the axis
RELATIONS = {(1, False): "left of", (1, True): "right of", (2, False): "above", (2, True): "below"}
DIRECTIONS = {(1, False): "left to right", (1, True): "right to left",
              (2, False): "top to bottom", (2, True): "bottom to top"}

# web caption corruptions (recorded per web caption so that filtering can be scored)
CORRUPTIONS = ("none", "attribute", "relation", "swapped")
# multi-image question types
QTYPES = ("count", "most", "largest", "change", "sequence")
CHANGES = ("colour", "shape", "position", "added", "removed")
SEQUENCES = ("grows", "shrinks", "moves")

# special tokens the model uses, appended after the BPE ranks
BOS, EOS, PAD, MASK, GLOB = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|mask|>", "<|glob|>"
SPECIAL_TOKENS = (EOS, BOS, PAD, MASK, GLOB)
BACKGROUND = "background"  # class 0 of every class map
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@dataclass
class WorldConfig:
    world_seed: int = 0  # the whole world is a function of this seed and the fields below
    n_train: int = 20000  # clean image-caption pairs for pretraining
    n_val: int = 1000
    n_test: int = 1000  # half of it shows held-out colour-shape pairs
    n_web: int = 20000  # noisy "web" pairs (CapFilt)
    web_noise: float = 0.3  # fraction of web captions corrupted
    n_novel_train: int = 1000  # images with novel shapes (few-shot prompting)
    n_novel_val: int = 500
    n_multi_train: int = 4000  # multi-image question sets
    n_multi_val: int = 500
    grid: int = 4  # objects sit in the cells of a grid x grid layout (at least 3: rows of three)
    max_images: int = 4  # most images in a multi-image set
    captions_per_image: int = 4  # paraphrases per clean image
    n_heldout_pairs: int = 6  # colour-shape pairs shown only in the test split


# -----------------------------------------------------------------------------
# scenes: sampling objects and laying them out


N_OBJECT_CODES = len(ALL_SHAPES) * len(COLOURS) * len(SIZES) + 1  # 0: no object


def scene_id(axis, objects):
    """One int64 for a scene: its layout axis and its objects (shape, colour, size) in order
    along the axis. Two captions describe the same scene iff they parse to the same id."""
    sid, base = axis, len(AXES)
    for s, c, z in objects:
        sid += base * (1 + (s * len(COLOURS) + c) * len(SIZES) + z)
        base *= N_OBJECT_CODES
    return sid


def decode_scene(sid):
    """(axis, objects) of a scene id: the inverse of scene_id."""
    axis, sid = int(sid % len(AXES)), int(sid // len(AXES))
    objects = []
    while sid:
        code = sid % N_OBJECT_CODES - 1
        objects.append((code // (len(COLOURS) * len(SIZES)), code // len(SIZES) % len(COLOURS), code % len(SIZES)))
        sid //= N_OBJECT_CODES
    return axis, objects


def heldout_pairs(cfg):
    """The colour-shape pairs kept out of every split but test, chosen so that each colour and
    each shape still appears in training with others."""
    rng = np.random.default_rng([cfg.world_seed, 99])
    pairs = set()
    for i in rng.permutation(len(SHAPES) * len(COLOURS)):
        s, c = divmod(int(i), len(COLOURS))
        if len(pairs) == cfg.n_heldout_pairs:
            break
        if all(s != s2 for s2, _ in pairs) and all(c != c2 for _, c2 in pairs):
            pairs.add((s, c))
    return sorted(pairs)


def sample_object(rng, shapes, pairs_ok):
    """(shape, colour, size) drawn uniformly among the allowed colour-shape pairs; shapes is a
    sequence of shape indices."""
    while True:
        s, c, z = int(rng.choice(shapes)), int(rng.integers(len(COLOURS))), int(rng.integers(2))
        if pairs_ok(s, c):
            return s, c, z


def radius_px(rng, z, cell):
    """Radius of a small (z=0) or large (z=1) object in pixels, for cells of `cell` pixels."""
    return RADIUS[z] * cell * rng.uniform(0.94, 1.0)


def in_cell(rng, col, row, r, cell):
    """(cx, cy, r): an object centred in a grid cell, jittered as far as it stays inside."""
    j = max(cell / 2 - r - 0.5, 0.0)
    return (col + 0.5) * cell + rng.uniform(-j, j), (row + 0.5) * cell + rng.uniform(-j, j), r


def cell_of(placement, cell):
    return int(placement[0] // cell), int(placement[1] // cell)


def layout_row(rng, objects, S, grid):
    """Place captioned objects: one object in any cell; two or three in one row (axis 1) or
    one column (axis 2) of the grid, in distinct cells, so that exactly one relation holds
    between neighbours. Returns (axis, [(cx, cy, r)]) with the objects in order along the axis."""
    n, cell = len(objects), S / grid
    radii = [radius_px(rng, z, cell) for *_, z in objects]
    if n == 1:
        col, row = rng.integers(grid, size=2)
        return 0, [in_cell(rng, int(col), int(row), radii[0], cell)]
    axis, line = int(rng.integers(1, 3)), int(rng.integers(grid))
    along = np.sort(rng.choice(grid, n, replace=False))
    cells = [(int(a), line) if axis == 1 else (line, int(a)) for a in along]
    return axis, [in_cell(rng, col, row, r, cell) for (col, row), r in zip(cells, radii)]


def place_free(rng, radii, S, grid, taken=()):
    """Objects of the given radii in distinct random cells, none of them in `taken`."""
    cell = S / grid
    free = [(col, row) for row in range(grid) for col in range(grid) if (col, row) not in taken]
    picks = rng.choice(len(free), len(radii), replace=False)
    return [in_cell(rng, *free[p], r, cell) for p, r in zip(picks, radii)]


def place_objects(rng, objects, S, grid, taken=()):
    """Objects (shape, colour, size) in distinct random cells, each at its size's radius."""
    return place_free(rng, [radius_px(rng, z, S / grid) for *_, z in objects], S, grid, taken)


# -----------------------------------------------------------------------------
# rendering: each shape is an implicit function on coordinates normalised by the radius


def shape_mask(shape, u, v):
    """Boolean mask of a shape centred at 0 with radius 1; u right, v down."""
    name = ALL_SHAPES[shape]
    d2 = u * u + v * v
    if name == "circle":
        return d2 <= 1.0
    if name == "square":
        return np.maximum(abs(u), abs(v)) <= 0.85
    if name == "triangle":  # apex up, base at v = 0.7
        return (v <= 0.7) & (abs(u) * 1.7 <= v + 1.0)
    if name == "diamond":
        return abs(u) + abs(v) <= 1.1
    if name == "cross":
        return ((abs(u) <= 0.35) & (abs(v) <= 1.0)) | ((abs(v) <= 0.35) & (abs(u) <= 1.0))
    if name == "ring":
        return (d2 <= 1.0) & (d2 >= 0.3)
    if name == "star":  # five points
        theta = np.arctan2(v, u) + np.pi / 2
        return np.sqrt(d2) <= 0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 3
    if name == "heart":
        x, y = 1.15 * u, -1.15 * v + 0.25
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if name == "moon":
        return (d2 <= 1.0) & ((u - 0.45) ** 2 + (v + 0.1) ** 2 >= 0.7)
    raise ValueError(f"unknown shape {name}")


def render(rng, objects, placement, S):
    """Draw one image. Returns (image (S,S,3) uint8, classmap (S,S) uint8, boxes [(x0,y0,x1,y1)]).
    Objects never overlap, so each object's pixels are exactly its mask."""
    image = np.empty((S, S, 3), np.uint8)
    image[:] = rng.integers(0, 50, size=3)  # dark background of a random tint
    classmap = np.zeros((S, S), np.uint8)
    boxes = []
    for (s, c, _), (cx, cy, r) in zip(objects, placement):
        x0, y0 = max(int(cx - r) - 1, 0), max(int(cy - r) - 1, 0)
        x1, y1 = min(int(cx + r) + 2, S), min(int(cy + r) + 2, S)
        u = (np.arange(x0, x1) + 0.5 - cx) / r  # pixel centres
        v = (np.arange(y0, y1) + 0.5 - cy) / r
        mask = shape_mask(s, u[None, :], v[:, None])
        colour = np.clip(np.array(COLOURS[COLOUR_NAMES[c]]) + rng.integers(-20, 21, size=3), 0, 255)
        image[y0:y1, x0:x1][mask] = colour
        classmap[y0:y1, x0:x1][mask] = 1 + s
        ys, xs = np.nonzero(mask)
        boxes.append((x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1))
    return image, classmap, boxes


def object_rows(objects, boxes):
    """(3, 7) int16 rows of shape, colour, size, x0, y0, x1, y1; -1 where there is no object."""
    rows = np.full((3, 7), -1, np.int16)
    for j, (o, b) in enumerate(zip(objects, boxes)):
        rows[j] = (*o, *b)
    return rows


# -----------------------------------------------------------------------------
# captions: written from templates, and parsed back with the same templates


def object_phrase(obj):
    s, c, z = obj
    return f"{SIZES[z]} {COLOUR_NAMES[c]} {ALL_SHAPES[s]}"


def write_caption(axis, objects, template):
    """Caption of a scene (objects in order along the axis) with one template. Even templates
    name the objects from the near end of the axis ("left of", "from top to bottom"), odd ones
    from the far end: the naming order is fixed by the template, chosen before any object is
    named (see TEMPLATES)."""
    reverse = template % 2 == 1
    order = objects[::-1] if reverse else objects
    return TEMPLATES[len(objects)][template].format(
        *map(object_phrase, order), rel=RELATIONS.get((axis, reverse)), dir=DIRECTIONS.get((axis, reverse)))


def _template_regex(template):
    obj = r"(small|large) (" + "|".join(COLOUR_NAMES) + r") (" + "|".join(ALL_SHAPES) + r")"
    pattern = regex.escape(template)
    for i in range(3):
        pattern = pattern.replace(regex.escape("{%d}" % i), obj)
    pattern = pattern.replace(regex.escape("{rel}"), "(" + "|".join(RELATIONS.values()) + ")")
    pattern = pattern.replace(regex.escape("{dir}"), "(" + "|".join(DIRECTIONS.values()) + ")")
    return regex.compile(pattern)


CAPTION_PATTERNS = [(n, _template_regex(t)) for n, ts in TEMPLATES.items() for t in ts]


def parse_caption(text):
    """The scene_id a caption describes, or None if it is not a well-formed world caption."""
    text = text.strip()
    for n, pattern in CAPTION_PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        groups = list(m.groups())
        word = next((g for g in groups if g in RELATIONS.values() or g in DIRECTIONS.values()), None)
        groups = [g for g in groups if g != word]
        objects = [(ALL_SHAPES.index(groups[i + 2]), COLOUR_NAMES.index(groups[i + 1]), SIZES.index(groups[i]))
                   for i in range(0, len(groups), 3)]
        if n == 1:
            return scene_id(0, objects)
        table = RELATIONS if n == 2 else DIRECTIONS
        axis, reverse = next(k for k, w in table.items() if w == word)
        return scene_id(axis, objects[::-1] if reverse else objects)
    return None


# -----------------------------------------------------------------------------
# the tokenizer: byte-level BPE trained on the world's texts, used through tiktoken


def train_bpe(texts, max_merges=2000):
    """Byte-level BPE ranks (as tiktoken wants them) learned from texts: every byte is a token,
    then the most frequent adjacent pair is merged, ties broken by the pair's bytes, until
    every word of the texts is one token (the world's vocabulary is small) or max_merges.
    Words are split with GPT-2's pattern, as the encoding will split them."""
    counts = {}
    for text in texts:
        for word in regex.findall(GPT2_PATTERN, text):
            counts[word] = counts.get(word, 0) + 1
    words = [[bytes([b]) for b in w.encode("utf-8")] for w in counts]
    freq = list(counts.values())
    ranks = {bytes([i]): i for i in range(256)}
    for _ in range(max_merges):
        pairs = {}
        for w, f in zip(words, freq):
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + f
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        for k, w in enumerate(words):
            i, out = 0, []
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return ranks


def bpe_to_text(ranks):
    """tiktoken's file format: one 'base64(token) rank' line per token, by rank."""
    return "".join(base64.b64encode(tok).decode() + f" {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda x: x[1]))


def bpe_from_text(text):
    """Inverse of bpe_to_text (what tiktoken.load.load_tiktoken_bpe does with a file)."""
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in text.splitlines() if line)}


def make_encoding(name, ranks, pattern=GPT2_PATTERN, specials=None):
    """A tiktoken Encoding with our special tokens numbered after the ranks (keeping any the
    base encoding already has, such as GPT-2's <|endoftext|>)."""
    specials = dict(specials or {})
    for tok in SPECIAL_TOKENS:
        if tok not in specials:
            specials[tok] = len(ranks) + len(specials)
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def get_tokenizer(kind, bpe_text=None):
    """'bpe': the world's encoding from the text of its tiktoken file; 'gpt2': tiktoken's
    GPT-2 encoding (its file must be cached or downloadable)."""
    if kind == "gpt2":
        base = tiktoken.get_encoding("gpt2")
        return make_encoding("gpt2-vlp", base._mergeable_ranks, base._pat_str, base._special_tokens)
    if kind == "bpe":
        return make_encoding("shapes-bpe", bpe_from_text(bpe_text))
    raise ValueError(f"unknown tokenizer {kind!r}: expected 'bpe' or 'gpt2'")


def encode_checked(enc, texts, length):
    """(tokens (n, length) int32 rows <bos> tokens <eos> <pad>..., problems): problems[i] is
    '' for a good text, 'empty' for one of only white space (encoded all the same) and
    'too long' for one of more than length - 2 tokens (its row left all <pad>)."""
    bos, eos, pad = (enc.encode_single_token(t) for t in (BOS, EOS, PAD))
    out = np.full((len(texts), length), pad, np.int32)
    problems = []
    for i, ids in enumerate(enc.encode_ordinary_batch(list(texts))):
        problems.append("too long" if len(ids) + 2 > length else "" if texts[i].strip() else "empty")
        if problems[-1] != "too long":
            out[i, 0], out[i, 1:len(ids) + 1], out[i, len(ids) + 1] = bos, ids, eos
    return out, problems


def encode_texts(enc, texts, length):
    """(n, length) int32: <bos> tokens <eos> <pad>... . Raises if a text does not fit."""
    out, problems = encode_checked(enc, texts, length)
    for text, problem in zip(texts, problems):
        if problem == "too long":
            raise ValueError(f"text of {len(enc.encode_ordinary(text))} tokens does not fit a context of {length}: {text!r}")
    return out


def class_prompt_tokens(enc, names, template, length):
    """(1 + len(names), length) int32 rows <bos> template name <eos>, for background and then
    each class name: the text side of dense scoring (M12), the template's tokens the place of
    the learned text prompts."""
    return encode_texts(enc, [f"{template} {name}" for name in (BACKGROUND, *names)], length)


def decode_tokens(enc, ids):
    """Text of one token row, stopping at <eos> and dropping <bos>/<pad>."""
    eos = enc.encode_single_token(EOS)
    specials = {enc.encode_single_token(t) for t in SPECIAL_TOKENS}
    out = []
    for t in ids:
        t = int(t)
        if t == eos:
            break
        if t not in specials:
            out.append(t)
    return enc.decode(out)


# -----------------------------------------------------------------------------
# generating the splits


def gen_captioned(rng, n, S, grid, pairs_ok, n_captions):
    """n images of 1-3 objects laid out by layout_row, with class maps, objects, scene ids and
    n_captions captions each (distinct templates, each naming the objects in its direction). Returns (arrays, scenes
    as (axis, objects), captions as lists of strings)."""
    images = np.empty((n, S, S, 3), np.uint8)
    classmap = np.empty((n, S, S), np.uint8)
    objects = np.empty((n, 3, 7), np.int16)
    scene = np.empty(n, np.int64)
    scenes, captions = [], []
    for i in range(n):
        count = int(rng.integers(1, 4))
        objs = [sample_object(rng, range(len(SHAPES)), pairs_ok) for _ in range(count)]
        axis, placement = layout_row(rng, objs, S, grid)
        images[i], classmap[i], boxes = render(rng, objs, placement, S)
        objects[i] = object_rows(objs, boxes)
        scene[i] = scene_id(axis, objs)
        scenes.append((axis, objs))
        templates = rng.permutation(len(TEMPLATES[count]))  # paraphrases use different templates
        captions.append([write_caption(axis, objs, int(templates[k % len(templates)]))
                         for k in range(n_captions)])
    return dict(images=images, classmap=classmap, objects=objects, scene=scene), scenes, captions


def corrupt(rng, axis, objs, all_scenes, pairs_ok):
    """A wrong description of a scene: (kind, axis, objects). Kinds: a wrong attribute of one
    object, a wrong relation (the other axis, or the order reversed), or another image's scene."""
    kinds = ["attribute", "swapped"] + (["relation"] if len(objs) > 1 else [])
    kind = kinds[int(rng.integers(len(kinds)))]
    sid = scene_id(axis, objs)
    while True:
        new_axis, new = axis, list(objs)
        if kind == "attribute":
            j, field = int(rng.integers(len(objs))), int(rng.integers(3))
            o = list(new[j])
            o[field] = int(rng.integers((len(SHAPES), len(COLOURS), len(SIZES))[field]))
            new[j] = tuple(o)
            if not pairs_ok(o[0], o[1]):
                continue
        elif kind == "relation":
            if rng.integers(2):
                new_axis = 3 - axis
            else:
                new = new[::-1]
        else:
            new_axis, new = all_scenes[int(rng.integers(len(all_scenes)))]
        if scene_id(new_axis, new) != sid:
            return CORRUPTIONS.index(kind), new_axis, new


def gen_web(rng, n, S, grid, noise, pairs_ok):
    """The noisy split: one caption per image, a fraction `noise` of them wrong, the kind of
    corruption and the scene each caption describes recorded."""
    arrays, scenes, _ = gen_captioned(rng, n, S, grid, pairs_ok, n_captions=0)
    corruption = np.zeros(n, np.int8)
    caption_scene = arrays["scene"].copy()
    captions = []
    for i, (axis, objs) in enumerate(scenes):
        if rng.random() < noise:
            corruption[i], axis, objs = corrupt(rng, axis, objs, scenes, pairs_ok)
            caption_scene[i] = scene_id(axis, objs)
        captions.append([write_caption(axis, objs, int(rng.integers(len(TEMPLATES[len(objs)]))))])
    arrays.update(corruption=corruption, caption_scene=caption_scene)
    return arrays, captions


def gen_multi(rng, n_sets, S, grid, max_images, pairs_ok):
    """Multi-image question sets: 2..max_images images of objects in random cells, a question
    that needs more than one image, and a short answer. Question types (QTYPES):
        count     how many objects of a colour or shape there are in all the images
        most      which image has the most objects
        largest   which image has the (only) large object
        change    what changed from the first image to the second (CHANGES)
        sequence  whether one object grows, shrinks or moves across 3+ images (SEQUENCES)"""
    cell = S / grid
    pool, pool_objects, sets, questions, answers, qtypes = [], [], [], [], [], []

    def random_objs(count, sizes=(0, 1)):
        return [(*sample_object(rng, range(len(SHAPES)), pairs_ok)[:2], int(rng.choice(sizes))) for _ in range(count)]

    def add(objs, placement):
        image, _, boxes = render(rng, objs, placement, S)
        pool.append(image)
        pool_objects.append(object_rows(objs, boxes))
        return len(pool) - 1

    while len(sets) < n_sets:
        qtype = QTYPES[len(sets) % len(QTYPES)]
        K = int(rng.integers(2, max_images + 1))
        if qtype == "count":
            scenes = [random_objs(int(rng.integers(1, 4))) for _ in range(K)]
            everything = [o for objs in scenes for o in objs]
            present = everything[int(rng.integers(len(everything)))]  # mostly ask about something shown
            if rng.integers(2):
                c = present[1] if rng.random() < 0.8 else int(rng.integers(len(COLOURS)))
                q, answer = f"how many {COLOUR_NAMES[c]} objects are there?", sum(o[1] == c for o in everything)
            else:
                s = present[0] if rng.random() < 0.8 else int(rng.integers(len(SHAPES)))
                name = SHAPES[s]
                q, answer = f"how many {PLURALS.get(name, name + 's')} are there?", sum(o[0] == s for o in everything)
            ids, a = [add(objs, place_objects(rng, objs, S, grid)) for objs in scenes], str(answer)
        elif qtype == "most":
            counts = rng.integers(1, 4, size=K)
            if (counts == counts.max()).sum() > 1:
                continue
            ids = [add(objs, place_objects(rng, objs, S, grid)) for objs in (random_objs(int(c)) for c in counts)]
            q, a = "which image has the most objects?", f"image {int(counts.argmax()) + 1}"
        elif qtype == "largest":
            big = int(rng.integers(K))
            scenes = [random_objs(int(rng.integers(1, 4)), sizes=(0,)) for _ in range(K)]
            scenes[big][0] = (*scenes[big][0][:2], 1)
            ids = [add(objs, place_objects(rng, objs, S, grid)) for objs in scenes]
            q, a = "which image has the largest object?", f"image {big + 1}"
        elif qtype == "change":
            change = CHANGES[int(rng.integers(len(CHANGES)))]
            count = int(rng.integers(2 if change == "removed" else 1, 3 if change == "added" else 4))
            objs = random_objs(count)
            before = place_objects(rng, objs, S, grid)
            objs2, after = list(objs), list(before)
            j = int(rng.integers(count))
            taken = [cell_of(p, cell) for p in before]
            if change in ("colour", "shape"):
                field = 1 if change == "colour" else 0
                o = list(objs[j])
                choices = [x for x in range(len(COLOURS) if field else len(SHAPES)) if x != o[field]
                           and pairs_ok(*((o[0], x) if field else (x, o[1])))]
                o[field] = int(rng.choice(choices))
                objs2[j] = tuple(o)
            elif change == "position":
                after[j] = place_free(rng, [before[j][2]], S, grid, taken)[0]
            elif change == "added":
                new = random_objs(1)
                objs2, after = objs + new, before + place_objects(rng, new, S, grid, taken)
            else:
                del objs2[j], after[j]
            ids = [add(objs, before), add(objs2, after)]
            q, a = "what changed between the two images?", change
        else:
            kind = SEQUENCES[int(rng.integers(3))]
            K = min(max(K, 3), grid) if kind == "moves" else max(K, 3)
            obj = random_objs(1)[0]
            col, row = (int(x) for x in rng.integers(grid, size=2))
            if kind == "moves":  # through K neighbouring cells of a row or column
                start = int(rng.integers(grid - K + 1))
                path = range(start, start + K) if rng.integers(2) else range(start + K - 1, start - 1, -1)
                r = radius_px(rng, obj[2], cell)
                horizontal = bool(rng.integers(2))
                places = [[in_cell(rng, p, row, r, cell) if horizontal else in_cell(rng, col, p, r, cell)] for p in path]
            else:  # one cell, the radius from small to large or back
                radii = np.linspace(RADIUS[0] * 0.8, RADIUS[1], K) * cell
                radii = radii if kind == "grows" else radii[::-1]
                centre = ((col + 0.5) * cell, (row + 0.5) * cell)
                places = [[(*centre, r)] for r in radii]
            ids = [add([obj], p) for p in places]
            q, a = "does the object grow, shrink or move?", kind
        sets.append(ids + [-1] * (max_images - len(ids)))
        questions.append(q)
        answers.append(a)
        qtypes.append(QTYPES.index(qtype))
    arrays = dict(images=np.stack(pool), objects=np.stack(pool_objects), sets=np.array(sets, np.int32),
                  qtype=np.array(qtypes, np.int8))
    return arrays, questions, answers


def gen_novel(rng, n, S, grid):
    """Images for few-shot prompting: a novel shape first, maybe base shapes beside it, in
    random cells. No captions: novel shapes are never named."""
    arrays = dict(images=[], classmap=[], objects=[])
    for _ in range(n):
        objs = [sample_object(rng, range(len(SHAPES), len(ALL_SHAPES)) if k == 0 else range(len(ALL_SHAPES)),
                              lambda s, c: True) for k in range(int(rng.integers(1, 4)))]
        image, classmap, boxes = render(rng, objs, place_objects(rng, objs, S, grid), S)
        for key, value in zip(arrays, (image, classmap, object_rows(objs, boxes))):
            arrays[key].append(value)
    return {key: np.stack(value) for key, value in arrays.items()}


def write_dataset(path, splits, meta, bpe_text=None, copy_from=None, copy_splits=(), replace=False):
    """Write a prepared dataset: every array of splits ({split: {key: array}}) as
    {split}.{key}.npy, the arrays of copy_splits copied from the dataset copy_from (not their
    visual codes: a codebook belongs to its own train split), the tokenizer file (bpe_text)
    and meta.json (meta, with the size of every split). It is written to a temporary
    directory renamed into place, so a killed writer leaves nothing half-written. A prepared
    dataset already at path is replaced, or with replace False kept (another process was
    first); anything else there is an error."""
    path = os.path.normpath(path)
    if os.path.exists(path) and not os.path.exists(os.path.join(path, "meta.json")):
        raise ValueError(f"{path} exists and is not a prepared dataset: not writing over it")
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if bpe_text is not None:
        with open(os.path.join(tmp, "tokenizer.tiktoken"), "w") as f:
            f.write(bpe_text)
        meta = dict(meta, tokenizer=dict(meta["tokenizer"], file="tokenizer.tiktoken"))
    sizes = {}
    for name, arrays in splits.items():
        sizes[name] = len(arrays["sets"] if "sets" in arrays else arrays["images"])
        for key, arr in arrays.items():
            np.save(os.path.join(tmp, f"{name}.{key}.npy"), arr)
    for name in copy_splits:
        sizes[name] = copy_from.split_size(name)
        for file in sorted(os.listdir(copy_from.path)):
            if file.startswith(name + ".") and file.endswith(".npy") and not file.startswith(f"{name}.codes-"):
                shutil.copyfile(os.path.join(copy_from.path, file), os.path.join(tmp, file))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(dict(meta, splits=sizes), f, indent=1)
    old = f"{path}.old-{os.getpid()}"
    if replace and os.path.exists(path):
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(old):  # the old one goes back: nothing is lost
            os.rename(old, path)
            raise
        # else another process finished first: keep its copy
    shutil.rmtree(old, ignore_errors=True)
    return path


def world_dir(root, cfg, image_size, context_length):
    """Cache directory of a world: named by a hash of everything that shapes its arrays."""
    key = json.dumps(dict(asdict(cfg), image_size=image_size, context_length=context_length,
                          version=WORLD_VERSION), sort_keys=True)
    return os.path.join(root, "shapes-" + hashlib.sha256(key.encode()).hexdigest()[:12])


def prepare_world(root, cfg, image_size, context_length, log=print):
    """Generate the shapes world into root/shapes-<hash> unless it is there already; return
    the path. Written to a temporary directory and renamed, so a killed run leaves no half
    world behind and concurrent callers do not clash."""
    path = world_dir(root, cfg, image_size, context_length)
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    S, G = image_size, cfg.grid
    if G < 3 or S / G < 8:
        raise ValueError(f"grid {G} on {S} px images: need a grid of at least 3 cells of at least 8 px")
    log(f"generating the shapes world into {path} ...")
    t0 = time.time()
    held = heldout_pairs(cfg)
    seen_ok = lambda s, c: (s, c) not in held  # noqa: E731
    held_ok = lambda s, c: (s, c) in held  # noqa: E731
    rng = lambda i: np.random.default_rng([cfg.world_seed, i])  # noqa: E731  one stream per split
    C = cfg.captions_per_image
    splits, texts = {}, {}
    for i, (name, n) in enumerate([("train", cfg.n_train), ("val", cfg.n_val)]):
        splits[name], _, texts[name] = gen_captioned(rng(i), n, S, G, seen_ok, C)
    # test: the first half shows only held-out colour-shape pairs, the second half none
    n_held = cfg.n_test // 2
    a, _, ta = gen_captioned(rng(2), n_held, S, G, held_ok, C)
    b, _, tb = gen_captioned(rng(3), cfg.n_test - n_held, S, G, seen_ok, C)
    splits["test"] = {k: np.concatenate([a[k], b[k]]) for k in a}
    splits["test"]["heldout"] = np.arange(cfg.n_test) < n_held
    texts["test"] = ta + tb
    splits["web"], texts["web"] = gen_web(rng(4), cfg.n_web, S, G, cfg.web_noise, seen_ok)
    for i, (name, n) in enumerate([("novel_train", cfg.n_novel_train), ("novel_val", cfg.n_novel_val)]):
        splits[name] = gen_novel(rng(5 + i), n, S, G)
    multi_texts = {}
    for i, (name, n) in enumerate([("multi_train", cfg.n_multi_train), ("multi_val", cfg.n_multi_val)]):
        splits[name], q, a = gen_multi(rng(7 + i), n, S, G, cfg.max_images, seen_ok)
        multi_texts[name] = (q, a)
    # the tokenizer learns from the pretraining captions and the questions, never novel names
    corpus = [t for caps in texts["train"] for t in caps] + [t for q, a in multi_texts.values() for t in q + a]
    ranks = train_bpe(corpus)
    bpe_text = bpe_to_text(ranks)
    enc = get_tokenizer("bpe", bpe_text)
    for name, caps in texts.items():
        flat = encode_texts(enc, [t for cs in caps for t in cs], context_length)
        splits[name]["tokens"] = flat.reshape(len(caps), -1, context_length)
    for name, (q, a) in multi_texts.items():
        splits[name]["question"] = encode_texts(enc, q, context_length)
        splits[name]["answer"] = encode_texts(enc, a, 8)
    meta = dict(kind="shapes", version=WORLD_VERSION, world=asdict(cfg), image_size=S, context_length=context_length,
                shapes=list(SHAPES), novel_shapes=list(NOVEL_SHAPES), colours=list(COLOUR_NAMES), sizes=list(SIZES),
                heldout_pairs=[[ALL_SHAPES[s], COLOUR_NAMES[c]] for s, c in held],
                corruptions=list(CORRUPTIONS), qtypes=list(QTYPES),
                tokenizer=dict(kind="bpe", file="tokenizer.tiktoken", n_vocab=enc.n_vocab,
                               special_tokens={t: enc.encode_single_token(t) for t in SPECIAL_TOKENS}))
    write_dataset(path, splits, meta, bpe_text)
    log(f"shapes world ready in {time.time() - t0:.1f} s")
    return path


# -----------------------------------------------------------------------------
# reading prepared data


class Dataset:
    """A prepared dataset directory: its metadata, tokenizer and memory-mapped splits."""

    def __init__(self, path):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path} is not a prepared dataset: {meta_path} is missing")
        self.path = path
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.image_size = self.meta["image_size"]
        self.context_length = self.meta["context_length"]
        tok = self.meta["tokenizer"]
        self.bpe_text = None
        if tok["kind"] == "bpe":
            with open(os.path.join(path, tok["file"])) as f:
                self.bpe_text = f.read()
        self.tokenizer = get_tokenizer(tok["kind"], self.bpe_text)
        self._arrays = {}

    def array(self, split, key):
        """One memory-mapped array, e.g. array('train', 'images')."""
        if (split, key) not in self._arrays:
            file = os.path.join(self.path, f"{split}.{key}.npy")
            if not os.path.exists(file):
                raise FileNotFoundError(f"{self.path} has no array {key!r} for split {split!r}")
            self._arrays[split, key] = np.load(file, mmap_mode="r")
        return self._arrays[split, key]

    def has(self, split, key):
        return os.path.exists(os.path.join(self.path, f"{split}.{key}.npy"))

    def __len__(self):
        return self.meta["splits"]["train"]

    def split_size(self, split):
        return self.meta["splits"][split]

    def image_text_batch(self, split, idx, caption=None):
        """Images (B,S,S,3) uint8 and one caption each (B,T) int32 for the index array idx.
        caption: (B,) which caption of each image; default the first."""
        idx = np.asarray(idx)
        images = self.array(split, "images")[idx]
        tokens = self.array(split, "tokens")
        caption = np.zeros(len(idx), np.int64) if caption is None else caption
        return images, tokens[idx, caption]

    def class_names(self):
        """The class of each class-map value: ['background', the shapes..., the novel shapes...]
        for the shapes world, or the dataset's own list (meta 'classes', background first)."""
        return self.meta.get("classes") or [BACKGROUND, *self.meta["shapes"], *self.meta["novel_shapes"]]

    def class_targets(self, split, idx, names):
        """Class maps (B, S, S) of images idx as indices into ['background', *names]: a pixel
        of a class not named is background. Raises on a name the dataset does not have."""
        known = self.class_names()
        lut = np.zeros(len(known), np.int64)
        lut[self.class_values(names)] = np.arange(1, len(names) + 1)
        return lut[self.array(split, "classmap")[np.asarray(idx)]]

    def class_values(self, names):
        """The class-map value of each name; raises on a name the dataset does not have."""
        known = self.class_names()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{self.path} has no class {', '.join(map(repr, unknown))}; it has {', '.join(known[1:])}")
        return [known.index(n) for n in names]

    def shots(self, split, names, k, seed):
        """K-shot sampling: for each named class, k images of split showing it, drawn at random
        by seed, no image for two classes. Returns the indices (len(names) * k,)."""
        classmap = self.array(split, "classmap")
        rng = np.random.default_rng(seed)
        taken = np.zeros(len(classmap), bool)
        out = []
        for name, value in zip(names, self.class_values(names)):
            has = (classmap == value).any(axis=(1, 2)) & ~taken
            if has.sum() < k:
                raise ValueError(f"{split} of {self.path} has {has.sum()} images of {name!r} left, fewer than {k} shots")
            pick = rng.choice(np.flatnonzero(has), k, replace=False)
            taken[pick] = True
            out.extend(pick.tolist())
        return np.array(out, np.int64)

    def multi_batch(self, split, idx):
        """Multi-image question sets idx: images (B, K, S, S, 3) uint8 with zeros in the padding
        slots, valid (B, K) bool, question (B, T) and answer (B, Ta) int32 token rows. K is the
        most images of any set of the batch: sets of different sizes share a batch."""
        sets = self.array(split, "sets")[np.asarray(idx)]  # (B, max_images) pool indices, -1: no image
        valid = sets >= 0
        K = max(1, int(valid.sum(1).max()))
        sets, valid = sets[:, :K], valid[:, :K]
        images = self.array(split, "images")[np.where(valid, sets, 0)]
        images[~valid] = 0
        return images, valid, self.array(split, "question")[idx], self.array(split, "answer")[idx]

    def codebook(self, patch_size, n_codes):
        """(K, p*p*3) float32 centroids in [0, 1] pixels, written by prepare_codebook."""
        file = codebook_file(self.path, patch_size, n_codes)
        if not os.path.exists(file):
            raise FileNotFoundError(f"{self.path} has no visual codebook of {n_codes} codes for {patch_size} px patches "
                                    f"(data.prepare_codebook writes it)")
        return np.load(file)

    def codes(self, split, patch_size, n_codes):
        """(N, P) int16: the visual code of every patch of a split (prepare_codebook)."""
        return self.array(split, codebook_name(patch_size, n_codes))


# -----------------------------------------------------------------------------
# the visual codebook (the image vocabulary of ELECTRA's generator)


def codebook_name(patch_size, n_codes):
    """The array name of the per-patch codes: {split}.codes-p{p}-k{K}.npy."""
    return f"codes-p{patch_size}-k{n_codes}"


def codebook_file(path, patch_size, n_codes):
    return os.path.join(path, f"codebook-p{patch_size}-k{n_codes}.npy")


def patchify(images, p):
    """uint8 (N, S, S, 3) -> float32 (N, P, p*p*3) in [0, 1]: the patches in the ViT's
    row-major order, the pixels of each patch as (row, column, channel)."""
    N, S = images.shape[:2]
    g = S // p
    x = np.asarray(images).reshape(N, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(N, g * g, p * p * 3).astype(np.float32) / 255.0


def nearest_code(x, centroids):
    """(n,) index of the nearest centroid (squared Euclidean) of each row of x (n, d)."""
    return ((centroids ** 2).sum(1)[None, :] - 2.0 * (x @ centroids.T)).argmin(1)


def kmeans(x, k, iters, rng):
    """Lloyd's k-means on the rows of x, started from k distinct rows; a cluster that empties
    is re-seeded with the row farthest from its centroid. Returns (k, d) centroids."""
    distinct = np.unique(x, axis=0)
    if len(distinct) < k:
        raise ValueError(f"k-means: {len(distinct)} distinct patches, fewer than the {k} codes asked for")
    centroids = distinct[rng.choice(len(distinct), k, replace=False)]
    for _ in range(iters):
        code = nearest_code(x, centroids)
        counts = np.bincount(code, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, code, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        if not filled.all():
            far = ((x - centroids[code]) ** 2).sum(1).argsort()[::-1]
            centroids[~filled] = x[far[:(~filled).sum()]]
    return centroids


def prepare_codebook(path, patch_size, n_codes, iters=15, max_fit=65536, seed=0, log=print):
    """The visual codebook of ELECTRA's MOC objective, stored with a prepared dataset: k-means
    (n_codes centroids) over the patches of up to max_fit train images' patches, pixels scaled
    to [0, 1]; then every patch of every captioned split gets the index of its nearest
    centroid. Writes codebook-p{p}-k{K}.npy (K, p*p*3) float32 and {split}.codes-p{p}-k{K}.npy
    (N, P) int16, each atomically, the codebook last (it marks the work done)."""
    name = codebook_name(patch_size, n_codes)
    book_file = codebook_file(path, patch_size, n_codes)
    if os.path.exists(book_file):
        return book_file
    ds = Dataset(path)
    if ds.image_size % patch_size:
        raise ValueError(f"image size {ds.image_size} is not a multiple of patch size {patch_size}")
    t0 = time.time()
    rng = np.random.default_rng(seed)
    train = ds.array("train", "images")
    per_image = (ds.image_size // patch_size) ** 2
    pick = np.sort(rng.choice(len(train), min(len(train), max(1, max_fit // per_image)), replace=False))
    centroids = kmeans(patchify(train[pick], patch_size).reshape(-1, 3 * patch_size ** 2), n_codes, iters, rng)
    splits = [s for s in ds.meta["splits"] if ds.has(s, "tokens")]
    for split in splits:
        images = ds.array(split, "images")
        codes = np.empty((len(images), per_image), np.int16)
        for i in range(0, len(images), 1024):
            x = patchify(images[i:i + 1024], patch_size)
            codes[i:i + 1024] = nearest_code(x.reshape(-1, x.shape[-1]), centroids).reshape(len(x), -1)
        file = os.path.join(path, f"{split}.{name}.npy")
        np.save(file + ".tmp.npy", codes)
        os.replace(file + ".tmp.npy", file)
    np.save(book_file + ".tmp.npy", centroids)
    os.replace(book_file + ".tmp.npy", book_file)
    log(f"visual codebook ({n_codes} codes of {patch_size}x{patch_size} patches) ready in {time.time() - t0:.1f} s")
    return book_file


@lru_cache(maxsize=4)
@lru_cache(maxsize=2)  # a batch reads one epoch, or two at a boundary: each is drawn once, not per batch
def _epoch_permutation(n, seed, epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)


@lru_cache(maxsize=2)
def _epoch_captions(n, n_captions, seed, epoch):
    return np.random.default_rng([seed, epoch, 1]).integers(n_captions, size=n)


def batch_indices(n, batch_size, step, seed, rank=0, world_size=1, grad_accum=1, n_captions=0):
    """Indices of this rank's batch at micro-step `step`. The data is walked in a new random
    order each epoch; optimizer step t = step // grad_accum reads positions [t*B*k*W,
    (t+1)*B*k*W) of that walk, k = grad_accum and W = world_size: rank r the r-th run of B*k
    of them, its micro-step i the i-th run of B within that. The step's batch is so ordered
    rank by rank, each rank's micro-batches in turn (as train.train_step orders it), and
    however it is split it holds the same samples. With n_captions, also which caption of
    each image, drawn per position of the walk (so it does not depend on the split either).
    Stateless: a resumed run draws the same batches from the step alone."""
    t, i = divmod(step, grad_accum)
    pos = ((t * world_size + rank) * grad_accum + i) * batch_size + np.arange(batch_size)
    epoch, within = np.divmod(pos, n)
    out, caption = np.empty(batch_size, np.int64), np.empty(batch_size, np.int64)
    for e in np.unique(epoch):
        sel = epoch == e
        out[sel] = _epoch_permutation(n, seed, int(e))[within[sel]]
        if n_captions:
            caption[sel] = _epoch_captions(n, n_captions, seed, int(e))[within[sel]]
    return (out, caption) if n_captions else out


# -----------------------------------------------------------------------------
# image files


def load_image(path, size):
    """Read any common image file (RGB, RGBA, L, P, CMYK, 16-bit) as (size, size, 3) uint8:
    the shorter side resized to size, then centre-cropped. Raises ValueError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
                a = np.asarray(im, dtype=np.float64)
                top = 65535.0 if a.max() > 255 else 255.0
                im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            elif im.mode == "RGBA" or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size)
                im.paste(rgba, mask=rgba.split()[-1])  # transparent parts on black, like the world
            im = im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)

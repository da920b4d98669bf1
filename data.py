"""
The data of nanoVLP: the shapes world (procedural scenes whose ground truth is known), the tokenizers (the world's
BPE, GPT-2's and CLIP's as tiktoken encodings), prepared datasets (meta.json, tokenizer.tiktoken and memory-mapped
{split}.{key}.npy arrays; prepare.py prepares real data, docs/real-data.md), the visual codebook and the batches.
"""

import base64
import hashlib
import html
import itertools
import json
import os
import shutil
import time
import unicodedata
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex
import tiktoken
import torch

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

# Caption templates: objects named along the layout axis, even templates from the left or top, odd
# ones from the far end: fixed before any object, naming is a reading-order task (README).
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

CORRUPTIONS = ("none", "attribute", "relation", "swapped")  # recorded per web caption so that filtering can be scored
QTYPES = ("count", "most", "largest", "change", "sequence")  # multi-image questions
CHANGES = ("colour", "shape", "position", "added", "removed")
SEQUENCES = ("grows", "shrinks", "moves")

BOS, EOS, PAD, MASK, GLOB = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|mask|>", "<|glob|>"
SPECIAL_TOKENS = (EOS, BOS, PAD, MASK, GLOB)  # the model's, appended after the BPE ranks
BACKGROUND = "background"  # class 0 of every class map
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@dataclass
class WorldConfig:
    world_seed: int = 0  # the whole world is a function of this seed and the fields below
    n_train: int = 20000  # clean image-caption pairs for pretraining
    n_val: int = 1000  # val images (captioned as train)
    n_test: int = 1000  # half of it shows held-out colour-shape pairs
    n_web: int = 20000  # noisy "web" pairs (CapFilt)
    web_noise: float = 0.3  # fraction of web captions corrupted
    n_novel_train: int = 1000  # images with novel shapes (few-shot prompting)
    n_novel_val: int = 500  # val images with novel shapes
    n_multi_train: int = 4000  # multi-image question sets
    n_multi_val: int = 500  # val question sets
    grid: int = 4  # objects sit in the cells of a grid x grid layout (at least 3: rows of three)
    max_images: int = 4  # most images in a multi-image set
    captions_per_image: int = 4  # paraphrases per clean image
    n_heldout_pairs: int = 6  # colour-shape pairs shown only in the test split


# -----------------------------------------------------------------------------
# scenes: objects laid out in a grid, rendered as implicit shapes, captioned by templates


N_OBJECT_CODES = len(ALL_SHAPES) * len(COLOURS) * len(SIZES) + 1  # 0: no object


def scene_id(axis, objects):
    """One int64 for a scene: its layout axis and its objects (shape, colour, size) along it."""
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
    """The colour-shape pairs shown only in test; each colour and shape still trains with others."""
    pairs = set()
    for i in np.random.default_rng([cfg.world_seed, 99]).permutation(len(SHAPES) * len(COLOURS)):
        s, c = divmod(int(i), len(COLOURS))
        if len(pairs) < cfg.n_heldout_pairs and all(s != s2 and c != c2 for s2, c2 in pairs):
            pairs.add((s, c))
    return sorted(pairs)


def sample_object(rng, shapes, pairs_ok):
    """(shape, colour, size) drawn uniformly among the allowed colour-shape pairs."""
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


def layout_row(rng, objects, S, grid):
    """(axis, [(cx, cy, r)]): one object in any cell, two or three in one row (axis 1) or column (2)."""
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


# each shape's mask at (u, v) (d2 = u² + v²): centred at 0 with radius 1, u right, v down (normalised by the radius)
SHAPE_MASKS = dict(
    circle=lambda u, v, d2: d2 <= 1.0,
    square=lambda u, v, d2: np.maximum(abs(u), abs(v)) <= 0.85,
    triangle=lambda u, v, d2: (v <= 0.7) & (abs(u) * 1.7 <= v + 1.0),  # apex up, base at v = 0.7
    diamond=lambda u, v, d2: abs(u) + abs(v) <= 1.1,
    cross=lambda u, v, d2: ((abs(u) <= 0.35) & (abs(v) <= 1.0)) | ((abs(v) <= 0.35) & (abs(u) <= 1.0)),
    ring=lambda u, v, d2: (d2 <= 1.0) & (d2 >= 0.3),
    star=lambda u, v, d2: np.sqrt(d2) <= 0.45 + 0.55 * np.abs(np.cos(2.5 * (np.arctan2(v, u) + np.pi / 2))) ** 3,
    heart=lambda u, v, d2: (((1.15 * u) ** 2 + (0.25 - 1.15 * v) ** 2 - 1) ** 3  # (x² + y² - 1)³ <= x² y³
                            <= (1.15 * u) ** 2 * (0.25 - 1.15 * v) ** 3),  # at x = 1.15 u, y = 0.25 - 1.15 v
    moon=lambda u, v, d2: (d2 <= 1.0) & ((u - 0.45) ** 2 + (v + 0.1) ** 2 >= 0.7),
)


def render(rng, objects, placement, S):
    """Draw one image of up to 3 objects: image (S,S,3) uint8, classmap (S,S) uint8 and objects (3, 7) int16,
    a row of shape, colour, size, x0, y0, x1, y1 (-1 where there is no object)."""
    image = np.full((S, S, 3), rng.integers(0, 50, size=3), np.uint8)  # dark background of a random tint
    classmap = np.zeros((S, S), np.uint8)
    rows = np.full((3, 7), -1, np.int16)
    for j, ((s, c, z), (cx, cy, r)) in enumerate(zip(objects, placement)):
        x0, y0 = max(int(cx - r) - 1, 0), max(int(cy - r) - 1, 0)
        x1, y1 = min(int(cx + r) + 2, S), min(int(cy + r) + 2, S)
        u = (np.arange(x0, x1)[None, :] + 0.5 - cx) / r  # pixel centres
        v = (np.arange(y0, y1)[:, None] + 0.5 - cy) / r
        mask = SHAPE_MASKS[ALL_SHAPES[s]](u, v, u * u + v * v)
        colour = np.clip(np.array(COLOURS[COLOUR_NAMES[c]]) + rng.integers(-20, 21, size=3), 0, 255)
        image[y0:y1, x0:x1][mask] = colour
        classmap[y0:y1, x0:x1][mask] = 1 + s
        ys, xs = np.nonzero(mask)
        rows[j] = (s, c, z, x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)
    return image, classmap, rows


def write_caption(axis, objects, template):
    """Caption of a scene (objects in order along the axis) with one template (see TEMPLATES)."""
    reverse = template % 2 == 1
    phrases = [f"{SIZES[z]} {COLOUR_NAMES[c]} {ALL_SHAPES[s]}" for s, c, z in (objects[::-1] if reverse else objects)]
    return TEMPLATES[len(objects)][template].format(*phrases, rel=RELATIONS.get((axis, reverse)),
                                                    dir=DIRECTIONS.get((axis, reverse)))


# each template (plain words) as a regex: an object phrase for each object, the group 'word' for {rel} or {dir}
OBJECT_PHRASE = regex.compile(f"({'|'.join(SIZES)}) ({'|'.join(COLOUR_NAMES)}) ({'|'.join(ALL_SHAPES)})")
WORD_GROUPS = {key: f"(?P<word>{'|'.join(table.values())})" for key, table in (("rel", RELATIONS), ("dir", DIRECTIONS))}
CAPTION_PATTERNS = [(n, regex.compile(t.format(*[OBJECT_PHRASE.pattern] * 3, **WORD_GROUPS)))
                    for n, ts in TEMPLATES.items() for t in ts]


def parse_caption(text):
    """The scene_id a caption describes, or None if it is not a well-formed world caption."""
    for n, pattern in CAPTION_PATTERNS:
        m = pattern.fullmatch(text.strip())
        if m is not None:
            objects = [(ALL_SHAPES.index(s), COLOUR_NAMES.index(c), SIZES.index(z))
                       for z, c, s in OBJECT_PHRASE.findall(m[0])]
            if n == 1:
                return scene_id(0, objects)
            axis, reverse = next(k for k, w in (RELATIONS if n == 2 else DIRECTIONS).items() if w == m["word"])
            return scene_id(axis, objects[::-1] if reverse else objects)
    return None


# -----------------------------------------------------------------------------
# tokenizers, used through tiktoken: the world's byte-level BPE trained on its texts, and
# GPT-2's and CLIP's (read from Hugging Face files by hf.py)


def train_bpe(texts, max_merges=2000):
    """Byte-level BPE ranks learned from texts (words split by GPT-2's pattern): the most frequent
    pair merged (ties by its bytes) until every word is one token or max_merges."""
    counts = Counter(word for text in texts for word in regex.findall(GPT2_PATTERN, text))
    words = [([bytes([b]) for b in w.encode("utf-8")], f) for w, f in counts.items()]
    ranks = {bytes([i]): i for i in range(256)}
    for _ in range(max_merges):
        pairs = {}
        for w, f in words:
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + f
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        for w, _ in words:  # left to right; a merged token is never best[0], so never merged again
            out = []
            for tok in w:
                if out and (out[-1], tok) == best:
                    out[-1] = merged
                else:
                    out.append(tok)
            w[:] = out
    return ranks


def bpe_to_text(ranks):
    """tiktoken's file format: one 'base64(token) rank' line per token, by rank."""
    return "".join(base64.b64encode(tok).decode() + f" {rank}\n"
                   for tok, rank in sorted(ranks.items(), key=lambda x: x[1]))


def bpe_from_text(text):
    """Inverse of bpe_to_text (what tiktoken.load.load_tiktoken_bpe does with a file)."""
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in text.splitlines() if line)}


def make_encoding(name, ranks, pattern=GPT2_PATTERN, specials=None, cls=tiktoken.Encoding):
    """A tiktoken Encoding (or subclass cls) with our special tokens after the ranks (and specials)."""
    specials = dict(specials or {})
    for tok in SPECIAL_TOKENS:
        specials.setdefault(tok, len(ranks) + len(specials))
    return cls(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


# CLIP marks a word's last symbol with '</w>': here a trailing space byte, which no CLIP word holds
CLIP_WORDS = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                           r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


class ClipEncoding(tiktoken.Encoding):
    """OpenAI CLIP's BPE as a tiktoken Encoding: each of CLIP's words followed by a space ('</w>')."""

    def words(self, text):
        """CLIP's text cleaning (but ftfy: NFC, HTML unescaped twice, one space a run, stripped, lower), its words."""
        text = html.unescape(html.unescape(unicodedata.normalize("NFC", text)))
        return "".join(w + " " for w in CLIP_WORDS.findall(regex.sub(r"\s+", " ", text).strip().lower()))

    def encode_ordinary(self, text):
        return super().encode_ordinary(self.words(text))

    def encode(self, text, **kwargs):
        return super().encode(self.words(text), **kwargs)

    def decode(self, tokens, errors="replace"):
        return super().decode(tokens, errors=errors).strip()


def get_tokenizer(kind, bpe_text=None):
    """The encoding of a tokenizer from the text of its tiktoken file: 'bpe' the world's, 'gpt2'
    GPT-2's (no text: tiktoken's own file), 'clip' CLIP's; their own specials keep their ids."""
    if kind == "bpe":
        return make_encoding("shapes-bpe", bpe_from_text(bpe_text))
    if kind == "gpt2" and bpe_text is None:
        base = tiktoken.get_encoding("gpt2")
        return make_encoding("gpt2-vlp", base._mergeable_ranks, base._pat_str, base._special_tokens)
    if kind == "gpt2":
        ranks = bpe_from_text(bpe_text)
        return make_encoding("gpt2-vlp", ranks, GPT2_PATTERN, {EOS: len(ranks)})
    if kind == "clip":
        ranks = bpe_from_text(bpe_text)
        return make_encoding("clip-vlp", ranks, r"[^ ]+ ", {BOS: len(ranks), EOS: len(ranks) + 1}, ClipEncoding)
    raise ValueError(f"unknown tokenizer {kind!r}: expected 'bpe', 'gpt2' or 'clip'")


def tokenizer_meta(kind, enc):
    """The tokenizer entry of meta.json (write_meta adds its file)."""
    return dict(kind=kind, n_vocab=enc.n_vocab, special_tokens={t: enc.encode_single_token(t) for t in SPECIAL_TOKENS})


def encode_checked(enc, texts, length):
    """(rows <bos> tokens <eos> <pad>... (n, length) int32, problems: '', 'empty' or 'too long')."""
    bos, eos, pad = (enc.encode_single_token(t) for t in (BOS, EOS, PAD))
    out = np.full((len(texts), length), pad, np.int32)
    problems = []
    for i, ids in enumerate(enc.encode_ordinary_batch(list(texts))):
        problems.append("too long" if len(ids) + 2 > length else "" if texts[i].strip() and ids else "empty")
        if problems[-1] != "too long":
            out[i, 0], out[i, 1:len(ids) + 1], out[i, len(ids) + 1] = bos, ids, eos
    return out, problems


def encode_texts(enc, texts, length):
    """(n, length) int32: <bos> tokens <eos> <pad>... . Raises if a text does not fit."""
    out, problems = encode_checked(enc, texts, length)
    for text, problem in zip(texts, problems):
        if problem == "too long":
            raise ValueError(f"text of {len(enc.encode_ordinary(text))} tokens does not fit a context of {length}: "
                             f"{text!r}")
    return out


def encode_truncated(enc, texts, length):
    """(rows as encode_texts gives them, the indices of the texts cut): a text too long keeps its first length - 2
    tokens, as CLIP's tokenizers truncate."""
    out, problems = encode_checked(enc, texts, length)
    cut = [i for i, problem in enumerate(problems) if problem == "too long"]
    for i in cut:
        out[i, 0], out[i, -1] = enc.encode_single_token(BOS), enc.encode_single_token(EOS)
        out[i, 1:-1] = enc.encode_ordinary(texts[i])[:length - 2]
    return out, cut


def class_prompt_tokens(enc, names, template, length):
    """Rows <bos> template name <eos> of background and each class name: dense scoring's texts."""
    return encode_texts(enc, [f"{template} {name}" for name in (BACKGROUND, *names)], length)


def decode_tokens(enc, ids):
    """Text of one token row, stopping at <eos> and dropping <bos>/<pad>."""
    eos, specials = enc.encode_single_token(EOS), {enc.encode_single_token(t) for t in SPECIAL_TOKENS}
    return enc.decode([t for t in itertools.takewhile(lambda t: t != eos, map(int, ids)) if t not in specials])


# -----------------------------------------------------------------------------
# writing prepared datasets, atomically: a reader or a killed writer never leaves half of one


def write_file(file, content):
    """Write text, an array (np.save) or what content(f) writes to a binary file, to a temporary file of
    this process's renamed to file: a reader sees the old file or the new one, never half of one."""
    tmp, text = f"{file}.tmp-{os.getpid()}", isinstance(content, str)
    with open(tmp, "w" if text else "wb", encoding="utf-8" if text else None) as f:
        if text:
            f.write(content)
        elif callable(content):
            content(f)
        else:
            np.save(f, content)
    os.replace(tmp, file)


@contextmanager
def staged_dataset(path, replace=False):
    """A temporary directory renamed to path when the block ends (removed on an error); a dataset
    at path is replaced, or with replace False kept (another process was first)."""
    path = os.path.normpath(path)
    if os.path.exists(path) and not os.path.exists(os.path.join(path, "meta.json")):
        raise ValueError(f"{path} exists and is not a prepared dataset: not writing over it")
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def link_split_files(tmp, dataset, names):
    """Hard-link (or copy) splits `names` of a dataset into tmp, but their visual codes; returns sizes."""
    for name in names:
        for file in sorted(os.listdir(dataset.path)):
            if file.startswith(name + ".") and file.endswith((".npy", ".captions.json")) \
                    and not file.startswith(f"{name}.codes-"):
                src, dst = os.path.join(dataset.path, file), os.path.join(tmp, file)
                try:  # prepared files are replaced, never written in place: the two names stay equal
                    os.link(src, dst)
                except OSError:  # another device, or no hard links
                    shutil.copyfile(src, dst)
    return {name: dataset.split_size(name) for name in names}


def write_meta(tmp, meta, sizes, bpe_text=None):
    """meta.json (meta with the size of every split) and the tokenizer file (bpe_text)."""
    if bpe_text is not None:
        write_file(os.path.join(tmp, "tokenizer.tiktoken"), bpe_text)
        meta = dict(meta, tokenizer=dict(meta["tokenizer"], file="tokenizer.tiktoken"))
    write_file(os.path.join(tmp, "meta.json"), json.dumps(dict(meta, splits=sizes), indent=1))


def save_arrays(tmp, split, arrays):
    """Each array of {key: array} as {split}.{key}.npy in the staging directory tmp."""
    for key, a in arrays.items():
        np.save(os.path.join(tmp, f"{split}.{key}.npy"), a)


def write_dataset(path, splits, meta, bpe_text=None, copy_from=None, copy_splits=(), replace=False):
    """Write splits {split: {key: array}} (and copy_splits of copy_from) as a prepared dataset."""
    with staged_dataset(path, replace) as tmp:
        for name, arrays in splits.items():
            save_arrays(tmp, name, arrays)
        sizes = {name: len(a["sets"] if "sets" in a else a["images"]) for name, a in splits.items()}
        write_meta(tmp, meta, {**sizes, **link_split_files(tmp, copy_from, copy_splits)}, bpe_text)
    return os.path.normpath(path)


# -----------------------------------------------------------------------------
# generating the splits


def gen_captioned(rng, n, S, grid, pairs_ok, n_captions):
    """(arrays, scenes (axis, objects), captions) of n images of 1-3 objects, captions by template."""
    images = np.empty((n, S, S, 3), np.uint8)
    classmap = np.empty((n, S, S), np.uint8)
    objects = np.empty((n, 3, 7), np.int16)
    scene = np.empty(n, np.int64)
    scenes, captions = [], []
    for i in range(n):
        count = int(rng.integers(1, 4))
        objs = [sample_object(rng, range(len(SHAPES)), pairs_ok) for _ in range(count)]
        axis, placement = layout_row(rng, objs, S, grid)
        images[i], classmap[i], objects[i] = render(rng, objs, placement, S)
        scene[i] = scene_id(axis, objs)
        scenes.append((axis, objs))
        templates = rng.permutation(len(TEMPLATES[count]))  # paraphrases use different templates
        captions.append([write_caption(axis, objs, int(templates[k % len(templates)]))
                         for k in range(n_captions)])
    return dict(images=images, classmap=classmap, objects=objects, scene=scene), scenes, captions


def corrupt(rng, axis, objs, all_scenes, pairs_ok):
    """(kind, axis, objects) of a wrong description: an attribute, the relation, or another scene."""
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
        elif kind == "relation":  # the other axis, or the objects the other way along it
            new_axis, new = (3 - axis, new) if rng.integers(2) else (axis, new[::-1])
        else:
            new_axis, new = all_scenes[int(rng.integers(len(all_scenes)))]
        if scene_id(new_axis, new) != sid:
            return CORRUPTIONS.index(kind), new_axis, new


def gen_web(rng, n, S, grid, noise, pairs_ok):
    """The noisy split: one caption per image, a fraction `noise` wrong (kind and scene recorded)."""
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
    """Question sets of 2..max_images images that need more than one image; QTYPES in turn."""
    cell = S / grid
    pool, sets, questions, answers = [], [], [], []  # pool: each image rendered (image, classmap, objects)

    def random_objs(count, sizes=(0, 1)):
        return [(*sample_object(rng, range(len(SHAPES)), pairs_ok)[:2], int(rng.choice(sizes))) for _ in range(count)]

    def add(objs, placement):
        pool.append(render(rng, objs, placement, S))
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
            taken = [(int(p[0] // cell), int(p[1] // cell)) for p in before]
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
                places = [[in_cell(rng, p, row, r, cell) if horizontal else in_cell(rng, col, p, r, cell)]
                          for p in path]
            else:  # one cell, the radius from small to large or back
                radii = np.linspace(RADIUS[0] * 0.8, RADIUS[1], K) * cell
                places = [[((col + 0.5) * cell, (row + 0.5) * cell, r)] for r in radii[::1 if kind == "grows" else -1]]
            ids = [add([obj], p) for p in places]
            q, a = "does the object grow, shrink or move?", kind
        sets.append(ids + [-1] * (max_images - len(ids)))
        questions.append(q)
        answers.append(a)
    arrays = dict(images=np.stack([p[0] for p in pool]), objects=np.stack([p[2] for p in pool]),
                  sets=np.array(sets, np.int32), qtype=(np.arange(n_sets) % len(QTYPES)).astype(np.int8))
    return arrays, questions, answers


def gen_novel(rng, n, S, grid):
    """Uncaptioned images for few-shot prompting: a novel shape, maybe base shapes beside it."""
    rendered = []
    for _ in range(n):
        objs = [sample_object(rng, range(len(SHAPES), len(ALL_SHAPES)) if k == 0 else range(len(ALL_SHAPES)),
                              lambda s, c: True) for k in range(int(rng.integers(1, 4)))]
        rendered.append(render(rng, objs, place_objects(rng, objs, S, grid), S))
    return dict(zip(("images", "classmap", "objects"), map(np.stack, zip(*rendered))))


def world_dir(root, cfg, image_size, context_length):
    """Cache directory of a world: named by a hash of everything that shapes its arrays."""
    key = json.dumps(dict(asdict(cfg), image_size=image_size, context_length=context_length,
                          version=WORLD_VERSION), sort_keys=True)
    return os.path.join(root, "shapes-" + hashlib.sha256(key.encode()).hexdigest()[:12])


def prepare_world(root, cfg, image_size, context_length, log=print):
    """Generate the shapes world into root/shapes-<hash> unless it is there; returns the path."""
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
    bpe_text = bpe_to_text(train_bpe(corpus))
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
                corruptions=list(CORRUPTIONS), qtypes=list(QTYPES), tokenizer=tokenizer_meta("bpe", enc))
    write_dataset(path, splits, meta, bpe_text)
    log(f"shapes world ready in {time.time() - t0:.1f} s")
    return path


# -----------------------------------------------------------------------------
# reading prepared data


class Dataset:
    """A prepared dataset directory: its metadata, tokenizer and memory-mapped splits. A
    webdataset source's train split is not prepared but streamed from its shards: then stream
    is meta's {shards, counts, samples} (prepare.ShardStream reads it) and len() its samples."""

    def __init__(self, path):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path} is not a prepared dataset: {meta_path} is missing")
        self.path, self.meta = path, json.loads(Path(meta_path).read_text())
        self.image_size, self.context_length = self.meta["image_size"], self.meta["context_length"]
        tok = self.meta["tokenizer"]
        self.bpe_text = Path(path, tok["file"]).read_text() if tok.get("file") else None  # None: tiktoken's GPT-2
        self.tokenizer = get_tokenizer(tok["kind"], self.bpe_text)
        self.stream = self.meta.get("stream")
        self._arrays = {}

    def array(self, split, key):
        """One memory-mapped array, e.g. array('train', 'images')."""
        if (split, key) not in self._arrays:
            if not self.has(split, key):
                raise FileNotFoundError(f"{self.path} has no array {key!r} for split {split!r}")
            self._arrays[split, key] = np.load(os.path.join(self.path, f"{split}.{key}.npy"), mmap_mode="r")
        return self._arrays[split, key]

    def has(self, split, key):
        return os.path.exists(os.path.join(self.path, f"{split}.{key}.npy"))

    def __len__(self):
        return self.stream["samples"] if self.stream else self.meta["splits"]["train"]

    def split_size(self, split):
        return self.meta["splits"][split]

    def captions(self, split):
        """Each image's captions as the source wrote them ({split}.captions.json), or None (world)."""
        file = os.path.join(self.path, f"{split}.captions.json")
        return json.loads(Path(file).read_text(encoding="utf-8")) if os.path.exists(file) else None

    def image_text_batch(self, split, idx, caption):
        """Images (B,S,S,3) uint8 and caption rows (B,T) int32 of images idx (B,), caption (B,) of each."""
        return self.array(split, "images")[idx], self.array(split, "tokens")[idx, caption]

    def class_names(self):
        """The class of each class-map value: meta 'classes', or background and the world's shapes."""
        return self.meta.get("classes") or [BACKGROUND, *self.meta["shapes"], *self.meta["novel_shapes"]]

    def class_targets(self, split, idx, names):
        """Class maps (B, S, S) of images idx as indices into ['background', *names]."""
        lut = np.zeros(len(self.class_names()), np.int64)
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
        """(len(names) * k,) indices: k images of split showing each class, no image for two."""
        classmap = self.array(split, "classmap")
        rng = np.random.default_rng(seed)
        taken = np.zeros(len(classmap), bool)
        out = []
        for name, value in zip(names, self.class_values(names)):
            has = (classmap == value).any(axis=(1, 2)) & ~taken
            if has.sum() < k:
                raise ValueError(f"{split} of {self.path} has {has.sum()} images of {name!r} left, "
                                 f"fewer than {k} shots")
            pick = rng.choice(np.flatnonzero(has), k, replace=False)
            taken[pick] = True
            out.extend(pick.tolist())
        return np.array(out, np.int64)

    def multi_batch(self, split, idx):
        """Multi-image question sets idx: images (B, K, S, S, 3) uint8 (zeros in padding slots),
        valid (B, K) bool, question (B, T) and answer (B, Ta) int32; K the batch's largest set."""
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
            raise FileNotFoundError(f"{self.path} has no visual codebook of {n_codes} codes for {patch_size} px "
                                    f"patches (data.prepare_codebook writes it)")
        return np.load(file)

    def codes(self, split, patch_size, n_codes):
        """(N, P) int16: the visual code of every patch of a split (prepare_codebook)."""
        return self.array(split, codebook_name(patch_size, n_codes))


# -----------------------------------------------------------------------------
# the visual codebook (the image vocabulary of ELECTRA's generator)


CODEBOOK_VERSION = 2  # in the file names: a dataset prepared before the fit changed gets a new codebook


def codebook_name(patch_size, n_codes):
    """The array name of the per-patch codes: {split}.codes-p{p}-k{K}-v{version}.npy."""
    return f"codes-p{patch_size}-k{n_codes}-v{CODEBOOK_VERSION}"


def codebook_file(path, patch_size, n_codes):
    return os.path.join(path, f"codebook-p{patch_size}-k{n_codes}-v{CODEBOOK_VERSION}.npy")


def patchify(images, p):
    """uint8 (N, S, S, 3) -> float32 (N, P, p*p*3) in [0, 1], patches row-major as the ViT's."""
    N, g = len(images), images.shape[1] // p
    x = np.asarray(images).reshape(N, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(N, g * g, p * p * 3).astype(np.float32) / 255.0


def nearest_code(x, centroids):
    """(n,) index of the nearest centroid (squared Euclidean) of each row of x (n, d)."""
    return ((centroids ** 2).sum(1)[None, :] - 2.0 * (x @ centroids.T)).argmin(1)


def visual_codes(images, centroids, patch_size):
    """(N, P) int64: the nearest centroid of every patch of images, ELECTRA's MOC targets."""
    x = patchify(images, patch_size)
    return nearest_code(x.reshape(-1, x.shape[-1]), centroids).reshape(len(x), -1)


def kmeans(x, k, iters, rng):
    """(k, d) centroids of Lloyd's k-means on the rows of x, from k distinct rows; empties re-seeded."""
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


def prepare_codebook(path, patch_size, n_codes, iters=15, max_fit=65536, seed=0, stream_images=None, log=print):
    """ELECTRA's visual codebook, stored with a dataset: k-means over up to max_fit patches of random
    train images (streamed: stream_images(ds, n, seed, log), from prepare.prepare_codebook), then
    every patch of each captioned split coded; the codebook is written last (it marks the work done)."""
    book_file = codebook_file(path, patch_size, n_codes)
    if os.path.exists(book_file):
        return book_file
    ds = Dataset(path)
    if ds.image_size % patch_size:
        raise ValueError(f"image size {ds.image_size} is not a multiple of patch size {patch_size}")
    t0 = time.time()
    rng = np.random.default_rng(seed)
    per_image = (ds.image_size // patch_size) ** 2
    n = min(len(ds), max(1, max_fit // per_image))
    if ds.stream and stream_images is None:
        raise ValueError(f"{path} streams its train split from webdataset shards: its codebook is fitted by "
                         f"prepare.prepare_codebook")
    fit = stream_images(ds, n, seed, log) if ds.stream else \
        ds.array("train", "images")[np.sort(rng.choice(len(ds), n, replace=False))]
    patches = patchify(fit, patch_size).reshape(-1, 3 * patch_size ** 2)
    # one patch per pattern at 8 levels a pixel: else the uniform background (88% of the shapes
    # world's patches) takes a third of the codes as tints a few levels apart (results/small-run.md)
    _, first = np.unique(np.round(patches * 7).astype(np.uint8), axis=0, return_index=True)
    centroids = kmeans(patches[np.sort(first)] if len(first) >= n_codes else patches, n_codes, iters, rng)
    for split in [s for s in ds.meta["splits"] if ds.has(s, "tokens")]:
        images = ds.array(split, "images")
        codes = np.empty((len(images), per_image), np.int16)
        for i in range(0, len(images), 1024):
            codes[i:i + 1024] = visual_codes(images[i:i + 1024], centroids, patch_size)
        write_file(os.path.join(path, f"{split}.{codebook_name(patch_size, n_codes)}.npy"), codes)
    write_file(book_file, centroids)
    log(f"visual codebook ({n_codes} codes of {patch_size}x{patch_size} patches) ready in {time.time() - t0:.1f} s")
    return book_file


# -----------------------------------------------------------------------------
# batches of a prepared split, and mirrored ones (augmentation)


@lru_cache(maxsize=2)  # a batch reads one epoch, or two at a boundary: each is drawn once, not per batch
def _epoch_order(n, n_captions, seed, epoch):
    """An epoch's order of the n samples, and each sample's caption of n_captions (0 without)."""
    return (np.random.default_rng([seed, epoch]).permutation(n),
            np.random.default_rng([seed, epoch, 1]).integers(max(n_captions, 1), size=n))


def batch_indices(n, batch_size, step, seed, rank=0, world_size=1, grad_accum=1, n_captions=0):
    """Indices of this rank's batch at micro-step `step` of a walk in a new order each epoch: an
    optimizer step reads the next B*k*W places, rank by rank, so any split of it holds the same
    samples; with n_captions, also each image's caption. Stateless: a resume draws the same."""
    t, i = divmod(step, grad_accum)
    pos = ((t * world_size + rank) * grad_accum + i) * batch_size + np.arange(batch_size)
    epoch, within = np.divmod(pos, n)
    out, caption = np.empty(batch_size, np.int64), np.empty(batch_size, np.int64)
    for e in np.unique(epoch):
        sel, (order, captions) = epoch == e, _epoch_order(n, n_captions, seed, int(e))
        out[sel], caption[sel] = order[within[sel]], captions[within[sel]]
    return (out, caption) if n_captions else out


# A mirror swaps 'left' and 'right' only where they name a side (not 'right now'): told by the word
# before, the text after or the word's ending (leftmost); else mirror leaves the row as it is.
FLIP_WORDS = regex.compile(r"\b(left|right)(?=(?:most|wards?)?\b)", regex.IGNORECASE)
SIDE_BEFORE = regex.compile(r"\b(?:the|her|his|its|their|my|your|our|far|to|from|turn(?:s|ed|ing)?|bear(?:s|ing)?|"
                            r"veer(?:s|ed|ing)?|keep(?:s|ing)?)\s+$", regex.IGNORECASE)
SIDE_AFTER = regex.compile(r"(?:most|wards?)\b|-hand(?:ed)?\b|"
                           r"\s+(?:sides?|hand|arms?|legs?|foot|feet|eye|ear|lane|turn|of|corner|edge|half|wing)\b",
                           regex.IGNORECASE)


def flip_caption(text):
    """The caption of the mirrored image: 'left' and 'right' words swapped, keeping their case."""
    def swap(m):
        word = {"left": "right", "right": "left"}[m.group(1).lower()]
        return word.upper() if m.group(1).isupper() else word.capitalize() if m.group(1)[0].isupper() else word
    return FLIP_WORDS.sub(swap, text)


def sides_only(text):
    """Whether every 'left' and 'right' word of text names a side (SIDE_BEFORE, SIDE_AFTER)."""
    return all(SIDE_BEFORE.search(text, 0, m.start()) or SIDE_AFTER.match(text, m.end())
               for m in FLIP_WORDS.finditer(text))


def mirror(images, tokens, enc, flip):
    """(images, tokens, rows mirrored): the rows where flip is true mirrored with flipped captions,
    but those whose caption is not sides_only or would not fit once flipped."""
    images, tokens = np.array(images), np.array(tokens)
    rows = np.flatnonzero(flip)
    texts = [decode_tokens(enc, tokens[i]) for i in rows]
    swapped, problems = encode_checked(enc, [flip_caption(t) for t in texts], tokens.shape[1])
    ok = np.array([p != "too long" and sides_only(t) for p, t in zip(problems, texts)], bool)
    rows = rows[ok]
    images[rows] = images[rows, :, ::-1]
    tokens[rows] = swapped[ok]
    return images, tokens, rows


def mirrored_scene(sid):
    """The scene id of a shapes-world scene seen in a mirror: a row (axis 1) read the other way."""
    axis, objects = decode_scene(sid)
    return scene_id(1, objects[::-1]) if axis == 1 else int(sid)


# -----------------------------------------------------------------------------
# pretraining batches on the host, read ahead by loader processes

FLIP_STREAM = 0x666C6970  # 'flip': its random stream's key, apart from the (seed, epoch, ...) streams
CAPTION_DRAWS = 720720  # the least common multiple of 1..16: divisible by every count of valid captions


def pretrain_fetch(cfg, ds, rank, world_size, electra, stream=None):
    """(fetch, n): fetch(micro_step) is this rank's batch of that micro-step as numpy arrays:
    images and one caption each, paraphrase groups and visual codes (electra) where known,
    mirrored with --flip; from stream (the shards' fetch, n) or the prepared train_split."""
    fetch, n_train = stream or prepared_fetch(cfg, ds, cfg.train_split, rank, world_size, electra)
    codebook = ds.codebook(cfg.model.patch_size, cfg.model.n_codes) if electra else None
    shapes = ds.meta["kind"] == "shapes"

    def fetch_batch(micro_step):
        parts, rows = fetch(micro_step), []
        if cfg.flip:
            parts["images"], parts["tokens"], rows = mirror(parts["images"], parts["tokens"], ds.tokenizer,
                                                            flip_draw(cfg, micro_step, rank, world_size))
            if len(rows) and "groups" in parts:  # a mirrored row shows another scene (a real image: its own mirror)
                parts["groups"][rows] = [mirrored_scene(g) for g in parts["groups"][rows]] if shapes \
                    else parts["groups"][rows] + ds.split_size(cfg.train_split)
        if electra and "codes" not in parts:  # streamed images: their codes are computed here
            parts["codes"] = visual_codes(parts["images"], codebook, cfg.model.patch_size)
        elif electra and len(rows):  # mirrored patches have codes of their own
            parts["codes"][rows] = visual_codes(parts["images"][rows], codebook, cfg.model.patch_size)
        return parts
    return fetch_batch, n_train


def prepared_fetch(cfg, ds, split, rank, world_size, electra):
    """(fetch, n) over a prepared split: batches by batch_indices, one caption per image."""
    if split not in ds.meta["splits"] or not ds.has(split, "tokens"):
        raise SystemExit(f"--train_split {split!r}: {ds.path} has no captioned split of that name")
    n_train = min(ds.split_size(split), cfg.train_images or ds.split_size(split))
    n_captions = ds.array(split, "tokens").shape[1]
    # real data: an image may have fewer valid captions than slots (repeated to fill them); a
    # draw from [0, CAPTION_DRAWS) modulo its count picks one of them uniformly
    valid = ds.array(split, "n_captions") if ds.has(split, "n_captions") else None
    if valid is not None:
        if n_captions > 16:
            raise SystemExit(f"{ds.path}: {n_captions} caption slots per image; at most 16 are drawn from uniformly")
        n_captions = CAPTION_DRAWS
    # captions known to be true of their scene (not the noisy web split): paraphrases of one scene are never negatives
    clean = ds.has(split, "scene") and not ds.has(split, "corruption")
    if electra:
        ds.codes(split, cfg.model.patch_size, cfg.model.n_codes)  # computed once here, not in each loader worker

    def fetch(micro_step):
        idx, caption = batch_indices(n_train, cfg.batch_size, micro_step, cfg.seed, rank, world_size, cfg.grad_accum,
                                     n_captions)
        if valid is not None:
            caption = caption % valid[idx]
        images, tokens = ds.image_text_batch(split, idx, caption)
        parts = dict(images=images, tokens=tokens.astype(np.int64))
        if clean:
            parts["groups"] = ds.array(split, "scene")[idx].astype(np.int64)
        if electra:
            parts["codes"] = ds.codes(split, cfg.model.patch_size, cfg.model.n_codes)[idx].astype(np.int64)
        return parts
    return fetch, n_train


def flip_draw(cfg, micro_step, rank, world_size):
    """(batch_size,) bool: which samples of this rank's micro-batch --flip mirrors, drawn per place
    in the step's whole batch (as batch_indices orders it): the same however the step is split."""
    t, i = divmod(micro_step, cfg.grad_accum)
    u = np.random.default_rng([cfg.seed, FLIP_STREAM, t]).random(cfg.batch_size * cfg.grad_accum * world_size)
    start = (rank * cfg.grad_accum + i) * cfg.batch_size
    return u[start:start + cfg.batch_size] < 0.5


class HostBatches(torch.utils.data.IterableDataset):
    """fetch(s) for s = start, start + 1, ... through a DataLoader: worker w of n reads micro-steps
    start + w, start + w + n, ..., handed out in turn, so the sequence is the same with any number of workers."""

    def __init__(self, fetch, start):
        self.fetch, self.start = fetch, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for s in itertools.count(self.start + w, n):
            yield self.fetch(s)


def host_batches(fetch, start, num_workers, pin_memory):
    """An endless iterator over fetch(start), fetch(start + 1), ...: in this process, or in
    num_workers loader processes that read ahead (two micro-steps each)."""
    if num_workers == 0:
        return iter(HostBatches(fetch, start))
    if "fork" not in torch.multiprocessing.get_all_start_methods():
        raise SystemExit("--num_workers needs the 'fork' start method (Linux); use --num_workers=0 here")
    return iter(torch.utils.data.DataLoader(HostBatches(fetch, start), batch_size=None, num_workers=num_workers,
                                            pin_memory=pin_memory, prefetch_factor=2, multiprocessing_context="fork"))

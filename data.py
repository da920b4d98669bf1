"""
The data of nanoVLP: the shapes world (procedural scenes whose ground truth is known), its
tokenizer and the pretrained ones (GPT-2's, CLIP's), real data prepared from image files, and
batches sliced from the prepared arrays (or streamed from webdataset shards).

A prepared dataset is a directory:
    meta.json                  what is in it (kind, splits, sizes, vocabularies, tokenizer)
    tokenizer.tiktoken         the BPE ranks in tiktoken's own file format
    {split}.images.npy         (N, S, S, 3) uint8 images
    {split}.tokens.npy         (N, C, T) int32 captions: <bos> text <eos> <pad>...
    {split}.scene.npy          (N,) int64 id of the scene each image shows (see scene_id)
    {split}.objects.npy        (N, 3, 7) int16 shape, colour, size, x0, y0, x1, y1 (-1: none)
    {split}.classmap.npy       (N, S, S) uint8 per-pixel class: 0 background, 1 + shape index
    codebook-p{p}-k{K}.npy     (K, p*p*3) float32 visual codebook of p x p patches (prepare_codebook,
                               written when training first needs it)
    {split}.codes-p{p}-k{K}.npy  (N, P) int16 the nearest code of each patch of the split's images
    report.json                (real data) what the preparation kept and skipped, and why
and, for some splits, extra arrays (web corruption, held-out flags, multi-image questions;
in a set cleaned by CapFilt (train.py --stage capfilt), each caption slot's source and each
image's index in the split it came from). That is the shapes world (meta kind 'shapes').
Real data comes in three kinds, each with a report.json of what was kept and skipped, and why:
  'captions'  splits train, val (and test when the source has one): images; tokens, C =
              captions_per_image slots: the image's valid captions, then repeated in order;
              n_captions (N,) int16 valid captions in the slots (1..C; two equal captions
              count twice); scene (N,) int64, the image's index (its own scene); and
              {split}.captions.json, a JSON list of each image's n_captions captions as the
              source wrote them, in slot order (Dataset.captions; what BLEU and CIDEr score
              against). From webdataset shards (img2dataset's tars of key.jpg + key.txt) the
              train split is not prepared but streamed from its shards (meta stream: the
              paths of those not empty, each one's sample count and their sum; ShardStream),
              val prepared (C = 1)
  'masks'     splits novel_train, novel_val (read by the prompt stage): images; classmap, the
              mask values (0 background); objects (N, R, 7) int16, a row per 8-connected region
              of one class: class value - 1, -1, -1, x0, y0, x1, y1 (-1 rows pad); meta classes
              (the name of each value, background first) and novel_classes (the others)
  'multi'     splits multi_train, multi_val (read by the instruct stage): images, a pool;
              sets (n, K) int32 pool indices (-1 pads); question (n, T) int32, at most
              T - answer_length tokens; answer (n, answer_length) int32; qtype (n,) int16, an
              index into meta qtypes
Every array is opened with np.load(mmap_mode='r'): a batch is one fancy-indexed slice.

Real data is prepared on the command line (python data.py SOURCE --help for the options):
    python data.py coco --captions annotations/captions_train2017.json --images train2017 \
        --split train --out data/coco --tokenizer openai/clip-vit-base-patch32 \
        --image_size 224 --context_length 77
    python data.py coco --captions annotations/captions_val2017.json --images val2017 --split val \
        --out data/coco ...  (the same tokenizer and sizes: the split is added)
    python data.py karpathy --json dataset_coco.json --images COCO_ROOT --out data/coco-karpathy ...
    python data.py table --file captions.jsonl --val_fraction 0.05 --out data/mine ...  (.csv, .tsv; --val FILE)
    python data.py masks --images IMAGES --masks MASKS --classes classes.txt --val_fraction 0.2 ...
    python data.py multi --file sets.json --val val_sets.json --max_images 4 --answer_length 8 ...
    python data.py webdataset --train 'shards/{00000..00099}.tar' --val shards/00100.tar ...
each also with --tokenizer (a Hugging Face CLIP or GPT-2 tokenizer, 'gpt2' for tiktoken's, or
a prepared dataset), --image_size and --context_length (the model's) and --workers.
"""

import argparse
import base64
import csv
import glob
import hashlib
import heapq
import html
import io
import itertools
import json
import multiprocessing
import os
import shutil
import tarfile
import time
import unicodedata
import warnings
from collections import Counter, namedtuple
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache, partial

import numpy as np
import regex
import tiktoken
from PIL import Image

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
# tokenizers, used through tiktoken: the world's byte-level BPE trained on its texts, and
# GPT-2's and CLIP's read from (and written as) Hugging Face files


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


def make_encoding(name, ranks, pattern=GPT2_PATTERN, specials=None, cls=tiktoken.Encoding):
    """A tiktoken Encoding (or subclass cls) with our special tokens numbered after the ranks
    (keeping any the base encoding already has, such as GPT-2's <|endoftext|>)."""
    specials = dict(specials or {})
    for tok in SPECIAL_TOKENS:
        if tok not in specials:
            specials[tok] = len(ranks) + len(specials)
    return cls(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


# Pretrained tokenizers: GPT-2's and OpenAI CLIP's byte-level BPE, read from a Hugging Face
# directory's vocab.json and merges.txt into tiktoken ranks. tiktoken merges the adjacent
# pair whose joined bytes rank lowest, Hugging Face the pair that comes first in merges.txt:
# the same merges when each merge makes a new token numbered in merge order, as in both
# files (hf_bpe_ranks checks it). CLIP marks the last symbol of a word with '</w>'; here it
# is a trailing space byte, which no CLIP word contains (its words never hold white space),
# merged onto the last byte first since the 256 byte+'</w>' tokens rank below every merge.

CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_WORDS = regex.compile(CLIP_PATTERN, regex.IGNORECASE)
END_OF_WORD = "</w>"


def bytes_to_unicode():
    """GPT-2's table {byte: printable character} that Hugging Face byte-level vocabularies
    are written in: printable Latin-1 bytes stand for themselves, the rest for chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


def clip_normalize(text):
    """CLIP's text cleaning: Unicode NFC, HTML entities unescaped (twice, as CLIP does), runs of
    white space made one space, the ends stripped, lower case. OpenAI's CLIP also runs
    ftfy.fix_text (mojibake repair) first; ftfy is not installed here, so only its NFC step
    is done. Hugging Face's CLIPTokenizer does not unescape HTML ('&amp;' stays as it is)."""
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text)))
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipEncoding(tiktoken.Encoding):
    """OpenAI CLIP's BPE as a tiktoken Encoding: text is cleaned (clip_normalize) and split
    into words by CLIP's pattern, each word followed by the space that stands for '</w>', and
    tiktoken encodes the words (its pattern: a run up to and with a space). decode turns the
    spaces back into word breaks and strips the ends, as CLIP's decoder does."""

    def words(self, text):
        return "".join(w + " " for w in CLIP_WORDS.findall(clip_normalize(text)))

    def encode_ordinary(self, text):
        return super().encode_ordinary(self.words(text))

    def encode(self, text, **kwargs):
        return super().encode(self.words(text), **kwargs)

    def decode(self, tokens, errors="replace"):
        return super().decode(tokens, errors=errors).strip()


def hf_bpe_ranks(vocab, merges, end_of_word=""):
    """tiktoken ranks {token bytes: id} from a Hugging Face byte-level BPE: vocab {token: id},
    merges [(a, b)] in order. The tokens are the 256 bytes (with end_of_word, also each byte
    ending a word) and the merged ones. Raises ValueError if the ids are not 0..n-1 or a
    merged token's id is not in merge order (tiktoken's merge rule would then differ)."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token):
        word_end = bool(end_of_word) and token.endswith(end_of_word)
        chars = token[:len(token) - len(end_of_word) * word_end]
        if not chars or any(c not in byte_of for c in chars):
            raise ValueError(f"token {token!r} is not written in byte characters")
        return bytes(byte_of[c] for c in chars) + b" " * word_end

    base = list(byte_of) + [c + end_of_word for c in byte_of] * bool(end_of_word)
    merged = [a + b for a, b in merges]
    missing = [t for t in base + merged if t not in vocab]
    if missing:
        raise ValueError(f"the vocabulary lacks {len(missing)} of its byte and merged tokens, e.g. {missing[:3]}")
    ranks = {to_bytes(t): vocab[t] for t in base + merged}
    ids = [vocab[t] for t in merged]
    if len(ranks) != len(base) + len(merged) or sorted(ranks.values()) != list(range(len(ranks))) \
            or any(a >= b for a, b in zip(ids, ids[1:])) or (ids and ids[0] < len(base)):
        raise ValueError("the vocabulary does not number its byte tokens 0..n-1 and its merged tokens after them "
                         "in merge order: tiktoken cannot reproduce its merges")
    return ranks


def hf_files(name_or_path, names):
    """Local paths of files of a Hugging Face model: in a directory, or downloaded from the hub
    (huggingface_hub's cache)."""
    if os.path.isdir(name_or_path):
        paths = [os.path.join(name_or_path, n) for n in names]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"{name_or_path} has no {', '.join(map(os.path.basename, missing))}")
        return paths
    try:
        from huggingface_hub import hf_hub_download
        return [hf_hub_download(name_or_path, n) for n in names]
    except Exception as e:  # offline, unknown repository, no such file: all say the same to the user
        raise ValueError(f"{name_or_path!r} is not a directory, and its {', '.join(names)} could not be had from "
                         f"the Hugging Face hub ({type(e).__name__}: {e})") from None


def hf_bpe(name_or_path):
    """(vocab, merges) as read from a Hugging Face tokenizer, a directory or a hub name: its
    vocab.json and merges.txt, or else its tokenizer.json (all that transformers 5 saves)."""
    try:
        files = hf_files(name_or_path, ("vocab.json", "merges.txt"))
    except ValueError as first:
        try:
            files = hf_files(name_or_path, ("tokenizer.json",))
        except ValueError:
            raise ValueError(f"{first}, nor tokenizer.json") from None
    try:
        with open(files[0], encoding="utf-8") as f:
            content = json.load(f)
        if len(files) == 1:  # tokenizer.json
            model = content["model"]
            return model["vocab"], [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        with open(files[1], encoding="utf-8") as f:
            return content, [line.split() for line in f if line.strip() and not line.startswith("#version")]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{name_or_path}: its tokenizer files cannot be read as a BPE ({type(e).__name__}: {e})") from None


def hf_tokenizer(name_or_path):
    """(kind, bpe_text) of a Hugging Face GPT-2 or CLIP tokenizer (hf_bpe): kind 'clip' when the
    vocabulary has '</w>' word ends, else 'gpt2'; bpe_text the ranks in tiktoken's file format
    (get_tokenizer reads it back). The vocabulary's other tokens must be the kind's own
    specials right after the ranks: CLIP's <|startoftext|> and <|endoftext|>, GPT-2's
    <|endoftext|>."""
    vocab, merges = hf_bpe(name_or_path)
    try:
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()) \
                or not all(isinstance(m, list) and len(m) == 2 for m in merges):
            raise ValueError("the vocabulary is not {token: id} or a merge is not two tokens")
        kind = "clip" if any(t.endswith(END_OF_WORD) for t in vocab) else "gpt2"
        ranks = hf_bpe_ranks(vocab, [tuple(m) for m in merges], END_OF_WORD if kind == "clip" else "")
    except ValueError as e:
        raise ValueError(f"{name_or_path}: not a byte-level BPE tokenizer: {e}") from None
    n, specials = len(ranks), (BOS, EOS) if kind == "clip" else (EOS,)
    extra = {t: i for t, i in vocab.items() if i >= n}
    if extra != {t: n + k for k, t in enumerate(specials)}:
        raise ValueError(f"{name_or_path}: a {kind} vocabulary should end with {', '.join(specials)} at {n}.., "
                         f"not {extra}")
    return kind, bpe_to_text(ranks)


def get_tokenizer(kind, bpe_text=None):
    """The encoding of a prepared dataset's tokenizer from the text of its tiktoken file:
    'bpe' the world's; 'gpt2' GPT-2's (without a text, tiktoken's own file, which must be
    cached or downloadable); 'clip' CLIP's (ClipEncoding). Specials as in the README: GPT-2's
    <|endoftext|> and CLIP's <|startoftext|> and <|endoftext|> keep their ids."""
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


def load_tokenizer(spec):
    """(kind, bpe_text) named on a command line: 'gpt2' (tiktoken's GPT-2 file), a prepared
    dataset (its tokenizer), or a Hugging Face tokenizer directory or hub name (hf_tokenizer)."""
    if spec == "gpt2":
        try:
            return "gpt2", bpe_to_text(tiktoken.get_encoding("gpt2")._mergeable_ranks)
        except Exception as e:  # not cached and no network
            raise ValueError(f"tiktoken's gpt2 file is not cached and could not be downloaded ({type(e).__name__}); "
                             f"give a Hugging Face GPT-2 directory instead") from None
    if os.path.exists(os.path.join(spec, "meta.json")):
        ds = Dataset(spec)
        return ds.meta["tokenizer"]["kind"], ds.bpe_text
    return hf_tokenizer(spec)


def tokenizer_meta(kind, enc):
    """The tokenizer entry of meta.json (write_meta adds its file)."""
    return dict(kind=kind, n_vocab=enc.n_vocab, special_tokens={t: enc.encode_single_token(t) for t in SPECIAL_TOKENS})


def bpe_parts(token, ranks, below):
    """The parts byte-level BPE leaves of token's bytes with only the ranks below `below`
    (tiktoken's rule: the adjacent pair whose join ranks lowest is joined first)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        joins = [ranks.get(a + b, below) for a, b in zip(parts, parts[1:])]
        best = min(range(len(joins)), key=joins.__getitem__)
        if joins[best] >= below:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


HF_TOKENIZER_CLASSES = {"clip": "CLIPTokenizer", "gpt2": "GPT2Tokenizer", "bpe": "GPT2Tokenizer"}  # by our kind


def hf_tokenizer_files(kind, bpe_text, folder):
    """Write a tokenizer, (kind, bpe_text) as get_tokenizer takes them, into folder as Hugging
    Face's vocab.json, merges.txt and tokenizer_config.json: transformers.AutoTokenizer loads
    them as the kind's class (HF_TOKENIZER_CLASSES) giving our token rows, <bos> text <eos>
    <pad>... with padding="max_length" (encode_texts), and hf_tokenizer reads them back as
    (kind, bpe_text). The world's 'bpe' is a GPT-2 kind of BPE (GPT-2's pattern,
    <|endoftext|> right after the ranks): it is written as one, and read back as 'gpt2' (the
    same encoding). vocab.json holds the ranks and the kind's own specials (CLIP's
    <|startoftext|> and <|endoftext|>, GPT-2's <|endoftext|>); tokenizer_config.json names
    bos, eos and pad, has a GPT2Tokenizer add bos and eos as CLIPTokenizer does, and lists
    every special of ours at its id. The merges, in rank order: for each token not of the
    base (a byte; for CLIP also a byte with '</w>', the trailing space byte here), the two
    parts BPE joins into it (bpe_parts with the ranks below its own); raises ValueError for
    a token that is not one join of lower ranked tokens. Each file written atomically.
    Returns the three paths."""
    if kind not in HF_TOKENIZER_CLASSES:
        raise ValueError(f"unknown tokenizer {kind!r}: expected 'clip', 'gpt2' or 'bpe'")
    clip, char = kind == "clip", bytes_to_unicode()
    ranks = bpe_from_text(bpe_text)

    def name(token):  # as Hugging Face writes a token: byte characters, CLIP's word end as '</w>'
        word_end = clip and len(token) > 1 and token.endswith(b" ")
        return "".join(char[b] for b in token[:len(token) - word_end]) + END_OF_WORD * word_end

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda x: x[1]):
        if not (len(token) == 1 or clip and len(token) == 2 and token.endswith(b" ")):  # not a base token
            parts = bpe_parts(token, ranks, rank)
            if len(parts) != 2:
                raise ValueError(f"{kind} token {token!r} (rank {rank}) is not one join of two lower ranked tokens "
                                 f"(BPE leaves {len(parts)} parts): it has no Hugging Face merge")
            merges.append(f"{name(parts[0])} {name(parts[1])}\n")
    ids = tokenizer_meta(kind, get_tokenizer(kind, bpe_text))["special_tokens"]
    vocab = {**{name(t): r for t, r in ranks.items()}, **{t: ids[t] for t in ((BOS, EOS) if clip else (EOS,))}}
    config = dict(tokenizer_class=HF_TOKENIZER_CLASSES[kind], bos_token=BOS, eos_token=EOS, pad_token=PAD,
                  **({} if clip else dict(add_bos_token=True, add_eos_token=True)),
                  added_tokens_decoder={str(ids[t]): dict(content=t, special=True) for t in SPECIAL_TOKENS})
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, n) for n in ("vocab.json", "merges.txt", "tokenizer_config.json")]
    write_file(paths[0], json.dumps(vocab, ensure_ascii=False))
    write_file(paths[1], "#version: 0.2\n" + "".join(merges))
    write_file(paths[2], json.dumps(config, indent=1))
    return paths


def encode_checked(enc, texts, length):
    """(tokens (n, length) int32 rows <bos> tokens <eos> <pad>..., problems): problems[i] is
    '' for a good text, 'empty' for one of only white space or of no tokens (encoded all the
    same) and 'too long' for one of more than length - 2 tokens (its row left all <pad>)."""
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
# writing prepared datasets


def write_file(file, content):
    """Write content (text, or an array as np.save writes it) to a temporary file of this
    process's own, then rename it to file: a reader, or another process writing the same
    file, never meets a half-written one."""
    tmp = f"{file}.tmp-{os.getpid()}{os.path.splitext(file)[1]}"
    if isinstance(content, str):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(content)
    else:
        np.save(tmp, content)
    os.replace(tmp, file)


@contextmanager
def staged_dataset(path, replace=False):
    """A temporary directory to write a prepared dataset into, renamed to path when the block
    ends, so a killed writer leaves nothing half-written (and an error in the block removes
    it). A prepared dataset already at path is replaced, or with replace False kept (another
    process was first); anything else there is an error."""
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


def link_or_copy(src, dst):
    """dst the same file as src (a hard link: no bytes copied), or a copy of it where the file
    system cannot link them (another device, no hard links). A prepared file is never written
    in place (a new one is written and renamed over it), so the two names stay equal."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def link_split_files(tmp, dataset, names):
    """Put the arrays and caption lists of splits `names` of a prepared dataset into tmp
    (link_or_copy; not their visual codes: a codebook belongs to its own train split); returns
    their sizes."""
    for name in names:
        for file in sorted(os.listdir(dataset.path)):
            if file.startswith(name + ".") and file.endswith((".npy", ".captions.json")) \
                    and not file.startswith(f"{name}.codes-"):
                link_or_copy(os.path.join(dataset.path, file), os.path.join(tmp, file))
    return {name: dataset.split_size(name) for name in names}


def write_meta(tmp, meta, sizes, bpe_text=None):
    """meta.json (meta with the size of every split) and the tokenizer file (bpe_text)."""
    if bpe_text is not None:
        with open(os.path.join(tmp, "tokenizer.tiktoken"), "w") as f:
            f.write(bpe_text)
        meta = dict(meta, tokenizer=dict(meta["tokenizer"], file="tokenizer.tiktoken"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(dict(meta, splits=sizes), f, indent=1)


def save_arrays(tmp, split, arrays):
    """Each array of {key: array} as {split}.{key}.npy in the staging directory tmp."""
    for key, a in arrays.items():
        np.save(os.path.join(tmp, f"{split}.{key}.npy"), a)


def write_dataset(path, splits, meta, bpe_text=None, copy_from=None, copy_splits=(), replace=False):
    """Write a prepared dataset (staged_dataset: atomically): every array of splits ({split:
    {key: array}}) as {split}.{key}.npy, the files of splits copy_splits of the dataset
    copy_from (link_split_files), the tokenizer file (bpe_text) and meta.json (meta, with the
    size of every split). replace: as staged_dataset."""
    with staged_dataset(path, replace) as tmp:
        sizes = {}
        for name, arrays in splits.items():
            sizes[name] = len(arrays["sets"] if "sets" in arrays else arrays["images"])
            save_arrays(tmp, name, arrays)
        sizes.update(link_split_files(tmp, copy_from, copy_splits))
        write_meta(tmp, meta, sizes, bpe_text)
    return os.path.normpath(path)


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
                tokenizer=tokenizer_meta("bpe", enc))
    write_dataset(path, splits, meta, bpe_text)
    log(f"shapes world ready in {time.time() - t0:.1f} s")
    return path


# -----------------------------------------------------------------------------
# image files


class BadImage(ValueError):
    """An image (or mask) file that cannot be used, and why: reason is a report's key."""

    def __init__(self, path, reason, detail=""):
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))
        self.path, self.reason, self.detail = path, reason, detail

    def __reduce__(self):  # to come back from a worker process whole
        return BadImage, (self.path, self.reason, self.detail)


@dataclass(frozen=True)
class TarMember:
    """A file inside a tar file (a webdataset shard's image): size bytes at offset of tar,
    read without going through the tar's other members."""
    tar: str
    name: str
    offset: int
    size: int

    def __str__(self):
        return f"{self.tar}:{self.name}"

    def read(self):
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def read_image_file(path, convert, what="image"):
    """convert(im) of the decoded image file at path (or TarMember). Raises BadImage with the
    reason '<what> not found', 'empty <what> file' (0 bytes), 'oversized <what>' (more pixels
    than Image.MAX_IMAGE_PIXELS, Pillow's decompression-bomb limit, whose warning is an error
    here), 'truncated <what>' (also one its tar file ends inside) or 'corrupt <what>'
    (anything else Pillow cannot decode)."""
    if isinstance(path, TarMember):
        try:
            data = path.read()
        except OSError as e:
            raise BadImage(path, f"{what} not found", str(e)) from None
        if len(data) < path.size:
            raise BadImage(path, f"truncated {what}", f"its tar file ends after {len(data)} of its {path.size} bytes")
        size, source = len(data), io.BytesIO(data)
    elif not os.path.isfile(path):
        raise BadImage(path, f"{what} not found")
    else:
        size, source = os.path.getsize(path), path
    if size == 0:
        raise BadImage(path, f"empty {what} file")

    def bad(e):
        return BadImage(path, f"{'truncated' if 'truncated' in str(e).lower() else 'corrupt'} {what}",
                        f"{type(e).__name__}: {e}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(source)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(path, f"oversized {what}", str(e)) from None
    except Exception as e:  # Pillow raises many kinds on bad data
        raise bad(e) from None
    with im:
        try:
            im.load()
        except Exception as e:
            raise bad(e) from None
        return convert(im)


def fit_square(im, size, resample):
    """(size, size, ...) array of a PIL image: the shorter side resized to size and the longer
    in proportion, rounded down (int(size * long / short), as Hugging Face's CLIPImageProcessor
    and torchvision's Resize do), then the centre cropped (of an odd number of pixels cut, the
    one more on the right or bottom). Masks take the geometry of their images with resample NEAREST."""
    w, h = im.size
    im = im.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), resample)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def to_rgb(im):
    """An opened image as RGB: 16-bit grey scaled to 8 bits (32-bit grey too, by 65535 if any
    value is over 255, else as it is), transparent parts on black (like the world), other
    modes (grey, palette, CMYK) by Pillow's convert."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 255.0 if im.mode == "I" and a.max() <= 255 else 65535.0
        return Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size)
        out.paste(rgba, mask=rgba.split()[-1])
        return out
    return im.convert("RGB")


def read_image(path, size):
    """(pixels (size, size, 3) uint8 as fit_square makes them (bicubic), the file's mode if it
    was not RGB (else None), the file's (width, height)). Raises BadImage."""
    return read_image_file(path, lambda im: (fit_square(to_rgb(im), size, Image.BICUBIC),
                                             None if im.mode == "RGB" else im.mode, im.size))


def load_image(path, size):
    """Read any common image file (RGB, RGBA, L, LA, P, CMYK, 16-bit) as (size, size, 3)
    uint8: the shorter side resized to size, then centre-cropped. Raises BadImage (a
    ValueError) naming the file and why it cannot be read."""
    return read_image(path, size)[0]


# -----------------------------------------------------------------------------
# real data: reports, parallel decoding and the writing of image arrays
#
# Real sources are checked item by item: a bad image, caption, mask or question set is
# skipped with its reason in the report (report.json beside meta.json, and a summary on
# screen); only a source that cannot be read at all (a missing path, JSON that is not JSON
# or not the expected schema) or that leaves a split empty stops the preparation, with an
# error naming it. Image files are decoded in worker processes straight into a memory-mapped
# array in the staging directory, so a source is never all in memory.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
NO_SPLIT = "(no split)"  # the report's place for items skipped before their split is known


def count_text(counts):
    """'reason: n, reason: n' of {reason: count}, or 'none'."""
    return ", ".join(f"{r}: {n}" for r, n in counts.items()) or "none"


class Report:
    """What a preparation kept and skipped, per split: counts kept, skipped items by reason
    (an item is what the reason is about: an image, a caption, a row, a question set), images
    converted by their file's mode, and the first `limit` skipped items with their reasons."""

    def __init__(self, limit=1000):
        self.limit, self.splits = limit, {}

    def split(self, name):
        return self.splits.setdefault(name or NO_SPLIT, dict(kept={}, skipped={}, converted={}, first_skipped=[]))

    def skip(self, split, reason, item, detail=""):
        s = self.split(split)
        s["skipped"][reason] = s["skipped"].get(reason, 0) + 1
        if len(s["first_skipped"]) < self.limit:
            entry = dict(item=str(item), reason=reason)
            s["first_skipped"].append(dict(entry, detail=str(detail)) if detail else entry)

    def convert(self, split, mode):
        s = self.split(split)
        s["converted"][mode] = s["converted"].get(mode, 0) + 1

    def keep(self, split, **counts):
        self.split(split)["kept"].update(counts)

    def reasons(self, split):
        return count_text(self.split(split)["skipped"])

    def ordered(self):
        order = ("train", "val", "test", "novel_train", "novel_val", "multi_train", "multi_val", NO_SPLIT)
        return dict(sorted(self.splits.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else -1))

    def to_dict(self):
        """report.json: the splits, and the skipped and converted counts summed over them."""
        total = {key: {} for key in ("skipped", "converted")}
        for s in self.splits.values():
            for key, counts in total.items():
                for k, n in s[key].items():
                    counts[k] = counts.get(k, 0) + n
        return dict(total, splits=self.ordered())

    def summary(self):
        lines = []
        for name, s in self.ordered().items():
            kept = ", ".join(f"{n} {k}" for k, n in s["kept"].items()) or "nothing kept"
            conv = f"; converted {s['converted']}" if s["converted"] else ""
            lines.append(f"{name}: {kept}; skipped {self.reasons(name)}{conv}")
        return "\n".join(lines)


def nothing_left_error(source, split, report):
    """The error of a split left with nothing usable, with the report's reasons."""
    unsplit = f"; before a split was known: {report.reasons(None)}" if NO_SPLIT in report.splits else ""
    return ValueError(f"{source}: nothing usable is left for split {split!r} "
                      f"(skipped: {report.reasons(split)}{unsplit})")


def text_reason(problem, what):
    """The report's reason for a text encode_checked found a problem with ('empty', 'too long')."""
    return f"empty {what}" if problem == "empty" else f"{what} {problem}"


def by_split(rows, source, report, expected):
    """{split: [row less its split]} of rows (split, ...), in the order of expected, each of
    which must have rows (else nothing_left_error)."""
    out = {split: [] for split in expected}
    for split, *rest in rows:
        out[split].append(tuple(rest))
    for split, items in out.items():
        if not items:
            raise nothing_left_error(source, split, report)
    return out


def held_out(key, fraction):
    """Whether an item goes to the held-out split: a hash of its key (a path, say) below
    fraction, so the split does not depend on the order of the source."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") < fraction * 2 ** 64


def two_splits(read, main, val, fraction, names, report, source):
    """{split: [row less its split]} (by_split) of a source of two splits, names (train, held):
    read(part, split_of) the rows (split, ...) of main, and of val when given (all of them
    held); else the rows whose key hashes below fraction are held (held_out: read calls
    split_of(key) for each row). The held split must have rows when val or fraction is given."""
    train, held = names
    if val is None:
        rows = read(main, lambda key: held if held_out(key, fraction) else train)
    else:
        rows = read(main, lambda key: train) + read(val, lambda key: held)
    return by_split(rows, source, report, names if val is not None or fraction else names[:1])


def _attempt(fn, task):
    try:
        return fn(task), None
    except BadImage as e:
        return None, e


def run_files(fn, tasks, workers):
    """(fn(task), None), or (None, the BadImage it raised), for each task in order: in
    `workers` forked processes when more than one (decoding is most of the work), else here."""
    call = partial(_attempt, fn)
    if workers > 1 and len(tasks) > 1:
        methods = multiprocessing.get_all_start_methods()
        with multiprocessing.get_context("fork" if "fork" in methods else None).Pool(min(workers, len(tasks))) as pool:
            yield from pool.imap(call, tasks, chunksize=max(1, min(32, len(tasks) // (8 * workers))))
    else:
        yield from map(call, tasks)


def shrink_npy(file, n):
    """Keep the first n rows of a C-order .npy file in place: its header's shape made n rows
    (padded with spaces to the header's old length, as the format allows) and the rest cut."""
    with open(file, "r+b") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        start, prefix = f.tell(), 10 if version == (1, 0) else 12
        header = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, *shape[1:])})
        f.seek(prefix)
        f.write((header.ljust(start - prefix - 1) + "\n").encode("latin1"))
        f.truncate(start + n * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


def write_rows(tmp, split, tasks, fn, rows, workers, report):
    """Run fn over tasks (run_files) and write each good result's arrays, in order, into the
    memory-mapped files {split}.{key}.npy of tmp, rows {key: (row shape, dtype)}. fn returns
    ({key: row}, the mode its image was converted from or None, anything else). A task whose
    fn raised BadImage is skipped in the report. Returns [(task index, anything else)]."""
    files = {key: os.path.join(tmp, f"{split}.{key}.npy") for key in rows}
    out = {key: np.lib.format.open_memmap(files[key], "w+", dtype, (len(tasks), *shape))
           for key, (shape, dtype) in rows.items()}
    kept = []
    for i, (result, bad) in enumerate(run_files(fn, tasks, workers)):
        if bad is not None:
            report.skip(split, bad.reason, bad.path, bad.detail)
            continue
        arrays, mode, extra = result
        if mode:
            report.convert(split, mode)
        for key, row in arrays.items():
            out[key][len(kept)] = row
        kept.append((i, extra))
    for key in rows:
        out.pop(key).flush()  # and unmapped, before the file is cut
    for file in files.values():
        shrink_npy(file, len(kept))
    return kept


def image_row(path, size):
    """An image file as a row of an images array (write_rows)."""
    pixels, mode, _ = read_image(path, size)
    return {"images": pixels}, mode, None


def read_json(path):
    """A JSON file's content; ValueError naming it when it is missing or not valid JSON."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def check_dir(path):
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory")
    return path


def finish_dataset(tmp, out, meta, sizes, bpe_text, report, log):
    """meta.json, the tokenizer file and report.json of a prepared real dataset; the summary
    printed."""
    write_meta(tmp, meta, sizes, bpe_text)
    with open(os.path.join(tmp, "report.json"), "w") as f:
        json.dump(report.to_dict(), f, indent=1)
    log(f"prepared {out} ({meta['kind']}):\n{report.summary()}")


# -----------------------------------------------------------------------------
# real data: captioned images (COCO, Karpathy's splits, a table of image paths and captions)


def coco_items(captions_file, image_dir, split, report):
    """[(image path, [captions])] of a COCO captions file (images[] with id and file_name,
    annotations[] with image_id and caption) whose images are in image_dir, in the order of
    images[]. Entries missing a field are skipped with the reason."""
    doc = read_json(captions_file)
    check_dir(image_dir)
    if not (isinstance(doc, dict) and isinstance(doc.get("images"), list) and isinstance(doc.get("annotations"), list)):
        raise ValueError(f"{captions_file} is not a COCO captions file: it has no lists 'images' and 'annotations'")
    files, captions = {}, {}
    for k, im in enumerate(doc["images"]):
        where = f"{captions_file}: images[{k}]"
        if not isinstance(im, dict) or not isinstance(im.get("id"), (int, str)):
            report.skip(split, "image without id", where)
        elif not isinstance(im.get("file_name"), str) or not im["file_name"]:
            report.skip(split, "image without file_name", where)
        elif im["id"] in files:
            report.skip(split, "duplicate image id", where, im["id"])
        else:
            files[im["id"]], captions[im["id"]] = os.path.join(image_dir, im["file_name"]), []
    for k, ann in enumerate(doc["annotations"]):
        where = f"{captions_file}: annotations[{k}]"
        if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), (int, str)):
            report.skip(split, "annotation without image_id", where)
        elif not isinstance(ann.get("caption"), str):
            report.skip(split, "annotation without caption", where)
        elif ann["image_id"] not in files:
            report.skip(split, "annotation of an unknown image", where, ann["image_id"])
        else:
            captions[ann["image_id"]].append(ann["caption"])
    return [(files[i], captions[i]) for i in files]


KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def karpathy_items(split_file, root, report):
    """{split: [(image path, [captions])]} of Karpathy's split file (dataset_coco.json: images[]
    with filepath, filename, split and sentences[].raw) over the COCO root folder (images at
    root/filepath/filename; Flickr's files have no filepath). 'restval' joins train."""
    doc = read_json(split_file)
    check_dir(root)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ValueError(f"{split_file} is not a Karpathy split file: it has no list 'images'")
    items, seen = [], {"train"}
    for k, im in enumerate(doc["images"]):
        where = f"{split_file}: images[{k}]"
        raw = im.get("split") if isinstance(im, dict) else None
        split = KARPATHY_SPLITS.get(raw) if isinstance(raw, str) else None
        seen.add(split)
        if split is None:
            report.skip(None, "entry without a known split", where)
        elif not (isinstance(im.get("filename"), str) and im["filename"] and isinstance(im.get("filepath", ""), str)):
            report.skip(split, "entry without filename", where)
        elif not isinstance(im.get("sentences"), list):
            report.skip(split, "entry without sentences", where)
        else:
            captions = []
            for s in im["sentences"]:
                if isinstance(s, dict) and isinstance(s.get("raw"), str):
                    captions.append(s["raw"])
                else:
                    report.skip(split, "sentence without raw", where)
            items.append((split, os.path.join(root, im.get("filepath", ""), im["filename"]), captions))
    return by_split(items, split_file, report, [s for s in ("train", "val", "test") if s in seen])


def table_rows(file, columns, report, split_of):
    """(split, image path, {column: text}) of each usable row of a CSV or TSV file (with a
    header row) or a JSONL file (one object per line), UTF-8 with or without a byte order
    mark; image paths (column 'image') relative to the file's folder or absolute. A row with
    bytes that are not UTF-8, a JSONL line that is not a JSON object, or a row missing one of
    the columns is skipped with the reason. split_of(image path as written) names a row's
    split."""
    if not os.path.isfile(file):
        raise ValueError(f"{file} does not exist")
    ext = os.path.splitext(file)[1].lower()
    if ext not in (".csv", ".tsv", ".jsonl"):
        raise ValueError(f"{file}: expected a .csv, .tsv or .jsonl file")
    folder = os.path.dirname(os.path.abspath(file))
    image_key = columns[0]

    def row_of(where, row):
        path = row.get(image_key)
        if not isinstance(path, str) or not path.strip():
            report.skip(None, f"{image_key} missing", where)
            return None
        split = split_of(os.path.normpath(path))
        missing = [c for c in columns[1:] if not isinstance(row.get(c), str)]
        if missing:
            report.skip(split, f"{missing[0]} missing", where)
            return None
        return split, os.path.join(folder, os.path.normpath(path)), {c: row[c] for c in columns[1:]}

    rows = []
    if ext == ".jsonl":
        with open(file, "rb") as f:
            for n, line in enumerate(f, 1):
                where = f"{file}:{n}"
                try:
                    row = json.loads(line.decode("utf-8-sig"))  # a byte order mark (Excel writes one) dropped
                except UnicodeDecodeError:
                    report.skip(None, "not valid UTF-8", where)
                    continue
                except json.JSONDecodeError:
                    if line.strip():
                        report.skip(None, "not valid JSON", where)
                    continue
                if not isinstance(row, dict):
                    report.skip(None, "not a JSON object", where)
                elif (r := row_of(where, row)) is not None:
                    rows.append(r)
        return rows
    with open(file, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
        absent = [c for c in columns if c not in (reader.fieldnames or [])]
        if absent:
            raise ValueError(f"{file} has no column {absent[0]!r} in its header row (it has {reader.fieldnames})")
        for row in reader:
            where = f"{file}:{reader.line_num}"
            try:
                [v.encode("utf-8") for v in row.values() if isinstance(v, str)]
            except UnicodeEncodeError:  # the bytes that were not UTF-8, kept as lone surrogates
                report.skip(None, "not valid UTF-8", where)
                continue
            if (r := row_of(where, row)) is not None:
                rows.append(r)
    return rows


def table_items(file, report, val_file=None, val_fraction=0.0, image_column="image", caption_column="caption"):
    """{split: [(image path, [captions])]} of a table of image paths and captions (table_rows):
    rows of the same image are one image with their captions in row order. The val split is
    the file val_file, or the images whose path (as written) hashes below val_fraction."""
    read = lambda part, split_of: table_rows(part, (image_column, caption_column), report, split_of)  # noqa: E731
    out = {}
    for split, rows in two_splits(read, file, val_file, val_fraction, ("train", "val"), report, file).items():
        images = {}
        for path, row in rows:
            images.setdefault(path, []).append(row[caption_column])
        out[split] = list(images.items())
    return out


def captioned_split(tmp, split, items, enc, size, length, per_image, workers, report, source):
    """Write one split of captioned images (captioned_dataset); returns its size."""
    texts = [c for _, captions in items for c in captions]
    tokens, problems = encode_checked(enc, texts, length)
    tasks, good, k = [], [], 0
    for path, captions in items:
        rows = []
        for caption in captions:
            if problems[k]:
                report.skip(split, text_reason(problems[k], "caption"), path, caption[:200])
            else:
                rows.append(k)
            k += 1
        if rows:
            tasks.append(path)
            good.append(rows)
        else:
            report.skip(split, "no valid caption", path)
    kept = write_rows(tmp, split, tasks, partial(image_row, size=size), {"images": ((size, size, 3), np.uint8)},
                      workers, report) if tasks else []
    if not kept:
        raise nothing_left_error(source, split, report)
    rows = [good[i] for i, _ in kept]
    n_captions = np.array([min(len(r), per_image) for r in rows], np.int16)
    slots = [[r[j % n] for j in range(per_image)] for r, n in zip(rows, n_captions)]  # repeated in order
    save_arrays(tmp, split, dict(tokens=tokens[slots], n_captions=n_captions,
                                 scene=np.arange(len(kept), dtype=np.int64)))
    with open(os.path.join(tmp, f"{split}.captions.json"), "w") as f:  # \u escapes: even a lone surrogate is kept
        json.dump([[texts[k] for k in r[:int(n)]] for r, n in zip(rows, n_captions)], f)
    report.keep(split, images=len(kept), captions=int(n_captions.sum()),
                captions_unused=sum(len(r) - int(n) for r, n in zip(rows, n_captions)))
    return len(kept)


def captioned_dataset(out, items, tokenizer, image_size, context_length, captions_per_image=5, workers=1,
                      source="", report=None, add=False, extra_meta=None, log=print):
    """Prepare captioned images, items {split: [(image path or TarMember, [captions])]}, into
    the dataset out (kind 'captions': layout in the module docstring). Every caption is
    encoded with tokenizer (kind, bpe_text) into context_length tokens; empty and too long ones
    are skipped, and an image left without one; the first captions_per_image of an image are
    kept, repeated in order to fill the slots, and written as they are in {split}.captions.json
    (Dataset.captions). Every image is decoded (workers processes) and the unreadable skipped.
    With add, the splits go into the captioned dataset already at out (same tokenizer and
    sizes, else an error naming each field that differs), its other splits kept (linked, not
    copied: link_split_files) with their report entries, and a streamed train split (meta
    stream) too unless train is among the splits; else out is replaced. extra_meta: more
    entries of meta.json (a streamed train split's). Returns out."""
    kind, bpe_text = tokenizer
    enc = get_tokenizer(kind, bpe_text)
    report = report or Report()
    old = Dataset(out) if add and os.path.exists(os.path.join(out, "meta.json")) else None
    meta = dict(kind="captions", image_size=image_size, context_length=context_length,
                captions_per_image=captions_per_image, tokenizer=tokenizer_meta(kind, enc),
                source={split: source for split in items}, **(extra_meta or {}))
    keep = []
    if old is not None:
        fields = ("kind", "image_size", "context_length", "captions_per_image")
        differ = [f"{k} {old.meta.get(k)} there, {meta[k]} asked" for k in fields if old.meta.get(k) != meta[k]]
        old_kind, old_text = old.meta["tokenizer"]["kind"], old.bpe_text or ""
        if (old_kind, old_text) != (kind, bpe_text):
            n_old, n_new = (text.count("\n") for text in (old_text, bpe_text))  # a line a rank
            differ.append(f"tokenizer {old_kind} of {n_old} ranks there, {'other ' * (old_kind == kind)}{kind} of "
                          f"{n_new} ranks asked")
        if differ:
            raise ValueError(f"{out} holds a dataset of other sizes or another tokenizer than asked: "
                             f"{'; '.join(differ)}: prepare into a new --out, or ask for the same")
        keep = [s for s in old.meta["splits"] if s not in items]
        streamed = "stream" in old.meta and "train" not in items  # a streamed train split is kept too
        if streamed:
            meta["stream"] = old.meta["stream"]
        kept, sources = keep + ["train"] * streamed, old.meta.get("source", {})
        meta["source"] = {**{s: sources[s] for s in kept if s in sources}, **meta["source"]}
        with open(os.path.join(out, "report.json")) as f:
            report.splits = {**{s: v for s, v in json.load(f)["splits"].items() if s in kept}, **report.splits}
    with staged_dataset(out, replace=True) as tmp:
        sizes = {}
        for split, split_items in items.items():
            t0 = time.time()
            sizes[split] = captioned_split(tmp, split, split_items, enc, image_size, context_length,
                                           captions_per_image, workers, report, source)
            log(f"{split}: {sizes[split]} images in {time.time() - t0:.1f} s")
        sizes.update(link_split_files(tmp, old, keep))
        finish_dataset(tmp, out, meta, sizes, bpe_text, report, log)
    return out


# -----------------------------------------------------------------------------
# real data: webdataset shards, the train split streamed
#
# img2dataset (and webdataset) write image-text pairs as tar files, "shards", of samples: the
# members that share a key (a member's path up to the first dot of its base name) are one
# sample, key.jpg (or .jpeg, .png, .webp) its image and key.txt its caption. Such a train set
# is too large to prepare into arrays, and it need not be: training streams it (ShardStream,
# below the batches), each rank and loader worker reading its own part of the shards. Its val
# split is prepared from val shards like any captioned source.

WDS_IMAGE = ("jpg", "jpeg", "png", "webp")  # the extensions of a sample's image member
WDS_CAPTION = "txt"
SHARD_RANGE = regex.compile(r"\{(\d+)\.\.(\d+)\}")  # webdataset's brace range: {00000..00099}
WdsSample = namedtuple("WdsSample", "key image caption")  # image a TarMember, caption bytes; either None if absent


def expand_braces(name):
    """The names of a brace range name, in order: each number of the range zero-padded to the
    width of its first bound (several ranges multiply)."""
    m = SHARD_RANGE.search(name)
    if m is None:
        return [name]
    lo, hi = m.groups()
    if int(hi) < int(lo):
        raise ValueError(f"webdataset shards {name}: the range {m.group()} runs backwards")
    return [expanded for i in range(int(lo), int(hi) + 1)
            for expanded in expand_braces(name[:m.start()] + str(i).zfill(len(lo)) + name[m.end():])]


def expand_shards(spec):
    """The absolute paths of a shard spec, in order: comma-separated parts, each a path, a glob
    (its files sorted) or a brace range as webdataset names shards (shards/{00000..00099}.tar).
    Raises naming a shard that does not exist, a glob that matches none, or a shard named twice."""
    paths = []
    for part in filter(None, spec.split(",")):
        if glob.has_magic(part):
            names = sorted(glob.glob(part))
            if not names:
                raise ValueError(f"webdataset shards {part}: no file matches")
        else:
            names = expand_braces(part)
        missing = [n for n in names if not os.path.isfile(n)]
        if missing:
            raise ValueError(f"webdataset shard not found: {missing[0]}")
        paths += [os.path.abspath(n) for n in names]
    if not paths:
        raise ValueError(f"no webdataset shard in {spec!r}")
    seen = Counter(paths)
    twice = [p for p in paths if seen[p] > 1]
    if twice:
        raise ValueError(f"webdataset shard {twice[0]} is named twice in {spec}")
    return paths


def tar_samples(path):
    """(samples, problem) of a webdataset tar: its samples in the tar's order (WdsSample: the
    key, the first image member and the caption's bytes, read here; the image is not), and ''
    or what is wrong with the tar. A tar that cannot be read to its end (cut short, a damaged
    header, not a tar) keeps the samples before the damage, and problem says where it stopped."""
    samples, problem = [], ""
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dot = member.name.find(".", member.name.rfind("/") + 1)
                key, ext = (member.name[:dot], member.name[dot + 1:].lower()) if dot >= 0 else (member.name, "")
                if not samples or samples[-1].key != key:
                    samples.append(WdsSample(key, None, None))
                if ext in WDS_IMAGE and samples[-1].image is None:
                    image = TarMember(path, member.name, member.offset_data, member.size)
                    samples[-1] = samples[-1]._replace(image=image)
                elif ext == WDS_CAPTION:
                    samples[-1] = samples[-1]._replace(caption=tar.extractfile(member).read())
            tar.fileobj.seek(tar.offset)  # tarfile stops quietly at a damaged header: only zeros may follow
            if tar.fileobj.read(512).strip(b"\0"):
                problem = f"unreadable from byte {tar.offset} on"
    except (tarfile.TarError, OSError) as e:
        problem = f"{type(e).__name__}: {e}"
    return samples, problem and f"{problem} (after {len(samples)} samples)"


def wds_caption(sample):
    """(caption, '') of a sample with an image member and a UTF-8 caption, else (None, why not)."""
    if sample.image is None:
        return None, "no image"
    if sample.caption is None:
        return None, "no caption"
    try:
        return sample.caption.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "caption not UTF-8"


def shard_samples(shards, split, report):
    """(shard, its samples) for each shard (tar_samples); a damaged one in the report."""
    for shard in shards:
        samples, problem = tar_samples(shard)
        if problem:
            report.skip(split, "damaged tar", shard, problem)
        yield shard, samples


def webdataset_items(shards, split, report):
    """[(image TarMember, [caption])] of the samples of shards, for captioned_dataset; samples
    without an image or a UTF-8 caption, and damaged tars, in the report."""
    items = []
    for shard, samples in shard_samples(shards, split, report):
        for sample in samples:
            caption, reason = wds_caption(sample)
            if reason:
                report.skip(split, reason, f"{shard}:{sample.key}")
            else:
                items.append((sample.image, [caption]))
    return items


def webdataset_dataset(out, train, val, tokenizer, image_size, context_length, workers=1, report=None, log=print):
    """A captioned dataset (captioned_dataset, one caption per image) whose val split is
    prepared from the val shards and whose train split is streamed from the train shards
    (shard specs as expand_shards reads them): meta 'stream' = {'shards': the absolute paths
    of those not empty, 'counts': how many samples each one's tar headers hold, in the same
    order, 'samples': their sum}, and no train arrays. No sample of the train shards is
    prepared: the visual codebook is fitted later, when training first needs it (train.py's
    load_data calls prepare_codebook), on the first images of the stream. A shard that is
    missing, or in both sets, is an error; a damaged one is reported and its samples before
    the damage count; one without a sample that has an image and a UTF-8 caption
    (img2dataset writes an empty tar when all of a chunk's downloads fail) is reported as an
    'empty shard' and left out of the stream. Train shards that are all empty are an
    error."""
    report = report or Report()
    train_shards, val_shards = expand_shards(train), expand_shards(val)
    both = [s for s in train_shards if s in set(val_shards)]
    if both:
        raise ValueError(f"webdataset shard {both[0]} is in both the train and the val shards")
    stream = dict(shards=[], counts=[], samples=0)
    for shard, found in shard_samples(train_shards, "train", report):
        if any(not wds_caption(sample)[1] for sample in found):
            stream["shards"].append(shard)
            stream["counts"].append(len(found))
            stream["samples"] += len(found)
        else:
            report.skip("train", "empty shard", shard,
                        f"{len(found)} samples, none with an image and a UTF-8 caption" if found else "no sample")
    if not stream["shards"]:
        raise ValueError(f"webdataset shards {train}: no sample with an image and a UTF-8 caption in them "
                         f"(skipped: {report.reasons('train')})")
    report.keep("train", shards=len(stream["shards"]), samples=stream["samples"])
    return captioned_dataset(out, {"val": webdataset_items(val_shards, "val", report)}, tokenizer, image_size,
                             context_length, captions_per_image=1, workers=workers, source=val, report=report,
                             extra_meta=dict(stream=stream), log=log)


# -----------------------------------------------------------------------------
# real data: class masks (the prompt stage)


def check_classes(names, where):
    """The class names of a mask set, the background's first: 2 to 256 (class maps are uint8),
    distinct, non-empty and without commas (train.py --classes lists them with commas)."""
    if any(not n or "," in n for n in names) or len(set(names)) != len(names) or not 2 <= len(names) <= 256:
        raise ValueError(f"{where}: need 2 to 256 distinct class names, the background's first, none empty or with a "
                         f"comma; got {names[:10]}{'...' if len(names) > 10 else ''}")
    return names


def read_classes(file):
    """The class names of a file with one per line, line k naming mask value k: the first line
    names value 0, the background."""
    if not os.path.isfile(file):
        raise ValueError(f"{file} does not exist")
    with open(file, encoding="utf-8") as f:
        return check_classes([line.strip() for line in f.read().rstrip("\n").split("\n")], file)


def mask_pairs(image_dir, mask_dir, split_of, report):
    """[(split, image path, mask path)] of the image files in image_dir (sorted) and the PNG
    masks of the same base name in mask_dir; an image without a mask ('mask not found'), and
    a mask without an image, are skipped. split_of(image file name) names a pair's split."""
    images = sorted(f for f in os.listdir(check_dir(image_dir)) if f.lower().endswith(IMAGE_EXTENSIONS))
    masks = {os.path.splitext(f)[0]: f for f in os.listdir(check_dir(mask_dir)) if f.lower().endswith(".png")}
    pairs = []
    for f in images:
        mask = masks.pop(os.path.splitext(f)[0], None)
        if mask is None:
            report.skip(split_of(f), "mask not found", os.path.join(image_dir, f))
        else:
            pairs.append((split_of(f), os.path.join(image_dir, f), os.path.join(mask_dir, mask)))
    for mask in masks.values():
        report.skip(None, "mask without image", os.path.join(mask_dir, mask))
    return pairs


def mask_values(im):
    """(values (H, W) int64, (W, H)) of a single-band mask image."""
    if im.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise BadImage(im.filename, "mask not single-band", im.mode)
    return np.asarray(im).astype(np.int64), im.size


def class_regions(classmap):
    """[(value, x0, y0, x1, y1)] of every 8-connected region of one class (value > 0) in a
    class map (H, W); x1, y1 one past its last pixel; by value, then top, then left. Runs of
    one value along rows are joined to the runs of the row above that touch them."""
    H, W = classmap.shape
    runs, first = [], []  # runs (y, x0, x1, value); first[y]: the index of row y's first run
    for y in range(H):
        row = classmap[y]
        cuts = [0, *(np.flatnonzero(row[1:] != row[:-1]) + 1).tolist(), W]
        first.append(len(runs))
        runs += [(y, x0, x1, int(row[x0])) for x0, x1 in zip(cuts, cuts[1:]) if row[x0]]
    first.append(len(runs))
    parent = list(range(len(runs)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(1, H):
        for i in range(first[y], first[y + 1]):
            _, x0, x1, v = runs[i]
            for j in range(first[y - 1], first[y]):
                _, p0, p1, pv = runs[j]
                if p0 > x1:
                    break
                if pv == v and x0 <= p1:  # columns within one of each other
                    parent[root(i)] = root(j)
    boxes = {}
    for i, (y, x0, x1, v) in enumerate(runs):
        b = boxes.setdefault(root(i), [v, x0, y, x1, y + 1])
        b[1], b[3], b[4] = min(b[1], x0), max(b[3], x1), y + 1
    return sorted(tuple(b) for b in boxes.values())


def mask_row(pair, size, n_classes, void):
    """An image and its class mask as rows of a mask split: the mask resized and cropped as its
    image (nearest neighbour), void values made background; and the boxes of its regions."""
    image, mask = pair
    pixels, mode, image_wh = read_image(image, size)
    values, mask_wh = read_image_file(mask, mask_values, "mask")
    if mask_wh != image_wh:
        raise BadImage(mask, "mask size differs from its image", f"{mask_wh} vs {image_wh}")
    if void is not None:
        values[values == void] = 0
    if values.max() >= n_classes or values.min() < 0:
        raise BadImage(mask, "mask value beyond the classes", f"{values.min()}..{values.max()} for {n_classes} classes")
    classmap = fit_square(Image.fromarray(values.astype(np.uint8)), size, Image.NEAREST)
    return {"images": pixels, "classmap": classmap}, mode, class_regions(classmap)


def mask_dataset(out, pairs, classes, tokenizer, image_size, context_length, void=None, workers=1, source="",
                 report=None, log=print):
    """Prepare images with class masks, pairs {split: [(image path, mask path)]} and classes the
    names of the mask values (background first), into the dataset out (kind 'masks', splits
    novel_train and novel_val as the prompt stage reads them; layout in the module docstring).
    A pair whose mask is missing, unreadable, of another size than its image or with a value
    beyond the classes (after void values are made background) is skipped. Returns out."""
    kind, bpe_text = tokenizer
    enc = get_tokenizer(kind, bpe_text)
    report = report or Report()
    check_classes(classes, "the classes")
    meta = dict(kind="masks", image_size=image_size, context_length=context_length, tokenizer=tokenizer_meta(kind, enc),
                classes=list(classes), novel_classes=list(classes[1:]), void=void,
                source={split: source for split in pairs})
    with staged_dataset(out, replace=True) as tmp:
        sizes = {}
        for split, tasks in pairs.items():
            rows = {"images": ((image_size, image_size, 3), np.uint8), "classmap": ((image_size, image_size), np.uint8)}
            kept = write_rows(tmp, split, tasks, partial(mask_row, size=image_size, n_classes=len(classes), void=void),
                              rows, workers, report) if tasks else []
            if not kept:
                raise nothing_left_error(source, split, report)
            objects = np.full((len(kept), max(1, max(len(b) for _, b in kept)), 7), -1, np.int16)
            for n, (_, boxes) in enumerate(kept):
                for j, (v, *box) in enumerate(boxes):
                    objects[n, j] = (v - 1, -1, -1, *box)  # the world's objects rows: class value - 1 as the shape
            save_arrays(tmp, split, dict(objects=objects))
            sizes[split] = len(kept)
            report.keep(split, images=len(kept), regions=int((objects[:, :, 0] >= 0).sum()))
        finish_dataset(tmp, out, meta, sizes, bpe_text, report, log)
    return out


# -----------------------------------------------------------------------------
# real data: multi-image question sets (the instruct stage)


def multi_items(file, max_images, report, split_of):
    """[(split, [image paths], question, answer, type)] of a JSON list of question sets
    {"images": [paths], "question": str, "answer": str, "type": optional str}; paths
    relative to the file's folder or absolute; a set without a type has type 'other'. Sets
    missing a field, or with more than max_images images, are skipped. split_of(set as
    written) names a set's split."""
    doc = read_json(file)
    if not isinstance(doc, list):
        raise ValueError(f"{file} is not a list of question sets")
    folder, sets = os.path.dirname(os.path.abspath(file)), []
    for k, s in enumerate(doc):
        where = f"{file}: [{k}]"
        if not isinstance(s, dict):
            report.skip(None, "set not an object", where)
            continue
        split = split_of(json.dumps([s.get("images"), s.get("question")]))
        images = s.get("images")
        if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
            report.skip(split, "images missing", where)
        elif len(images) > max_images:
            report.skip(split, "too many images", where, f"{len(images)} > {max_images}")
        elif not isinstance(s.get("question"), str):
            report.skip(split, "question missing", where)
        elif not isinstance(s.get("answer"), str):
            report.skip(split, "answer missing", where)
        elif not isinstance(s.get("type", "other"), str):
            report.skip(split, "type not a string", where)
        else:
            paths = [os.path.join(folder, os.path.normpath(p)) for p in images]
            sets.append((split, paths, s["question"], s["answer"], s.get("type", "other")))
    return sets


def multi_dataset(out, sets, tokenizer, image_size, context_length, answer_length=8, workers=1, source="",
                  report=None, log=print):
    """Prepare multi-image question sets, {split: [([image paths], question, answer, type)]},
    into the dataset out (kind 'multi', splits multi_train and multi_val; layout in the module
    docstring). Questions get context_length - answer_length tokens and answers answer_length
    (as the model's question and answer blocks); a set with an empty or too long question or
    answer, or an image that cannot be read, is skipped. Returns out."""
    kind, bpe_text = tokenizer
    enc = get_tokenizer(kind, bpe_text)
    report = report or Report()
    meta = dict(kind="multi", image_size=image_size, context_length=context_length, answer_length=answer_length,
                tokenizer=tokenizer_meta(kind, enc), source={split: source for split in sets})
    with staged_dataset(out, replace=True) as tmp:
        sizes, types = {}, {}
        for split, split_sets in sets.items():
            question, q_problems = encode_checked(enc, [s[1] for s in split_sets], context_length - answer_length)
            answer, a_problems = encode_checked(enc, [s[2] for s in split_sets], answer_length)
            good = []
            for i, (_, q, a, _) in enumerate(split_sets):
                problems = [text_reason(p, w) for p, w in ((q_problems[i], "question"), (a_problems[i], "answer")) if p]
                if problems:
                    report.skip(split, problems[0], q[:200], a[:200])
                else:
                    good.append(i)
            paths = sorted({p for i in good for p in split_sets[i][0]})
            kept = write_rows(tmp, split, paths, partial(image_row, size=image_size),
                              {"images": ((image_size, image_size, 3), np.uint8)}, workers, report) if paths else []
            pool = {paths[i]: n for n, (i, _) in enumerate(kept)}
            rows = []
            for i in good:
                lost = [p for p in split_sets[i][0] if p not in pool]
                if lost:
                    report.skip(split, "unusable image", split_sets[i][1][:200], lost[0])
                else:
                    rows.append(i)
            if not rows:
                raise nothing_left_error(source, split, report)
            members = [[pool[p] for p in split_sets[i][0]] for i in rows]
            width, pad = max(map(len, members)), enc.encode_single_token(PAD)
            arrays = dict(sets=np.array([m + [-1] * (width - len(m)) for m in members], np.int32),
                          question=np.pad(question[rows], ((0, 0), (0, answer_length)), constant_values=pad),
                          answer=answer[rows])
            save_arrays(tmp, split, arrays)
            sizes[split], types[split] = len(rows), [split_sets[i][3] for i in rows]
            report.keep(split, sets=len(rows), images=len(kept))
        meta["qtypes"] = sorted({t for ts in types.values() for t in ts})  # the types of the sets kept
        for split, ts in types.items():
            save_arrays(tmp, split, dict(qtype=np.array([meta["qtypes"].index(t) for t in ts], np.int16)))
        finish_dataset(tmp, out, meta, sizes, bpe_text, report, log)
    return out


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
        self.bpe_text = None  # a GPT-2 dataset without a file uses tiktoken's own
        if tok.get("file"):
            with open(os.path.join(path, tok["file"])) as f:
                self.bpe_text = f.read()
        self.tokenizer = get_tokenizer(tok["kind"], self.bpe_text)
        self.stream = self.meta.get("stream")  # a train split streamed from shards: {shards, counts, samples}
        if self.stream is not None and "counts" not in self.stream:
            raise ValueError(f"{path} streams its train split from webdataset shards but was prepared before their "
                             f"sample counts were kept (meta stream 'counts'): prepare it again (data.py webdataset)")
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
        return self.stream["samples"] if self.stream else self.meta["splits"]["train"]

    def split_size(self, split):
        return self.meta["splits"][split]

    def captions(self, split):
        """[[caption]] of a prepared captioned split: each image's n_captions captions as its
        source wrote them, in slot order ({split}.captions.json); None where the dataset has no
        such file (the shapes world, a dataset prepared before the file was written)."""
        file = os.path.join(self.path, f"{split}.captions.json")
        if not os.path.exists(file):
            return None
        with open(file, encoding="utf-8") as f:
            return json.load(f)

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


CODEBOOK_VERSION = 2  # in the file names: a dataset prepared before the fit changed gets a new codebook


def codebook_name(patch_size, n_codes):
    """The array name of the per-patch codes: {split}.codes-p{p}-k{K}-v{version}.npy."""
    return f"codes-p{patch_size}-k{n_codes}-v{CODEBOOK_VERSION}"


def codebook_file(path, patch_size, n_codes):
    return os.path.join(path, f"codebook-p{patch_size}-k{n_codes}-v{CODEBOOK_VERSION}.npy")


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


def visual_codes(images, centroids, patch_size):
    """(N, P) int64: the code (nearest centroid) of every patch of images (N, S, S, 3) uint8,
    the targets of ELECTRA's MOC: prepare_codebook stores them for a prepared split, a
    streamed batch computes them as it is read."""
    x = patchify(images, patch_size)
    return nearest_code(x.reshape(-1, x.shape[-1]), centroids).reshape(len(x), -1)


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
    (n_codes centroids) over the distinct patterns of up to max_fit patches' worth of train images
    (drawn at random; of a streamed train split, the first images of its walk), pixels scaled to
    [0, 1]; then every patch of every prepared captioned split gets the index of its nearest
    centroid. Writes codebook_file (K, p*p*3) float32 and {split}.{codebook_name}.npy (N, P)
    int16, each atomically, the codebook last (it marks the work done)."""
    name = codebook_name(patch_size, n_codes)
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
    if ds.stream:
        fit = ShardStream(ds.stream["shards"], ds.stream["counts"], 0, 1, seed, ds.tokenizer, ds.context_length,
                          ds.image_size, n, log=log).batch(0)[0]
    else:
        fit = ds.array("train", "images")[np.sort(rng.choice(len(ds), n, replace=False))]
    patches = patchify(fit, patch_size).reshape(-1, 3 * patch_size ** 2)
    # one patch per pattern at 8 levels a pixel: else the uniform background (88% of the shapes
    # world's patches) takes a third of the codes as tints a few levels apart (results/small-run.md)
    _, first = np.unique(np.round(patches * 7).astype(np.uint8), axis=0, return_index=True)
    centroids = kmeans(patches[np.sort(first)] if len(first) >= n_codes else patches, n_codes, iters, rng)
    splits = [s for s in ds.meta["splits"] if ds.has(s, "tokens")]
    for split in splits:
        images = ds.array(split, "images")
        codes = np.empty((len(images), per_image), np.int16)
        for i in range(0, len(images), 1024):
            codes[i:i + 1024] = visual_codes(images[i:i + 1024], centroids, patch_size)
        write_file(os.path.join(path, f"{split}.{name}.npy"), codes)
    write_file(book_file, centroids)
    log(f"visual codebook ({n_codes} codes of {patch_size}x{patch_size} patches) ready in {time.time() - t0:.1f} s")
    return book_file


# -----------------------------------------------------------------------------
# batches of a prepared split


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
# augmentation: mirrored images and captions


# A mirrored image needs its caption's 'left' and 'right' swapped, where they name a side.
# Where they do not ('the train has left the station', 'right now', 'all right'), swapping
# would say something else: mirror then leaves the row as it is, image and caption. A word
# is taken for a side by its neighbours alone: the word before it (SIDE_BEFORE: 'on the
# left', 'her right', 'turn left', 'from left to right') or after it (SIDE_AFTER: 'left of',
# 'right hand', 'left-handed'), or its own ending (leftmost, rightward, rightwards).
FLIP_WORDS = regex.compile(r"\b(left|right)(?=(?:most|wards?)?\b)", regex.IGNORECASE)
SIDE_BEFORE = regex.compile(r"\b(?:the|her|his|its|their|my|your|our|far|to|from|turn(?:s|ed|ing)?|bear(?:s|ing)?|"
                            r"veer(?:s|ed|ing)?|keep(?:s|ing)?)\s+$", regex.IGNORECASE)
SIDE_AFTER = regex.compile(r"(?:most|wards?)\b|-hand(?:ed)?\b|"
                           r"\s+(?:sides?|hand|arms?|legs?|foot|feet|eye|ear|lane|turn|of|corner|edge|half|wing)\b",
                           regex.IGNORECASE)


def flip_caption(text):
    """The caption of the image mirrored left to right: every 'left' and 'right' swapped where
    it is a word or begins leftmost, rightward(s)..., in the case it was written in (not
    leftover, bright, copyright). Whether each is a side is mirror's question (sides_only)."""
    def swap(m):
        word = {"left": "right", "right": "left"}[m.group(1).lower()]
        return word.upper() if m.group(1).isupper() else word.capitalize() if m.group(1)[0].isupper() else word
    return FLIP_WORDS.sub(swap, text)


def sides_only(text):
    """Whether every 'left' and 'right' word of text (FLIP_WORDS) names a side: the word before
    it is one of SIDE_BEFORE's or the text after it starts as SIDE_AFTER says. True for a
    text without such a word."""
    return all(SIDE_BEFORE.search(text, 0, m.start()) or SIDE_AFTER.match(text, m.end())
               for m in FLIP_WORDS.finditer(text))


def mirror(images, tokens, enc, flip):
    """Images (B, S, S, 3) and token rows (B, T) with the rows where flip is true mirrored left
    to right and their captions swapped to match (flip_caption); a row whose caption has a
    'left' or 'right' that is not a side (sides_only), or whose swapped caption would not
    fit the context, stays as it was, image and caption. Returns new arrays and the indices
    of the rows mirrored."""
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
    """The scene id (scene_id) of a shapes-world scene seen in a mirror: a row (axis 1) read
    the other way; a column or a single object as it was."""
    axis, objects = decode_scene(sid)
    return scene_id(1, objects[::-1]) if axis == 1 else int(sid)


# -----------------------------------------------------------------------------
# streaming webdataset shards: the batches of a train split too large to prepare
#
# The consumers of a stream are the loader workers of every rank: consumer c = rank * n + j of
# C = world_size * n reads stream j of its rank (n streams a rank, one per loader worker).
# Every consumer walks the shards in the same order, new each epoch. With at least as many
# shards as consumers, each epoch deals every shard to one consumer, the one with the fewest
# samples so far, so no sample is read twice in an epoch, none is left out, and the
# consumers' sample counts stay within the largest shard of each other: they go through
# the epochs together. With fewer shards, every consumer reads every shard and takes its
# turn of the samples. Its valid samples, in order, make its stream, cut into batches. A
# batch is found by counting samples: a consumer that starts late (a resumed run, or a
# worker's turn) gets there reading tar headers and captions, not images.

StreamSample = namedtuple("StreamSample", "epoch shard key image tokens")  # tokens (T,) int32
LOGGED_SKIPS = 10  # a consumer logs its first skips, then only those whose count is a power of two


def nearest_good(good):
    """For each place of a batch, the nearest place whose image is good (good (B,) bool, at
    least one), the earlier one on a tie."""
    places = np.flatnonzero(good)
    return places[np.abs(np.arange(len(good))[:, None] - places[None, :]).argmin(1)]


def few(paths, n=3):
    """The first n of a list of paths, and how many there are in all if more."""
    return ", ".join(paths[:n]) + (f" ... ({len(paths)} in all)" if len(paths) > n else "")


def deal_shards(order, counts, dealt):
    """The consumer each shard of order goes to: the one with the fewest samples dealt so far
    (dealt, a heap of (samples, consumer) over every consumer, updated here; counts the
    samples of each shard, an empty one counted as 1 so that it still goes round), the
    lowest consumer on a tie. The consumers' totals so stay within the largest shard of each
    other (a shard goes to the smallest)."""
    out = []
    for s in order:
        total, c = heapq.heappop(dealt)
        heapq.heappush(dealt, (total + max(1, counts[s]), c))
        out.append(c)
    return out


class ShardStream:
    """Consumer `consumer` of n_consumers C reading S webdataset shards, epoch after epoch;
    counts: the samples of each shard (meta stream's; S >= C deals by them). Each epoch the shards are
    put in a random order (by seed and epoch) and each shard's samples too (by seed, epoch and
    shard). With S >= C the epoch deals every shard, in that order, to the consumer with the
    fewest samples dealt so far, this epoch and those before (deal_shards): a consumer reads
    all of each shard dealt to it, every sample is read once an epoch, and the consumers'
    totals stay within the largest shard of each other. With S < C every
    consumer reads every shard, and the samples of the walk over every epoch are dealt in
    turn: consumer c takes the valid ones at places c, c + C, ... of all the valid ones (an
    epoch with any valid sample gives every consumer one within C epochs), and counts the
    passed-over ones at places c, c + C, ... of those. A sample without an image member, or
    whose caption is missing, not UTF-8, empty or too long for context_length, is passed
    over; the rest, in order, are the consumer's stream, and batch(k) its samples [k*B,
    (k+1)*B). Every sample passed over, image that does not decode and damaged tar is counted
    in skipped (reason -> count) and logged: the first LOGGED_SKIPS of the consumer, then each
    whose count is a power of two, each line with the counts so far."""

    def __init__(self, shards, counts, consumer, n_consumers, seed, enc, context_length, image_size, batch_size,
                 log=print):
        if len(counts) != len(shards):
            raise ValueError(f"{len(shards)} webdataset shards but {len(counts)} sample counts")
        self.shards, self.counts, self.c, self.n, self.seed = shards, counts, consumer, n_consumers, seed
        self.enc, self.T, self.S, self.B, self.log = enc, context_length, image_size, batch_size, log
        self.skipped = {}
        self._walk, self._start, self._held = None, 0, []  # the walk, and its samples held from place _start on

    def skip(self, reason, item, action="passed over"):
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        n = sum(self.skipped.values())
        if n <= LOGGED_SKIPS or n & (n - 1) == 0:
            later = "; from here on a skip is logged when the count reaches a power of two" if n == LOGGED_SKIPS else ""
            self.log(f"webdataset: consumer {self.c} of {self.n}: {item}: {reason}, {action} "
                     f"(skipped so far: {count_text(self.skipped)}{later})")

    def walk(self):
        """(epoch, shard, [StreamSample]) for each shard this consumer reads, epoch after epoch:
        its valid samples of the shard, in the epoch's order. An epoch that gives it none goes
        on to the next. Raises (an endless walk would never find a batch) when every shard
        has been read whole since its last valid sample (S >= C), or when a whole epoch, every
        sample of every shard, has no valid sample (S < C; nor will any epoch after it)."""
        split = len(self.shards) >= self.n
        dealt = [(0, c) for c in range(self.n)]  # a heap of (samples dealt so far, consumer) (S >= C)
        dry = set()  # shards read whole since the last valid sample (S >= C)
        walked = {True: 0, False: 0}  # valid and passed-over samples of the walk so far (S < C)
        for epoch in itertools.count():
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            if split:
                order = [s for s, c in zip(order, deal_shards(order, self.counts, dealt)) if c == self.c]
            found = 0  # valid samples of the shards read this epoch
            for s in order:
                shard = self.shards[s]
                samples, problem = tar_samples(shard)
                if problem:
                    self.skip("damaged tar", shard, f"read as far as it goes: {problem}")
                samples = [samples[i] for i in np.random.default_rng([self.seed, epoch, s]).permutation(len(samples))]
                valid = []
                for sample, row, reason in zip(samples, *self.caption_rows(samples)):
                    place, walked[not reason] = walked[not reason], walked[not reason] + 1
                    if split or place % self.n == self.c:
                        if reason:
                            self.skip(reason, f"{shard}:{sample.key}")
                        else:
                            valid.append(StreamSample(epoch, shard, sample.key, sample.image, row))
                    found += not reason
                dry = set() if valid else dry | {s}
                yield epoch, shard, valid
                if split and len(dry) == len(self.shards):
                    raise self.nothing_error("every shard it read whole since its last valid sample")
            if not split and not found:
                raise self.nothing_error("a whole epoch of every shard")

    def nothing_error(self, where):
        return ValueError(f"webdataset shards {few(self.shards)}: consumer {self.c} of {self.n} found no sample with "
                          f"an image and a usable caption in {where} (skipped: {count_text(self.skipped)})")

    def caption_rows(self, samples):
        """(tokens (n, T) int32, reasons): each sample's caption encoded (encode_checked), and ''
        or why the sample is passed over: no image, no caption, not UTF-8 (wds_caption), or a
        caption empty or too long (text_reason)."""
        captions = [wds_caption(sample) for sample in samples]
        tokens, problems = encode_checked(self.enc, [caption or "" for caption, _ in captions], self.T)
        return tokens, [reason or problem and text_reason(problem, "caption")
                        for (_, reason), problem in zip(captions, problems)]

    def samples(self, k):
        """The StreamSamples of batch k. Batches are read forwards: an earlier batch than the
        last one asked for starts the walk again."""
        lo, hi = k * self.B, (k + 1) * self.B
        if self._walk is None or lo < self._start:
            self._walk, self._start, self._held = self.walk(), 0, []
        while self._start + len(self._held) < hi:
            self._held += next(self._walk)[2]
            if self._start + len(self._held) <= lo:  # all before the batch: let go
                self._start, self._held = self._start + len(self._held), []
        del self._held[:lo - self._start]
        self._start = lo
        return self._held[:self.B]

    def batch(self, k):
        """Images (B, S, S, 3) uint8 (load_image) and tokens (B, T) int32 of batch k. An image
        that does not decode is replaced by the nearest good sample of the batch (nearest_good:
        image and caption); a batch without one is an error naming its shards."""
        samples = self.samples(k)
        images = np.zeros((self.B, self.S, self.S, 3), np.uint8)
        good = np.zeros(self.B, bool)
        for i, sample in enumerate(samples):
            try:
                images[i], good[i] = load_image(sample.image, self.S), True
            except BadImage as e:
                self.skip(e.reason, sample.image, "replaced by the nearest good sample of its batch")
        if not good.any():
            shards = sorted({sample.shard for sample in samples})
            raise ValueError(f"webdataset shards {few(shards)}: no image of batch {k} of consumer {self.c} "
                             f"of {self.n} decodes (skipped: {count_text(self.skipped)})")
        source = nearest_good(good)
        return images[source], np.stack([samples[i].tokens for i in source])


class ShardBatches:
    """A rank's pretraining batches streamed from webdataset shards (ShardStream), for
    loader workers: micro-step s is batch k = s // n of stream j = s % n (consumer rank * n + j
    of world_size * n), so with the micro-steps dealt to n workers in turn each worker reads
    one stream, and a run resumed with the same ranks and workers reads the same batches.
    shards and counts: as ShardStream takes them (meta stream's). A stream is made where it
    is first read (in the loader worker that reads it)."""

    def __init__(self, shards, counts, rank, world_size, n_streams, seed, enc, context_length, image_size, batch_size,
                 log=print):
        self.n, self.rank, self.world_size = n_streams, rank, world_size
        self.args = (seed, enc, context_length, image_size, batch_size)
        self.shards, self.counts, self.log, self.streams = shards, counts, log, {}

    def stream(self, s):
        j = s % self.n
        if j not in self.streams:
            self.streams[j] = ShardStream(self.shards, self.counts, self.rank * self.n + j, self.world_size * self.n,
                                          *self.args, log=self.log)
        return self.streams[j]

    def samples(self, s):
        """The StreamSamples of micro-step s (for tests: which samples a step reads)."""
        return self.stream(s).samples(s // self.n)

    def fetch(self, s):
        """Images (B, S, S, 3) uint8 and tokens (B, T) int32 of micro-step s (ShardStream.batch)."""
        return self.stream(s).batch(s // self.n)


# -----------------------------------------------------------------------------
# the command line: real data into prepared datasets


def command_line():
    """The parser of `python data.py SOURCE ...` (the module docstring shows the commands)."""
    parser = argparse.ArgumentParser(prog="data.py", description="Prepare real data into a nanoVLP dataset directory.")
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="the prepared dataset's directory")
    common.add_argument("--tokenizer", required=True, help="a Hugging Face CLIP or GPT-2 tokenizer (directory or hub "
                        "name), 'gpt2' (tiktoken's file), or a prepared dataset (its tokenizer)")
    common.add_argument("--image_size", type=int, required=True, help="the model's image_size")
    common.add_argument("--context_length", type=int, required=True, help="the model's context_length")
    common.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes decoding images")
    captions = argparse.ArgumentParser(add_help=False)
    captions.add_argument("--captions_per_image", type=int, default=5, help="caption slots per image")
    held = argparse.ArgumentParser(add_help=False)
    held.add_argument("--val_fraction", type=float, default=0.0,
                      help="the fraction held out for val, chosen by a hash of each item (not its place in the file)")
    p = sub.add_parser("coco", parents=[common, captions], help="a COCO captions file and its image folder: one split")
    p.add_argument("--captions", required=True, help="e.g. annotations/captions_train2017.json")
    p.add_argument("--images", required=True, help="its image folder, e.g. train2017")
    p.add_argument("--split", default="train", help="the split it becomes; other splits already in --out are kept")
    p = sub.add_parser("karpathy", parents=[common, captions], help="Karpathy's split file over the COCO images")
    p.add_argument("--json", required=True, help="dataset_coco.json")
    p.add_argument("--images", required=True, help="the COCO root, which holds the folders the file's filepaths name")
    p = sub.add_parser("table", parents=[common, captions, held], help="a CSV, TSV or JSONL of images and captions")
    p.add_argument("--file", required=True, help="columns (or keys) image and caption; paths relative to its folder")
    p.add_argument("--val", help="a second such file for the val split")
    p.add_argument("--image_column", default="image")
    p.add_argument("--caption_column", default="caption")
    p = sub.add_parser("masks", parents=[common, held], help="images and PNG class masks for the prompt stage")
    p.add_argument("--images", required=True, help="the image folder")
    p.add_argument("--masks", required=True, help="the mask folder: <image base name>.png, pixel value = class")
    p.add_argument("--classes", required=True, help="a text file naming mask value k on line k + 1 (background first)")
    p.add_argument("--val_images", help="an image folder for the val split")
    p.add_argument("--val_masks", help="its mask folder")
    p.add_argument("--void", type=int, help="a mask value made background (PASCAL VOC marks object borders 255)")
    p = sub.add_parser("multi", parents=[common, held], help="multi-image question sets for the instruct stage")
    p.add_argument("--file", required=True, help='a JSON list of {"images": [paths], "question", "answer", "type"}')
    p.add_argument("--val", help="a second such file for the val split")
    p.add_argument("--answer_length", type=int, default=8, help="the model's answer_length")
    p.add_argument("--max_images", type=int, default=4, help="the most images of a set (the model's image_slots)")
    p = sub.add_parser("webdataset", parents=[common], help="webdataset tar shards: val prepared, train streamed")
    p.add_argument("--train", required=True, help="the train shards, streamed in training: paths, globs or brace "
                   "ranges, comma-separated (quoted), e.g. 'shards/{00000..00099}.tar'")
    p.add_argument("--val", required=True, help="the val shards, prepared (one caption per image)")
    for p in sub.choices.values():
        p.set_defaults(parser=p)  # usage errors are told with the command's own usage
    return parser


def usage_problem(args):
    """What is wrong with the parsed arguments, or ''."""
    if args.image_size < 1 or args.context_length < 3 or args.workers < 1:
        return "--image_size and --workers must be at least 1, --context_length at least 3"
    if getattr(args, "captions_per_image", 1) < 1:
        return "--captions_per_image must be at least 1"
    if not 0 <= getattr(args, "val_fraction", 0) < 1:
        return "--val_fraction must be in [0, 1)"
    if getattr(args, "val", None) and getattr(args, "val_fraction", 0):
        return "give --val or --val_fraction, not both"
    if args.source == "masks" and (bool(args.val_images) != bool(args.val_masks) or
                                   bool(args.val_images) and bool(args.val_fraction)):
        return "give --val_images with --val_masks, or --val_fraction, or neither"
    if args.source == "multi" and not (3 <= args.answer_length < args.context_length and args.max_images >= 1):
        return "--answer_length must be at least 3 and below --context_length, --max_images at least 1"
    return ""


def main(argv=None):
    """python data.py SOURCE ...: prepare a real source; bad input stops with 'error: ...'."""
    parser = command_line()
    args = parser.parse_args(argv)
    problem = usage_problem(args)
    if problem:
        args.parser.error(problem)
    report = Report()
    try:
        common = dict(tokenizer=load_tokenizer(args.tokenizer), image_size=args.image_size,
                      context_length=args.context_length, workers=args.workers, report=report)
        if args.source == "coco":
            items = {args.split: coco_items(args.captions, args.images, args.split, report)}
            captioned_dataset(args.out, items, captions_per_image=args.captions_per_image, source=args.captions,
                              add=True, **common)
        elif args.source == "karpathy":
            items = karpathy_items(args.json, args.images, report)
            captioned_dataset(args.out, items, captions_per_image=args.captions_per_image, source=args.json, **common)
        elif args.source == "table":
            items = table_items(args.file, report, args.val, args.val_fraction, args.image_column, args.caption_column)
            captioned_dataset(args.out, items, captions_per_image=args.captions_per_image, source=args.file, **common)
        elif args.source == "webdataset":
            webdataset_dataset(args.out, args.train, args.val, **common)
        elif args.source == "masks":
            classes = read_classes(args.classes)
            read = lambda folders, split_of: mask_pairs(*folders, split_of, report)  # noqa: E731
            pairs = two_splits(read, (args.images, args.masks), (args.val_images, args.val_masks) if args.val_images
                               else None, args.val_fraction, ("novel_train", "novel_val"), report, args.images)
            mask_dataset(args.out, pairs, classes, void=args.void, source=args.images, **common)
        else:
            sets = two_splits(lambda file, split_of: multi_items(file, args.max_images, report, split_of), args.file,
                              args.val, args.val_fraction, ("multi_train", "multi_val"), report, args.file)
            multi_dataset(args.out, sets, answer_length=args.answer_length, source=args.file, **common)
    except ValueError as e:  # bad input, named: no stack trace
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

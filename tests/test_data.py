"""The shapes world, its tokenizer and batching, checked against what was drawn and said."""

import hashlib
import math
import os
import tempfile
from dataclasses import replace

import numpy as np
import pytest
import tiktoken
from PIL import Image
from tiktoken.load import load_tiktoken_bpe

import data
import prepare
from conftest import TINY

SINGLE_SPLITS = ("train", "val", "test", "web", "novel_train", "novel_val")


def small_world(**changes):
    return replace(TINY.world, n_train=64, n_val=16, n_test=16, n_web=32, n_novel_train=8, n_novel_val=4,
                   n_multi_train=20, n_multi_val=5, **changes)


def test_world_is_deterministic_and_depends_on_its_seed(tmp_path):
    cfg = small_world()
    a = data.prepare_world(str(tmp_path / "a"), cfg, 48, 24, log=lambda *_: None)
    b = data.prepare_world(str(tmp_path / "b"), cfg, 48, 24, log=lambda *_: None)
    files = sorted(os.listdir(a))
    assert files == sorted(os.listdir(b)) and "meta.json" in files and "tokenizer.tiktoken" in files
    assert data.Dataset(a).captions("train") is None  # captions as written: prepared real data only
    for f in files:
        with open(os.path.join(a, f), "rb") as fa, open(os.path.join(b, f), "rb") as fb:
            assert fa.read() == fb.read(), f"{f} differs between two generations with the same seed"
    c = data.prepare_world(str(tmp_path / "c"), replace(cfg, world_seed=1), 48, 24, log=lambda *_: None)
    assert not np.array_equal(np.load(os.path.join(a, "train.images.npy")), np.load(os.path.join(c, "train.images.npy")))


def test_world_is_cached_and_regenerated_when_its_parameters_change(tmp_path):
    cfg = small_world()
    calls = []  # one "generating ..." message per world generated
    log = lambda msg: calls.append(msg) if msg.startswith("generating") else None  # noqa: E731
    p1 = data.prepare_world(str(tmp_path), cfg, 48, 24, log=log)
    mtime = os.path.getmtime(os.path.join(p1, "meta.json"))
    assert data.prepare_world(str(tmp_path), cfg, 48, 24, log=log) == p1
    assert len(calls) == 1 and os.path.getmtime(os.path.join(p1, "meta.json")) == mtime  # reused, not rewritten
    p2 = data.prepare_world(str(tmp_path), replace(cfg, n_val=20), 48, 24, log=log)
    p3 = data.prepare_world(str(tmp_path), cfg, 48, 32, log=log)
    assert len({p1, p2, p3}) == 3 and len(calls) == 3
    assert data.Dataset(p2).split_size("val") == 20
    assert np.load(os.path.join(p3, "val.tokens.npy")).shape[-1] == 32
    assert not [d for d in os.listdir(tmp_path) if ".tmp" in d]  # no half-written worlds left behind


def test_classmap_and_boxes_match_the_drawn_pixels(tiny_world):
    """Objects are flat colours on a flat background: an object's pixels are exactly the
    pixels of its class in the class map, its box is their bounding box, and its colour is
    the named colour (up to the jitter)."""
    for split in SINGLE_SPLITS:
        images, cmaps = tiny_world.array(split, "images"), tiny_world.array(split, "classmap")
        objects = tiny_world.array(split, "objects")
        for i in range(min(len(images), 40)):
            img, cmap = images[i].astype(int), cmaps[i]
            background = img[cmap == 0]
            assert (background == background[0]).all(), "the background is one colour"
            assert ((img != background[0]).any(-1) == (cmap > 0)).all(), "object pixels = class map pixels"
            covered = np.zeros_like(cmap, bool)
            for s, c, z, x0, y0, x1, y1 in objects[i]:
                if s < 0:
                    continue
                box = np.zeros_like(covered)
                box[y0:y1, x0:x1] = True
                mine = box & (cmap == 1 + s)
                ys, xs = np.nonzero(mine)
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
                colour = img[mine]
                assert (colour == colour[0]).all()
                assert np.abs(colour[0] - np.array(data.COLOURS[data.COLOUR_NAMES[c]])).max() <= 20
                covered |= mine
            assert (covered == (cmap > 0)).all(), "every class pixel belongs to a listed object"


@pytest.mark.parametrize("name, area", [
    ("circle", math.pi), ("square", 1.7 ** 2), ("diamond", 2 * 1.1 ** 2), ("ring", math.pi * (1 - 0.3)),
    ("cross", 2 * (0.7 * 2.0) - 0.7 ** 2), ("triangle", 2.0 * 1.7 / 2),
])
def test_shapes_have_their_geometric_area(name, area):
    """A shape drawn with radius r covers area * r^2 pixels; the areas follow from the
    shapes' definitions (the triangle: apex at -1, base of width 2 at 0.7)."""
    r, S = 40.0, 128
    objects = [(data.ALL_SHAPES.index(name), 0, 1)]
    _, cmap, _ = data.render(np.random.default_rng(0), objects, [(S / 2, S / 2, r)], S)
    assert abs((cmap > 0).sum() / (area * r * r) - 1) < 0.02


def test_captions_describe_the_laid_out_scene(tiny_world):
    """Row scenes are strictly ordered along their axis and overlap across it, so exactly one
    relation holds; every caption parses back to the image's scene."""
    for split in ("train", "val", "test"):
        objects, scene = tiny_world.array(split, "objects"), tiny_world.array(split, "scene")
        tokens = tiny_world.array(split, "tokens")
        for i in range(len(objects)):
            objs = [o for o in objects[i] if o[0] >= 0]
            if len(objs) > 1:
                x_sorted = all(a[5] <= b[3] for a, b in zip(objs, objs[1:]))
                y_sorted = all(a[6] <= b[4] for a, b in zip(objs, objs[1:]))
                assert x_sorted != y_sorted, "a row is ordered along exactly one axis"
                lo, hi = (4, 6) if x_sorted else (3, 5)  # the other axis: intervals overlap
                assert max(o[lo] for o in objs) < min(o[hi] for o in objs)
                axis = 1 if x_sorted else 2
            else:
                axis = 0
            assert scene[i] == data.scene_id(axis, [tuple(int(v) for v in o[:3]) for o in objs])
            for row in tokens[i]:
                assert data.parse_caption(data.decode_tokens(tiny_world.tokenizer, row)) == scene[i]


def test_heldout_pairs_appear_only_in_test(tiny_world):
    held = {(data.SHAPES.index(s), data.COLOUR_NAMES.index(c)) for s, c in tiny_world.meta["heldout_pairs"]}
    assert len(held) == TINY.world.n_heldout_pairs
    for split in ("train", "val", "web", "multi_train", "multi_val"):
        objs = tiny_world.array(split, "objects").reshape(-1, 7)
        assert not {(int(s), int(c)) for s, c in objs[objs[:, 0] >= 0, :2]} & held, split
    objs, flag = tiny_world.array("test", "objects"), tiny_world.array("test", "heldout")
    assert flag.any() and (~flag).any()
    for row, is_held in zip(objs, flag):
        pairs = {(int(s), int(c)) for s, c in row[row[:, 0] >= 0, :2]}
        assert (pairs <= held) if is_held else not (pairs & held)


def test_web_corruption_is_recorded(tiny_world):
    tok = tiny_world.tokenizer
    corruption, scene = tiny_world.array("web", "corruption"), tiny_world.array("web", "scene")
    described = tiny_world.array("web", "caption_scene")
    parsed = np.array([data.parse_caption(data.decode_tokens(tok, row[0])) for row in tiny_world.array("web", "tokens")])
    assert (parsed == described).all()
    assert ((corruption == 0) == (described == scene)).all()
    n, rate = len(corruption), TINY.world.web_noise
    assert abs((corruption > 0).mean() - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
    assert set(np.unique(corruption)) <= set(range(len(data.CORRUPTIONS)))


def test_novel_shapes_are_never_named(tiny_world):
    tok = tiny_world.tokenizer
    for split in ("train", "val", "test", "web"):
        for row in tiny_world.array(split, "tokens").reshape(-1, tiny_world.context_length):
            assert not set(data.decode_tokens(tok, row).split()) & set(data.NOVEL_SHAPES)
    first = tiny_world.array("novel_train", "objects")[:, 0, 0]
    assert (first >= len(data.SHAPES)).all()


def test_multi_image_answers_follow_from_the_objects(tiny_world):
    """Recompute each answer from the stored objects (boxes and attributes) of the images."""
    tok = tiny_world.tokenizer
    for split in ("multi_train", "multi_val"):
        sets, objects = tiny_world.array(split, "sets"), tiny_world.array(split, "objects")
        for ids, qtype, q, a in zip(sets, tiny_world.array(split, "qtype"), tiny_world.array(split, "question"),
                                    tiny_world.array(split, "answer")):
            q, a = data.decode_tokens(tok, q), data.decode_tokens(tok, a)
            imgs = [[o for o in objects[i] if o[0] >= 0] for i in ids if i >= 0]
            assert 2 <= len(imgs) <= TINY.world.max_images
            kind = data.QTYPES[qtype]
            if kind == "count":
                word = q.split()[2]
                if word in data.COLOUR_NAMES:
                    expect = sum(o[1] == data.COLOUR_NAMES.index(word) for im in imgs for o in im)
                else:
                    shape = next(s for s in data.SHAPES if data.PLURALS.get(s, s + "s") == word)
                    expect = sum(o[0] == data.SHAPES.index(shape) for im in imgs for o in im)
                assert a == str(expect)
            elif kind == "most":
                assert a == f"image {int(np.argmax([len(im) for im in imgs])) + 1}"
            elif kind == "largest":
                assert a == f"image {[any(o[2] == 1 for o in im) for im in imgs].index(True) + 1}"
            elif kind == "change":
                (before, after), key = imgs, lambda o: tuple(o[:3])
                if len(after) != len(before):
                    assert a == ("added" if len(after) > len(before) else "removed")
                else:
                    changed = [(b, c) for b, c in zip(before, after) if tuple(b) != tuple(c)]
                    assert len(changed) == 1
                    b, c = changed[0]
                    assert a == ("colour" if b[1] != c[1] else "shape" if b[0] != c[0] else "position"), (b, c)
                    if a == "position":
                        assert key(b) == key(c)
            else:
                widths = [im[0][5] - im[0][3] for im in imgs]
                centres = [((im[0][3] + im[0][5]) / 2, (im[0][4] + im[0][6]) / 2) for im in imgs]
                if a == "grows":
                    assert widths == sorted(widths) and widths[-1] > widths[0]
                elif a == "shrinks":
                    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0]
                else:  # the same object (box width up to a pixel of rounding) moving one way
                    assert a == "moves" and max(widths) - min(widths) <= 1
                    xs, ys = zip(*centres)
                    assert any(list(v) in (sorted(v), sorted(v, reverse=True)) and v[0] != v[-1] for v in (xs, ys))


def test_tokenizer_round_trips_and_is_a_tiktoken_file(tiny_world):
    enc = tiny_world.tokenizer
    path = os.path.join(tiny_world.path, "tokenizer.tiktoken")
    assert load_tiktoken_bpe(path) == data.bpe_from_text(tiny_world.bpe_text)  # tiktoken reads our file
    for text in ["a small red circle above a large blue square", "Ünïcode, digits 123 and emoji 🙂!", ""]:
        assert enc.decode(enc.encode_ordinary(text)) == text
    words = {w for t in data.TEMPLATES[3] for w in t.replace(",", "").replace(":", "").split() if "{" not in w}
    words |= set(data.SHAPES) | set(data.COLOUR_NAMES) | set(data.SIZES)
    for w in words:
        assert len(enc.encode_ordinary(" " + w)) == 1, f"{w!r} is not one token"
    specials = [enc.encode_single_token(t) for t in data.SPECIAL_TOKENS]
    assert len(set(specials)) == len(specials) and min(specials) >= enc.n_vocab - len(specials)
    rows = data.encode_texts(enc, ["a small red circle", "there is a large white ring"], 12)
    assert rows[0, 0] == enc.encode_single_token(data.BOS)
    assert [data.decode_tokens(enc, r) for r in rows] == ["a small red circle", "there is a large white ring"]
    with pytest.raises(ValueError, match="does not fit"):
        data.encode_texts(enc, ["a small red circle " * 10], 12)


def gpt2_cached():
    """tiktoken keeps downloaded files under a hash of their URL (tiktoken/load.py)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    urls = ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]
    return all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls)


@pytest.mark.skipif(not gpt2_cached(), reason="tiktoken's gpt2 files are not cached and the build machines have no network")
def test_gpt2_tokenizer_has_our_special_tokens():
    enc = data.get_tokenizer("gpt2")
    assert enc.encode_single_token(data.EOS) == 50256  # GPT-2's own end token is kept
    assert enc.decode(enc.encode_ordinary("a photo of a cat")) == "a photo of a cat"
    assert len({enc.encode_single_token(t) for t in data.SPECIAL_TOKENS}) == len(data.SPECIAL_TOKENS)
    assert tiktoken.get_encoding("gpt2").encode_ordinary("hello world") == enc.encode_ordinary("hello world")


def test_batches_are_disjoint_across_ranks_and_cover_each_epoch(tiny_world):
    n, B, W = 50, 8, 2
    seen = np.concatenate([data.batch_indices(n, B, s, seed=3, rank=r, world_size=W) for s in range(6) for r in range(W)])
    # 6 steps * 2 ranks * 8 = 96 draws: the first 50 are one permutation, the rest a new one
    assert sorted(seen[:n]) == list(range(n)) and len(set(seen[n:])) == len(seen[n:])
    step0 = [set(data.batch_indices(n, B, 0, 3, r, W)) for r in range(W)]
    assert not step0[0] & step0[1]
    assert (data.batch_indices(n, B, 4, 3, 1, W) == data.batch_indices(n, B, 4, 3, 1, W)).all()
    idx, cap = np.array([5, 2, 9]), np.array([1, 0, 3])
    images, tokens = tiny_world.image_text_batch("train", idx, cap)
    assert (images == tiny_world.array("train", "images")[[5, 2, 9]]).all()
    assert (tokens == np.stack([tiny_world.array("train", "tokens")[i, c] for i, c in zip(idx, cap)])).all()


def test_a_split_step_reads_the_samples_and_captions_of_the_whole_batch():
    """2 ranks x 2 micro-batches of 4, rank by rank: the rows, and their captions, of one
    process's batch of 16 at the same optimizer step, across an epoch boundary (n = 20)."""
    n, B, W, k = 20, 4, 2, 2
    for step in range(3):
        whole = data.batch_indices(n, B * W * k, step, seed=5, n_captions=5)
        parts = [data.batch_indices(n, B, step * k + i, 5, r, W, k, n_captions=5) for r in range(W) for i in range(k)]
        assert (np.concatenate([p[0] for p in parts]) == whole[0]).all()
        assert (np.concatenate([p[1] for p in parts]) == whole[1]).all()
    assert len(set(whole[1])) > 1  # the captions are drawn, not all the first


def test_load_image_reads_every_common_mode(tmp_path):
    S = 16
    rgb = np.zeros((20, 24, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).quantize(4).save(tmp_path / "p.png")
    Image.fromarray(np.full((20, 24), 100, np.uint8)).save(tmp_path / "l.png")
    Image.fromarray(np.full((20, 24), 65535, np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray(np.concatenate([rgb, np.full((20, 24, 1), 255, np.uint8)], -1)).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    expect = {"rgb.png": (200, 0, 0), "p.png": (200, 0, 0), "l.png": (100, 100, 100), "i16.png": (255, 255, 255),
              "rgba.png": (200, 0, 0), "cmyk.jpg": (200, 0, 0)}
    for name, colour in expect.items():
        im = prepare.load_image(str(tmp_path / name), S)
        assert im.shape == (S, S, 3) and im.dtype == np.uint8
        assert np.abs(im.astype(int) - colour).max() <= 3, name
    with pytest.raises(ValueError, match="not found"):
        prepare.load_image(str(tmp_path / "missing.png"), S)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="bad.png"):
        prepare.load_image(str(tmp_path / "bad.png"), S)


def test_visual_codebook_gives_every_patch_its_nearest_centroid(tiny_world):
    p, K = 16, 16
    data.prepare_codebook(tiny_world.path, p, K, log=lambda *a: None)
    book = tiny_world.codebook(p, K)
    assert book.shape == (K, 3 * p * p) and book.min() >= 0 and book.max() <= 1
    for split in ("train", "val", "test", "web"):
        images, codes = tiny_world.array(split, "images"), tiny_world.codes(split, p, K)
        assert codes.shape == (len(images), (images.shape[1] // p) ** 2)
        patches = data.patchify(images[:20], p)  # brute force: the nearest centroid of each patch
        want = ((patches[:, :, None, :] - book[None, None]) ** 2).sum(-1).argmin(-1)
        assert (codes[:20] == want).mean() > 0.99  # float ties aside
    # one patch per pattern: the uniform background (each image its own tint) is one code, where
    # k-means over every patch spends several on its tints
    patches = data.patchify(tiny_world.array("train", "images"), p)
    background = patches.reshape(*patches.shape[:2], -1, 3).std(2).max(-1) < 0.01
    assert np.bincount(tiny_world.codes("train", p, K)[background]).max() >= 0.99 * background.sum()
    flat = patches.reshape(-1, 3 * p * p)
    plain = data.nearest_code(flat, data.kmeans(flat, K, 15, np.random.default_rng(0)))
    assert len(np.unique(plain[background.ravel()])) >= 3
    # prepared once: a second call finds it and changes nothing
    stamp = os.path.getmtime(os.path.join(tiny_world.path, f"train.{data.codebook_name(p, K)}.npy"))
    data.prepare_codebook(tiny_world.path, p, K, log=lambda *a: None)
    assert os.path.getmtime(os.path.join(tiny_world.path, f"train.{data.codebook_name(p, K)}.npy")) == stamp

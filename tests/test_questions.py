"""Question sets generated from captions alone (prepare.py questions): the caption reader against explicit
objects, and on the shapes world every generated answer against the answer its scene records give."""
import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import data
import prepare
import train
from conftest import TINY


@pytest.mark.parametrize("caption, objects", [
    ("a small purple diamond above a large cyan cross",
     [(1, "small", "purple", "diamond"), (1, "large", "cyan", "cross")]),
    ("from bottom to top: a large green circle, a small red square and a small purple diamond",
     [(1, "large", "green", "circle"), (1, "small", "red", "square"), (1, "small", "purple", "diamond")]),
    ("an image with a small white ring", [(1, "small", "white", "ring")]),  # 'ring' is a noun, not a verb
    ("A man riding a wave on top of a surfboard.", [(1, None, None, "man"), (1, None, None, "wave"),
                                                    (1, None, None, "surfboard")]),
    ("Two dogs are playing with a red frisbee in the park",
     [(2, None, None, "dog"), (1, None, "red", "frisbee"), (None, None, None, "park")]),
    ("three small crosses and the big brown ponies", [(3, "small", None, "cross"), (None, "large", "brown", "pony")]),
    ("a photo of 2 black cats sitting on a bench", [(2, None, "black", "cat"), (1, None, None, "bench")]),
    ("sunset over the sea", [(None, None, None, "sea")]),
    ("a picture", []),  # the frame, not an object
])
def test_caption_reader_finds_each_noun_phrase(caption, objects):
    assert prepare.caption_objects(caption) == objects


def test_plural_and_singular_round_trip_the_world_shapes():
    for name in data.ALL_SHAPES:
        assert prepare.plural(name) == data.PLURALS.get(name, name + "s")
        assert prepare.singular(prepare.plural(name)) == name


def world_answer(qtype, question, records):
    """The answer the scene records give to a generated question; records: each image's (shape, colour, size)."""
    def obj(words):  # 'red circle' -> (shape, colour)
        colour, shape = words.split()
        return data.ALL_SHAPES.index(shape), data.COLOUR_NAMES.index(colour)
    if qtype == "count":
        word = question.split()[2]
        objs = [o for r in records for o in r]
        if word in data.COLOUR_NAMES:
            return str(sum(o[1] == data.COLOUR_NAMES.index(word) for o in objs))
        shape = next(s for s in data.SHAPES if data.PLURALS.get(s, s + "s") == word)
        return str(sum(o[0] == data.SHAPES.index(shape) for o in objs))
    if qtype == "most":
        n = [len(r) for r in records]
        assert n.count(max(n)) == 1
        return f"image {n.index(max(n)) + 1}"
    if qtype == "largest":
        big = [k for k, r in enumerate(records) if any(o[2] == 1 for o in r)]
        assert len(big) == 1
        return f"image {big[0] + 1}"
    if qtype == "which":
        s, c = obj(question.removeprefix("which image shows the ").removesuffix("?"))
        where = [k for k, r in enumerate(records) if any(o[0] == s for o in r)]
        assert len(where) == 1 and any(o[:2] == (s, c) for o in records[where[0]])
        return f"image {where[0] + 1}"
    if qtype == "order":
        a, b = (obj(w) for w in question.removeprefix("is the ").removesuffix("?").split(" before the "))
        at = [next(k for k, r in enumerate(records) if any(o[:2] == x for o in r)) for x in (a, b)]
        return "yes" if at[0] < at[1] else "no"
    assert qtype == "change" and len(records) == 2
    before, after = Counter(records[0]), Counter(records[1])
    if before == after:  # the same objects: only their places can differ
        return "position"
    if sum(after.values()) != sum(before.values()):
        return "added" if sum(after.values()) > sum(before.values()) else "removed"
    (x,), (y,) = before - after, after - before  # exactly one object differs
    assert x[2] == y[2] and (x[0] == y[0]) != (x[1] == y[1])
    return "colour" if x[0] == y[0] else "shape"


@pytest.fixture(scope="module")
def exported(tiny_world, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("export") / "coco")
    prepare.main(["export", "--data", tiny_world.path, "--split", "train", "--out", folder])
    return folder


def test_export_writes_the_split_as_a_coco_folder(tiny_world, exported):
    doc = json.load(open(os.path.join(exported, "captions.json")))
    assert [im["id"] for im in doc["images"]] == list(range(tiny_world.split_size("train")))
    assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"])
    for k in (0, 7, 300):
        pixels = np.asarray(Image.open(os.path.join(exported, "images", doc["images"][k]["file_name"])))
        np.testing.assert_array_equal(pixels, tiny_world.array("train", "images")[k])  # PNG: lossless
        captions = [a["caption"] for a in doc["annotations"] if a["image_id"] == k]
        decoded = [data.decode_tokens(tiny_world.tokenizer, r) for r in tiny_world.array("train", "tokens")[k]]
        assert captions == list(dict.fromkeys(decoded))
    with pytest.raises(SystemExit, match="exists"):
        prepare.main(["export", "--data", tiny_world.path, "--out", exported])


def question_args(tiny_world, exported, out, *extra):
    m = TINY.model
    return ["questions", "--captions", os.path.join(exported, "captions.json"), "--images",
            os.path.join(exported, "images"), "--out", str(out), "--tokenizer", tiny_world.path, "--image_size",
            str(m.image_size), "--context_length", str(m.context_length), "--workers", "1", "--sets", "300",
            "--val_sets", "40", "--val_fraction", "0.2", *extra]


def test_every_generated_answer_is_what_the_scene_records_say(tiny_world, exported, tmp_path):
    """The world's captions name every object, so each answer read from them must equal the ground truth's."""
    args = prepare.parse_args(question_args(tiny_world, exported, tmp_path / "q"))
    args.tokenizer = prepare.load_tokenizer(args.tokenizer)
    report = prepare.Report()
    sets = prepare.generated_sets(args, report)
    objects = tiny_world.array("train", "objects")
    rows = lambda path: [tuple(int(v) for v in o) for o in objects[int(os.path.basename(path)[:6])]  # noqa: E731
                         if o[0] >= 0]
    records = lambda path: [o[:3] for o in rows(path)]  # noqa: E731
    train_images = {p for s in sets["multi_train"] for p in s[0]}
    assert not train_images & {p for s in sets["multi_val"] for p in s[0]}  # val sets use held-out images only
    assert len(sets["multi_train"]) == 300 and len(sets["multi_val"]) == 40
    types = Counter(t for *_, t in sets["multi_train"])
    assert set(types) == set(prepare.GEN_QTYPES) and max(types.values()) - min(types.values()) <= 1
    for paths, question, answer, qtype in sets["multi_train"] + sets["multi_val"]:
        if qtype == "free":
            assert question == "" and len(paths) == 1
            assert data.parse_caption(answer) == tiny_world.array("train", "scene")[int(os.path.basename(paths[0])[:6])]
        else:
            assert 2 <= len(paths) <= 4 and len(set(paths)) == len(paths)
            assert answer == world_answer(qtype, question, [records(p) for p in paths]), (qtype, question)
            if answer == "position":  # and the places did differ: some object has no twin at the same box
                assert sorted(rows(paths[0])) != sorted(rows(paths[1]))
    assert {a for *_, a, t in sets["multi_train"] if t == "change"} <= set(data.CHANGES)


@pytest.mark.parametrize("caption, layout", [
    ("a small purple diamond above a large cyan cross",
     (2, ((1, "small", "purple", "diamond"), (1, "large", "cyan", "cross")))),
    ("a large red ring right of a small blue cross", (1, ((1, "small", "blue", "cross"), (1, "large", "red", "ring")))),
    ("from right to left: a red ring, a blue cross and a cat",
     (1, ((1, None, None, "cat"), (1, None, "blue", "cross"), (1, None, "red", "ring")))),
    ("a cat beneath a table", (2, ((1, None, None, "table"), (1, None, None, "cat")))),
    ("a small white ring", None),  # one object: no layout
    ("two dogs left of a cat", None),  # which dog?
    ("a dog under a table left of a cat", None),  # two layout phrases
])
def test_caption_layout_names_the_objects_along_their_axis(caption, layout):
    assert prepare.caption_layout(caption) == layout


def test_change_pairs_differ_in_the_one_thing_their_answer_names():
    """Hand-written captions: every kind of change is made, each pair's objects differ in just what it names."""
    captions = ["a red ring left of a blue cross", "a red ring above a blue cross", "a blue cross left of a red ring",
                "a green ring left of a blue cross", "a red star left of a blue cross", "a red ring",
                "a red ring, a blue cross and a moon from left to right", "a small red ring left of a blue cross"]
    images = [([c], prepare.caption_objects(c)) for c in captions]
    fits = lambda q, a: True  # noqa: E731
    made = prepare.question_sets(images, 400, 2, fits, np.random.default_rng(0), prepare.Report(), "t", ("change",))
    assert {a for *_, a, _ in made} == set(data.CHANGES)
    for (i, k), _, answer, _ in made:
        a, b = (Counter(o[1:] for o in images[x][1]) for x in (i, k))
        if answer == "position":
            assert a == b and prepare.caption_layout(captions[i]) != prepare.caption_layout(captions[k])
        elif answer in ("added", "removed"):
            small, big = (a, b) if answer == "added" else (b, a)
            assert big.total() == small.total() + 1 and not small - big
        else:
            (x,), (y,) = a - b, b - a
            field = 1 if answer == "colour" else 2  # (size, colour, noun): only that one differs
            assert [f for f in range(3) if x[f] != y[f]] == [field]
    assert all(7 not in ids for ids, *_ in made)  # 'small' names a size: no other caption differs from it in one
    pairs = {tuple(ids): answer for ids, _, answer, _ in made}
    assert (pairs[(0, 3)], pairs[(0, 6)], pairs[(6, 0)], pairs[(1, 5)]) == ("colour", "added", "removed", "removed")
    # the objects that stay keep their layout: 'above' against 'left of' is a second change
    assert not {(1, 3), (1, 4), (1, 6), (2, 3)} & {tuple(sorted(ids)) for ids in pairs}


def test_unreadable_images_are_skipped_and_counted(tiny_world, exported, tmp_path):
    """Every tenth image corrupt: each of the 300 sets drawn is kept or counted as skipped for an unusable image."""
    folder = tmp_path / "coco"
    shutil.copytree(exported, folder)
    names = sorted(os.listdir(folder / "images"))
    for name in names[::10]:  # every tenth image
        (folder / "images" / name).write_bytes(b"not a png")
    out = tmp_path / "q"
    prepare.main(question_args(tiny_world, str(folder), out, "--types", "change"))
    skipped = json.load(open(out / "report.json"))["splits"]["multi_train"]["skipped"]
    kept = data.Dataset(str(out)).meta["splits"]["multi_train"]
    assert skipped["unusable image"] > 0 and kept > 0 and kept + skipped["unusable image"] == 300


@pytest.mark.parametrize("a, b, before, after, kept", [
    ((1, ("r", "b")), (1, ("g", "b")), "r", "g", True),
    ((1, ("r", "b")), (2, ("g", "b")), "r", "g", False),  # another axis
    ((1, ("r", "b")), (1, ("b", "g")), "r", "g", False),  # another order
    ((1, ("r", "b", "m")), (1, ("r", "m")), "b", None, True),  # removed, the rest in order
    ((1, ("r", "b", "m")), (1, ("m", "r")), "b", None, False),
    (None, (1, ("m", "r")), "b", None, True),  # an unknown layout agrees with any
])
def test_kept_layout(a, b, before, after, kept):
    assert prepare.kept_layout(a, b, before, after) == kept


def test_types_chooses_the_question_types(tiny_world, exported, tmp_path, capsys):
    args = prepare.parse_args(question_args(tiny_world, exported, tmp_path / "q", "--types", "most,change"))
    args.tokenizer = prepare.load_tokenizer(args.tokenizer)
    sets = prepare.generated_sets(args, prepare.Report())
    assert [t for *_, t in sets["multi_train"]] == ["most", "change"] * 150
    with pytest.raises(SystemExit):
        prepare.parse_args(question_args(tiny_world, exported, tmp_path / "q", "--types", "most,colour"))
    assert "--types most,colour: each must be one of count, most" in capsys.readouterr().err


def test_generated_sets_prepare_and_train_the_instruct_stage(tiny_world, exported, tiny_run, tmp_path, world_root):
    out = tmp_path / "q"
    prepare.main(question_args(tiny_world, exported, out))
    ds = data.Dataset(str(out))
    assert ds.meta["kind"] == "multi" and set(ds.meta["qtypes"]) == set(prepare.GEN_QTYPES)
    free = ds.meta["qtypes"].index("free")
    question = ds.array("multi_train", "question")[ds.array("multi_train", "qtype") == free]
    ends = [ds.tokenizer.encode_single_token(t) for t in (data.BOS, data.EOS)]
    assert len(question) and (question[:, :2] == ends).all()  # an empty question: <bos> <eos>
    run = tmp_path / "run"
    train.main(["--config", "tiny", "--stage=instruct", f"--init_from={tiny_run}/ckpt.pt", f"--data={out}",
                f"--out_dir={run}", "--max_iters=3", "--eval_interval=1000000000"])
    metrics = json.load(open(run / "eval.json"))
    assert {f"instruct_acc_{t}" for t in prepare.GEN_QTYPES} <= set(metrics)


def test_captions_that_name_nothing_are_a_clear_error(tiny_world, tmp_path, capsys):
    folder = tmp_path / "coco"
    os.makedirs(folder / "images")
    images, annotations = [], []
    for i in range(12):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png"})
        annotations.append({"id": i, "image_id": i, "caption": "sunset"})
    json.dump({"images": images, "annotations": annotations}, open(folder / "captions.json", "w"))
    m = TINY.model
    with pytest.raises(SystemExit, match="captions of split 'multi_train' gave 0 question sets of the 5 asked"):
        prepare.main(["questions", "--captions", str(folder / "captions.json"), "--images", str(folder / "images"),
                      "--out", str(tmp_path / "q"), "--tokenizer", tiny_world.path, "--image_size", str(m.image_size),
                      "--context_length", str(m.context_length), "--sets", "5", "--val_sets", "2"])
    with pytest.raises(SystemExit):
        prepare.main(["questions", "--captions", "x", "--images", "y", "--out", "z", "--tokenizer", tiny_world.path,
                      "--image_size", "8", "--context_length", "24", "--max_images", "1"])
    assert "--max_images must be at least 2" in capsys.readouterr().err

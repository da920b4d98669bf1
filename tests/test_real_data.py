"""Real data: the pretrained tokenizers against transformers' own, and sources prepared into
datasets checked against the files they came from, with every bad input skipped for its reason."""

import codecs
import csv
import errno
import io
import json
import os
import random
import re
from collections import Counter

import numpy as np
import pytest
import tiktoken
import torch
from PIL import Image
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPTokenizer, GPT2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

import data
import hf as hf_io
import prepare as prep  # prep: this file's prepare() runs its command line
from prompt import connected_regions, true_boxes
from test_data import gpt2_cached

S, T = 16, 24  # image size and context length of every prepared set here

CORPUS = [
    "a photo of a dog running on the beach", "two cats sleeping on a red sofa", "a man riding a bike in the city",
    "the quick brown fox jumps over the lazy dog", "Don't stop: it's 3.5x faster (v2)!", "naïve café, résumé & Ünïcode",
    "A group of people standing around a table with food.", "She'll say they've gone; we'd know I'm right.",
    "12 apples, 7 oranges and 100 bananas", "a kitchen with white cabinets and a stainless steel refrigerator",
    "an airplane flying over snow covered mountains", "children playing football in a park at sunset",
    "which image is larger or red? how many dogs? what changed? image one, image two, the colour",
]
STRINGS = CORPUS + [
    "A photo, of   THE dog's café!  123", "Hello\tworld\n\nagain", "It's   WE'LL  they'd I'M", "e\u0301 combining",
    "x,y;z...!!?", "  leading and trailing  ", "", "12345 67.8", "emoji 🙂🙂 and 中文字符", "don't-stop—now",
    "$100 & 50% off #1 @home", "ÅNGSTRÖM straße ÉCOLE", "tabs\tand\u00a0non-breaking spaces", "''quotes'' \"double\"",
    "MiXeD CaSe WoRdS", "end.", "a", "zzz qqq xyzzy",
]


def train_vocab(texts, n_merges, clip):
    """vocab.json and merges.txt contents of a byte-level BPE learned from texts as CLIP's and
    GPT-2's files are laid out: the 256 byte characters (for CLIP, then each with '</w>'), one
    token per merge (the most frequent adjacent pair whose join is new), then the specials."""
    table = bytes_to_unicode()
    counts = Counter()
    for text in texts:
        for word in (text.lower().split() if clip else [" " + w for w in text.split()]):
            chars = [table[b] for b in word.encode("utf-8")]
            counts[tuple(chars[:-1] + [chars[-1] + "</w>"]) if clip else tuple(chars)] += 1
    vocab = list(table.values()) + ([c + "</w>" for c in table.values()] if clip else [])
    known, merges, words = set(vocab), [], dict(counts)
    while len(merges) < n_merges:
        pairs = Counter()
        for w, f in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += f
        new = [(f, p) for p, f in pairs.items() if p[0] + p[1] not in known]
        if not new:
            break
        best = max(new)[1]
        merges.append(best)
        known.add(best[0] + best[1])
        vocab.append(best[0] + best[1])
        joined = {}
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            joined[tuple(out)] = joined.get(tuple(out), 0) + f
        words = joined
    vocab += ["<|startoftext|>", "<|endoftext|>"] if clip else ["<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def write_vocab(folder, vocab, merges):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return str(folder)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("clip"), *train_vocab(CORPUS * 3, 300, clip=True))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("gpt2"), *train_vocab(CORPUS * 3, 300, clip=False))


@pytest.fixture(scope="module")
def enc(clip_dir):
    return data.get_tokenizer(*hf_io.hf_tokenizer(clip_dir))


# -----------------------------------------------------------------------------
# tokenizers


def test_clip_tokenizer_gives_transformers_ids(clip_dir):
    kind, text = hf_io.hf_tokenizer(clip_dir)
    enc, hf = data.get_tokenizer(kind, text), CLIPTokenizer.from_pretrained(clip_dir)
    assert kind == "clip" and hf_io.bytes_to_unicode() == bytes_to_unicode()
    n = len(hf.get_vocab()) - 2
    specials = [enc.encode_single_token(t) for t in (data.BOS, data.EOS, data.PAD, data.MASK, data.GLOB)]
    assert specials == [hf.bos_token_id, hf.eos_token_id, n + 2, n + 3, n + 4] == list(range(n, n + 5))
    assert enc.n_vocab == n + 5
    for s in STRINGS:
        ids = hf(s, add_special_tokens=False)["input_ids"]
        assert enc.encode_ordinary(s) == ids, s
        assert enc.decode(ids) == hf.decode(ids), s
        assert enc.encode_ordinary(enc.decode(ids)) == ids, s  # decoding loses only what cleaning drops
    rows = data.encode_texts(enc, STRINGS[:4], 64)
    assert rows[:, 0].tolist() == [hf.bos_token_id] * 4
    assert [data.decode_tokens(enc, r) for r in rows] == [hf.decode(hf(s)["input_ids"], skip_special_tokens=True)
                                                          for s in STRINGS[:4]]
    # OpenAI CLIP's cleaning also unescapes HTML, which Hugging Face's does not
    assert enc.encode_ordinary("fish &amp;amp; chips") == enc.encode_ordinary("fish & chips")
    assert enc.encode("<|startoftext|>a dog", allowed_special="all") == [hf.bos_token_id] + enc.encode_ordinary("a dog")


def test_gpt2_tokenizer_gives_transformers_ids(gpt2_dir, monkeypatch):
    kind, text = hf_io.hf_tokenizer(gpt2_dir)
    enc, hf = data.get_tokenizer(kind, text), GPT2Tokenizer.from_pretrained(gpt2_dir)
    assert kind == "gpt2" and enc.encode_single_token(data.EOS) == hf.eos_token_id == len(hf.get_vocab()) - 1
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's own reading of the files, not cached
    ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(gpt2_dir, "merges.txt"), os.path.join(gpt2_dir, "vocab.json"))
    assert data.bpe_from_text(text) == ranks
    for s in STRINGS:
        ids = hf(s, add_special_tokens=False)["input_ids"]
        assert enc.encode_ordinary(s) == ids, s
        assert enc.decode(ids) == s  # byte-level: lossless


@pytest.mark.skipif(not gpt2_cached(), reason="tiktoken's gpt2 files are not cached and the build machines have no network")
def test_tiktoken_gpt2_file_is_stored_as_ranks_text():
    kind, text = hf_io.load_tokenizer("gpt2")
    ours, theirs = data.get_tokenizer(kind, text), data.get_tokenizer("gpt2")
    assert kind == "gpt2" and ours.n_vocab == theirs.n_vocab == 50261
    for s in STRINGS:
        assert ours.encode_ordinary(s) == theirs.encode_ordinary(s) == tiktoken.get_encoding("gpt2").encode_ordinary(s)


def test_a_saved_tokenizer_json_gives_the_same_ranks(tmp_path, clip_dir, gpt2_dir):
    for folder, cls in ((clip_dir, CLIPTokenizer), (gpt2_dir, GPT2Tokenizer)):
        saved = str(tmp_path / os.path.basename(folder))
        cls.from_pretrained(folder).save_pretrained(saved)  # transformers 5 writes tokenizer.json only
        assert not os.path.exists(os.path.join(saved, "vocab.json"))
        assert hf_io.hf_tokenizer(saved) == hf_io.hf_tokenizer(folder)


def test_hf_tokenizer_errors_name_the_source(tmp_path, gpt2_dir, monkeypatch):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vocab.json").write_text("{}")
    with pytest.raises(ValueError, match="half has no merges.txt, nor tokenizer.json"):
        hf_io.hf_tokenizer(str(tmp_path / "half"))
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ValueError, match="'someone/some-clip' is not a directory.*OSError: no network"):
        hf_io.hf_tokenizer("someone/some-clip")
    vocab = json.load(open(os.path.join(gpt2_dir, "vocab.json"), encoding="utf-8"))
    merges = open(os.path.join(gpt2_dir, "merges.txt"), encoding="utf-8").read().split("\n")
    a, b = merges[1].replace(" ", ""), merges[2].replace(" ", "")
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two merged tokens numbered out of merge order
    write_vocab(tmp_path / "swapped", vocab, [tuple(m.split()) for m in merges[1:] if m])
    with pytest.raises(ValueError, match="swapped: not a byte-level BPE tokenizer: .*merge order"):
        hf_io.hf_tokenizer(str(tmp_path / "swapped"))


def test_tokenizer_files_are_the_hugging_face_ones_and_read_back(tmp_path, clip_dir, gpt2_dir):
    """hf_tokenizer_files writes back the vocab.json and merges.txt the tokenizer was read from,
    token for token; transformers loads them with our ids; the world's BPE goes out as GPT-2's.
    With tokenizer_config.json, AutoTokenizer (beside a CLIP's config.json, as in an export)
    pads texts into our rows: <bos> text <eos> <pad>..."""
    world = data.bpe_to_text(data.train_bpe(CORPUS))
    for folder, cls, kind in ((clip_dir, CLIPTokenizer, "clip"), (gpt2_dir, GPT2Tokenizer, "gpt2"),
                              (None, GPT2Tokenizer, "bpe")):
        text = world if folder is None else hf_io.hf_tokenizer(folder)[1]
        out = str(tmp_path / kind)
        assert hf_io.hf_tokenizer_files(kind, text, out) == \
            [os.path.join(out, n) for n in ("vocab.json", "merges.txt", "tokenizer_config.json")]
        assert hf_io.hf_tokenizer(out) == ("gpt2" if kind == "bpe" else kind, text)
        if folder is not None:
            read = [[open(os.path.join(f, n), encoding="utf-8").read() for n in ("vocab.json", "merges.txt")]
                    for f in (folder, out)]
            assert json.loads(read[0][0]) == json.loads(read[1][0]) and read[0][1] == read[1][1]
        enc, hf = data.get_tokenizer(kind, text), cls.from_pretrained(out)
        assert hf.eos_token_id == enc.encode_single_token(data.EOS)
        assert kind != "clip" or hf.bos_token_id == enc.encode_single_token(data.BOS)
        for s in STRINGS:
            assert hf(s, add_special_tokens=False)["input_ids"] == enc.encode_ordinary(s), (kind, s)
        CLIPConfig().save_pretrained(out)  # model_type 'clip': the tokenizer's class comes from its own config
        auto = AutoTokenizer.from_pretrained(out)
        assert type(auto).__name__ == hf_io.HF_TOKENIZER_CLASSES[kind]
        rows = auto(STRINGS, padding="max_length", max_length=T * 4)["input_ids"]
        assert rows == data.encode_texts(enc, STRINGS, T * 4).tolist(), kind
        assert [auto.convert_ids_to_tokens(enc.encode_single_token(t)) for t in data.SPECIAL_TOKENS] == \
            list(data.SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="unknown tokenizer 'sentencepiece'"):
        hf_io.hf_tokenizer_files("sentencepiece", world, str(tmp_path / "sp"))
    ranks = {bytes([b]): b for b in range(256)}
    with pytest.raises(ValueError, match=r"gpt2 token b'abc' \(rank 256\) is not one join of two lower ranked tokens"):
        hf_io.hf_tokenizer_files("gpt2", data.bpe_to_text({**ranks, b"abc": 256}), str(tmp_path / "no-join"))


# -----------------------------------------------------------------------------
# images


@pytest.mark.parametrize("height,width", [(480, 640), (333, 500), (224, 225), (100, 50), (500, 333), (227, 1000)])
def test_images_are_cropped_as_clip_image_processor_crops_them(tmp_path, height, width):
    """load_image's pixels are those of transformers' CLIP image processor (its PIL backend:
    shorter side to 224 bicubic, the longer rounded down, centre crop) before rescaling."""
    path = save(tmp_path, "image.png", rgb(height * width, height, width))
    processor = CLIPImageProcessorPil(do_rescale=False, do_normalize=False)
    assert processor.size.shortest_edge == 224 and processor.crop_size.height == processor.crop_size.width == 224
    assert processor.resample == Image.BICUBIC and processor.do_resize and processor.do_center_crop
    pixels = processor(Image.open(path), return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == np.uint8
    assert np.array_equal(prep.load_image(path, 224), pixels[0].transpose(1, 2, 0))


# -----------------------------------------------------------------------------
# captioned sources


def rgb(seed, h=S, w=S):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(folder, name, array, mode=None, **kwargs):
    path = os.path.join(folder, name)
    Image.fromarray(array, mode).save(path, **kwargs)
    return path


def prepare(clip_dir, *argv, workers=1):
    prep.main([*argv, "--tokenizer", clip_dir, "--image_size", str(S), "--context_length", str(T),
               "--workers", str(workers)])


def read_report(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def check_captions(ds, split, files, captions, enc, C=5):
    """The split's arrays against the source: pixels as load_image reads each file, the first
    C captions of each image encoded in its slots and then repeated, their counts, scenes, and
    the captions as written (captions.json)."""
    assert ds.split_size(split) == len(files)
    assert ds.captions(split) == [list(caps[:C]) for caps in captions]
    for i, (file, caps) in enumerate(zip(files, captions)):
        n = min(len(caps), C)
        assert np.array_equal(ds.array(split, "images")[i], prep.load_image(file, S))
        assert np.array_equal(ds.array(split, "tokens")[i], data.encode_texts(enc, [caps[j % n] for j in range(C)], T))
        assert [data.decode_tokens(enc, r) for r in ds.array(split, "tokens")[i]] == [caps[j % n] for j in range(C)]
        assert ds.array(split, "n_captions")[i] == n
    assert ds.array(split, "scene").tolist() == list(range(len(files)))


def links_work(folder):
    """Whether the file system of folder makes hard links."""
    try:
        open(os.path.join(folder, "link-src"), "w").close()
        os.link(os.path.join(folder, "link-src"), os.path.join(folder, "link-dst"))
        return True
    except OSError:
        return False
    finally:
        for name in ("link-src", "link-dst"):
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))


def test_coco_split_matches_its_files_and_val_is_added(tmp_path, clip_dir, enc, monkeypatch):
    root = tmp_path / "coco"
    os.makedirs(root / "train2017")
    os.makedirs(root / "val2017")
    shapes = {"a.png": (S, S), "b.jpg": (30, 20), "c.png": (24, 40), "d.png": (S, S)}
    files = [save(root / "train2017", name, rgb(k, *hw)) for k, (name, hw) in enumerate(shapes.items())]
    caps = [["a red square", "a photo of red"], [f"caption number {w}" for w in "one two three four five six seven".split()],
            [f"the {w} picture" for w in ("first", "second", "third", "fourth", "fifth")], ["a lonely image"]]
    anns = [{"id": 10 * i + j, "image_id": 100 + i, "caption": c} for i, cs in enumerate(caps) for j, c in enumerate(cs)]
    anns.sort(key=lambda a: a["id"] % 10)  # the images' captions interleaved, each image's in order
    images = [{"id": 100 + i, "file_name": name, "width": 1, "height": 1} for i, name in enumerate(shapes)]
    train_json = write_json(root / "captions_train2017.json", {"images": images, "annotations": anns})
    out = str(tmp_path / "out")
    prepare(clip_dir, "coco", "--captions", train_json, "--images", str(root / "train2017"), "--out", out)
    ds = data.Dataset(out)
    assert ds.meta["kind"] == "captions" and ds.meta["splits"] == {"train": 4} and ds.meta["tokenizer"]["kind"] == "clip"
    check_captions(ds, "train", files, caps, enc)
    assert read_report(out)["splits"]["train"]["kept"] == {"images": 4, "captions": 13, "captions_unused": 2}
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out) if f.startswith("train.")}
    inodes = {f: os.stat(os.path.join(out, f)).st_ino for f in before}
    assert set(before) == {f"train.{k}.npy" for k in ("images", "tokens", "n_captions", "scene")} | {"train.captions.json"}

    val_files = [save(root / "val2017", f"v{k}.png", rgb(10 + k, 18, 18)) for k in range(2)]
    val_caps = [["a blue dog"], ["two birds", "three birds"]]
    val_json = write_json(root / "captions_val2017.json", {
        "images": [{"id": k, "file_name": f"v{k}.png"} for k in range(2)],
        "annotations": [{"image_id": k, "caption": c} for k, cs in enumerate(val_caps) for c in cs]})
    prepare(clip_dir, "coco", "--captions", val_json, "--images", str(root / "val2017"), "--split", "val", "--out", out)
    ds = data.Dataset(out)
    assert ds.meta["splits"] == {"train": 4, "val": 2} and set(read_report(out)["splits"]) == {"train", "val"}
    check_captions(ds, "val", val_files, val_caps, enc)
    assert before == {f: open(os.path.join(out, f), "rb").read() for f in before}  # train kept as it was
    if links_work(tmp_path):  # else copied
        assert inodes == {f: os.stat(os.path.join(out, f)).st_ino for f in before}  # linked, not copied

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", no_link)
    prepare(clip_dir, "coco", "--captions", val_json, "--images", str(root / "val2017"), "--split", "val", "--out", out)
    assert before == {f: open(os.path.join(out, f), "rb").read() for f in before}  # copied where links fail
    assert not set(inodes.values()) & {os.stat(os.path.join(out, f)).st_ino for f in before}
    check_captions(data.Dataset(out), "val", val_files, val_caps, enc)
    monkeypatch.undo()

    par = str(tmp_path / "parallel")
    prepare(clip_dir, "coco", "--captions", train_json, "--images", str(root / "train2017"), "--out", par, workers=2)
    assert before == {f: open(os.path.join(par, f), "rb").read() for f in before}  # worker processes: the same bytes


def test_karpathy_restval_joins_train(tmp_path, clip_dir, enc):
    for folder in ("train2014", "val2014"):
        os.makedirs(tmp_path / folder)
    entries, expected = [], {"train": [], "val": [], "test": []}
    for k, (split, folder) in enumerate([("train", "train2014"), ("restval", "val2014"), ("val", "val2014"),
                                         ("test", "val2014"), ("train", "train2014")]):
        path = save(tmp_path / folder, f"img{k}.jpg", rgb(k, 20, 24))
        sentences = [{"raw": f"picture {w} of {k}", "tokens": []} for w in ("one", "two")[:1 + k % 2]]
        if k == 4:
            sentences.append({"tokens": ["no", "raw"]})
        entries.append({"filepath": folder, "filename": f"img{k}.jpg", "split": split, "sentences": sentences})
        expected["train" if split == "restval" else split].append((path, [s["raw"] for s in sentences if "raw" in s]))
    entries += [{"filepath": "val2014", "filename": "img3.jpg", "split": "test"},
                {"filepath": "val2014", "filename": "img3.jpg", "split": "other", "sentences": []},
                {"filepath": "val2014", "split": "train", "sentences": [{"raw": "no file"}]}]
    split_file = write_json(tmp_path / "dataset_coco.json", {"images": entries, "dataset": "coco"})
    out = str(tmp_path / "out")
    prepare(clip_dir, "karpathy", "--json", split_file, "--images", str(tmp_path), "--out", out)
    ds = data.Dataset(out)
    assert ds.meta["splits"] == {"train": 3, "val": 1, "test": 1}
    for split, items in expected.items():
        check_captions(ds, split, *zip(*items), enc)
    report = read_report(out)
    assert report["skipped"] == {"sentence without raw": 1, "entry without sentences": 1,
                                 "entry without a known split": 1, "entry without filename": 1}
    assert report["splits"]["(no split)"]["skipped"] == {"entry without a known split": 1}


def write_table(path, rows):
    """rows: dicts, or bytes written as they are (a broken line)."""
    if str(path).endswith(".jsonl"):
        lines = [r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode() for r in rows]
    else:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["caption", "image"])
        lines = [buf.getvalue().encode()]
        for r in rows:
            buf = io.StringIO()
            if not isinstance(r, bytes):
                csv.writer(buf).writerow([r.get("caption", ""), r.get("image", "")])
            lines.append(r if isinstance(r, bytes) else buf.getvalue().encode())
    with open(path, "wb") as f:
        f.write(b"".join(lines))
    return str(path)


def table_of(items):
    """{split: {image path: captions in order}} of prepared items."""
    return {split: dict(images) for split, images in items.items()}


def test_tables_group_rows_and_hold_out_val_by_path(tmp_path, clip_dir, enc):
    os.makedirs(tmp_path / "img")
    files = [save(tmp_path / "img", f"i{k}.png", rgb(k, 20, 20)) for k in range(12)]
    rows = [{"image": f"img/i{k}.png" if k % 3 else files[k], "caption": f"image {w} caption {j}"}
            for j in range(3) for k, w in enumerate("zero one two three four five six seven eight nine ten eleven".split())
            if k % 4 >= j]
    bad = [b'{"image": "img/i0.png", "caption": "caf\xe9"}\n', b"not json at all\n", b"[1, 2]\n",
           {"image": "img/i1.png"}, {"caption": "a caption without its image"}, b"\n"]
    jsonl = write_table(tmp_path / "captions.jsonl", rows + bad)
    items = prep.table_items(jsonl, prep.Report(), val_fraction=0.5)
    groups = {path: [r["caption"] for r in rows if os.path.join(str(tmp_path), os.path.normpath(r["image"])) == path]
              for path in files}
    assert table_of(items) == {s: {p: groups[p] for p in ps} for s, ps in table_of(items).items()}
    assert sorted(p for ps in table_of(items).values() for p in ps) == sorted(files)
    assert min(len(items["train"]), len(items["val"])) >= 3  # a hash split, not all on one side
    shuffled = write_table(tmp_path / "shuffled.jsonl", random.Random(1).sample(rows + bad, len(rows + bad)))
    again = prep.table_items(shuffled, prep.Report(), val_fraction=0.5)
    assert {s: set(v) for s, v in table_of(again).items()} == {s: set(v) for s, v in table_of(items).items()}
    assert all(sorted(table_of(again)[s][p]) == sorted(v) for s, ps in table_of(items).items() for p, v in ps.items())

    out_j, out_c = str(tmp_path / "from-jsonl"), str(tmp_path / "from-csv")
    prepare(clip_dir, "table", "--file", jsonl, "--val_fraction", "0.5", "--out", out_j)
    prepare(clip_dir, "table", "--file", write_table(tmp_path / "captions.csv", rows + [b'caf\xe9,img/i0.png\n']),
            "--val_fraction", "0.5", "--out", out_c)
    for split, images in table_of(items).items():
        check_captions(data.Dataset(out_j), split, list(images), list(images.values()), enc)
    for f in sorted(os.listdir(out_j)):
        if f.endswith(".npy"):
            assert open(os.path.join(out_j, f), "rb").read() == open(os.path.join(out_c, f), "rb").read(), f
    report = read_report(out_j)
    assert report["splits"]["(no split)"]["skipped"] == {"not valid UTF-8": 1, "not valid JSON": 1,
                                                          "not a JSON object": 1, "image missing": 1}
    assert report["skipped"] == {**report["splits"]["(no split)"]["skipped"], "caption missing": 1}
    assert read_report(out_c)["skipped"] == {"not valid UTF-8": 1}

    out_v = str(tmp_path / "two-files")
    val = write_table(tmp_path / "val.jsonl", [{"image": "img/i11.png", "caption": "the held out one"}])
    prepare(clip_dir, "table", "--file", jsonl, "--val", val, "--out", out_v)
    ds = data.Dataset(out_v)
    assert ds.meta["splits"] == {"train": 12, "val": 1}
    check_captions(ds, "val", [files[11]], [["the held out one"]], enc)


def test_a_byte_order_mark_is_not_read_as_text(tmp_path):
    """Excel writes UTF-8 with a byte order mark: the table reads as it does without one (the
    first column named as written, the first JSONL line JSON), bad UTF-8 still skipped."""
    os.makedirs(tmp_path / "img")
    files = [save(tmp_path / "img", f"i{k}.png", rgb(k)) for k in range(3)]
    rows = [{"image": f"img/i{k}.png", "caption": f"caption {k}"} for k in range(3)]
    for ext, broken in ((".csv", b"caf\xe9,img/i0.png\n"), (".jsonl", b'{"image": "img/i0.png", "caption": "caf\xe9"}\n')):
        plain = write_table(tmp_path / f"plain{ext}", rows + [broken])
        marked = tmp_path / f"marked{ext}"
        marked.write_bytes(codecs.BOM_UTF8 + open(plain, "rb").read())
        report = prep.Report()
        assert prep.table_items(str(marked), report) == prep.table_items(plain, prep.Report()) == \
            {"train": [(f, [f"caption {k}"]) for k, f in enumerate(files)]}
        assert report.to_dict()["skipped"] == {"not valid UTF-8": 1}


def reference_rgb(mode, a):
    """The RGB pixels of an image file of mode holding array a, computed here: CMYK as Pillow
    defines it, transparency (alpha 0 or 255 only) on black, 16-bit grey scaled to 8 bits."""
    if mode == "CMYK":
        return np.round((255.0 - a[..., :3]) * (255.0 - a[..., 3:]) / 255.0).astype(np.uint8)
    if mode == "I;16":
        return np.repeat(np.round(a / 65535.0 * 255.0).astype(np.uint8)[..., None], 3, -1)
    if mode == "L":
        return np.repeat(a[..., None], 3, -1)
    if mode == "LA":
        return np.repeat(np.where(a[..., 1] == 255, a[..., 0], 0)[..., None], 3, -1).astype(np.uint8)
    return np.where(a[..., 3:] == 255, a[..., :3], 0).astype(np.uint8)  # RGBA


def test_bad_images_captions_and_entries_are_skipped_with_their_reasons(tmp_path, clip_dir, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns past this and refuses past twice it
    folder = str(tmp_path)
    rng = np.random.default_rng(0)
    good, expected = {}, []  # file name -> source, and the pixels each kept image should have

    def keep(name, pixels):
        good[name] = ["a photo"]
        expected.append(pixels)
    keep("rgb.png", rgb(1))
    save(folder, "rgb.png", expected[-1])
    for mode, shape in (("CMYK", (S, S, 4)), ("I;16", (S, S)), ("L", (S, S)), ("LA", (S, S, 2)), ("RGBA", (S, S, 4))):
        a = rng.integers(0, 65536 if mode == "I;16" else 256, shape).astype(np.uint16 if mode == "I;16" else np.uint8)
        if "A" in mode:
            a[..., -1] = np.where(rng.random((S, S)) < 0.5, 0, 255)
        name = f"{mode.replace(';', '')}.{'tif' if mode == 'CMYK' else 'png'}"
        (Image.fromarray(a, mode) if mode != "I;16" else Image.fromarray(a)).save(os.path.join(folder, name))
        keep(name, reference_rgb(mode, a))
    palette = rng.integers(0, 256, (4, 3), dtype=np.uint8)
    index = rng.integers(0, 4, (S, S)).astype(np.uint8)
    for name, transparency in (("palette.png", None), ("palette-alpha.png", bytes([255, 0, 255, 255]))):
        im = Image.fromarray(index, "P")
        im.putpalette(palette.ravel().tolist())
        im.save(os.path.join(folder, name), **({"transparency": transparency} if transparency else {}))
        keep(name, palette[index] * (index != 1)[..., None] if transparency else palette[index])
    for name, size in (("big.png", (40, 40)), ("huge.png", (50, 50))):  # over the limit, over twice it
        save(folder, name, rgb(2, *size))
    for fmt, name in (("JPEG", "cut.jpg"), ("PNG", "cut.png")):
        buf = io.BytesIO()
        Image.fromarray(rgb(3, 24, 30)).save(buf, fmt)
        open(os.path.join(folder, name), "wb").write(buf.getvalue()[:len(buf.getvalue()) // 2])
    open(os.path.join(folder, "empty.png"), "wb").close()
    open(os.path.join(folder, "corrupt.jpg"), "wb").write(rng.bytes(300))
    save(folder, "bad-captions.png", rgb(4))
    save(folder, "no-captions.png", rgb(5))
    files = {**good, "big.png": ["a photo"], "huge.png": ["a photo"], "cut.jpg": ["a photo"], "cut.png": ["a photo"],
             "empty.png": ["a photo"], "corrupt.jpg": ["a photo"], "missing.png": ["a photo"],
             "bad-captions.png": ["", "word " * 30], "no-captions.png": []}
    files["rgb.png"] = ["a photo", "   ", "", "word " * 30]  # its good caption kept, the others skipped
    ids = {name: i for i, name in enumerate(files)}
    images = [{"id": ids[n], "file_name": n} for n in files]
    images += [{"id": 90}, {"file_name": "rgb.png"}, {"id": ids["rgb.png"], "file_name": "other.png"}]
    anns = [{"image_id": ids[n], "caption": c} for n, cs in files.items() for c in cs]
    anns += [{"image_id": ids["rgb.png"]}, {"image_id": ids["rgb.png"], "caption": None}, {"caption": "no image"},
             {"image_id": 999, "caption": "an unknown image"}]
    captions = write_json(tmp_path / "captions.json", {"images": images, "annotations": anns})
    out = str(tmp_path / "out")
    prepare(clip_dir, "coco", "--captions", captions, "--images", folder, "--out", out, workers=2)
    report = read_report(out)
    assert report["skipped"] == {
        "image without id": 1, "image without file_name": 1, "duplicate image id": 1, "annotation without caption": 2,
        "annotation without image_id": 1, "annotation of an unknown image": 1, "empty caption": 3,
        "caption too long": 2, "no valid caption": 2, "oversized image": 2, "truncated image": 2, "empty image file": 1,
        "corrupt image": 1, "image not found": 1}
    assert report["converted"] == {"CMYK": 1, "I;16": 1, "L": 1, "LA": 1, "RGBA": 1, "P": 2}
    first = {(d["item"], d["reason"]) for d in report["splits"]["train"]["first_skipped"]}
    assert {(os.path.join(folder, n), r) for n, r in [("big.png", "oversized image"), ("cut.jpg", "truncated image"),
                                                      ("missing.png", "image not found"), ("no-captions.png", "no valid caption")]} <= first
    ds = data.Dataset(out)
    assert ds.split_size("train") == len(good)
    assert np.array_equal(ds.array("train", "images")[:], np.stack(expected))  # every good image, converted right


def test_clear_errors_for_unreadable_sources(tmp_path, clip_dir):
    out = str(tmp_path / "out")
    folder = str(tmp_path)
    args = ["--images", folder, "--out", out]
    with pytest.raises(SystemExit, match=re.escape(f"error: {tmp_path}/nowhere.json does not exist")):
        prepare(clip_dir, "coco", "--captions", str(tmp_path / "nowhere.json"), *args)
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(SystemExit, match="broken.json is not valid JSON"):
        prepare(clip_dir, "coco", "--captions", str(tmp_path / "broken.json"), *args)
    with pytest.raises(SystemExit, match="list.json is not a COCO captions file"):
        prepare(clip_dir, "coco", "--captions", write_json(tmp_path / "list.json", [1, 2]), *args)
    with pytest.raises(SystemExit, match="list.json is not a Karpathy split file"):
        prepare(clip_dir, "karpathy", "--json", str(tmp_path / "list.json"), *args)
    with pytest.raises(SystemExit, match="nowhere is not a directory"):
        prepare(clip_dir, "coco", "--captions", str(tmp_path / "list.json"), "--images", str(tmp_path / "nowhere"),
                "--out", out)
    nothing = write_json(tmp_path / "nothing.json", {"images": [{"id": 1, "file_name": "gone.png"}],
                                                     "annotations": [{"image_id": 1, "caption": "a photo"}]})
    with pytest.raises(SystemExit, match=r"nothing usable is left for split 'train' \(skipped: image not found: 1\)"):
        prepare(clip_dir, "coco", "--captions", nothing, *args)
    with pytest.raises(SystemExit, match="is not a list of question sets"):
        prepare(clip_dir, "multi", "--file", nothing, "--out", out)
    with pytest.raises(SystemExit) as e:  # a usage error: argparse's exit status 2
        prepare(clip_dir, "table", "--file", nothing, "--val", nothing, "--val_fraction", "0.1", "--out", out)
    assert e.value.code == 2
    assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


# -----------------------------------------------------------------------------
# masks (the prompt stage) and multi-image question sets (the instruct stage)


def regions_by_reference(classmap, n_classes):
    """Boxes (value, x0, y0, x1, y1) of the 8-connected regions of each class, found by the
    model's own labelling (prompt.connected_regions)."""
    boxes = []
    for v in range(1, n_classes):
        labels = connected_regions(torch.from_numpy(classmap == v)[None])[0].numpy()
        for label in np.unique(labels[labels > 0]):
            ys, xs = np.nonzero(labels == label)
            boxes.append((v, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return sorted(tuple(int(b) for b in box) for box in boxes)


def test_class_regions_are_the_8_connected_components():
    rng = np.random.default_rng(0)
    for k in range(20):
        classmap = rng.integers(0, 3, (12, 15)) * (rng.random((12, 15)) < 0.2 + 0.04 * k)
        assert prep.class_regions(classmap) == regions_by_reference(classmap, 3)


def save_mask(folder, name, values, mode="P"):
    im = Image.fromarray(values.astype(np.uint8), "L" if mode == "L" else "P")
    if mode == "P":
        im.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [255] * 759)
    im.save(os.path.join(folder, name))


def test_masks_are_prepared_as_the_prompt_stage_reads_them(tmp_path, clip_dir):
    for d in ("img", "mask", "vimg", "vmask"):
        os.makedirs(tmp_path / d)
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n")
    square = np.zeros((S, S), int)
    square[1:4, 1:4] = 1
    square[5, 5] = square[6, 6] = 1  # touching at a corner: one region
    square[10:14, 2:6] = 2
    square[10:12, 12:15] = 1
    tall_small = np.zeros((24, S), int)  # the class map of a 32 x 48 mask after resizing by 1/2
    tall_small[5:9, 3:8], tall_small[12:20, 9:12], tall_small[0:3, 0:3] = 2, 1, 1  # the last one cropped away
    tall = np.kron(tall_small, np.ones((2, 2), int))
    tall_with_void = np.where((np.arange(48)[:, None] % 5 == 0) & (tall == 0), 255, tall)
    dogs = (square == 1) * 2
    sources = {"a": (rgb(1), square, "P"), "b": (rgb(2, 48, 32), tall_with_void, "L"), "c": (rgb(3), dogs, "L")}
    for name, (image, mask, mode) in sources.items():
        save(tmp_path / "img", f"{name}.jpg" if name == "b" else f"{name}.png", image)
        save_mask(tmp_path / "mask", f"{name}.png", mask, mode)
    save(tmp_path / "img", "wrong-size.png", rgb(4))
    save_mask(tmp_path / "mask", "wrong-size.png", square[:8])
    save(tmp_path / "img", "beyond.png", rgb(5))
    save_mask(tmp_path / "mask", "beyond.png", square + (square == 2), "L")  # a value 3
    save(tmp_path / "img", "unmasked.png", rgb(6))
    save(tmp_path / "img", "colour-mask.png", rgb(7))
    save(tmp_path / "mask", "colour-mask.png", rgb(8))
    save_mask(tmp_path / "mask", "orphan.png", square)
    save(tmp_path / "vimg", "v.png", rgb(9))
    save_mask(tmp_path / "vmask", "v.png", square[::-1])
    out = str(tmp_path / "out")
    prepare(clip_dir, "masks", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask"), "--classes",
            str(tmp_path / "classes.txt"), "--val_images", str(tmp_path / "vimg"), "--val_masks", str(tmp_path / "vmask"),
            "--void", "255", "--out", out)
    ds = data.Dataset(out)
    assert ds.meta["kind"] == "masks" and ds.meta["splits"] == {"novel_train": 3, "novel_val": 1}
    assert ds.class_names() == ["background", "cat", "dog"] and ds.meta["novel_classes"] == ["cat", "dog"]
    expected = {"a": square, "b": tall_small[4:20], "c": dogs}  # b: resized by 1/2, the middle 16 rows kept
    for i, (name, truth) in enumerate(expected.items()):
        file = os.path.join(tmp_path, "img", f"{name}.jpg" if name == "b" else f"{name}.png")
        assert np.array_equal(ds.array("novel_train", "images")[i], prep.load_image(file, S))
        assert np.array_equal(ds.array("novel_train", "classmap")[i], truth)
        rows = ds.array("novel_train", "objects")[i]
        assert sorted((int(o[0]) + 1, *map(int, o[3:])) for o in rows if o[0] >= 0) == regions_by_reference(truth, 3)
        assert (rows[rows[:, 0] >= 0][:, 1:3] == -1).all()
        truths = true_boxes(ds, "novel_train", [i], ["dog", "cat"])[0]  # what eval scores AP against
        named = {1: 2, 2: 1}  # class value -> index into ['background', 'dog', 'cat']
        assert sorted(truths) == sorted((named[v], *box) for v, *box in regions_by_reference(truth, 3))
    assert np.array_equal(ds.array("novel_val", "classmap")[0], square[::-1])
    targets = ds.class_targets("novel_train", [0, 2], ["dog"])
    assert np.array_equal(targets, np.stack([square == 2, dogs == 2]).astype(int))
    shots = ds.shots("novel_train", ["cat", "dog"], 1, seed=0)
    assert (ds.array("novel_train", "classmap")[shots[0]] == 1).any() and (ds.array("novel_train", "classmap")[shots[1]] == 2).any()
    assert read_report(out)["skipped"] == {"mask not found": 1, "mask without image": 1, "mask size differs from its image": 1,
                                           "mask value beyond the classes": 1, "mask not single-band": 1}


def test_question_sets_are_prepared_as_the_instruct_stage_reads_them(tmp_path, clip_dir, enc):
    os.makedirs(tmp_path / "pool")
    pool = [save(tmp_path / "pool", f"p{k}.png", rgb(k, 20 if k % 2 else S, S)) for k in range(5)]
    rel = [f"pool/p{k}.png" for k in range(5)]
    sets = [
        {"images": rel[:2], "question": "which image is red", "answer": "image one", "type": "which"},
        {"images": [pool[2]], "question": "how many dogs", "answer": "two", "type": "count"},
        {"images": [rel[0], rel[2], rel[3]], "question": "what changed", "answer": "the colour"},
        {"images": [rel[1], "pool/gone.png"], "question": "is it there", "answer": "no"},
        {"images": rel, "question": "too many", "answer": "yes"},
        {"images": rel[:1], "question": "", "answer": "yes"},  # kept: an instruction-free sample
        {"images": rel[:1], "question": "a question", "answer": "word " * 10},
        {"images": rel[:1], "question": "word " * 20, "answer": "yes"},
        {"images": [], "question": "none", "answer": "no"},
        {"images": rel[:1], "question": "no answer"},
        {"images": rel[:1], "question": "typed", "answer": "yes", "type": 3},
        "not a set",
    ]
    val = [{"images": rel[3:5], "question": "which image is larger", "answer": "image two", "type": "which"}]
    out = str(tmp_path / "out")
    prepare(clip_dir, "multi", "--file", write_json(tmp_path / "sets.json", sets), "--val",
            write_json(tmp_path / "val.json", val), "--answer_length", "8", "--max_images", "4", "--out", out)
    ds = data.Dataset(out)
    assert ds.meta["kind"] == "multi" and ds.meta["splits"] == {"multi_train": 4, "multi_val": 1}
    assert ds.meta["qtypes"] == ["count", "other", "which"]
    for split, kept in (("multi_train", sets[:3] + sets[5:6]), ("multi_val", val)):
        images, valid, question, answer = ds.multi_batch(split, np.arange(len(kept)))
        assert question.shape[1] == T and answer.shape[1] == 8
        for i, s in enumerate(kept):
            n = len(s["images"])
            files = [p if os.path.isabs(p) else os.path.join(tmp_path, p) for p in s["images"]]
            assert valid[i].tolist() == [True] * n + [False] * (images.shape[1] - n)
            assert all(np.array_equal(images[i, j], prep.load_image(f, S)) for j, f in enumerate(files))
            assert not images[i, n:].any()
            assert data.decode_tokens(enc, question[i]) == s["question"]
            assert data.decode_tokens(enc, answer[i]) == s["answer"]
            assert (question[i, T - 8:] == enc.encode_single_token(data.PAD)).all()  # the answer block's places
            assert ds.meta["qtypes"][ds.array(split, "qtype")[i]] == s.get("type", "other")
    assert ds.array("multi_train", "images").shape[0] == 4  # p0..p3 once each (gone.png could not be read)
    report = read_report(out)
    assert report["skipped"] == {"image not found": 1, "unusable image": 1, "too many images": 1,
                                 "answer too long": 1, "question too long": 1, "images missing": 1, "answer missing": 1,
                                 "type not a string": 1, "set not an object": 1}

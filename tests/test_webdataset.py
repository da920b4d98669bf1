"""webdataset shards: tars written here (PNG and JPEG members; samples with no caption, an
empty one, one that is not UTF-8 or too long, a corrupt image, no image) streamed by ranks and
loader workers with every valid sample read once an epoch (shards of equal and unequal sizes
dealt whole, the consumers kept within a shard of each other), batches equal to the tar read
independently, a resumed stream equal to a walked one, skips counted per reason; shard specs;
the preparation command (val prepared, train streamed) and the visual codes of a streamed batch."""

import io
import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import data
import hf
import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S, T, N = 8, 24, 40  # image size, context length, samples written
BAD_CAPTIONS = {5: (None, "no caption"), 9: (b"   ", "empty caption"), 13: (b"caf\xe9 au lait", "caption not UTF-8"),
                25: (b"word " * 10, "caption too long")}
NO_IMAGE, CORRUPT = 21, 17  # a sample of a caption (and a .json) only; one whose .jpg is not an image


def key(k):
    return f"part/{k:05d}"


def image_bytes(k):
    a = np.random.default_rng(k).integers(0, 256, (10 + k % 3, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG" if k % 2 else "PNG")
    return buf.getvalue()


def sample_members(k):
    """{extension: bytes} of sample k."""
    caption = BAD_CAPTIONS[k][0] if k in BAD_CAPTIONS else f"a photo number {k}".encode()
    members = {"json": json.dumps({"key": k}).encode()}
    if k != NO_IMAGE:
        members["png" if k % 2 == 0 else "jpg"] = image_bytes(k) if k != CORRUPT else b"\xff\xd8 not a jpeg" * 9
    if caption is not None:
        members["txt"] = caption
    return members


VALID = [key(k) for k in range(N) if k not in BAD_CAPTIONS and k != NO_IMAGE]  # the stream's samples (CORRUPT too)
EPOCH_SKIPS = {**Counter(reason for _, reason in BAD_CAPTIONS.values()), "no image": 1}


def write_tar(path, ks):
    with tarfile.open(path, "w") as tar:
        for k in ks:
            for ext, content in sample_members(k).items():
                info = tarfile.TarInfo(f"{key(k)}.{ext}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return str(path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A Hugging Face GPT-2 tokenizer without merges: every byte a token."""
    folder = tmp_path_factory.mktemp("bytes-bpe")
    vocab = {c: b for b, c in hf.bytes_to_unicode().items()}
    (folder / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": 256}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return str(folder)


@pytest.fixture(scope="module")
def enc(tokenizer_dir):
    return data.get_tokenizer(*hf.hf_tokenizer(tokenizer_dir))


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same samples as one tar, three shards and five shards: {name: [tar paths]}."""
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for n in (1, 3, 5):
        os.makedirs(root / str(n))
        out[n] = [write_tar(root / str(n) / f"{i:03d}.tar", range(N)[i::n] if n > 1 else range(N)) for i in range(n)]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, enc):
    """{key: (pixels as load_image reads the member's bytes from a file, tokens as encode_texts
    writes the caption)} of every valid sample but the corrupt one."""
    folder = tmp_path_factory.mktemp("members")
    out = {}
    for k in range(N):
        if key(k) in VALID and k != CORRUPT:
            members = sample_members(k)
            ext = "png" if "png" in members else "jpg"
            path = folder / f"{k}.{ext}"
            path.write_bytes(members[ext])
            out[key(k)] = prepare.load_image(str(path), S), data.encode_texts(enc, [members["txt"].decode()], T)[0]
    return out


def sample_counts(shards):
    """The samples of each shard, as preparation counts them (meta stream 'counts')."""
    return [len(prepare.tar_samples(shard)[0]) for shard in shards]


def stream(shards, c, n, enc, batch_size=4, seed=3, log=lambda line: None):
    return prepare.ShardStream(shards, sample_counts(shards), c, n, seed, enc, T, S, batch_size, log=log)


def by_epoch(s, n):
    """[(shards, keys, skips)] of the first n epochs of stream s's walk: the shards it read, the
    keys of its valid samples in order, and its samples passed over (Counter of reasons)."""
    out, before = [([], [], Counter()) for _ in range(n)], Counter()
    for epoch, shard, samples in s.walk():
        if epoch >= n:
            return out
        shards, keys, skips = out[epoch]
        shards.append(shard)
        keys += [x.key for x in samples]
        skips.update(Counter(s.skipped) - before)
        before = Counter(s.skipped)


def skip_reason(k):
    """Why sample k is passed over in a walk, or None."""
    return "no image" if k == NO_IMAGE else BAD_CAPTIONS[k][1] if k in BAD_CAPTIONS else None


# -----------------------------------------------------------------------------
# splitting the shards among consumers


@pytest.mark.parametrize("n_shards", [1, 3, 5])
@pytest.mark.parametrize("world_size,n_streams", [(2, 1), (2, 2)])
def test_every_valid_sample_is_read_once_an_epoch(layouts, enc, n_shards, world_size, n_streams):
    """Three epochs of every consumer: every valid sample is read once an epoch and every bad
    one counted once; with at least as many shards as consumers each shard goes whole to
    one consumer an epoch, with fewer every consumer reads every shard."""
    shards, C = layouts[n_shards], world_size * n_streams
    reads, skipped, dealt = [Counter() for _ in range(3)], [Counter() for _ in range(3)], [Counter() for _ in range(3)]
    orders = []
    for c in range(C):
        for epoch, (read, keys, skips) in enumerate(by_epoch(stream(shards, c, C, enc), 3)):
            if n_shards >= C:  # the consumer reads all of each shard dealt to it
                valid = [{x.key for x in prepare.tar_samples(shard)[0]} & set(VALID) for shard in read]
                assert sorted(keys) == sorted(set().union(*valid))
            else:
                assert sorted(read) == sorted(shards)
            reads[epoch].update(keys)
            skipped[epoch].update(skips)
            dealt[epoch].update(read)
            orders.append(keys)
    for epoch in range(3):
        assert set(reads[epoch].values()) == {1} and sorted(reads[epoch]) == sorted(VALID)
        assert skipped[epoch] == EPOCH_SKIPS  # once, by whoever reads it
        assert dealt[epoch] == Counter({shard: 1 if n_shards >= C else C for shard in shards})
    assert orders[0] != orders[1]  # consumer 0 reads another part, or in another order, in epoch 1


@pytest.mark.parametrize("sizes,C", [((6, 6, 6, 6), 3), ((20, 2, 20, 2), 2), ((12, 2, 9, 2, 1, 6, 4), 3)])
def test_shards_are_dealt_whole_and_consumers_stay_within_a_shard(tmp_path, enc, sizes, C):
    """Shards of equal and unequal sizes: each epoch every sample is read once, and at each
    epoch's end the samples dealt to the consumers so far are within the largest shard of
    each other; dealing is a plain loop giving each shard to the consumer with the fewest."""
    start = np.cumsum((0,) + sizes)
    shards = [write_tar(tmp_path / f"{i}.tar", [k % N for k in range(a, b)])
              for i, (a, b) in enumerate(zip(start, start[1:]))]
    names = {shard: i for i, shard in enumerate(shards)}
    for seed in range(3):
        epochs = [by_epoch(stream(shards, c, C, enc, seed=seed), 4) for c in range(C)]
        for epoch in range(4):
            read = [shard for c in range(C) for shard in epochs[c][epoch][0]]
            assert sorted(read) == sorted(shards)  # every shard, once
            totals = [sum(sizes[names[shard]] for e in range(epoch + 1) for shard in epochs[c][e][0]) for c in range(C)]
            assert max(totals) - min(totals) <= max(sizes), (seed, epoch, totals)
    dealt, totals = [(0, c) for c in range(C)], [0] * C
    for epoch in range(5):
        order = np.random.default_rng([0, epoch]).permutation(len(sizes))
        brute = []
        for s in order:
            brute.append(int(np.argmin(totals)))  # the first of the fewest
            totals[brute[-1]] += sizes[s]
        assert prepare.deal_shards(order, sizes, dealt) == brute


def test_micro_steps_go_to_one_stream_per_worker(layouts, enc):
    """ShardBatches: micro-step s of rank r is batch s // n of consumer r * n + s % n."""
    shards = layouts[3]
    for rank in (0, 1):
        batches = prepare.ShardBatches(shards, sample_counts(shards), rank, 2, 2, 3, enc, T, S, 4,
                                       log=lambda line: None)
        for s in range(8):
            want = stream(shards, rank * 2 + s % 2, 4, enc).samples(s // 2)
            assert [x.key for x in batches.samples(s)] == [x.key for x in want]
            images, tokens = batches.fetch(s)
            assert images.shape == (4, S, S, 3) and tokens.shape == (4, T) and images.dtype == np.uint8
        assert set(batches.streams) == {0, 1}


@pytest.mark.parametrize("n_shards", [1, 5])
def test_batches_are_the_tar_read_independently_and_resume_where_they_were(layouts, enc, reference, monkeypatch,
                                                                          n_shards):
    shards, B = layouts[n_shards], 4
    walked = stream(shards, 1, 2, enc, B)
    three_epochs = [key for _, keys, _ in by_epoch(walked, 3) for key in keys]
    keys, batches = [], []
    for k in range(2 * len(three_epochs) // 3 // B + 2):  # into the third epoch
        samples = walked.samples(k)
        images, tokens = walked.batch(k)
        batches.append((images, tokens))
        keys += [x.key for x in samples]
        for i, x in enumerate(samples):
            if x.key != key(CORRUPT):
                assert np.array_equal(images[i], reference[x.key][0]), (k, i)
                assert np.array_equal(tokens[i], reference[x.key][1]), (k, i)
    assert keys == three_epochs[:len(keys)]  # the batches cut the walk with no gap or overlap

    decoded = []
    monkeypatch.setattr(prepare, "load_image",
                        lambda path, size: decoded.append(path) or prepare.read_image(path, size)[0])
    last = len(batches) - 1
    resumed = stream(shards, 1, 2, enc, B).batch(last)  # a run resumed there
    assert all(np.array_equal(a, b) for a, b in zip(resumed, batches[last]))
    assert len(decoded) == B  # getting there read captions and headers, no image
    again = walked.batch(last - 1)  # an earlier batch than the last: the walk starts again
    assert all(np.array_equal(a, b) for a, b in zip(again, batches[last - 1])) and len(decoded) == 2 * B


def test_a_corrupt_image_takes_the_nearest_good_sample_of_its_batch(layouts, enc, reference):
    for good in ([False, True, False, False, True, False], [True, False, True], [False, False, True]):
        brute = [min(np.flatnonzero(good), key=lambda p: (abs(p - i), p)) for i in range(len(good))]
        assert prepare.nearest_good(np.array(good)).tolist() == brute
    lines = []
    s = stream(layouts[1], 0, 1, enc, batch_size=4, log=lines.append)
    k = next(k for k in range(N) if key(CORRUPT) in [x.key for x in s.samples(k)])
    samples = s.samples(k)
    images, tokens = s.batch(k)
    bad = [x.key for x in samples].index(key(CORRUPT))
    near = min((i for i in range(4) if i != bad), key=lambda i: (abs(i - bad), i))
    assert np.array_equal(images[bad], reference[samples[near].key][0])
    assert np.array_equal(tokens[bad], reference[samples[near].key][1])
    assert s.skipped == {**EPOCH_SKIPS, "corrupt image": 1}
    assert lines[-1].startswith(f"webdataset: consumer 0 of 1: {layouts[1][0]}:{key(CORRUPT)}.jpg: corrupt image, "
                                f"replaced by the nearest good sample of its batch (skipped so far: ")
    assert counts_in(lines[-1]) == s.skipped and len(lines) == sum(s.skipped.values())  # a line each, so far

    one = stream(layouts[1], 0, 1, enc, batch_size=1)
    k = next(k for k in range(N) if one.samples(k)[0].key == key(CORRUPT))
    with pytest.raises(ValueError, match=re.escape(f"webdataset shards {layouts[1][0]}: no image of batch {k}")):
        one.batch(k)


def counts_in(line):
    """{reason: count} of a skip's log line: '... (skipped so far: reason: n, reason: n)'."""
    counts = re.search(r"\(skipped so far: (.*?)(; from here on .*)?\)$", line).group(1)
    return dict((r, int(n)) for r, n in (part.rsplit(": ", 1) for part in counts.split(", ")))


def test_skips_are_logged_ten_then_at_powers_of_two_with_the_counts(layouts, enc, monkeypatch):
    """Thirty epochs of a tar with five bad samples: the log is the one a line a skip would
    be, cut to the first ten lines and those whose count of skips is a power of two (the
    tenth saying so), each with the counts so far."""
    def thirty_epochs():
        lines = []
        s = stream(layouts[1], 0, 1, enc, log=lines.append)
        assert [e for e, _, _ in itertools.islice(s.walk(), 30)] == list(range(30))
        return s, lines
    s, logged = thirty_epochs()
    monkeypatch.setattr(prepare, "LOGGED_SKIPS", 10 ** 9)
    _, every = thirty_epochs()
    assert s.skipped == {reason: 30 * n for reason, n in EPOCH_SKIPS.items()} and len(every) == 150
    for i, line in enumerate(every):
        count = Counter(counts_in(line))
        (reason, one), = (count - Counter(counts_in(every[i - 1]) if i else {})).items()  # one more, of one reason
        assert one == 1 and sum(count.values()) == i + 1 and f": {reason}, passed over (" in line
    kept = [i for i in range(150) if i < 10 or (i + 1) & i == 0]
    assert kept[10:] == [15, 31, 63, 127] and len(logged) == len(kept)
    note = "; from here on a skip is logged when the count reaches a power of two)"
    assert logged == [every[i][:-1] + note if i == 9 else every[i] for i in kept]


# -----------------------------------------------------------------------------
# tar files and shard specs


def test_tar_samples_group_members_by_key_and_stop_at_damage(layouts, tmp_path, enc):
    tar = layouts[1][0]
    samples, problem = prepare.tar_samples(tar)
    assert problem == "" and [x.key for x in samples] == [key(k) for k in range(N)]
    for k, x in enumerate(samples):
        members = sample_members(k)
        assert x.caption == members.get("txt")
        image = members.get("png", members.get("jpg"))
        assert (x.image is None) == (image is None) and (image is None or x.image.read() == image)

    raw = open(tar, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[:len(raw) // 2 + 100])
    broken = bytearray(raw)
    offset = next(m.offset for m in tarfile.open(tar) if m.name == f"{key(30)}.json")
    broken[offset + 100:offset + 110] = b"x" * 10  # its header's checksum no longer holds
    (tmp_path / "broken.tar").write_bytes(bytes(broken))
    (tmp_path / "junk.tar").write_bytes(b"not a tar file" * 100)
    for name, before in (("cut.tar", None), ("broken.tar", 30), ("junk.tar", 0)):
        got, problem = prepare.tar_samples(str(tmp_path / name))
        assert problem and f"(after {len(got)} samples)" in problem, (name, problem)
        if before is not None:
            assert [x.key for x in got] == [key(k) for k in range(before)]
        assert [x.key for x in got] == [x.key for x in samples[:len(got)]]

    lines, before = [], [k for k in VALID if k < key(30)]
    s = stream([str(tmp_path / "broken.tar")], 0, 1, enc, batch_size=len(before), log=lines.append)
    assert sorted(x.key for x in s.samples(0)) == before  # an epoch: the samples before the damage
    assert s.skipped == {"damaged tar": 1, **EPOCH_SKIPS}
    assert "broken.tar: damaged tar, read as far as it goes: unreadable from byte" in lines[0]


def test_shard_specs_expand_ranges_globs_and_lists(tmp_path):
    for name in ("a-000.tar", "a-001.tar", "a-002.tar", "b-09.tar", "b-10.tar", "c-1-2.tar"):
        (tmp_path / name).write_bytes(b"")
    p = str(tmp_path)
    assert prepare.expand_shards(f"{p}/a-{{000..002}}.tar") == [f"{p}/a-{i:03d}.tar" for i in range(3)]
    assert prepare.expand_shards(f"{p}/b-{{09..10}}.tar,{p}/a-*.tar") == \
        [f"{p}/b-09.tar", f"{p}/b-10.tar"] + [f"{p}/a-{i:03d}.tar" for i in range(3)]
    assert prepare.expand_shards(f"{p}/c-{{1..1}}-{{2..2}}.tar") == [f"{p}/c-1-2.tar"]
    rel = os.path.relpath(f"{p}/b-09.tar")
    assert prepare.expand_shards(rel) == [f"{p}/b-09.tar"]  # absolute
    for spec, message in ((f"{p}/a-{{000..003}}.tar", f"webdataset shard not found: {p}/a-003.tar"),
                          (f"{p}/z-*.tar", f"webdataset shards {p}/z-*.tar: no file matches"),
                          (f"{p}/a-*.tar,{p}/a-001.tar", f"webdataset shard {p}/a-001.tar is named twice"),
                          (f"{p}/a-{{002..000}}.tar", "runs backwards"), (",", "no webdataset shard in ','")):
        with pytest.raises(ValueError, match=re.escape(message)):
            prepare.expand_shards(spec)


# -----------------------------------------------------------------------------
# preparing a streamed dataset, its codebook and the visual codes of a streamed batch


def test_preparation_prepares_val_and_points_at_the_train_shards(layouts, tmp_path, tokenizer_dir, enc, reference):
    train, folder = layouts[3], os.path.dirname(layouts[3][0])
    spec = f"{folder}/{{000..002}}.tar"
    val = write_tar(tmp_path / "val.tar", [3, 4, 9, 13, CORRUPT, NO_IMAGE, 25, 26])
    out = str(tmp_path / "wds")
    argv = ["--out", out, "--tokenizer", tokenizer_dir, "--image_size", str(S), "--context_length", str(T),
            "--workers", "1"]
    prepare.main(["webdataset", "--train", spec, "--val", val, *argv])
    ds = data.Dataset(out)
    kept = [key(k) for k in (3, 4, 26)]
    assert ds.meta["kind"] == "captions" and ds.meta["splits"] == {"val": 3} and ds.meta["captions_per_image"] == 1
    assert ds.stream == {"shards": train, "counts": [14, 13, 13], "samples": N} and len(ds) == N
    assert np.array_equal(ds.array("val", "images")[:], np.stack([reference[k][0] for k in kept]))
    assert np.array_equal(ds.array("val", "tokens")[:], np.stack([reference[k][1] for k in kept])[:, None])
    assert ds.array("val", "n_captions").tolist() == [1, 1, 1] and ds.array("val", "scene").tolist() == [0, 1, 2]
    assert ds.captions("val") == [[sample_members(k)["txt"].decode()] for k in (3, 4, 26)]
    report = read_json(os.path.join(out, "report.json"))
    assert report["splits"]["train"]["kept"] == {"shards": 3, "samples": N}
    assert report["skipped"] == {"empty caption": 1, "caption too long": 1, "no valid caption": 2, "no image": 1,
                                 "caption not UTF-8": 1, "corrupt image": 1}
    assert {d["item"] for d in report["splits"]["val"]["first_skipped"]} == \
        {f"{val}:{key(k)}" for k in (13, NO_IMAGE)} | {f"{val}:{key(k)}.jpg" for k in (9, 25, CORRUPT)}

    for extra, message in ((["--train", f"{folder}/{{000..003}}.tar", "--val", val],
                            f"error: webdataset shard not found: {folder}/003.tar"),
                           (["--train", spec, "--val", train[1]], f"error: webdataset shard {train[1]} is in both")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            prepare.main(["webdataset", *extra, "--out", str(tmp_path / "other"), *argv[2:]])
    assert not os.path.exists(tmp_path / "other")

    prepare.prepare_codebook(out, 4, 4, log=lambda *a: None)  # fitted on the stream's first images
    centroids = data.Dataset(out).codebook(4, 4)
    images, _ = stream(train, 0, 1, enc, batch_size=6).batch(0)
    for batch, codes in ((images, data.visual_codes(images, centroids, 4)),
                         (ds.array("val", "images")[:], data.Dataset(out).codes("val", 4, 4))):
        brute = [[((batch[i, r:r + 4, c:c + 4].reshape(-1) / 255.0 - centroids) ** 2).sum(1).argmin()
                  for r in range(0, S, 4) for c in range(0, S, 4)] for i in range(len(batch))]
        assert np.array_equal(codes, brute)


def test_a_split_added_to_a_streamed_dataset_keeps_the_stream(layouts, tmp_path, tokenizer_dir):
    """coco --split test into a streamed dataset: the stream and the train report are kept; a
    dataset of other sizes or another tokenizer is refused, naming each field that differs."""
    out, argv = str(tmp_path / "wds"), ["--tokenizer", tokenizer_dir, "--image_size", str(S), "--context_length",
                                         str(T), "--workers", "1"]
    prepare.main(["webdataset", "--train", ",".join(layouts[3]), "--val", write_tar(tmp_path / "val.tar", [3, 4]),
                  "--out", out, *argv])
    before, train_report = data.Dataset(out).meta, read_json(os.path.join(out, "report.json"))["splits"]["train"]
    os.makedirs(tmp_path / "images")
    for k in (0, 2):
        (tmp_path / "images" / f"{k}.png").write_bytes(image_bytes(k))
    captions = str(tmp_path / "captions.json")
    with open(captions, "w") as f:
        json.dump({"images": [{"id": k, "file_name": f"{k}.png"} for k in (0, 2)],
                   "annotations": [{"image_id": k, "caption": f"a photo number {k}"} for k in (0, 2)]}, f)
    coco = ["coco", "--captions", captions, "--images", str(tmp_path / "images"), "--split", "test", "--out", out]
    other = tmp_path / "other-bpe"  # one merge more than tokenizer_dir's
    other.mkdir()
    vocab = read_json(os.path.join(tokenizer_dir, "vocab.json"))
    (other / "vocab.json").write_text(json.dumps({**vocab, "ab": 256, "<|endoftext|>": 257}))
    (other / "merges.txt").write_text("#version: 0.2\na b\n")
    for extra, message in (([], "captions_per_image 1 there, 5 asked"),
                           (["--captions_per_image", "1", "--image_size", "16"], "image_size 8 there, 16 asked"),
                           (["--captions_per_image", "1", "--tokenizer", str(other)],
                            "tokenizer gpt2 of 256 ranks there, other gpt2 of 257 ranks asked")):
        with pytest.raises(SystemExit, match=re.escape(f"error: {out} holds a dataset of other sizes or another "
                                                       f"tokenizer than asked: {message}: prepare into a new --out")):
            prepare.main([*coco, *argv, *extra])
    prepare.main([*coco, *argv, "--captions_per_image", "1"])
    ds = data.Dataset(out)
    assert ds.stream == before["stream"] and ds.meta["splits"] == {"test": 2, "val": 2}
    assert ds.meta["source"] == {"val": before["source"]["val"], "test": captions}
    assert read_json(os.path.join(out, "report.json"))["splits"]["train"] == train_report


def test_empty_shards_are_walked_past_and_left_out_of_a_prepared_stream(layouts, tmp_path, tokenizer_dir, enc):
    empty = [write_tar(tmp_path / f"empty{i}.tar", []) for i in range(3)]
    useless = write_tar(tmp_path / "useless.tar", [NO_IMAGE, 5, 13])  # no image, no caption, not UTF-8
    full, lines = layouts[3][0], []  # samples 0, 3, 6, ...
    in_full = [k for k in VALID if int(k.split("/")[1]) % 3 == 0]
    found = {}
    for c in range(2):
        s = stream([*empty[:2], full, useless], c, 2, enc, batch_size=4, log=lines.append)
        for epoch, (_, keys, _) in enumerate(by_epoch(s, 12)):
            found[epoch, c] = len(keys)
        keys = [x.key for k in range(8) for x in s.samples(k)]
        assert len(keys) == 32 and set(keys) == set(in_full)  # past the epochs that gave it nothing
    assert all(sorted([found[e, 0], found[e, 1]]) == [0, len(in_full)] for e in range(12))  # full is one's
    dry = [*empty, useless]
    with pytest.raises(ValueError, match=re.escape(f"webdataset shards {', '.join(dry[:3])} ... (4 in all): consumer 1 "
                                                   f"of 2 found no sample with an image and a usable caption in every "
                                                   f"shard it read whole since its last valid sample")):
        stream(dry, 1, 2, enc).samples(0)
    # fewer shards than consumers: the valid samples of the epochs go to each consumer in turn
    one = write_tar(tmp_path / "one.tar", [0])
    for c in range(2):
        assert [(x.epoch, x.key) for x in stream([one], c, 2, enc, batch_size=3).samples(0)] == \
            [(epoch, key(0)) for epoch in (c, c + 2, c + 4)]
    sparse = write_tar(tmp_path / "sparse.tar", [5, 9, 0, 13, NO_IMAGE, 25, 2])  # 2 valid samples of 7
    for c in range(4):
        assert {x.key for x in stream([sparse], c, 4, enc, batch_size=1).samples(9)} <= {key(0), key(2)}
    with pytest.raises(ValueError, match=re.escape(f"webdataset shards {useless}: consumer 1 of 2 found no sample with "
                                                   f"an image and a usable caption in a whole epoch of every shard")):
        stream([useless], 1, 2, enc).samples(0)

    argv = ["--val", write_tar(tmp_path / "val.tar", [3, 4]), "--tokenizer", tokenizer_dir, "--image_size", str(S),
            "--context_length", str(T), "--workers", "1"]
    out = str(tmp_path / "wds")
    prepare.main(["webdataset", "--train", ",".join([empty[0], full, empty[1], useless]), "--out", out, *argv])
    n_full = len(range(0, N, 3))
    assert data.Dataset(out).stream == {"shards": [full], "counts": [n_full], "samples": n_full}
    report = read_json(os.path.join(out, "report.json"))["splits"]["train"]
    assert report["kept"] == {"shards": 1, "samples": n_full} and report["skipped"] == {"empty shard": 3}
    assert report["first_skipped"] == [dict(item=empty[0], reason="empty shard", detail="no sample"),
                                       dict(item=empty[1], reason="empty shard", detail="no sample"),
                                       dict(item=useless, reason="empty shard",
                                            detail="3 samples, none with an image and a UTF-8 caption")]
    with pytest.raises(SystemExit, match=re.escape("error: webdataset shards " + ",".join(dry) + ": no sample with an "
                                                   "image and a UTF-8 caption in them (skipped: empty shard: 4)")):
        prepare.main(["webdataset", "--train", ",".join(dry), "--out", str(tmp_path / "none"), *argv])
    assert not os.path.exists(tmp_path / "none")


# -----------------------------------------------------------------------------
# two ranks in two processes, each with two loader workers


def test_two_ranks_stream_a_tar_with_no_sample_read_twice(layouts, tmp_path, tokenizer_dir, enc):
    steps, out = 12, str(tmp_path / "reads.json")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "tests", "wds_ranks.py"), layouts[1][0], tokenizer_dir,
                             str(S), str(T), str(steps), out],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as f:
        reads = json.load(f)  # [rank][step] -> [[epoch, key]]
    by_epoch = {0: Counter(), 1: Counter()}
    for rank, steps_read in enumerate(reads):
        for s, read in enumerate(steps_read):
            want = prepare.ShardBatches(layouts[1], sample_counts(layouts[1]), rank, 2, 2, 0, enc, T, S, 2,
                                        log=lambda line: None).samples(s)
            assert read == [[x.epoch, x.key] for x in want]  # in a loader worker of its rank as in this process
            for epoch, k in read:
                by_epoch[epoch][k] += 1
    assert sorted(by_epoch[0]) == sorted(VALID) and set(by_epoch[0].values()) == {1}
    assert by_epoch[1] and set(by_epoch[1].values()) == {1}

"""
Real data into prepared datasets (data.Dataset reads them), and webdataset shards streamed:

    python prepare.py coco --captions annotations/captions_train2017.json --images train2017 \\
        --out data/coco --tokenizer openai/clip-vit-base-patch32 --image_size 224 --context_length 77
    python prepare.py karpathy | table | masks | multi | questions | webdataset | export ...  (SOURCE --help)

A bad image, caption, mask or question set is skipped with its reason in report.json (summed on screen);
an unreadable source, or a split left empty, stops with an error naming it. Formats: docs/real-data.md.
"""

import argparse
import csv
import glob
import hashlib
import heapq
import io
import itertools
import json
import multiprocessing
import os
import tarfile
import time
import warnings
from collections import Counter, namedtuple
from functools import partial

import numpy as np
import regex
from PIL import Image

import data
from data import (PAD, Dataset, encode_checked, get_tokenizer, link_split_files, save_arrays, staged_dataset,
                  tokenizer_meta, write_meta)
from hf import load_tokenizer

# -----------------------------------------------------------------------------
# image files


class BadImage(ValueError):
    """An image (or mask) file that cannot be used, and why: reason is a report's key."""

    def __init__(self, path, reason, detail=""):
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))
        self.path, self.reason, self.detail = path, reason, detail

    def __reduce__(self):  # to come back from a worker process whole
        return BadImage, (self.path, self.reason, self.detail)


class TarMember(namedtuple("TarMember", "tar name offset size")):
    """A file inside a tar (a webdataset shard's image): size bytes at offset, read directly."""

    def __str__(self):
        return f"{self.tar}:{self.name}"

    def read(self):
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


def read_image_file(path, convert, what="image"):
    """convert(im) of the image file at path (or TarMember); BadImage if it is missing, empty, over
    Pillow's decompression-bomb limit ('oversized'), truncated or corrupt."""
    if isinstance(path, TarMember):
        try:
            content = path.read()
        except OSError as e:
            raise BadImage(path, f"{what} not found", str(e)) from None
        if len(content) < path.size:
            raise BadImage(path, f"truncated {what}",
                           f"its tar file ends after {len(content)} of its {path.size} bytes")
        size, source = len(content), io.BytesIO(content)
    elif not os.path.isfile(path):
        raise BadImage(path, f"{what} not found")
    else:
        size, source = os.path.getsize(path), path
    if size == 0:
        raise BadImage(path, f"empty {what} file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(source)
            im.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadImage(path, f"oversized {what}", str(e)) from None
    except Exception as e:  # Pillow raises many kinds on bad data
        kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
        raise BadImage(path, f"{kind} {what}", f"{type(e).__name__}: {e}") from None
    with im:
        return convert(im)


def fit_square(im, size, resample):
    """(size, size, ...) array: the shorter side resized to size (as CLIP's processor), centre cropped."""
    w, h = im.size
    im = im.resize((size, int(size * h / w)) if w <= h else (int(size * w / h), size), resample)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def to_rgb(im):
    """An opened image as RGB: 16- and 32-bit grey scaled to 8 bits, transparent parts on black."""
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
    """(pixels (size, size, 3) uint8, the file's mode if not RGB, its (width, height)); or BadImage."""
    return read_image_file(path, lambda im: (fit_square(to_rgb(im), size, Image.BICUBIC),
                                             None if im.mode == "RGB" else im.mode, im.size))


def load_image(path, size):
    """Any common image file as (size, size, 3) uint8 (read_image); raises BadImage naming it."""
    return read_image(path, size)[0]


# -----------------------------------------------------------------------------
# reports, parallel decoding and the writing of image arrays

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
NO_SPLIT = "(no split)"  # the report's place for items skipped before their split is known


def count_text(counts):
    """'reason: n, reason: n' of {reason: count}, or 'none'."""
    return ", ".join(f"{r}: {n}" for r, n in counts.items()) or "none"


class Report:
    """What a preparation kept, skipped (by reason, the first 1000 items by name) and converted, per split."""

    def __init__(self):
        self.splits = {}

    def split(self, name):
        return self.splits.setdefault(name or NO_SPLIT, dict(kept={}, skipped={}, converted={}, first_skipped=[]))

    def skip(self, split, reason, item, detail=""):
        s = self.split(split)
        s["skipped"][reason] = s["skipped"].get(reason, 0) + 1
        if len(s["first_skipped"]) < 1000:
            s["first_skipped"].append(dict(item=str(item), reason=reason, **{"detail": str(detail)} if detail else {}))

    def convert(self, split, mode):
        counts = self.split(split)["converted"]
        counts[mode] = counts.get(mode, 0) + 1

    def keep(self, split, **counts):
        self.split(split)["kept"].update(counts)

    def reasons(self, split):
        return count_text(self.split(split)["skipped"])

    def ordered(self):
        order = ("train", "val", "test", "novel_train", "novel_val", "multi_train", "multi_val", NO_SPLIT)
        return dict(sorted(self.splits.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else -1))

    def to_dict(self):
        """report.json: the splits, and the skipped and converted counts summed over them."""
        return dict({key: sum((Counter(s[key]) for s in self.splits.values()), Counter())
                     for key in ("skipped", "converted")}, splits=self.ordered())

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
    """{split: [row less its split]} of rows (split, ...); each split of expected must have rows."""
    out = {split: [] for split in expected}
    for split, *rest in rows:
        out[split].append(tuple(rest))
    for split, items in out.items():
        if not items:
            raise nothing_left_error(source, split, report)
    return out


def held_out(key, fraction):
    """Whether an item is held out: a hash of its key below fraction (not its place in the source)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") < fraction * 2 ** 64


def two_splits(read, main, val, fraction, names, report, source):
    """by_split of read(part, split_of) of main, and val (held) if given, else with held_out keys held."""
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
    """(fn(task), None) or (None, its BadImage) for each task in order, in `workers` forked processes."""
    call = partial(_attempt, fn)
    if workers > 1 and len(tasks) > 1:
        methods = multiprocessing.get_all_start_methods()
        with multiprocessing.get_context("fork" if "fork" in methods else None).Pool(min(workers, len(tasks))) as pool:
            yield from pool.imap(call, tasks, chunksize=max(1, min(32, len(tasks) // (8 * workers))))
    else:
        yield from map(call, tasks)


def shrink_npy(file, n):
    """Keep the first n rows of a C-order .npy file of open_memmap's (a version 1.0 header, rewritten at its length)."""
    with open(file, "r+b") as f:
        np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        start = f.tell()
        header = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, *shape[1:])})
        f.seek(10)  # the magic string and the header's length
        f.write((header.ljust(start - 11) + "\n").encode("latin1"))
        f.truncate(start + n * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


def write_rows(tmp, split, tasks, fn, rows, workers, report):
    """[(task index, extra)] of fn's results ({key: row}, mode converted, extra) over tasks, written into
    memory-mapped {split}.{key}.npy files, rows {key: (shape, dtype)}: a source is never all in memory."""
    out = {key: np.lib.format.open_memmap(os.path.join(tmp, f"{split}.{key}.npy"), "w+", dtype, (len(tasks), *shape))
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
        file = out[key].filename
        out.pop(key).flush()  # and unmapped, before the file is cut
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


def dataset_meta(args, kind, splits, source, **extra):
    """(the tokenizer's encoding, meta.json but its split sizes) of a dataset of kind prepared from source."""
    enc = get_tokenizer(*args.tokenizer)
    return enc, dict(kind=kind, image_size=args.image_size, context_length=args.context_length, **extra,
                     tokenizer=tokenizer_meta(args.tokenizer[0], enc), source={split: source for split in splits})


def finish_dataset(tmp, args, meta, sizes, report):
    """meta.json, the tokenizer file and report.json of a dataset prepared into tmp; the summary printed."""
    write_meta(tmp, meta, sizes, args.tokenizer[1])
    with open(os.path.join(tmp, "report.json"), "w") as f:
        json.dump(report.to_dict(), f, indent=1)
    print(f"prepared {args.out} ({meta['kind']}):\n{report.summary()}")


# -----------------------------------------------------------------------------
# captioned images (COCO, Karpathy's splits, a table of image paths and captions)


def coco_items(captions_file, image_dir, split, report):
    """[(image path, [captions])] of a COCO captions file whose images are in image_dir."""
    doc = read_json(captions_file)
    check_dir(image_dir)
    if not (isinstance(doc, dict) and isinstance(doc.get("images"), list) and isinstance(doc.get("annotations"), list)):
        raise ValueError(f"{captions_file} is not a COCO captions file: it has no lists 'images' and 'annotations'")
    images = {}  # id: (path, [captions])
    for k, im in enumerate(doc["images"]):
        where = f"{captions_file}: images[{k}]"
        if not isinstance(im, dict) or not isinstance(im.get("id"), (int, str)):
            report.skip(split, "image without id", where)
        elif not isinstance(im.get("file_name"), str) or not im["file_name"]:
            report.skip(split, "image without file_name", where)
        elif im["id"] in images:
            report.skip(split, "duplicate image id", where, im["id"])
        else:
            images[im["id"]] = (os.path.join(image_dir, im["file_name"]), [])
    for k, ann in enumerate(doc["annotations"]):
        where = f"{captions_file}: annotations[{k}]"
        if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), (int, str)):
            report.skip(split, "annotation without image_id", where)
        elif not isinstance(ann.get("caption"), str):
            report.skip(split, "annotation without caption", where)
        elif ann["image_id"] not in images:
            report.skip(split, "annotation of an unknown image", where, ann["image_id"])
        else:
            images[ann["image_id"]][1].append(ann["caption"])
    return list(images.values())


KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def karpathy_items(split_file, root, report):
    """{split: [(image path, [captions])]} of Karpathy's dataset_coco.json over the COCO root folder."""
    doc = read_json(split_file)
    check_dir(root)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ValueError(f"{split_file} is not a Karpathy split file: it has no list 'images'")
    items, seen = [], {"train"}
    for k, im in enumerate(doc["images"]):
        where = f"{split_file}: images[{k}]"
        split = KARPATHY_SPLITS.get(str(im.get("split"))) if isinstance(im, dict) else None  # str: a list is no key
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


def table_lines(file, columns):
    """(where, the row {column: value} or why it is skipped) of each line of a CSV, TSV (header row) or JSONL file."""
    if not os.path.isfile(file):
        raise ValueError(f"{file} does not exist")
    ext = os.path.splitext(file)[1].lower()
    if ext not in (".csv", ".tsv", ".jsonl"):
        raise ValueError(f"{file}: expected a .csv, .tsv or .jsonl file")
    if ext == ".jsonl":
        with open(file, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line.decode("utf-8-sig"))  # a byte order mark (Excel writes one) dropped
                    row = row if isinstance(row, dict) else "not a JSON object"
                except UnicodeDecodeError:
                    row = "not valid UTF-8"
                except json.JSONDecodeError:
                    if not line.strip():
                        continue
                    row = "not valid JSON"
                yield f"{file}:{n}", row
        return
    with open(file, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
        if absent := [c for c in columns if c not in (reader.fieldnames or [])]:
            raise ValueError(f"{file} has no column {absent[0]!r} in its header row (it has {reader.fieldnames})")
        for row in reader:
            try:
                [v.encode("utf-8") for v in row.values() if isinstance(v, str)]
            except UnicodeEncodeError:  # the bytes that were not UTF-8, kept as lone surrogates
                row = "not valid UTF-8"
            yield f"{file}:{reader.line_num}", row


def table_rows(file, image_key, caption_key, report, split_of):
    """(split, image path, caption) of each usable row of a table (table_lines)."""
    folder, rows = os.path.dirname(os.path.abspath(file)), []
    for where, row in table_lines(file, (image_key, caption_key)):
        path = row.get(image_key) if isinstance(row, dict) else None
        if isinstance(row, str):
            report.skip(None, row, where)
        elif not isinstance(path, str) or not path.strip():
            report.skip(None, f"{image_key} missing", where)
        elif not isinstance(row.get(caption_key), str):
            report.skip(split_of(os.path.normpath(path)), f"{caption_key} missing", where)
        else:
            path = os.path.normpath(path)
            rows.append((split_of(path), os.path.join(folder, path), row[caption_key]))
    return rows


def table_items(file, report, val_file=None, val_fraction=0.0, image_column="image", caption_column="caption"):
    """{split: [(image path, [captions])]} of a table (table_rows), the rows of an image joined."""
    read = lambda part, split_of: table_rows(part, image_column, caption_column, report, split_of)  # noqa: E731
    out = {}
    for split, rows in two_splits(read, file, val_file, val_fraction, ("train", "val"), report, file).items():
        images = {}
        for path, caption in rows:
            images.setdefault(path, []).append(caption)
        out[split] = list(images.items())
    return out


def captioned_split(tmp, split, items, enc, args, report, source):
    """Write one split of captioned images: images, tokens (each image's valid captions repeated to fill the
    slots), n_captions and the texts ({split}.captions.json); returns its size."""
    t0, texts = time.time(), [c for _, captions in items for c in captions]
    tokens, problems = encode_checked(enc, texts, args.context_length)
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
    S, per_image = args.image_size, args.captions_per_image
    kept = write_rows(tmp, split, tasks, partial(image_row, size=S), {"images": ((S, S, 3), np.uint8)},
                      args.workers, report) if tasks else []
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
    print(f"{split}: {len(kept)} images in {time.time() - t0:.1f} s")
    return len(kept)


def captioned_dataset(args, items, report, source, stream=None):
    """Prepare captioned images, items {split: [(image path or TarMember, [captions])]}, into --out (kind
    'captions'; stream: the meta of a streamed train split); coco's split joins the dataset at --out (same sizes
    and tokenizer), its other splits kept."""
    enc, meta = dataset_meta(args, "captions", items, source, captions_per_image=args.captions_per_image)
    if stream:
        meta["stream"] = stream
    old = Dataset(args.out) if args.source == "coco" and os.path.exists(os.path.join(args.out, "meta.json")) else None
    keep = []
    if old is not None:
        fields = ("kind", "image_size", "context_length", "captions_per_image")
        differ = [f"{k} {old.meta.get(k)} there, {meta[k]} asked" for k in fields if old.meta.get(k) != meta[k]]
        (kind, bpe_text), old_kind, old_text = args.tokenizer, old.meta["tokenizer"]["kind"], old.bpe_text or ""
        if (old_kind, old_text) != (kind, bpe_text):
            n_old, n_new = (text.count("\n") for text in (old_text, bpe_text))  # a line a rank
            differ.append(f"tokenizer {old_kind} of {n_old} ranks there, {'other ' * (old_kind == kind)}{kind} of "
                          f"{n_new} ranks asked")
        if differ:
            raise ValueError(f"{args.out} holds a dataset of other sizes or another tokenizer than asked: "
                             f"{'; '.join(differ)}: prepare into a new --out, or ask for the same")
        keep = [s for s in old.meta["splits"] if s not in items]
        if "stream" in old.meta and "train" not in items:  # a streamed train split is kept too
            meta["stream"] = old.meta["stream"]
        kept = keep + ["train"] * ("stream" in meta)
        meta["source"] = {**{s: v for s, v in old.meta.get("source", {}).items() if s in kept}, **meta["source"]}
        with open(os.path.join(args.out, "report.json")) as f:
            report.splits = {**{s: v for s, v in json.load(f)["splits"].items() if s in kept}, **report.splits}
    with staged_dataset(args.out, replace=True) as tmp:
        sizes = {split: captioned_split(tmp, split, split_items, enc, args, report, source)
                 for split, split_items in items.items()}
        sizes.update(link_split_files(tmp, old, keep))
        finish_dataset(tmp, args, meta, sizes, report)


# -----------------------------------------------------------------------------
# webdataset shards: tars of samples (key.jpg + key.txt, as img2dataset writes them); the val
# split is prepared, the train split, too large to prepare, streamed in training (ShardStream)

WDS_IMAGE = ("jpg", "jpeg", "png", "webp")  # the extensions of a sample's image member
WDS_CAPTION = "txt"
SHARD_RANGE = regex.compile(r"\{(\d+)\.\.(\d+)\}")  # webdataset's brace range: {00000..00099}
WdsSample = namedtuple("WdsSample", "key image caption")  # image a TarMember, caption bytes; either None if absent


def expand_braces(name):
    """The names of a brace range name, in order, zero-padded to its first bound's width."""
    m = SHARD_RANGE.search(name)
    if m is None:
        return [name]
    lo, hi = m.groups()
    if int(hi) < int(lo):
        raise ValueError(f"webdataset shards {name}: the range {m.group()} runs backwards")
    return [expanded for i in range(int(lo), int(hi) + 1)
            for expanded in expand_braces(name[:m.start()] + str(i).zfill(len(lo)) + name[m.end():])]


def expand_shards(spec):
    """The absolute paths of a shard spec: comma-separated paths, globs or brace ranges, each once."""
    paths = []
    for part in filter(None, spec.split(",")):
        if glob.has_magic(part):
            names = sorted(glob.glob(part))
            if not names:
                raise ValueError(f"webdataset shards {part}: no file matches")
        else:
            names = expand_braces(part)
        if missing := [n for n in names if not os.path.isfile(n)]:
            raise ValueError(f"webdataset shard not found: {missing[0]}")
        paths += [os.path.abspath(n) for n in names]
    if not paths:
        raise ValueError(f"no webdataset shard in {spec!r}")
    if twice := [p for p, n in Counter(paths).items() if n > 1]:
        raise ValueError(f"webdataset shard {twice[0]} is named twice in {spec}")
    return paths


def tar_samples(path):
    """(its WdsSamples in order, '' or where a damaged tar stopped) of a webdataset tar."""
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


def webdataset_dataset(args, report):
    """A captioned dataset of the val shards' usable samples with the train split streamed: meta stream =
    {shards (but those without a usable sample), counts: each one's samples, samples: their sum}."""
    train_shards, val_shards = expand_shards(args.train), expand_shards(args.val)
    if both := [s for s in train_shards if s in set(val_shards)]:
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
        raise ValueError(f"webdataset shards {args.train}: no sample with an image and a UTF-8 caption in them "
                         f"(skipped: {report.reasons('train')})")
    report.keep("train", shards=len(stream["shards"]), samples=stream["samples"])
    val = []
    for shard, samples in shard_samples(val_shards, "val", report):
        for sample in samples:
            caption, reason = wds_caption(sample)
            if reason:
                report.skip("val", reason, f"{shard}:{sample.key}")
            else:
                val.append((sample.image, [caption]))
    captioned_dataset(args, {"val": val}, report, args.val, stream)


StreamSample = namedtuple("StreamSample", "epoch shard key image tokens")  # tokens (T,) int32
LOGGED_SKIPS = 10  # a consumer logs its first skips, then only those whose count is a power of two


def nearest_good(good):
    """For each place of a batch, the nearest place whose image is good (the earlier on a tie)."""
    places = np.flatnonzero(good)
    return places[np.abs(np.arange(len(good))[:, None] - places[None, :]).argmin(1)]


def few(paths):
    """The first three of a list of paths, and how many there are in all if more."""
    return ", ".join(paths[:3]) + (f" ... ({len(paths)} in all)" if len(paths) > 3 else "")


def deal_shards(order, counts, dealt):
    """The consumer of each shard of order: the fewest samples so far (dealt, a heap), the lowest on a tie."""
    out = []
    for s in order:
        total, c = heapq.heappop(dealt)
        heapq.heappush(dealt, (total + max(1, counts[s]), c))
        out.append(c)
    return out


class ShardStream:
    """Consumer c of C (every rank's loader workers) reading S shards, shuffled by seed and epoch: with S >= C
    each shard whole to one consumer an epoch (deal_shards), with S < C every C-th valid sample of every shard.
    batch(k) is samples [k*B, (k+1)*B) of its valid ones; a late start reads captions, not images."""

    def __init__(self, shards, counts, consumer, n_consumers, seed, enc, context_length, image_size, batch_size,
                 log=print):
        self.shards, self.counts, self.c, self.n, self.seed = shards, counts, consumer, n_consumers, seed
        self.enc, self.T, self.S, self.B, self.log = enc, context_length, image_size, batch_size, log
        self.skipped = Counter()
        self._walk, self._start, self._held = None, 0, []  # the walk, and its samples held from place _start on

    def skip(self, reason, item, action="passed over"):
        self.skipped[reason] += 1
        n = self.skipped.total()
        if n <= LOGGED_SKIPS or n & (n - 1) == 0:
            later = "; from here on a skip is logged when the count reaches a power of two" if n == LOGGED_SKIPS else ""
            self.log(f"webdataset: consumer {self.c} of {self.n}: {item}: {reason}, {action} "
                     f"(skipped so far: {count_text(self.skipped)}{later})")

    def walk(self):
        """(epoch, shard, [StreamSample]) of each shard read; raises once no valid sample can come."""
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
                captions = [wds_caption(sample) for sample in samples]
                tokens, problems = encode_checked(self.enc, [caption or "" for caption, _ in captions], self.T)
                valid = []
                for sample, row, (_, reason), problem in zip(samples, tokens, captions, problems):
                    reason = reason or problem and text_reason(problem, "caption")
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

    def samples(self, k):
        """The StreamSamples of batch k; an earlier batch than the last one starts the walk again."""
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
        """Images (B, S, S, 3) uint8 and tokens (B, T) int32 of batch k, a bad image's by nearest_good."""
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
    """A rank's pretraining batches for loader workers: micro-step s is batch s // n of stream s % n, the
    ShardStream (seed, enc, context_length, image_size, batch_size) of consumer rank * n + s % n of world_size * n."""

    def __init__(self, shards, counts, rank, world_size, n, *stream_args, log=print):
        self.n = n
        self.streams = {j: ShardStream(shards, counts, rank * n + j, world_size * n, *stream_args, log=log)
                        for j in range(n)}

    def samples(self, s):
        """The StreamSamples of micro-step s (for tests: which samples a step reads)."""
        return self.streams[s % self.n].samples(s // self.n)

    def fetch(self, s):
        """Images (B, S, S, 3) uint8 and tokens (B, T) int32 of micro-step s (ShardStream.batch)."""
        return self.streams[s % self.n].batch(s // self.n)


def stream_images(ds, n, seed, log):
    """The first n images of a streamed train split's walk (consumer 0 of 1): a codebook's fit."""
    return ShardStream(ds.stream["shards"], ds.stream["counts"], 0, 1, seed, ds.tokenizer, ds.context_length,
                       ds.image_size, n, log=log).batch(0)[0]


def prepare_codebook(path, patch_size, n_codes, **kwargs):
    """data.prepare_codebook of any dataset, a streamed train split fitted on its first images."""
    return data.prepare_codebook(path, patch_size, n_codes, stream_images=stream_images, **kwargs)


def stream_fetch(cfg, ds, rank, world_size):
    """(fetch, n) of pretraining batches from a streamed train split: micro-step s is read by
    stream s mod max(1, num_workers) of this rank (one per loader worker), so a resumed run with
    the same ranks and workers reads the same batches; every sample is its own group."""
    if cfg.train_images:
        raise SystemExit(f"--train_images={cfg.train_images} (a flag, or the finetune stage's preset): {ds.path} "
                         f"streams its train split from webdataset shards; give --train_images=0 to stream them all")
    batches = ShardBatches(ds.stream["shards"], ds.stream["counts"], rank, world_size, max(1, cfg.num_workers),
                           cfg.seed, ds.tokenizer, ds.context_length, ds.image_size, cfg.batch_size)

    def fetch(micro_step):
        images, tokens = batches.fetch(micro_step)
        return dict(images=images, tokens=tokens.astype(np.int64))
    return fetch, ds.stream["samples"]


# -----------------------------------------------------------------------------
# class masks (the prompt stage)


def read_classes(file):
    """The class names of a file with one per line, line k naming mask value k (0: background): 2 to 256
    (uint8 maps), distinct, none empty or with a comma (train.py --classes)."""
    if not os.path.isfile(file):
        raise ValueError(f"{file} does not exist")
    with open(file, encoding="utf-8") as f:
        names = [line.strip() for line in f.read().rstrip("\n").split("\n")]
    if any(not n or "," in n for n in names) or len(set(names)) != len(names) or not 2 <= len(names) <= 256:
        raise ValueError(f"{file}: need 2 to 256 distinct class names, the background's first, none empty or with "
                         f"a comma; got {names[:10]}{'...' if len(names) > 10 else ''}")
    return names


def mask_pairs(image_dir, mask_dir, split_of, report):
    """[(split, image path, mask path)] of the images in image_dir and their PNG masks in mask_dir."""
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
    """Sorted [(value, x0, y0, x1, y1)] of each 8-connected region of a class (value > 0) of a class map."""
    runs, parent, above = [], [], []  # runs [value, x0, y, x1, y + 1] (a box), by row; above: the last row's

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y, row in enumerate(classmap):
        cuts = [0, *(np.flatnonzero(row[1:] != row[:-1]) + 1).tolist(), len(row)]
        first = len(runs)
        runs += [[int(row[x0]), x0, y, x1, y + 1] for x0, x1 in zip(cuts, cuts[1:]) if row[x0]]
        parent += range(first, len(runs))
        for i in range(first, len(runs)):
            for j in above:
                if runs[j][1] > runs[i][3]:
                    break
                if runs[j][0] == runs[i][0] and runs[i][1] <= runs[j][3]:  # columns within one of each other
                    parent[root(i)] = root(j)
        above = range(first, len(runs))
    boxes = {}
    for i, (v, x0, y0, x1, y1) in enumerate(runs):
        b = boxes.setdefault(root(i), [v, x0, y0, x1, y1])
        b[1], b[3], b[4] = min(b[1], x0), max(b[3], x1), y1
    return sorted(map(tuple, boxes.values()))


def mask_row(pair, size, n_classes, void):
    """An image and its class mask (cropped as the image, void made background) as rows, and its regions."""
    image, mask = pair
    pixels, mode, image_wh = read_image(image, size)
    values, mask_wh = read_image_file(mask, mask_values, "mask")
    if mask_wh != image_wh:
        raise BadImage(mask, "mask size differs from its image", f"{mask_wh} vs {image_wh}")
    if void is not None:
        values[values == void] = 0
    if values.max() >= n_classes or values.min() < 0:
        raise BadImage(mask, "mask value beyond the classes",
                       f"{values.min()}..{values.max()} for {n_classes} classes")
    classmap = fit_square(Image.fromarray(values.astype(np.uint8)), size, Image.NEAREST)
    return {"images": pixels, "classmap": classmap}, mode, class_regions(classmap)


def mask_dataset(args, pairs, classes, report):
    """Prepare images with class masks, pairs {split: [(image, mask)]}, into --out (kind 'masks', splits
    novel_train and novel_val); classes names the mask values, background first."""
    _, meta = dataset_meta(args, "masks", pairs, args.images, classes=classes, novel_classes=classes[1:],
                           void=args.void)
    S = args.image_size
    rows = {"images": ((S, S, 3), np.uint8), "classmap": ((S, S), np.uint8)}
    read = partial(mask_row, size=S, n_classes=len(classes), void=args.void)
    with staged_dataset(args.out, replace=True) as tmp:
        sizes = {}
        for split, tasks in pairs.items():
            kept = write_rows(tmp, split, tasks, read, rows, args.workers, report) if tasks else []
            if not kept:
                raise nothing_left_error(args.images, split, report)
            objects = np.full((len(kept), max(1, max(len(b) for _, b in kept)), 7), -1, np.int16)
            for n, (_, boxes) in enumerate(kept):
                for j, (v, *box) in enumerate(boxes):
                    objects[n, j] = (v - 1, -1, -1, *box)  # the world's objects rows: class value - 1 as the shape
            save_arrays(tmp, split, dict(objects=objects))
            sizes[split] = len(kept)
            report.keep(split, images=len(kept), regions=int((objects[:, :, 0] >= 0).sum()))
        finish_dataset(tmp, args, meta, sizes, report)


# -----------------------------------------------------------------------------
# multi-image question sets (the instruct stage)


def multi_items(file, max_images, report, split_of):
    """[(split, [image paths], question, answer, type)] of a JSON list of question sets."""
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


def multi_dataset(args, sets, report):
    """Prepare question sets, {split: [([image paths], question, answer, type)]}, into --out (kind 'multi',
    splits multi_train and multi_val): an image pool and the sets' pool indices."""
    S, A = args.image_size, args.answer_length
    enc, meta = dataset_meta(args, "multi", sets, args.file, answer_length=A)
    with staged_dataset(args.out, replace=True) as tmp:
        sizes, types = {}, {}
        for split, split_sets in sets.items():
            question, q_problems = encode_checked(enc, [s[1] for s in split_sets], args.context_length - A)
            q_problems = [p if p != "empty" else "" for p in q_problems]  # no question: an instruction-free sample
            answer, a_problems = encode_checked(enc, [s[2] for s in split_sets], A)
            good = []
            for i, (_, q, a, _) in enumerate(split_sets):
                problems = [text_reason(p, w) for p, w in ((q_problems[i], "question"), (a_problems[i], "answer")) if p]
                if problems:
                    report.skip(split, problems[0], q[:200], a[:200])
                else:
                    good.append(i)
            paths = sorted({p for i in good for p in split_sets[i][0]})
            kept = write_rows(tmp, split, paths, partial(image_row, size=S), {"images": ((S, S, 3), np.uint8)},
                              args.workers, report) if paths else []
            pool = {paths[i]: n for n, (i, _) in enumerate(kept)}
            rows = []
            for i in good:
                if lost := [p for p in split_sets[i][0] if p not in pool]:
                    report.skip(split, "unusable image", split_sets[i][1][:200], lost[0])
                else:
                    rows.append(i)
            if not rows:
                raise nothing_left_error(args.file, split, report)
            members = [[pool[p] for p in split_sets[i][0]] for i in rows]
            width, pad = max(map(len, members)), enc.encode_single_token(PAD)
            save_arrays(tmp, split, dict(sets=np.array([m + [-1] * (width - len(m)) for m in members], np.int32),
                                         question=np.pad(question[rows], ((0, 0), (0, A)), constant_values=pad),
                                         answer=answer[rows]))
            sizes[split], types[split] = len(rows), [split_sets[i][3] for i in rows]
            report.keep(split, sets=len(rows), images=len(kept))
        meta["qtypes"] = sorted({t for ts in types.values() for t in ts})  # the types of the sets kept
        for split, ts in types.items():
            save_arrays(tmp, split, dict(qtype=np.array([meta["qtypes"].index(t) for t in ts], np.int16)))
        finish_dataset(tmp, args, meta, sizes, report)


# -----------------------------------------------------------------------------
# multi-image question sets generated from captions alone (no scene records, no hand labels)

NUMBER_WORDS = {w: n for n, w in enumerate("zero one two three four five six seven eight nine ten".split())
                if n} | {"a": 1, "an": 1}
DETERMINERS = NUMBER_WORDS.keys() | {"the", "some", "several", "many", "this", "that", "these", "those", "his", "her",
                                     "its", "their"}  # a noun phrase starts at one (or at a number)
# words that end a noun phrase: prepositions, conjunctions, common verbs (and a word in -ing after a noun)
PHRASE_ENDS = set("""of in on at with near next to by under above below behind beside beneath over for into onto
    from left right top bottom front and or while that who which is are was were has have sits sit stands stand
    holds hold there here""".split())
FRAME_NOUNS = {"photo", "picture", "image", "view", "photograph", "shot", "closeup", "scene"}  # the picture, no object
COLOUR_WORDS = set(data.COLOUR_NAMES) | {"black", "grey", "gray", "brown", "pink", "magenta", "silver", "gold"}
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large", "huge": "large"}
GEN_QTYPES = ("count", "most", "largest", "which", "change", "order", "free")
# words that lay objects out along an axis: (axis, whether the caption names them from the far end)
LAYOUT_WORDS = {w: k for table in (data.RELATIONS, data.DIRECTIONS) for k, w in table.items()} | {
    "under": (2, True), "beneath": (2, True), "on top of": (2, False)}


def singular(noun):
    """An English plural's singular, by rule (crosses -> cross, ponies -> pony, dogs -> dog)."""
    for end, repl in (("ies", "y"), ("sses", "ss"), ("xes", "x"), ("ches", "ch"), ("shes", "sh"), ("s", "")):
        if noun.endswith(end) and not noun.endswith("ss") and len(noun) > len(end) + 1:
            return noun[:-len(end)] + repl
    return noun


def plural(noun):
    """An English singular's plural, by rule: data.PLURALS agrees (cross -> crosses)."""
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" else noun + "s"


def ends_phrase(words, j, start):
    """Whether words[j] ends the noun phrase that words[start] begins."""
    verb = words[j].endswith("ing") and j > start + 1 and words[j - 1] not in COLOUR_WORDS | SIZE_WORDS.keys()
    return not words[j].isalpha() or words[j] in PHRASE_ENDS | DETERMINERS or verb  # 'a dog sitting', 'a red ring'


def caption_objects(text):
    """The objects a caption names: [(count or None, size or None, colour or None, noun)], one per noun phrase
    (a determiner or number, then words up to a phrase end); a plain reader of English, no tagger."""
    words = regex.findall(r"[a-z]+|\d+|[,.;:!?]", text.lower())
    objects, i = [], 0
    while i < len(words):
        if not (words[i] in DETERMINERS or words[i].isdigit()):
            i += 1
            continue
        count = int(words[i]) if words[i].isdigit() else NUMBER_WORDS.get(words[i])  # None: 'the', 'some', ...
        j = i + 1
        while j < len(words) and not ends_phrase(words, j, i):
            j += 1
        phrase, i = words[i + 1:j], j
        if not phrase or phrase[-1] in FRAME_NOUNS | COLOUR_WORDS | SIZE_WORDS.keys():
            continue
        noun = singular(phrase[-1]) if count is None or count > 1 else phrase[-1]
        size = next((SIZE_WORDS[x] for x in phrase[:-1] if x in SIZE_WORDS), None)
        colour = next((x for x in phrase[:-1] if x in COLOUR_WORDS), None)
        objects.append((count, size, colour, noun))
    return objects


def caption_layout(text):
    """(axis, the objects in order along it) where a caption of two or more single objects holds one layout
    phrase ('a red ring left of a blue cross', 'from right to left: ...'), else None."""
    found = [k for w, k in LAYOUT_WORDS.items() if regex.search(rf"\b{w}\b", text.lower())]
    objects = caption_objects(text)
    if len(found) != 1 or len(objects) < 2 or any(o[0] != 1 for o in objects):
        return None
    axis, reverse = found[0]
    return axis, tuple(objects[::-1] if reverse else objects)


def unit(obj):
    """One object of caption_objects as (size, colour, noun), '' for a word the caption leaves out."""
    return obj[1] or "", obj[2] or "", obj[3]


def describe(obj):
    """An object's colour and noun: 'red circle', or 'dog'."""
    return " ".join(x for x in obj[2:] if x)


def kept_layout(a, b, before, after):
    """Whether layout a with one object `before` made `after` (None: removed) is layout b: the objects that
    did not change stay in their order along the same axis. Unknown layouts (None) agree with any."""
    if not a or not b:
        return True
    return a[0] == b[0] and any(o == before and a[1][:n] + ((after,) if after else ()) + a[1][n + 1:] == b[1]
                                for n, o in enumerate(a[1]))


CHANGED_FIELD = {"colour": 1, "shape": 2}  # which of (size, colour, noun) a colour or shape change changes


def change_partners(units, layouts):
    """{kind: {image: [images whose objects differ from its in just that]}} for each of data.CHANGES: colour,
    shape, position (the same objects, another layout), removed and added (one object fewer, one more), the
    other objects kept in their layout; units {image: sorted unit of each object}, layouts {image: (axis, those
    units in order along it), or None}."""
    index = {"colour": {}, "shape": {}, "position": {}, "whole": {}}
    for i, u in units.items():
        index["whole"].setdefault(u, []).append(i)
        if layouts.get(i):
            index["position"].setdefault(u, {}).setdefault(layouts[i], []).append(i)
        for j, obj in enumerate(u):
            for kind, f in CHANGED_FIELD.items():  # keyed by the other objects and this one's other two fields
                index[kind].setdefault((u[:j] + u[j + 1:], obj[:f] + obj[f + 1:]), {}).setdefault(obj[f], []).append(i)
    found = {kind: {} for kind in data.CHANGES}
    for i, u in units.items():
        mine = layouts.get(i)
        if mine:
            found["position"][i] = [k for at, ks in index["position"][u].items() if at != mine for k in ks]
        for j, obj in enumerate(u):
            rest = u[:j] + u[j + 1:]
            found["removed"].setdefault(i, []).extend(k for k in index["whole"].get(rest, [])
                                                      if kept_layout(mine, layouts.get(k), obj, None))
            for kind, f in CHANGED_FIELD.items():
                group = index[kind][rest, obj[:f] + obj[f + 1:]].items() if obj[f] else ()  # unnamed: no change
                found[kind].setdefault(i, []).extend(
                    k for value, ks in group if value and value != obj[f] for k in ks
                    if kept_layout(mine, layouts.get(k), obj, obj[:f] + (value,) + obj[f + 1:]))
    for i, ks in found["removed"].items():  # k has one object fewer than i: i has one more than k
        for k in ks:
            found["added"].setdefault(k, []).append(i)
    return {kind: {i: sorted(set(ks)) for i, ks in found[kind].items() if ks} for kind in data.CHANGES}


def question_sets(images, n_sets, max_images, fits, rng, report, split, types=GEN_QTYPES, give_up=200):
    """n_sets [(image indices, question, answer, type)] over images [([captions], objects)], the types in turn;
    every answer is read from the captions. A draw the captions cannot answer, or that fits(question, answer)
    refuses, is skipped and counted; a type with give_up such draws in a row is dropped."""
    counted = [i for i, (_, objs) in enumerate(images) if objs and all(o[0] for o in objs)]  # every count known
    units = {i: tuple(sorted(unit(o) for o in images[i][1] for _ in range(o[0]))) for i in counted}
    small = [i for i in counted if all(x[0] == "small" for x in units[i])]
    large = [i for i in counted if all(x[0] for x in units[i]) and any(x[0] == "large" for x in units[i])]
    named = [i for i, (_, objs) in enumerate(images) if objs]
    layouts = {i: caption_layout(images[i][0][0]) for i in counted}
    partners = change_partners(units, {i: (at[0], tuple(map(unit, at[1]))) for i, at in layouts.items() if at})
    changes = {kind: list(p) for kind, p in partners.items() if p}  # the kinds these captions can show, each's images
    out, alive, misses = [], list(types), Counter()

    def pick(pool, k):
        return [int(x) for x in rng.choice(pool, k, replace=False)] if len(pool) >= k else None

    while len(out) < n_sets and alive:
        qtype = alive[len(out) % len(alive)]
        K = int(rng.integers(2, max_images + 1))
        ids = made = None  # the images drawn (None: too few to draw from) and the question and answer
        if qtype == "count" and (ids := pick(counted, K)):
            objs = [o for i in ids for o in images[i][1]]
            o = objs[int(rng.integers(len(objs)))]
            if rng.integers(2) and o[2]:
                made = f"how many {o[2]} objects are there?", str(sum(x[0] for x in objs if x[2] == o[2]))
            else:
                made = f"how many {plural(o[3])} are there?", str(sum(x[0] for x in objs if x[3] == o[3]))
        elif qtype == "most" and (ids := pick(counted, K)):
            totals = [len(units[i]) for i in ids]
            if totals.count(max(totals)) == 1:
                made = "which image has the most objects?", f"image {totals.index(max(totals)) + 1}"
        elif qtype == "largest" and (ids := pick(large, 1)) and (rest := pick(small, K - 1)):
            at = int(rng.integers(K))
            ids, made = rest[:at] + ids + rest[at:], ("which image has the largest object?", f"image {at + 1}")
        elif qtype == "which" and (ids := pick(named, K)):
            at = int(rng.integers(K))
            o = images[ids[at]][1][int(rng.integers(len(images[ids[at]][1])))]
            if not any(x[3] == o[3] for i in ids[:at] + ids[at + 1:] for x in images[i][1]):
                made = f"which image shows the {describe(o)}?", f"image {at + 1}"
        elif qtype == "change" and changes:  # each kind the captions can show as often, whatever its images
            kind = list(changes)[int(rng.integers(len(changes)))]
            i = int(rng.choice(changes[kind]))
            ids, made = [i, int(rng.choice(partners[kind][i]))], ("what changed between the two images?", kind)
        elif qtype == "order" and (ids := pick(named, K)):
            a, b = (int(x) for x in rng.choice(K, 2, replace=False))
            oa, ob = (images[ids[k]][1][int(rng.integers(len(images[ids[k]][1])))] for k in (a, b))
            nouns = [x[3] for i in ids for x in images[i][1]]
            if nouns.count(oa[3]) == 1 and nouns.count(ob[3]) == 1:
                made = f"is the {describe(oa)} before the {describe(ob)}?", "yes" if a < b else "no"
        elif qtype == "free" and (ids := pick(named, 1)):
            made = "", min(images[ids[0]][0], key=len)  # instruction-free: no question, a caption is the answer
        if made is not None and fits(*made):
            out.append((ids, *made, qtype))
            misses[qtype] = 0
            continue
        report.skip(split, f"a {qtype} draw the captions cannot answer" if made is None else
                    f"a {qtype} set too long for the context", ids if made is None else made[0] or made[1])
        misses[qtype] += 1
        if misses[qtype] == give_up:
            alive.remove(qtype)
            report.skip(split, f"{qtype}: dropped after {give_up} draws in a row gave no set", qtype)
    if len(out) < n_sets:
        raise ValueError(f"the captions of split {split!r} gave {len(out)} question sets of the {n_sets} asked: "
                         f"no type could give more")
    return out


def generated_sets(args, report):
    """{multi_train, multi_val: [([image paths], question, answer, type)]} made by question_sets from the captions
    of a COCO captions file (the objects from each image's first); val from the images --val_fraction holds out."""
    items = coco_items(args.captions, check_dir(args.images), None, report)
    enc = get_tokenizer(*args.tokenizer)
    fits = lambda q, a: (len(enc.encode_ordinary(q)) + 2 <= args.context_length - args.answer_length  # noqa: E731
                         and len(enc.encode_ordinary(a)) + 2 <= args.answer_length)
    rng, sets = np.random.default_rng(args.seed), {}
    for split, n in (("multi_train", args.sets), ("multi_val", args.val_sets)):
        mine = [(path, captions) for path, captions in items if captions and
                held_out(os.path.relpath(path, args.images), args.val_fraction) == (split == "multi_val")]
        made = question_sets([(cs, caption_objects(cs[0])) for _, cs in mine], n, args.max_images, fits, rng, report,
                             split, args.types)
        sets[split] = [([mine[i][0] for i in ids], q, a, t) for ids, q, a, t in made]
    return sets


def export_coco(args):
    """A prepared dataset's captioned split (the shapes world's too) as a COCO captions file and image folder:
    out/images/<n>.png and out/captions.json, written beside and renamed into place."""
    ds = Dataset(check_dir(args.data))
    if not ds.has(args.split, "tokens"):
        raise ValueError(f"{args.data} has no captioned split {args.split!r}")
    if os.path.exists(args.out):
        raise ValueError(f"{args.out} exists: not writing over it")
    texts = ds.captions(args.split)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    os.makedirs(os.path.join(tmp, "images"))
    images, annotations = [], []
    for i, (pixels, rows) in enumerate(zip(ds.array(args.split, "images"), ds.array(args.split, "tokens"))):
        name = f"{i:06d}.png"
        Image.fromarray(np.asarray(pixels)).save(os.path.join(tmp, "images", name))
        images.append({"id": i, "file_name": name})
        captions = texts[i] if texts else [data.decode_tokens(ds.tokenizer, r) for r in rows]
        for c in dict.fromkeys(c for c in captions if c):
            annotations.append({"id": len(annotations), "image_id": i, "caption": c})
    with open(os.path.join(tmp, "captions.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    os.rename(tmp, args.out)
    print(f"exported {len(images)} images and {len(annotations)} captions of {args.data} ({args.split}) to {args.out}")


# -----------------------------------------------------------------------------
# the command line


def parse_args(argv):
    """The arguments of `python prepare.py SOURCE ...`; a usage error exits with the command's own usage."""
    parser = argparse.ArgumentParser(prog="prepare.py",
                                     description="Prepare real data into a nanoVLP dataset directory.")
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
    asked = argparse.ArgumentParser(add_help=False)  # the sizes of question sets, made or read
    asked.add_argument("--answer_length", type=int, default=8, help="the model's answer_length")
    asked.add_argument("--max_images", type=int, default=4, help="the most images of a set (the model's image_slots)")
    p = sub.add_parser("multi", parents=[common, held, asked], help="multi-image question sets for the instruct stage")
    p.add_argument("--file", required=True, help='a JSON list of {"images": [paths], "question", "answer", "type"}')
    p.add_argument("--val", help="a second such file for the val split")
    p = sub.add_parser("questions", parents=[common, asked], help="multi-image question sets generated from the "
                       "captions of a COCO captions file alone (counting, comparison, change, order, ...)")
    p.add_argument("--captions", required=True, help="the COCO captions file")
    p.add_argument("--images", required=True, help="its image folder")
    p.add_argument("--sets", type=int, default=4000, help="question sets of multi_train")
    p.add_argument("--val_sets", type=int, default=500, help="question sets of multi_val (the held-out images)")
    p.add_argument("--seed", type=int, default=0, help="the draws of images and questions")
    p.add_argument("--types", type=lambda s: tuple(s.split(",")), default=GEN_QTYPES,
                   help=f"the question types, comma-separated, made in turn (default: all, {','.join(GEN_QTYPES)})")
    # its own --val_fraction, not held's: set_defaults on a parent's argument changes it for every source
    p.add_argument("--val_fraction", type=float, default=0.1, help="the images held out for the val sets (by a hash "
                   "of each path)")
    p = sub.add_parser("export", help="a prepared dataset's captioned split (the shapes world's too) as a COCO folder")
    p.add_argument("--data", required=True, help="the prepared dataset directory")
    p.add_argument("--split", default="train", help="the captioned split")
    p.add_argument("--out", required=True, help="the folder to write: images/ and captions.json")
    p = sub.add_parser("webdataset", parents=[common], help="webdataset tar shards: val prepared, train streamed")
    p.add_argument("--train", required=True, help="the train shards, streamed in training: paths, globs or brace "
                   "ranges, comma-separated (quoted), e.g. 'shards/{00000..00099}.tar'")
    p.add_argument("--val", required=True, help="the val shards, prepared (one caption per image)")
    p.set_defaults(captions_per_image=1)
    args = parser.parse_args(argv)
    error = sub.choices[args.source].error
    if args.source == "export":
        return args
    if args.image_size < 1 or args.context_length < 3 or args.workers < 1:
        error("--image_size and --workers must be at least 1, --context_length at least 3")
    if getattr(args, "captions_per_image", 1) < 1:
        error("--captions_per_image must be at least 1")
    if not 0 <= getattr(args, "val_fraction", 0) < 1:
        error("--val_fraction must be in [0, 1)")
    if getattr(args, "val", None) and getattr(args, "val_fraction", 0):
        error("give --val or --val_fraction, not both")
    if args.source == "masks" and (bool(args.val_images) != bool(args.val_masks) or
                                   bool(args.val_images) and bool(args.val_fraction)):
        error("give --val_images with --val_masks, or --val_fraction, or neither")
    if args.source in ("multi", "questions") and not (3 <= args.answer_length < args.context_length and
                                                      args.max_images >= 1):
        error("--answer_length must be at least 3 and below --context_length, --max_images at least 1")
    if args.source == "questions" and not (args.max_images >= 2 and args.sets >= 1 and args.val_sets >= 1 and
                                           args.val_fraction > 0):
        error("--max_images must be at least 2 (a set compares images), --sets and --val_sets at least 1, "
              "--val_fraction above 0 (the val sets' images)")
    if args.source == "questions" and not (args.types and set(args.types) <= set(GEN_QTYPES)):
        error(f"--types {','.join(args.types)}: each must be one of {', '.join(GEN_QTYPES)}")
    return args


def main(argv=None):
    """python prepare.py SOURCE ...: prepare a real source; bad input stops with 'error: ...'."""
    args = parse_args(argv)
    report = Report()
    try:
        if args.source == "export":
            return export_coco(args)
        args.tokenizer = load_tokenizer(args.tokenizer)  # (kind, the text of its tiktoken file)
        if args.source == "coco":
            items = {args.split: coco_items(args.captions, args.images, args.split, report)}
            captioned_dataset(args, items, report, args.captions)
        elif args.source == "karpathy":
            captioned_dataset(args, karpathy_items(args.json, args.images, report), report, args.json)
        elif args.source == "table":
            items = table_items(args.file, report, args.val, args.val_fraction, args.image_column, args.caption_column)
            captioned_dataset(args, items, report, args.file)
        elif args.source == "webdataset":
            webdataset_dataset(args, report)
        elif args.source == "masks":
            classes = read_classes(args.classes)
            read = lambda folders, split_of: mask_pairs(*folders, split_of, report)  # noqa: E731
            pairs = two_splits(read, (args.images, args.masks), (args.val_images, args.val_masks) if args.val_images
                               else None, args.val_fraction, ("novel_train", "novel_val"), report, args.images)
            mask_dataset(args, pairs, classes, report)
        elif args.source == "questions":
            args.file = args.captions  # the source multi_dataset names
            multi_dataset(args, generated_sets(args, report), report)
        else:
            sets = two_splits(lambda file, split_of: multi_items(file, args.max_images, report, split_of), args.file,
                              args.val, args.val_fraction, ("multi_train", "multi_val"), report, args.file)
            multi_dataset(args, sets, report)
    except ValueError as e:  # bad input, named: no stack trace
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

"""
Caption bootstrapping (CapFilt, BLIP): a captioner writes a caption for every image of a noisy split, an
image-text matching filter keeps the captions it judges matched (the image's own and the synthetic one), and
the result is a new prepared dataset to pretrain on. How it works: docs/capfilt.md.

    python train.py --config small --stage capfilt --init_from out-web/ckpt.pt
"""

import hashlib
import json
import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

import data
from eval import (OBJECTIVES_OFF, binary_metrics, check_tokenizer, checkpoint_file, generate_captions, image_tokens_of,
                  itm_margins, load_checkpoint, read_checkpoint, write_json)

# the objectives of the captioner's and the filter's fine-tuning runs (every other weight 0)
CAPFILT_ROLES = {"captioner": dict(caption_weight=1.0), "filter": dict(itc_weight=1.0, itm_weight=1.0)}
# the fields that decide a cleaned set (with init_from): they name its default directory and go in its report
CAPFILT_SETTINGS = ("capfilt_split", "capfilt_tune", "capfilt_synthetic", "capfilt_top_p", "capfilt_temperature",
                    "capfilt_threshold", "capfilt_clean", "train_split", "train_images", "init_from", "seed")


@torch.no_grad()
def bootstrap(captioner, filt, ds, cfg, device, ctx=nullcontext(), chunk=512):
    """The model work over cfg.capfilt_split, chunk images at a time: a caption per image by nucleus sampling,
    and the filter's ITM margins of each image with its own and its synthetic caption. Returns (synthetic tokens
    (N, T) int32, texts, problems ('', 'empty', 'too long' or 'off': no captioner), margins (N, 2) [own, synthetic])."""
    split, T = cfg.capfilt_split, ds.context_length
    images, own = ds.array(split, "images"), ds.array(split, "tokens")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    tokens, texts, problems, margins = [], [], [], []
    for i in tqdm(range(0, len(images), chunk), desc="capfilt", dynamic_ncols=True):
        x = images[i:i + chunk]
        chunk_texts = [""] * len(x) if captioner is None else generate_captions(
            captioner, ds.tokenizer, x, batch_size=chunk, ctx=ctx, generator=generator,
            temperature=cfg.capfilt_temperature, top_p=cfg.capfilt_top_p)
        chunk_tokens, chunk_problems = data.encode_checked(ds.tokenizer, chunk_texts, T)
        image_tokens = image_tokens_of(filt, x, ctx=ctx)
        pairs = torch.arange(len(x))[:, None].expand(-1, 2)
        margin = lambda t: itm_margins(  # noqa: E731
            filt, image_tokens, torch.from_numpy(np.asarray(t, np.int64)), pairs, device, ctx=ctx).cpu()
        margins.append(torch.stack([margin(own[i:i + chunk, 0]), torch.full((len(x),), -torch.inf) if captioner is None
                                    else margin(chunk_tokens)], 1))
        tokens.append(chunk_tokens)
        texts += chunk_texts
        problems += ["off"] * len(x) if captioner is None else chunk_problems
    return np.concatenate(tokens), texts, problems, torch.cat(margins).numpy()


def capfilt_keep(margins, problems, p):
    """(N, 2) bool [own, synthetic]: the captions whose ITM margin is at least log(p / (1 - p)), p(match) = p (infinite
    at p = 0 and 1: 0 keeps every caption and 1 none, nothing rounded), a synthetic one if usable."""
    threshold = -math.inf if p <= 0 else math.inf if p >= 1 else math.log(p / (1 - p))
    return np.stack([margins[:, 0] >= threshold, (margins[:, 1] >= threshold) & (np.asarray(problems) == "")], 1)


def capfilt_report(ds, split, keep, problems, margins, texts):
    """The filter's counts and, where the split records them, its precision, recall and AUC at finding
    corrupted own captions and wrong synthetic ones, and the share of wrong captions kept (docs/capfilt.md)."""
    problems = np.array(problems)
    usable = problems == ""
    report = {"images": len(keep), "images_kept": int(keep.any(1).sum()), "images_dropped": int((~keep.any(1)).sum()),
              "own_kept": int(keep[:, 0].sum()), "own_dropped": int((~keep[:, 0]).sum()),
              "synthetic_kept": int(keep[:, 1].sum()), "synthetic_dropped": int((~keep[:, 1] & usable).sum()),
              **{f"synthetic_{p.replace(' ', '_')}": int((problems == p).sum()) for p in ("empty", "too long", "off")}}
    synthetic_wrong = None
    if ds.has(split, "scene") and ds.meta.get("kind") == "shapes":
        scene = ds.array(split, "scene")[:]
        synthetic_wrong = np.array([data.parse_caption(t) != s for t, s in zip(texts, scene)]) & usable
        if usable.any():
            report.update(synthetic_parse_acc=float(1 - synthetic_wrong[usable].mean()), **binary_metrics(
                "synthetic_wrong", -margins[usable, 1], synthetic_wrong[usable], pred=~keep[usable, 1]))
    if ds.has(split, "corruption"):
        corruption = ds.array(split, "corruption")[:]
        corrupted = corruption > 0
        report.update(corrupted=int(corrupted.sum()), own_wrong_before=float(corrupted.mean()),
                      **binary_metrics("corrupted", -margins[:, 0], corrupted, pred=~keep[:, 0]))
        for k, kind in enumerate(ds.meta.get("corruptions", [])[1:], start=1):
            report[f"corrupted_recall_{kind}"] = float((~keep[corruption == k, 0]).mean()) if (corruption == k).any() \
                else float("nan")
        if synthetic_wrong is not None or not keep[:, 1].any():
            wrong_kept = (keep[:, 0] & corrupted).sum() + (
                0 if synthetic_wrong is None else (keep[:, 1] & synthetic_wrong).sum())
            report["wrong_after"] = float(wrong_kept / max(1, keep.sum()))
    return report


def cleaned_split(ds, split, keep, synthetic, clean=None, n_clean=0):
    """The arrays of the bootstrapped train split (BLIP's): the first n_clean (0: all) images of the clean split
    with their captions (clean: its name), then every image of split with a kept caption, [own, synthetic] or
    the kept one, repeated to fill the slots; n_captions (a row's own), caption_source, clean (from the clean
    split), source_index and corruption."""
    rows = np.flatnonzero(keep.any(1))
    own, syn, k = ds.array(split, "tokens")[rows, 0], synthetic[rows], keep[rows]
    pair = np.stack([np.where(k[:, :1], own, syn), np.where(k[:, 1:], syn, own)], 1)
    parts = [dict(images=ds.array(split, "images")[rows], tokens=pair, n_captions=k.sum(1).astype(np.int32),
                  caption_source=np.stack([~k[:, 0], k[:, 1]], 1).astype(np.int8), clean=np.zeros(len(rows), bool),
                  source_index=rows)]
    if clean is not None:
        n = min(ds.split_size(clean), n_clean or ds.split_size(clean))
        tokens = ds.array(clean, "tokens")[:n]
        valid = ds.array(clean, "n_captions")[:n] if ds.has(clean, "n_captions") else np.full(n, tokens.shape[1])
        parts.insert(0, dict(images=ds.array(clean, "images")[:n], tokens=tokens, n_captions=valid.astype(np.int32),
                             caption_source=np.zeros(tokens.shape[:2], np.int8), clean=np.ones(n, bool),
                             source_index=np.arange(n)))
    if ds.has(split, "corruption"):  # the clean split's captions are true of their images
        parts[-1]["corruption"] = ds.array(split, "corruption")[rows]
        parts[0].setdefault("corruption", np.zeros(len(parts[0]["images"]), np.int8))
    slots = max(p["tokens"].shape[1] for p in parts)
    for p in parts:  # a row's captions repeated to fill the slots (n_captions says how many are its own)
        for key in ("tokens", "caption_source"):
            p[key] = np.take(p[key], np.arange(slots) % p[key].shape[1], axis=1)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def capfilt_source(cfg):
    """(the source dataset, where the cleaned set goes), every setting checked before any work starts:
    never into or around the source or out_dir, nor over a directory CapFilt did not write."""
    if not cfg.init_from:
        raise SystemExit("--stage capfilt: give --init_from PATH "
                         "(with --resume too: finished fine-tuning runs are kept)")
    init = read_checkpoint(cfg.init_from, "--init_from")
    try:
        ds = data.Dataset(cfg.data if cfg.data != "shapes" else init["data_path"])
        if cfg.data == "shapes" and "capfilt" in ds.meta:  # a model pretrained on a CapFilt set: that set's source
            ds = data.Dataset(ds.meta["capfilt"]["source"])
    except FileNotFoundError as e:
        raise SystemExit(f"--stage capfilt: {e}") from None
    check_tokenizer(init, ds)
    split, m = cfg.capfilt_split, init["config"]["model"]
    for flag, name in (("capfilt_split", split), ("train_split", cfg.train_split if cfg.capfilt_clean else split)):
        if name not in ds.meta["splits"] or not ds.has(name, "tokens"):
            raise SystemExit(f"--{flag} {name!r}: {ds.path} has no captioned split of that name")
    if cfg.capfilt_clean and cfg.train_split == split:
        raise SystemExit(f"--capfilt_clean adds --train_split's images to the cleaned set, and {split!r} is the split "
                         f"being bootstrapped: give another --train_split, or --capfilt_clean=false")
    if cfg.capfilt_tune == "none" and (m["itm_weight"] == 0 or cfg.capfilt_synthetic and m["caption_weight"] == 0):
        raise SystemExit(f"--capfilt_tune=none: {cfg.init_from} is used as it is, and it was trained without ITM "
                         f"(the filter) or without captioning (the captioner)")
    settings = {k: getattr(cfg, k) for k in CAPFILT_SETTINGS}
    key = json.dumps({**settings, "init_from": os.path.abspath(checkpoint_file(cfg.init_from)),
                      "out_dir": os.path.abspath(cfg.out_dir)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    out = os.path.realpath(cfg.capfilt_data or f"{os.path.normpath(ds.path)}-capfilt-{digest}")
    inside = lambda a, b: os.path.commonpath([a, b]) == b  # noqa: E731  a is b or lies within it
    source, run_dir = os.path.realpath(ds.path), os.path.realpath(cfg.out_dir)
    if any(inside(out, other) or inside(other, out) for other in (source, run_dir)):
        raise SystemExit(f"--capfilt_data {out}: the cleaned set is a new directory, not in or around the source "
                         f"dataset ({source}) or the run's out_dir ({run_dir})")
    written = data.Dataset(out).meta if os.path.exists(os.path.join(out, "meta.json")) else {}
    if os.path.exists(out) and "capfilt" not in written:
        raise SystemExit(f"--capfilt_data {out} exists and is not a set CapFilt wrote: give a new path")
    return ds, out


def run(cfg, sub_run, runtime):
    """CapFilt: fine-tune the captioner and the filter, bootstrap the captions of capfilt_split, and write the
    cleaned set as a new prepared dataset; report.json, capfilt.npz and eval.json go to out_dir."""
    ds, out = capfilt_source(cfg)
    t0 = time.time()
    roles = {"separate": {k: v for k, v in CAPFILT_ROLES.items() if k == "filter" or cfg.capfilt_synthetic},
             "shared": {"shared": {k: v for w in CAPFILT_ROLES.values() for k, v in w.items()}},
             "none": {}}[cfg.capfilt_tune]
    paths = {}
    for name, weights in roles.items():  # each on the source dataset's train_split, from init_from
        run = {"out_dir": os.path.join(cfg.out_dir, name), "stage": "finetune", "data": ds.path, **OBJECTIVES_OFF,
               **weights}
        sub_run(run, f"{name}: fine-tuning on {cfg.train_split}")
        paths[name] = os.path.join(run["out_dir"], "ckpt.pt")
    filter_path = paths.get("filter", paths.get("shared", cfg.init_from))
    captioner_path = paths.get("captioner", paths.get("shared", cfg.init_from)) if cfg.capfilt_synthetic else None
    device, _, _, ctx = runtime
    filt = load_checkpoint(filter_path, device, "--init_from")[0]
    captioner = None if captioner_path is None else filt if captioner_path == filter_path else \
        load_checkpoint(captioner_path, device, "--init_from")[0]
    split = cfg.capfilt_split
    print(f"bootstrapping {ds.split_size(split)} images of {split}: nucleus p {cfg.capfilt_top_p}, "
          f"threshold p(match) >= {cfg.capfilt_threshold}")
    t_boot = time.time()
    synthetic, texts, problems, margins = bootstrap(captioner, filt, ds, cfg, device, ctx)
    t_boot = time.time() - t_boot
    keep = capfilt_keep(margins, problems, cfg.capfilt_threshold)
    report = capfilt_report(ds, split, keep, problems, margins, texts)
    report.update(data_path=out, source=os.path.abspath(ds.path), filter=filter_path, captioner=captioner_path,
                  **{k: getattr(cfg, k) for k in CAPFILT_SETTINGS},
                  examples=[{"own": data.decode_tokens(ds.tokenizer, ds.array(split, "tokens")[i, 0]),
                             "synthetic": texts[i], "kept": keep[i].tolist(),
                             "p_match": (1 / (1 + np.exp(-margins[i].astype(np.float64)))).tolist()}
                            for i in range(min(8, len(keep)))])
    os.makedirs(cfg.out_dir, exist_ok=True)
    for stale in ("eval.json", "report.json"):  # of an earlier run: this one's replace them, or say why not
        if os.path.exists(os.path.join(cfg.out_dir, stale)):
            os.remove(os.path.join(cfg.out_dir, stale))
    data.write_file(os.path.join(cfg.out_dir, "capfilt.npz"),
                    lambda f: np.savez(f, margins=margins, keep=keep, problems=np.array(problems), synthetic=synthetic))
    write_json(os.path.join(cfg.out_dir, "report.json"), report)
    summary = {k: v for k, v in report.items() if k != "examples"}
    for key, value in summary.items():
        print(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
    if not keep.any():
        raise SystemExit(f"the filter kept no caption of {split} at --capfilt_threshold={cfg.capfilt_threshold}: "
                         f"no dataset written (the report is in {cfg.out_dir}/report.json)")
    # BLIP's bootstrapped set holds the human-annotated data: the clean images the captioner and filter tuned on
    arrays = cleaned_split(ds, split, keep, synthetic, cfg.train_split if cfg.capfilt_clean else None, cfg.train_images)
    meta = {**{k: v for k, v in ds.meta.items() if k != "splits"}, "capfilt": summary}
    data.write_dataset(out, {"train": arrays}, meta, ds.bpe_text, copy_from=ds,
                       copy_splits=[s for s in ("val", "test") if s in ds.meta["splits"]], replace=True)
    print(f"cleaned dataset: {out} ({len(arrays['images'])} images, {int(keep.sum())} captions); "
          f"pretrain on it with --data={out}")
    metrics = {key: v for key, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.update(bootstrap_time_s=t_boot, capfilt_time_s=time.time() - t0)
    write_json(os.path.join(cfg.out_dir, "eval.json"), metrics)
    return metrics

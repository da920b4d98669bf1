"""
Evaluate a nanoVLP checkpoint (retrieval, ITM, RTD/R2D, zero-shot classification, captioning; on the shapes world
also on the held-out compositions), and train and tabulate the ablations. The protocols: docs/evaluation.md.

    python eval.py --ckpt out/ckpt.pt            # prints the metrics, writes out/eval.json
    python eval.py --ckpt out-coco/ckpt.pt --split test   # another split: keys test_*
    python eval.py --ablation --train_split=web  # trains each objective subset, writes a table
    python eval.py --ablation --stage=instruct --init_from=out/ckpt.pt   # the two-pass rows
    python eval.py --ablation --stage=prompt --init_from=out/ckpt.pt     # the prompt rows, 3 shot samples each
    python eval.py --ablation --stage=capfilt    # noisy pretraining, CapFilt, pretraining on its set, fine-tuning
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from contextlib import nullcontext

import numpy as np
import torch

import data
import instruct
import prompt
from configurator import checked_device
from model import VLM, VLMConfig


def build_model(cfg):
    """The model of a VLMConfig: the instruct or the prompt stage's when the config says so."""
    return (instruct.InstructVLM if cfg.instruct else prompt.PromptVLM if cfg.prompt else VLM)(cfg)


def read_checkpoint(path, flag="--ckpt", device="cpu"):
    """The dict of a ckpt.pt written by train.py, or of the one in a run directory. A missing, damaged (cut
    short, not a zip) or foreign file stops with an error naming the flag and the path."""
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise SystemExit(f"error: {flag}: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # zip, pickle and struct errors, EOF: what torch.load raises for a bad file varies
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
        raise SystemExit(f"error: {flag}: {path} cannot be read as a checkpoint ({reason}): is it cut short, "
                         f"or another kind of file?") from None
    if not (isinstance(ckpt, dict) and {"model", "config", "tokenizer"} <= set(ckpt)):
        raise SystemExit(f"error: {flag}: {path} is not a checkpoint written by train.py (it has no model, config "
                         f"and tokenizer)")
    return ckpt


def checkpoint_file(path):
    """A run directory's ckpt.pt; any other path as it is."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def is_checkpoint(path):
    """Whether a path names a train.py checkpoint (a file, a .pt path, a run directory holding ckpt.pt), not a
    Hugging Face CLIP (a save_pretrained directory or a hub name)."""
    return os.path.isfile(checkpoint_file(path)) or path.endswith(".pt")


def load_checkpoint(path, device="cpu", flag="--ckpt"):
    """(model, tokenizer, checkpoint dict) from read_checkpoint(path)."""
    ckpt = read_checkpoint(path, flag, device)
    model = build_model(VLMConfig(**ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])
    tok = ckpt["tokenizer"]
    return model.to(device).eval(), data.get_tokenizer(tok["kind"], tok.get("bpe")), ckpt


def check_tokenizer(ckpt, ds):
    """Stop if a checkpoint's tokenizer is not the dataset's. The world's BPE is a GPT-2 kind of
    encoding (sample.py export writes it as GPT-2 files), so between those two only the ranks are compared."""
    kind = lambda k: "gpt2" if k == "bpe" else k  # noqa: E731
    if (kind(ckpt["tokenizer"]["kind"]), ckpt["tokenizer"]["bpe"]) != (kind(ds.meta["tokenizer"]["kind"]), ds.bpe_text):
        raise SystemExit(f"the tokenizer of the starting weights ({ckpt['data_path']}) is not that of {ds.path}: "
                         f"use the data they were trained on, or data prepared with their tokenizer "
                         f"(prepare.py --tokenizer)")


@torch.no_grad()
def batched(f, x, batch_size, ctx):
    """torch.cat of f over x, batch_size rows at a time, each under ctx."""
    out = []
    for i in range(0, len(x), batch_size):
        with ctx:
            out.append(f(x[i:i + batch_size]))
    return torch.cat(out)


def embed_texts(model, tokens, device, batch_size=1024, ctx=nullcontext()):
    return batched(lambda t: model.encode_text(torch.as_tensor(np.asarray(t, np.int64), device=device)).float(),
                   tokens, batch_size, ctx)


def recall_at_k(sim, relevant, ks=(1, 5, 10)):
    """{k: fraction of queries (rows of sim) with a relevant item among their k most similar}."""
    order = sim.topk(min(max(ks), sim.size(1)), dim=1).indices  # the k nearest, nearest first
    hits = torch.gather(relevant, 1, order)  # (Q, max k): relevance in rank order
    return {k: hits[:, :k].any(1).float().mean().item() for k in ks}


def retrieval(image_emb, text_emb, image_scene, text_scene, ks=(1, 5, 10)):
    """R@K both ways; relevance is scene equality (the same image, on real captions)."""
    relevant = torch.as_tensor(image_scene)[:, None] == torch.as_tensor(text_scene)[None, :]
    sim = image_emb @ text_emb.t()
    out = {f"retrieval_i2t_r{k}": v for k, v in recall_at_k(sim, relevant, ks).items()}
    out.update({f"retrieval_t2i_r{k}": v for k, v in recall_at_k(sim.t(), relevant.t(), ks).items()})
    return out


def roc_auc(scores, labels):
    """Area under the ROC curve (the Mann-Whitney U statistic, ties counting half); NaN if a class is empty."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, tied scores share their mean rank
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(prefix, logits, labels, pred=None):
    """ROC-AUC of the logits, and precision and recall of pred (default: logit > 0)."""
    logits, labels = np.asarray(logits), np.asarray(labels, bool)
    pred = logits > 0 if pred is None else np.asarray(pred, bool)
    tp = (pred & labels).sum()
    return {f"{prefix}_auc": roc_auc(logits, labels),
            f"{prefix}_precision": float(tp / max(1, pred.sum())), f"{prefix}_recall": float(tp / max(1, labels.sum()))}


def image_tokens_of(model, images, batch_size=256, ctx=nullcontext()):
    """The image tokens the text transformer reads, (N, P, w), for uint8 images."""
    return batched(lambda x: model.image_tokens(model.visual(model.normalize_pixels(x))), images, batch_size, ctx)


def itm_margins(model, image_tokens, tokens, pairs, device, batch_size=512, ctx=nullcontext()):
    """ITM logit(match) - logit(no match) for the (image, caption) index pairs (n, 2)."""
    def margin(p):
        logits = model.itm_logits(image_tokens[p[:, 0]], tokens[p[:, 1]].to(device)).float()
        return logits[:, 1] - logits[:, 0]
    return batched(margin, pairs, batch_size, ctx)


def itm_evaluation(model, image_tokens, tokens, sim, relevant, first, k, device, ctx=nullcontext()):
    """ITM accuracy and AUC on matched and hard non-matched pairs, and ITC retrieval re-ranked by ITM
    over its top k. sim (N, G) ITC similarity of images and gallery captions, relevant (N, G) bool,
    tokens (G, T), first (N,) the gallery index of each image's first caption."""
    N = sim.size(0)
    hard = sim.masked_fill(relevant, float("-inf")).argmax(1)  # the most similar caption of another scene
    pairs = torch.stack([torch.arange(N).repeat(2), torch.cat([torch.as_tensor(first), hard])], 1)
    margin = itm_margins(model, image_tokens, tokens, pairs, device, ctx=ctx).cpu()
    labels = torch.arange(2 * N) < N
    out = {"itm_acc": float(((margin > 0) == labels).float().mean()), "itm_auc": roc_auc(margin, labels)}
    for name, s, rel, image_first in (("i2t", sim, relevant, True), ("t2i", sim.t(), relevant.t(), False)):
        top = s.topk(min(k, s.size(1)), dim=1).indices  # (Q, k)
        q = torch.arange(s.size(0))[:, None].expand_as(top)
        pairs = torch.stack([q, top] if image_first else [top, q], -1).reshape(-1, 2)
        reranked = s.double()  # float64: 1e4 + a margin keeps the margin's digits (float32 would tie close ones)
        margins = itm_margins(model, image_tokens, tokens, pairs, device, ctx=ctx).cpu().double()
        reranked[q, top] = 1e4 + margins.view_as(top)
        out.update({f"retrieval_itm_{name}_r{kk}": v for kk, v in recall_at_k(reranked, rel).items()})
    return out


@torch.no_grad()
def electra_evaluation(model, images, tokens, codes, device, batch_size=256, seed=0, ctx=nullcontext()):
    """RTD and R2D AUC, precision and recall on replaced val inputs (a fixed seed)."""
    rng = torch.Generator(device=device).manual_seed(seed)
    parts = []  # per batch: the RTD logits and labels of the text tokens, the R2D ones of the patches
    for i in range(0, len(images), batch_size):
        t, c = (torch.as_tensor(np.asarray(a[i:i + batch_size], np.int64), device=device) for a in (tokens, codes))
        with ctx:
            E = model.electra_inputs(model.normalize_pixels(images[i:i + batch_size]), t, c, rng=rng)
            image_tokens = model.image_tokens(model.visual(E["pixels"]))
            h = model.fuse(image_tokens, E["tokens"])
        P, text = image_tokens.size(1), t != model.cfg.pad_id
        parts.append((model.rtd_head(h[:, P:]).squeeze(-1).float()[text], E["rtd_label"][text],
                      model.r2d_head(h[:, :P]).squeeze(-1).float().flatten(), E["r2d_label"].flatten()))
    rtd, rtd_label, r2d, r2d_label = (torch.cat(x).cpu().numpy() for x in zip(*parts))
    return {**binary_metrics("rtd", rtd, rtd_label), **binary_metrics("r2d", r2d, r2d_label)}


def class_prompts(kind):
    """{class name: all single-object captions naming it}, kind 'shape' or 'colour'."""
    field, names = (0, data.SHAPES) if kind == "shape" else (1, data.COLOUR_NAMES)
    objects = list(np.ndindex(len(data.SHAPES), len(data.COLOURS), len(data.SIZES)))  # (shape, colour, size)
    return {name: [data.write_caption(0, [o], t) for o in objects if o[field] == i
                   for t in range(len(data.TEMPLATES[1]))] for i, name in enumerate(names)}


@torch.no_grad()
def generate_captions(model, tokenizer, images, batch_size=256, ctx=nullcontext(), **sampling):
    texts = []
    for i in range(0, len(images), batch_size):
        with ctx:
            out = model.generate(model.normalize_pixels(images[i:i + batch_size]), **sampling)
        texts += [data.decode_tokens(tokenizer, row) for row in out.tolist()]
    return texts


def print_captions(model, ds, ctx=nullcontext(), n=8):
    """Print the greedy captions of the first n val images beside their first true caption."""
    said = generate_captions(model, ds.tokenizer, ds.array("val", "images")[:n], ctx=ctx)
    true = [data.decode_tokens(ds.tokenizer, row) for row in ds.array("val", "tokens")[:n, 0]]
    print(f"captions of the first {len(said)} val images (true | generated):")
    for t, g in zip(true, said):
        print(f"  {t:<60s} | {g}")


def caption_parse_accuracy(captions, scenes, counts):
    """Fraction of captions that parse to the true scene, overall and per object count; also
    caption_objects_acc (the right objects, any order or axis) and caption_axis_acc (the right axis)."""
    parsed = [data.parse_caption(c) for c in captions]
    right = np.array([p == s for p, s in zip(parsed, scenes)])
    out = {"caption_parse_acc": float(right.mean())}
    for n in (1, 2, 3):
        if (counts == n).any():
            out[f"caption_parse_acc_{n}obj"] = float(right[counts == n].mean())
    pairs = [(data.decode_scene(p) if p is not None else (-1, []), data.decode_scene(s))
             for p, s in zip(parsed, scenes)]
    out["caption_objects_acc"] = float(np.mean([sorted(p[1]) == sorted(t[1]) for p, t in pairs]))
    if (counts > 1).any():
        out["caption_axis_acc"] = float(np.mean([p[0] == t[0] for (p, t), n in zip(pairs, counts) if n > 1]))
    return out


# -----------------------------------------------------------------------------
# BLEU and CIDEr-D as the COCO caption evaluation (pycocoevalcap) computes them, without its Java tokenizer

# pycocoevalcap's PUNCTUATIONS; its -LRB- never matches the lower-cased -lrb-, so brackets stay as -lrb- and the like
PTB_DROPPED = frozenset(["''", "'", "``", "`", '"', ".", "?", "!", ",", ":", ";", "-", "--", "..."])
PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# the words PTBTokenizer (CoreNLP 3.4.1) leaves a final period on, found by running it on 40,000 common words
PTB_ABBREVIATIONS = frozenset("""
adj adm al ala alex apr ariz assn assoc atty attys aug ave bancorp bhd blvd brig bros calif capt cf cmdr co col colo
comdr conn corp cos cpl ct dak dec dept det dr drs elec esq est etc ext feb fla fri ft ga gen gov govs hon inc ind intl
invt jan jos jr jul jun kan ky lieut lt ltd maj mar md messrs mich minn mlle mme mo mon mont mr mrs ms mt neb nev nov
oct okla penn ph pfc plc pres prof profs pte pty pvt rd rep reps rev rt sen sens sep sept seq sfc sgt spc sq sr st ste
supt supts sys tel tenn thu thurs tue tues univ va vs vt wed wis wisc wm wyo""".split())
_PTB_SPLITS = [(re.compile(pattern), repl) for pattern, repl in (
    (r"(?<=[^\W_])(n't|'s|'re|'ve|'m|'ll|'d)(?![^\W_])", r" \1"),  # clitics: do n't, dog 's, they 're
    (r"\b(can)(not)\b|\b(gon|wan)(na)\b|\b(got)(ta)\b|\b(gim|lem)(me)\b", r"\1\3\5\7 \2\4\6\8"))]
_PTB_TOKEN = re.compile(r"""
    \d+(?:[.,:]\d+)+(?=[^\W\d_])                              # a number before its unit: 2.5 mm
  | (?:[^\W\d_]\.)+(?![^\W_])                                 # initials and acronyms, periods kept: a.m.
  | (?P<word>[^\W_]+(?:[-./'][^\W_]+|(?<=\d)[,:]\d+)*)(?P<period>\.)?  # x-ray, 1,000, 3.5, o'clock, 1/2
  | '(?:s|re|ve|m|ll|d)(?![^\W_])                             # a clitic split off its word
  | (?<![^\W_])[-+]\d+(?:[.,:]\d+)*                           # a signed number: -5
  | (?P<ellipsis>\.{2,})|-{2,}|[?!]+                          # ellipses, dashes, runs of ? and !
  | \S""", re.X)


def coco_tokenize(text):
    """A caption as the COCO caption evaluation scores it: PTBTokenizer with -lowerCase, its
    punctuation dropped, words joined by spaces. Its rules, and where this differs: docs/evaluation.md."""
    text = text.lower().translate({0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"', 0x2013: " -- ", 0x2014: " -- "})
    for pattern, repl in _PTB_SPLITS:
        text = pattern.sub(repl, text)
    words = []
    for m in _PTB_TOKEN.finditer(text):
        word = m["word"] if m["period"] and m["word"] not in PTB_ABBREVIATIONS else m[0]
        word = "..." if m["ellipsis"] else PTB_BRACKETS.get(word, word)
        if word not in PTB_DROPPED:
            words.append(word)
    return " ".join(words)


def ngram_counts(text, n=4):
    """Counter of the 1..n-grams (word tuples) of a text, split on white space."""
    w = text.split()
    return Counter(tuple(w[i:i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))


def _check_captions(refs, cands):
    """Raise ValueError unless refs and cands name the same images, each with a reference."""
    if refs.keys() != cands.keys():
        raise ValueError(f"references and candidates name different images: {len(refs.keys() ^ cands.keys())} "
                         f"are in one but not the other")
    empty = [k for k, r in refs.items() if not r]
    if empty:
        raise ValueError(f"{len(empty)} images have no reference caption, e.g. {empty[0]!r}")


def bleu(refs, cands, n=4):
    """Corpus BLEU-1..n (a list) as pycocoevalcap's Bleu(n). refs {image: [tokenised captions]},
    cands {image: one tokenised caption}."""
    _check_captions(refs, cands)
    correct, guess, cand_len, ref_len = [0] * n, [0] * n, 0, 0
    for key in refs:
        counts, length = ngram_counts(cands[key], n), len(cands[key].split())
        most = Counter()  # each n-gram's largest count in one reference: the clip
        for r in refs[key]:
            most |= ngram_counts(r, n)
        for gram, c in (counts & most).items():
            correct[len(gram) - 1] += c
        for k in range(n):
            guess[k] += max(0, length - k)
        cand_len += length
        ref_len += min((abs(len(r.split()) - length), len(r.split())) for r in refs[key])[1]
    scores, p = [], 1.0
    for k in range(n):
        p *= (correct[k] + 1e-15) / (guess[k] + 1e-9)
        scores.append(p ** (1 / (k + 1)))
    ratio = (cand_len + 1e-15) / (ref_len + 1e-9)
    return [s * math.exp(1 - 1 / ratio) for s in scores] if ratio < 1 else scores


def cider_d(refs, cands, n=4, sigma=6.0):
    """CIDEr-D as pycocoevalcap's Cider, document frequencies from these references.
    refs {image: [tokenised captions]}, cands {image: one tokenised caption}."""
    _check_captions(refs, cands)
    ref_counts = {key: [ngram_counts(r, n) for r in rs] for key, rs in refs.items()}
    df = Counter(gram for counts in ref_counts.values() for gram in set().union(*counts))
    log_images = np.log(float(len(refs)))

    def tfidf(counts):
        """Per order: {n-gram: tf-idf} and the vector's norm; and the length in words."""
        vec, norm = [{} for _ in range(n)], [0.0] * n
        for gram, tf in counts.items():
            v = vec[len(gram) - 1][gram] = float(tf) * (log_images - np.log(max(1.0, df[gram])))
            norm[len(gram) - 1] += v ** 2
        return vec, [np.sqrt(s) for s in norm], sum(tf for gram, tf in counts.items() if len(gram) == 1)

    scores = []
    for key in refs:
        vec, norm, length = tfidf(ngram_counts(cands[key], n))
        total = np.zeros(n)
        for counts in ref_counts[key]:
            rvec, rnorm, rlength = tfidf(counts)
            for k in range(n):
                s = 0.0
                for gram, v in vec[k].items():
                    r = rvec[k].get(gram, 0.0)
                    s += min(v, r) * r
                if norm[k] != 0 and rnorm[k] != 0:
                    s /= norm[k] * rnorm[k]
                # np.e ** as pycocoevalcap computes it: np.exp can differ in the last bit
                total[k] += s * np.e ** (-(float(length - rlength) ** 2) / (2 * sigma ** 2))
        scores.append(np.mean(total) / len(ref_counts[key]) * 10.0)
    return float(np.mean(scores))


def caption_scores(captions, references):
    """BLEU-1..4 and CIDEr-D of captions (a text per image) against each image's references, both coco_tokenize'd."""
    refs = {i: [coco_tokenize(r) for r in rs] for i, rs in enumerate(references)}
    cands = {i: coco_tokenize(c) for i, c in enumerate(captions)}
    return {**{f"caption_bleu{k}": float(s) for k, s in enumerate(bleu(refs, cands), 1)},
            "caption_cider": cider_d(refs, cands)}


def zero_shot_accuracy(model, tokenizer, image_emb, objects, length, device, ctx=nullcontext()):
    """Shape and colour classification by ITC of single-object images: image_emb (n, D),
    objects (n, 3+) their object rows. A class embeds as the normalised mean of its prompts' embeddings."""
    if not len(objects):
        return {}
    out = {}
    for kind, field in (("shape", 0), ("colour", 1)):
        classes = [embed_texts(model, data.encode_texts(tokenizer, texts, length), device, ctx=ctx).mean(0)
                   for texts in class_prompts(kind).values()]
        pred = (image_emb @ torch.stack([e / e.norm() for e in classes]).t()).argmax(1).cpu().numpy()
        out[f"zeroshot_{kind}_acc"] = float((pred == objects[:, field]).mean())
    return out


@torch.no_grad()
def evaluate_split(model, ds, split, device, idx, ctx=nullcontext(), rerank_k=8):
    """Every metric the model's objectives give on the rows idx of a split: retrieval, ITM, RTD/R2D; then zero-shot
    and caption parse accuracy on the shapes world, or BLEU and CIDEr-D of greedy captions on real captions."""
    kind = ds.meta.get("kind")
    if kind not in ("shapes", "captions"):
        raise ValueError(f"{ds.path} is a {kind!r} dataset: evaluate takes the shapes world or captioned images")
    images, scene = ds.array(split, "images")[idx], ds.array(split, "scene")[idx]
    tokens = ds.array(split, "tokens")[idx]  # (N, C, T)
    N, C, T = tokens.shape
    # the gallery: every valid caption, image by image (real data repeats them to fill the C slots)
    n_captions = ds.array(split, "n_captions")[idx].astype(np.int64) if kind == "captions" else np.full(N, C)
    if ((n_captions < 1) | (n_captions > C)).any():
        raise ValueError(f"{ds.path}: {split}.n_captions must be 1 to {C} (the caption slots), "
                         f"got {n_captions.min()} to {n_captions.max()}")
    valid = np.arange(C)[None, :] < n_captions[:, None]
    gallery, owner = tokens[valid], np.nonzero(valid)[0]  # (G, T), (G,) the image of each caption
    image_emb = batched(lambda x: model.encode_image(model.normalize_pixels(x)).float(), images, 256, ctx)
    text_emb = embed_texts(model, gallery, device, ctx=ctx)
    out = retrieval(image_emb, text_emb, scene, scene[owner])
    cfg = model.cfg
    if cfg.itm_weight > 0:
        relevant = torch.as_tensor(scene)[:, None] == torch.as_tensor(scene[owner])[None, :]
        out.update(itm_evaluation(model, image_tokens_of(model, images, ctx=ctx), torch.from_numpy(gallery).long(),
                                  (image_emb @ text_emb.t()).cpu(), relevant, np.cumsum(n_captions) - n_captions,
                                  rerank_k, device, ctx))
    if cfg.rtd_weight > 0 or cfg.r2d_weight > 0:
        codes = ds.codes(split, cfg.patch_size, cfg.n_codes)[idx]
        out.update(electra_evaluation(model, images, tokens[:, 0], codes, device, ctx=ctx))
    captions = generate_captions(model, ds.tokenizer, images, ctx=ctx)
    if kind == "captions":  # the references as written (captions.json), else as the token rows decode
        written = ds.captions(split)
        references = [written[i] for i in idx] if written is not None else \
            [[data.decode_tokens(ds.tokenizer, row) for row in tokens[i, :n_captions[i]]] for i in range(N)]
        out.update(caption_scores(captions, references))
    else:
        objects = ds.array(split, "objects")[idx]
        counts = (objects[:, :, 0] >= 0).sum(1)
        single = counts == 1
        out.update(zero_shot_accuracy(model, ds.tokenizer, image_emb[torch.from_numpy(single)], objects[single, 0], T,
                                      device, ctx))
        out.update(caption_parse_accuracy(captions, scene, counts))
    return out


def evaluate(model, ds, device, max_images=None, heldout=True, ctx=nullcontext(), rerank_k=8, split="val"):
    """The metrics of a run: split (its first max_images images, or all) and, with heldout, the same on
    the test images of held-out compositions under 'heldout_*', where the dataset marks them (test.heldout)."""
    if split not in ds.meta["splits"] or not ds.has(split, "tokens"):
        raise ValueError(f"{ds.path} has no captioned split {split!r}; it has "
                         f"{', '.join(s for s in ds.meta['splits'] if ds.has(s, 'tokens'))}")
    was_training = model.training
    model.eval()
    n = ds.split_size(split)
    out = evaluate_split(model, ds, split, device, np.arange(min(n, max_images or n)), ctx, rerank_k)
    if heldout and ds.has("test", "heldout"):
        held = evaluate_split(model, ds, "test", device, np.flatnonzero(ds.array("test", "heldout")), ctx, rerank_k)
        out.update({f"heldout_{k}": v for k, v in held.items()})
    model.train(was_training)
    return out


def write_json(path, obj):
    """Write atomically (data.write_file): a reader sees the old file or the new one."""
    data.write_file(path, json.dumps(obj, indent=1))


def read_json(path):
    with open(path) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# the ablation runner: one `python train.py` process per row, the same budget and seed

OBJECTIVES_OFF = dict(itc_weight=0, caption_weight=0, itm_weight=0, mlm_weight=0, moc_weight=0, rtd_weight=0,
                      r2d_weight=0, momentum_alpha=0)


def objectives_only(*names):
    """The flags that switch off every pretraining objective but the named ones ('itc', 'momentum', ...)."""
    return {k: v for k, v in OBJECTIVES_OFF.items() if k.removesuffix("_weight").replace("_alpha", "") not in names}


ABLATION_ROWS = {
    "ITC": objectives_only("itc"),
    "ITC+LM": objectives_only("itc", "caption"),
    "ITC+LM+ITM": objectives_only("itc", "caption", "itm"),
    "ITC+LM+ELECTRA": objectives_only("itc", "caption", "mlm", "moc", "rtd", "r2d"),
    "ITC+LM+MLM+MOC": objectives_only("itc", "caption", "mlm", "moc"),  # ELECTRA's generator alone, no discriminator
    "ITC+LM+MoD": objectives_only("itc", "caption", "momentum"),
    "all": {},  # the preset as it is
}


# the prompt stage's rows (each trains shot_seeds runs; the zero-shot row is their no-prompt evaluation)
PROMPT_ROWS = {
    "text-only": dict(text_prompt_depth=4, image_prompt_depth=0, couple=False),
    "image-only": dict(text_prompt_depth=0, image_prompt_depth=4, couple=False),
    "uncoupled": dict(text_prompt_depth=4, image_prompt_depth=4, couple=False),
    "coupled-J1": dict(text_prompt_depth=1, image_prompt_depth=1, couple=True),
    "coupled-J3": dict(text_prompt_depth=3, image_prompt_depth=3, couple=True),
    "coupled-J4": dict(text_prompt_depth=4, image_prompt_depth=4, couple=True),
    "coupled-J4-one-layer": dict(text_prompt_depth=4, image_prompt_depth=4, couple=True, dense_layers="4"),
}


# the instruct stage's rows: each changes one thing of the default
_INSTRUCT_BASE = dict(two_pass=True, keep_ratio=0.5, drop_instruction=0.1, drop_images=0.1, drop_relation=0.1,
                      relation=True, converter="mlp")
INSTRUCT_ROWS = {
    "one-pass": dict(_INSTRUCT_BASE, two_pass=False),
    "keep-1.0": dict(_INSTRUCT_BASE, keep_ratio=1.0),
    "keep-0.5": dict(_INSTRUCT_BASE),
    "keep-0.25": dict(_INSTRUCT_BASE, keep_ratio=0.25),
    "keep-0.5-pass1-1": dict(_INSTRUCT_BASE, pass1_layers=1),  # pass 1 through the first text block only
    "keep-0.5-no-dropping": dict(_INSTRUCT_BASE, drop_instruction=0, drop_images=0, drop_relation=0),
    "keep-0.5-no-relation": dict(_INSTRUCT_BASE, relation=False),
    "keep-0.5-resampler": dict(_INSTRUCT_BASE, converter="resampler"),
}


def markdown_table(rows, keys):
    """rows {name: metrics}; one table row per name, '-' where a metric does not apply; a list (one value per
    seed) is written as mean ± std (ddof 1), or as its value where every seed gave the same."""
    def fmt(v):
        if isinstance(v, list):
            return fmt(v[0]) if len(set(v)) == 1 else f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}"
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| config | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(fmt(m.get(k)) for k in keys) + " |" for name, m in rows.items()]
    return "\n".join(lines) + "\n"


TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def run_train(name, out, flags, log_dir=""):
    """Run `python train.py --out_dir=out *flags` as its own process; its eval.json with the wall time and
    the median samples/s of out/log_dir/log.jsonl. A run finished before with the same flags is kept (out/run.json)."""
    cmd = [sys.executable, TRAIN_PY, f"--out_dir={out}", *flags]
    record = os.path.join(out, "run.json")
    if os.path.exists(record) and read_json(record)["command"] == cmd[1:]:
        print(f"[{name}] finished before, kept", flush=True)
        return read_json(record)["result"]
    print(f"[{name}]\n{' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    log = os.path.join(out, log_dir, "log.jsonl")
    with open(log) if os.path.exists(log) else nullcontext([]) as f:
        speeds = [json.loads(line)["samples_per_s"] for line in f if "samples_per_s" in line]
    result = {**read_json(os.path.join(out, "eval.json")), "wall_time_s": round(time.time() - t0),
              "samples_per_s": round(float(np.median(speeds))) if speeds else None}
    write_json(record, {"command": cmd[1:], "result": result})
    return result


def write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data.write_file(path, text)
    print(text)


def run_ablation(args, train_args):
    """Train every row of the stage's table (or --rows) as its own train.py process and write a Markdown
    table of their eval.json; --stage capfilt runs the CapFilt experiment instead."""
    stage = f"--stage={args.stage}" if args.stage != "pretrain" else f"--train_split={args.train_split}"
    iters = [f"--max_iters={args.max_iters}"] if args.max_iters else []
    # written above the table; the CapFilt experiment resumes only under the same command
    command = " ".join(["python eval.py --ablation", stage, "--config", args.config, *iters, *train_args])
    shown = " ".join([command, *[f"--{k}={v}" for k, v in (("rows", args.rows), ("seeds", args.seeds)) if v]])
    if args.stage == "capfilt":
        return run_capfilt_experiment(args, train_args, command, iters, shown)
    table = {"instruct": INSTRUCT_ROWS, "prompt": PROMPT_ROWS}.get(args.stage, ABLATION_ROWS)
    names = args.rows.split(",") if args.rows else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown ablation rows {unknown}; rows: {', '.join(table)}")
    if args.stage != "pretrain" and not any(a.startswith("--init_from") for a in train_args):
        raise SystemExit(f"--stage {args.stage}: give the pretrained checkpoint every row starts from, "
                         f"--init_from=PATH")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [None]
    except ValueError:
        raise SystemExit(f"error: --seeds={args.seeds}: give whole numbers, comma-separated: --seeds=1337,1,2") \
            from None

    def planned(name, seed):
        """(out_dir, train.py flags) of a row's run with a seed (None: the preset's)."""
        out = os.path.join(args.ablation_dir, name.replace("+", "_"), *([] if seed is None else [f"seed{seed}"]))
        flags = ["--config", args.config, stage, f"--eval_interval={10 ** 9}", *iters,
                 *[f"--{k}={v}" for k, v in table[name].items()], *train_args]
        return out, flags + ([] if seed is None else [f"--seed={seed}"])
    for name in names:  # each row's flags checked by train.py before the first run starts (seeds differ only by --seed)
        out, flags = planned(name, seeds[0])
        check = subprocess.run([sys.executable, TRAIN_PY, "--check", f"--out_dir={out}", *flags], capture_output=True,
                               text=True)
        if check.returncode != 0:
            raise SystemExit(f"error: ablation row {name}: {(check.stderr.strip().splitlines() or ['?'])[-1]}")
    results, runs = {}, {}
    for name in names:
        runs[name] = [run_train(name if s is None else f"{name}, seed {s}", *planned(name, s),
                                log_dir="seed0" if args.stage == "prompt" else "") for s in seeds]
        # one value per seed of each number every seed reported
        results[name] = runs[name][0] if len(seeds) == 1 else {
            k: [r[k] for r in runs[name]] for k in runs[name][0]
            if all(isinstance(r.get(k), (int, float)) for r in runs[name])}
    first, timing = runs[names[0]][0], ["wall_time_s", "samples_per_s"]
    keys = [k for k in dict.fromkeys(k for m in results.values() for k in m)
            if k not in ("step", "train_time_s", *timing)]
    steps = ", ".join(sorted({str(r.get("step")) for rs in runs.values() for r in rs}))
    text = (f"Ablation: `{shown}`; {steps} steps per row, " + ("the same seed" if len(seeds) == 1 else
            f"seeds {args.seeds}: the mean ± standard deviation (ddof 1) over them") + ".\n\n")
    if args.stage == "prompt":  # zero-shot (no prompts, nothing trained) as a row of its own
        zero = {k.removeprefix("zeroshot_"): v for k, v in first.items() if k.startswith("zeroshot_")}
        text += "novel_val, the mean and std over each row's shot samples:\n\n" + markdown_table(
            {"zero-shot": {**zero, "trainable_params": 0}, **results},
            ["miou", "miou_std", "ap50", "ap50_std", "fg_iou", "miou_unrefined", "ap50_unrefined", "iou_star",
             "iou_heart", "iou_moon", "trainable_params", "step", "train_time_s", "wall_time_s"])
    elif args.stage == "instruct":  # the majority-answer baseline as a row of its own
        majority = {k.replace("majority", "acc"): v for k, v in first.items() if "majority" in k}
        text += "Val split:\n\n" + markdown_table({**results, "majority answer": majority},
                                                   [k for k in keys if "majority" not in k] + timing)
    else:
        held = [k for k in keys if k.startswith("heldout_")]
        text += ("Val split:\n\n" + markdown_table(results, [k for k in keys if k not in held] + timing)
                 + "\nTest images with held-out colour-shape pairs:\n\n" + markdown_table(results, held))
    write_text(args.table, text)


# CapFilt experiment: (step, flags, init_from, the step whose cleaned set it pretrains on, the steps its pipeline needs)
# As BLIP: pretraining on the clean images plus the web captions as they are (noisy) against the clean images plus
# the bootstrapped web (cleaned); the captioner and the filter are fine-tuned from the noisy model
_KEEP_ALL = ["--stage=capfilt", "--capfilt_synthetic=false", "--capfilt_tune=none", "--capfilt_threshold=0"]
_NOISY = ["web", "noisy-set", "noisy"]
CAPFILT_STEPS = [
    ("web", ["--train_split=web"], None, None, []),
    ("noisy-set", _KEEP_ALL, "web/ckpt.pt", None, ["web"]),  # every web caption kept: the set, not its filter
    ("noisy", [], None, "noisy-set", ["web", "noisy-set"]),
    ("noisy-finetune", ["--stage=finetune"], "noisy/ckpt.pt", None, _NOISY),
    ("capfilt", ["--stage=capfilt", "--capfilt_tune=separate"], "noisy/ckpt.pt", None, _NOISY),
    ("cleaned", [], None, "capfilt", _NOISY + ["capfilt"]),
    ("cleaned-finetune", ["--stage=finetune"], "cleaned/ckpt.pt", None, _NOISY + ["capfilt", "cleaned"]),
    # BLIP's "filter only": the same filter, no synthetic captions
    ("filter-only", ["--stage=capfilt", "--capfilt_synthetic=false", "--capfilt_tune=none"], "capfilt/filter/ckpt.pt",
     None, _NOISY + ["capfilt"]),
    ("filtered", [], None, "filter-only", _NOISY + ["capfilt", "filter-only"]),
    ("filtered-finetune", ["--stage=finetune"], "filtered/ckpt.pt", None, _NOISY + ["capfilt", "filter-only",
                                                                                    "filtered"]),
    ("clean", ["--train_split=train"], None, None, []),
    ("clean-finetune", ["--stage=finetune"], "clean/ckpt.pt", None, ["clean"]),
]


def run_capfilt_experiment(args, train_args, command, iters, shown):
    """The CapFilt experiment (CAPFILT_STEPS, results/capfilt.md), each step a train.py process in
    ablation_dir/<step>; resumes from ablation_dir/experiment.json under the same command (shown: with --rows,
    the table's). Writes a Markdown table and the filter's reports."""
    if args.seeds or args.data or args.train_split != "train":
        raise SystemExit("--stage=capfilt runs its own steps on their own data: --seeds, --data and "
                         "--train_split do not apply (give --seed=S and an --ablation_dir per seed)")
    steps = {name: needs for name, *_, needs in CAPFILT_STEPS}
    asked = args.rows.split(",") if args.rows else list(steps)
    if any(r not in steps for r in asked):
        raise SystemExit(f"--rows={args.rows}: the CapFilt experiment's steps are {', '.join(steps)}")
    wanted = {n for r in asked for n in [*steps[r], r]}  # each step asked for and the steps its model needs
    fixed = [f for f in train_args
             if f.split("=")[0] in ("--out_dir", "--data", "--init_from", "--capfilt_data", "--stage")]
    if fixed:
        raise SystemExit(f"--stage=capfilt sets {', '.join(fixed)} itself for each step")
    state_file = os.path.join(args.ablation_dir, "experiment.json")
    done = {"command": command, **(read_json(state_file) if os.path.exists(state_file) else {})}
    if done["command"] != command:
        raise SystemExit(f"{args.ablation_dir} holds an experiment of other arguments ({done['command']}): "
                         f"give another --ablation_dir, or remove it")
    capfilt = [name for name, flags, *_ in CAPFILT_STEPS if "--stage=capfilt" in flags]
    for name, flags, init, cleaned, _ in CAPFILT_STEPS:
        if name not in wanted:
            continue
        if name in done:
            print(f"[{name}] finished before, kept")
            continue
        flags = ["--config", args.config, f"--eval_interval={10 ** 9}", *train_args, *flags]
        flags += [f"--init_from={os.path.join(args.ablation_dir, init)}"] if init else []
        flags += [f"--data={done[cleaned]['data_path']}"] if cleaned else []
        flags += [] if any(f.startswith("--stage=") for f in flags) else iters  # later stages: their own steps
        done[name] = run_train(name, os.path.join(args.ablation_dir, name), flags)
        if name in capfilt:
            done[name]["data_path"] = read_json(os.path.join(args.ablation_dir, name, "report.json"))["data_path"]
        write_json(state_file, done)
    write_json(state_file, done)  # with the command, also when every step was kept
    rows = {name: {**done[name], "pipeline_wall_time_s": sum(done[n]["wall_time_s"] for n in [*needs, name])}
            for name, _, _, _, needs in CAPFILT_STEPS if name in wanted and name not in capfilt}
    keys = ["retrieval_i2t_r1", "retrieval_t2i_r1", "caption_parse_acc", "heldout_retrieval_i2t_r1",
            "heldout_retrieval_t2i_r1", "heldout_caption_parse_acc", "step", "wall_time_s", "pipeline_wall_time_s"]
    text = (f"CapFilt experiment: `{shown}`. Val split, and the test images with held-out colour-shape pairs "
            f"(`heldout_`). A pipeline's wall time sums the steps its model needed (filter-only's counts the whole "
            f"capfilt step, though it reuses only its filter):\n\n" + markdown_table(rows, keys))
    filters = [n for n in capfilt if n in wanted]
    if filters:  # report.json keeps the counts as integers
        reports = {n: read_json(os.path.join(args.ablation_dir, n, "report.json")) for n in filters}
        report_keys = [k for k in dict.fromkeys(k for r in reports.values() for k in r)
                       if k.startswith(("images_", "own_", "synthetic_", "corrupted", "wrong_"))]
        text += (f"\nThe filter on the {int(done[filters[0]]['images'])} images of the web split (wall time: the "
                 f"step's, the captioner's and the filter's fine-tuning included):\n\n"
                 + markdown_table({n: {**reports[n], "wall_time_s": done[n]["wall_time_s"]} for n in filters},
                                  report_keys + ["wall_time_s"]))
    write_text(args.table, text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --seed=S goes to train.py, not to --seeds
    parser.add_argument("--ckpt", default="out/ckpt.pt")
    parser.add_argument("--data", help="prepared dataset directory (default: the checkpoint's)")
    parser.add_argument("--out", help="where to write the metrics (default: eval.json beside the checkpoint)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rerank_k", type=int, default=8, help="ITM re-ranks the top k of ITC retrieval")
    parser.add_argument("--split", default="val", help="the captioned split to evaluate (Karpathy's COCO: test)")
    ab = parser.add_argument_group("ablation (--ablation; any other --key=value goes to every train.py run)")
    ab.add_argument("--ablation", action="store_true", help="train and evaluate the objective subsets, write a table")
    ab.add_argument("--stage", default="pretrain", choices=("pretrain", "instruct", "prompt", "capfilt"),
                    help="pretrain: the objective subsets; instruct: the two-pass rows; prompt: the prompt rows "
                         "(give --init_from=PATH); capfilt: the CapFilt experiment (run_capfilt_experiment)")
    ab.add_argument("--rows", default="", help=f"comma-separated subset of: {', '.join(ABLATION_ROWS)}; "
                                               f"with --stage instruct: {', '.join(INSTRUCT_ROWS)}; "
                                               f"with --stage prompt: {', '.join(PROMPT_ROWS)}; with --stage "
                                               f"capfilt, the steps to run (and those they need): "
                                               f"{', '.join(s[0] for s in CAPFILT_STEPS)}")
    ab.add_argument("--config", default="small")
    ab.add_argument("--train_split", default="train", help="'train' (clean) or 'web' (noisy captions)")
    ab.add_argument("--max_iters", type=int, default=0, help="steps per row (default: the preset's)")
    ab.add_argument("--seeds", default="", help="comma-separated seeds, each row trained once per seed "
                                                "(ablation_dir/<row>/seed<s>); default: the preset's seed, once")
    ab.add_argument("--ablation_dir", help="default out-ablation, or out-ablation-<stage>")
    ab.add_argument("--table", help="default results/ablation.md, or results/ablation-<stage>.md")
    args, rest = parser.parse_known_args(argv)
    suffix = "" if args.stage == "pretrain" else f"-{args.stage}"
    args.ablation_dir = args.ablation_dir or f"out-ablation{suffix}"
    args.table = args.table or f"results/ablation{suffix}.md"
    if args.ablation:
        if os.path.isfile(args.ablation_dir) or os.path.isdir(args.table):
            parser.error(f"--ablation_dir {args.ablation_dir} must be a directory and --table {args.table} a file")
        return run_ablation(args, rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.rerank_k < 1:
        parser.error(f"--rerank_k={args.rerank_k}: must be at least 1")
    out = args.out or os.path.join(os.path.dirname(checkpoint_file(args.ckpt)), "eval.json")
    if os.path.isdir(out) or not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        parser.error(f"--out {out}: give a file in a folder that exists")
    model, _, ckpt = load_checkpoint(args.ckpt, checked_device(args.device))
    try:
        ds = data.Dataset(args.data or ckpt["data_path"])
    except FileNotFoundError as e:
        raise SystemExit(f"error: --data: {e}") from None
    check_tokenizer(ckpt, ds)
    if args.split != "val" and (model.cfg.prompt or model.cfg.instruct):
        raise SystemExit("error: --split is for pretraining checkpoints; the prompt and instruct stages evaluate "
                         "their own val splits")
    if model.cfg.prompt:
        names = ckpt["config"]["classes"].split(",")
        tokens = data.class_prompt_tokens(ds.tokenizer, names, model.cfg.prompt_init, model.cfg.context_length)
        metrics = prompt.evaluate(model, ds, names, tokens)
    elif model.cfg.instruct:
        metrics = instruct.evaluate(model, ds)
    else:
        try:
            metrics = evaluate(model, ds, args.device, rerank_k=args.rerank_k, split=args.split,
                               heldout=args.split == "val")  # the held-out part goes with the val metrics
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if args.split != "val":  # beside the val metrics in eval.json, not over them
            metrics = {f"{args.split}_{k}": v for k, v in metrics.items()}
    for k, v in metrics.items():
        print(f"{k:32s} {v:.4f}")
    if os.path.exists(out):  # keep what the training run wrote besides (its step, time, zero-shot numbers)
        metrics = {**read_json(out), **metrics}
    write_json(out, metrics)


if __name__ == "__main__":
    main()

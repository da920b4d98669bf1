"""
Evaluate a nanoVLP model: retrieval, zero-shot classification and captioning, on the val
split and on the test images that show held-out colour-shape pairs.

    python eval.py --ckpt out/ckpt.pt            # prints the metrics, writes out/eval.json

Protocols (shapes world):
- Retrieval. The gallery is every caption of every image of the split (C per image). Many
  images share a scene, so a hit is judged by meaning, not by index: the true captions of an
  image are all the captions the world can write for its scene (one per template), and a
  retrieved caption is a hit if its text is one of them. As every
  caption is written from one scene, this is "the caption's scene id equals the image's".
  Image-to-text R@K: an image is a hit if one of its true captions is among its K nearest
  captions. Text-to-image R@K: a caption is a hit if an image showing its scene is among its
  K nearest images.
- Zero-shot. On the images with one object: each shape (colour) is a class whose text
  embedding is the normalised mean of the embeddings of every single-object caption naming
  that shape (colour), over all colours (shapes), sizes and templates: CLIP's prompt
  ensembling, with the world's own templates as the prompts.
- Caption parse accuracy. Greedy captions are parsed back with the world's templates; a
  caption is right if it names exactly the image's objects, with their sizes, colours and
  shapes, in the right order along the right axis.
"""

import argparse
import json
import os
from contextlib import nullcontext

import numpy as np
import torch

import data
from model import VLM, VLMConfig


def load_checkpoint(path, device="cpu"):
    """(model, tokenizer, checkpoint dict) from a ckpt.pt written by train.py."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = VLM(VLMConfig(**ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    tok = ckpt["tokenizer"]
    return model, data.get_tokenizer(tok["kind"], tok.get("bpe")), ckpt


def to_pixels(model, images, device):
    """uint8 (B, H, W, 3) numpy -> normalised float pixels on device."""
    return model.normalize_pixels(torch.from_numpy(np.array(images)).to(device))  # a copy: memmaps are read-only


@torch.no_grad()
def embed_images(model, images, device, batch_size=256, ctx=nullcontext()):
    out = []
    for i in range(0, len(images), batch_size):
        with ctx:
            out.append(model.encode_image(to_pixels(model, images[i:i + batch_size], device)).float())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, tokens, device, batch_size=1024, ctx=nullcontext()):
    out = []
    for i in range(0, len(tokens), batch_size):
        with ctx:
            t = torch.from_numpy(np.ascontiguousarray(tokens[i:i + batch_size])).long().to(device)
            out.append(model.encode_text(t).float())
    return torch.cat(out)


def recall_at_k(sim, relevant, ks=(1, 5, 10)):
    """Fraction of queries (rows of sim) with a relevant item among their k most similar."""
    order = sim.argsort(dim=1, descending=True)
    hits = torch.gather(relevant, 1, order)  # (Q, G): relevance in rank order
    return {k: hits[:, :k].any(1).float().mean().item() for k in ks}


def retrieval(image_emb, text_emb, image_scene, text_scene, ks=(1, 5, 10)):
    """R@K both ways; relevance is scene equality (see the module docstring)."""
    relevant = torch.as_tensor(image_scene)[:, None] == torch.as_tensor(text_scene)[None, :]
    sim = image_emb @ text_emb.t()
    out = {f"retrieval_i2t_r{k}": v for k, v in recall_at_k(sim, relevant, ks).items()}
    out.update({f"retrieval_t2i_r{k}": v for k, v in recall_at_k(sim.t(), relevant.t(), ks).items()})
    return out


def class_prompts(kind):
    """{class name: all single-object captions naming it}, kind 'shape' or 'colour'."""
    names = data.SHAPES if kind == "shape" else data.COLOUR_NAMES
    prompts = {}
    for i, name in enumerate(names):
        objects = [(i, c, z) for c in range(len(data.COLOURS)) for z in range(len(data.SIZES))] if kind == "shape" \
            else [(s, i, z) for s in range(len(data.SHAPES)) for z in range(len(data.SIZES))]
        prompts[name] = [data.write_caption(0, [o], t) for o in objects for t in range(len(data.TEMPLATES[1]))]
    return prompts


@torch.no_grad()
def class_embeddings(model, tokenizer, prompts, length, device, ctx=nullcontext()):
    """(n_classes, D): per class, the normalised mean of its prompts' text embeddings."""
    out = []
    for texts in prompts.values():
        e = embed_texts(model, data.encode_texts(tokenizer, texts, length), device, ctx=ctx).mean(0)
        out.append(e / e.norm())
    return torch.stack(out)


@torch.no_grad()
def generate_captions(model, tokenizer, images, device, batch_size=256, ctx=nullcontext(), **sampling):
    texts = []
    for i in range(0, len(images), batch_size):
        with ctx:
            out = model.generate(to_pixels(model, images[i:i + batch_size], device), **sampling)
        texts += [data.decode_tokens(tokenizer, row) for row in out.tolist()]
    return texts


def caption_parse_accuracy(captions, scenes, counts):
    """Overall and per object count: the fraction of captions that parse to the true scene.
    Two parts of it, to see what a captioner gets wrong: `caption_objects_acc`, the captions
    that name the right objects (in any order, on any axis), and, over the images of two or
    three objects, `caption_axis_acc`, the captions that put them on the right axis (a row
    or a column)."""
    parsed = [data.parse_caption(c) for c in captions]
    right = np.array([p == s for p, s in zip(parsed, scenes)])
    out = {"caption_parse_acc": float(right.mean())}
    for n in (1, 2, 3):
        if (counts == n).any():
            out[f"caption_parse_acc_{n}obj"] = float(right[counts == n].mean())
    pairs = [(data.decode_scene(p) if p is not None else (-1, []), data.decode_scene(s)) for p, s in zip(parsed, scenes)]
    out["caption_objects_acc"] = float(np.mean([sorted(p[1]) == sorted(t[1]) for p, t in pairs]))
    if (counts > 1).any():
        out["caption_axis_acc"] = float(np.mean([p[0] == t[0] for (p, t), n in zip(pairs, counts) if n > 1]))
    return out


@torch.no_grad()
def evaluate_split(model, ds, split, device, select=None, ctx=nullcontext()):
    """Every metric on one split (or the rows `select` of it). Flat dict of floats."""
    images = ds.array(split, "images")
    idx = np.arange(len(images)) if select is None else np.asarray(select)
    images = images[idx]
    tokens = ds.array(split, "tokens")[idx]  # (N, C, T)
    scene = ds.array(split, "scene")[idx]
    objects = ds.array(split, "objects")[idx]
    counts = (objects[:, :, 0] >= 0).sum(1)
    N, C, T = tokens.shape
    image_emb = embed_images(model, images, device, ctx=ctx)
    text_emb = embed_texts(model, tokens.reshape(N * C, T), device, ctx=ctx)
    out = retrieval(image_emb, text_emb, scene, np.repeat(scene, C))
    single = counts == 1
    for kind, field in (("shape", 0), ("colour", 1)):
        if single.any():
            classes = class_embeddings(model, ds.tokenizer, class_prompts(kind), T, device, ctx)
            pred = (image_emb[torch.from_numpy(single)] @ classes.t()).argmax(1).cpu().numpy()
            out[f"zeroshot_{kind}_acc"] = float((pred == objects[single, 0, field]).mean())
    captions = generate_captions(model, ds.tokenizer, images, device, ctx=ctx)
    out.update(caption_parse_accuracy(captions, scene, counts))
    return out


def evaluate(model, ds, device, max_images=None, heldout=True, ctx=nullcontext()):
    """The metrics of a run: val (its first max_images images, or all), and, with heldout,
    the same on the test images whose objects are held-out compositions (keys 'heldout_*')."""
    was_training = model.training
    model.eval()
    n = ds.split_size("val")
    out = evaluate_split(model, ds, "val", device, np.arange(min(n, max_images or n)), ctx)
    if heldout:
        held = np.flatnonzero(ds.array("test", "heldout"))
        out.update({f"heldout_{k}": v for k, v in evaluate_split(model, ds, "test", device, held, ctx).items()})
    model.train(was_training)
    return out


def write_json(path, obj):
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out/ckpt.pt")
    parser.add_argument("--data", default=None, help="prepared dataset directory (default: the checkpoint's)")
    parser.add_argument("--out", default=None, help="where to write the metrics (default: eval.json beside the checkpoint)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    try:
        model, _, ckpt = load_checkpoint(args.ckpt, args.device)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    ds = data.Dataset(args.data or ckpt["data_path"])
    metrics = evaluate(model, ds, args.device)
    for k, v in metrics.items():
        print(f"{k:32s} {v:.4f}")
    write_json(args.out or os.path.join(os.path.dirname(args.ckpt), "eval.json"), metrics)


if __name__ == "__main__":
    main()

"""
The prompt stage: few-shot detection of new classes on the frozen model with coupled prompt vectors (MaPLe):
dense patch-by-class scores, refined along the image's edges (PAMR), each connected region a box (docs/prompt.md).

    python train.py --config small --stage prompt --init_from out/ckpt.pt
"""

import dataclasses
import json
import math
import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

import data
from model import VLM, fp32, fp32_scores

PRESETS = {
    "tiny": dict(max_iters=20, warmup_iters=2, eval_interval=10 ** 9, shots=2, shot_seeds=2, lr=1e-2, weight_decay=0.0,
                 prompt=True, momentum_alpha=0.0, text_prompt_depth=2, image_prompt_depth=2, dense_layers="1,2"),
    # 10 prompt vectors a layer (one per template token): 0.510 mIoU against 0.427 with 4 (results/prompt.md)
    "small": dict(max_iters=1000, warmup_iters=10, lr=5e-3, min_lr=5e-4, weight_decay=0.0, eval_interval=10 ** 9,
                  stop_loss=0.1, prompt=True, momentum_alpha=0.0, text_prompt_depth=4, image_prompt_depth=4,
                  prompt_init="there is an image with a photo of a"),
    "base": dict(max_iters=1000, warmup_iters=50, lr=3.5e-3, min_lr=3.5e-4, weight_decay=0.0, eval_interval=10 ** 9,
                 stop_loss=0.1, prompt=True, momentum_alpha=0.0, text_prompt_depth=9, image_prompt_depth=9,
                 dense_layers="8,10,12"),
}
TRAINS = ("prompt.",)  # the prompt learner alone; the model is frozen


def splice(x, start, vectors):
    """x (B, L, w) with positions start..start+n-1 replaced by vectors (n, w); a start of L appends them."""
    v = vectors.to(x.dtype).expand(x.size(0), -1, -1)
    return torch.cat([x[:, :start], v, x[:, start + v.size(1):]], dim=1)


class PromptLearner(nn.Module):
    """What the stage trains (MaPLe): text prompt vectors for the first text layers, image prompts for the
    first ViT layers (each a linear map of its layer's text prompts with couple, else free), the maps' fusion logits."""

    def __init__(self, cfg):
        super().__init__()
        Jt, Jv, n = cfg.text_prompt_depth, cfg.image_prompt_depth, cfg.n_ctx
        self.dense_layers = parse_layers(cfg.dense_layers, cfg.vit_layers)
        self.text_ctx = nn.Parameter(0.02 * torch.randn(Jt, n, cfg.text_width))  # layer 1: set from prompt_init
        self.coupling = nn.ModuleList(nn.Linear(cfg.text_width, cfg.vit_width) for _ in range(Jv if cfg.couple else 0))
        self.image_ctx = nn.Parameter(0.02 * torch.randn(0 if cfg.couple else Jv, n, cfg.vit_width))
        self.fusion = nn.Parameter(torch.zeros(len(self.dense_layers)))  # equal weights to start

    def text_prompts(self):
        return list(self.text_ctx)

    def image_prompts(self):
        return [f(ctx) for f, ctx in zip(self.coupling, self.text_ctx)] if len(self.coupling) else list(self.image_ctx)


def parse_layers(spec, n_layers):
    """'2,3,4' -> (2, 3, 4): 1-based layer numbers, each in 1..n_layers."""
    try:
        layers = tuple(int(x) for x in str(spec).split(","))
    except ValueError:
        raise ValueError(f"dense_layers takes comma-separated layer numbers, got {spec!r}") from None
    if not layers or not all(1 <= x <= n_layers for x in layers):
        raise ValueError(f"dense_layers {spec!r}: each must be a ViT layer in 1..{n_layers}")
    return layers


def patch_targets(target, patch_size, n_classes, min_fraction):
    """(B, H / p, W / p): each patch's class, the named class covering most of it if at least min_fraction, else 0."""
    share = F.avg_pool2d(F.one_hot(target, n_classes).permute(0, 3, 1, 2).float(), patch_size)[:, 1:]
    top = share.max(1)
    return torch.where(top.values >= min_fraction, top.indices + 1, 0)


def refine_masks(image, probs, iters=10, dilations=(1, 2, 4, 8)):
    """PAMR (Araslanov and Roth, 2020, https://arxiv.org/abs/2005.08104): class probabilities (B, C, H, W)
    made to follow the edges of image (B, 3, H, W), by repeated means over neighbours weighted by colour similarity."""
    H, W = image.shape[-2:]

    def neighbours(x):  # (B, c, H, W) -> (B, c, K, H, W): the 8 around each pixel per dilation, replicate padding
        out = torch.cat([F.unfold(F.pad(x, (d,) * 4, mode="replicate"), 3, dilation=d).unflatten(1, (-1, 9))
                         for d in dilations], 2)  # (B, c, 9 per dilation, H * W)
        return out[:, :, [k for k in range(out.size(2)) if k % 9 != 4]].unflatten(-1, (H, W))  # the centres left out

    nb = neighbours(image)
    spread = nb.std(dim=2, keepdim=True)
    affinity = (-(nb - image[:, :, None]).abs() / (1e-8 + 0.1 * spread)).mean(1).softmax(dim=1)  # (B, K, H, W)
    for _ in range(iters):
        probs = (neighbours(probs) * affinity[:, None]).sum(2)
    return probs


def connected_regions(masks):
    """masks (N, H, W) bool -> (N, H, W) long: each 8-connected region its own label, 0 elsewhere,
    by spreading the smallest label with a 3x3 min-pool until nothing changes."""
    H, W = masks.shape[1:]
    none = float(H * W + 1)
    labels = torch.where(masks, torch.arange(1, H * W + 1, dtype=torch.float32, device=masks.device).view(H, W), none)
    while True:
        spread = torch.where(masks, -F.max_pool2d(-labels[:, None], 3, 1, 1)[:, 0], none)
        if torch.equal(spread, labels):
            break
        labels = spread
    return torch.where(masks, labels, 0.0).long()


def anchor_boxes(classmap, scores, min_area=1):
    """The anchor generator: per image, a box (class, x0, y0, x1, y1, score), x1 and y1 one past the end, for every
    connected region of min_area or more pixels of a class in classmap (B, H, W), scored by its mean of scores."""
    B, C = scores.shape[:2]
    out = [[] for _ in range(B)]
    masks = classmap[:, None] == torch.arange(1, C, device=classmap.device)[None, :, None, None]  # (B, C-1, H, W)
    labels = connected_regions(masks.flatten(0, 1)).view(masks.shape)
    for b in range(B):
        for c in range(1, C):
            for label in labels[b, c - 1].unique().tolist():
                region = labels[b, c - 1] == label
                if label == 0 or int(region.sum()) < min_area:
                    continue
                ys, xs = region.nonzero(as_tuple=True)
                out[b].append((c, int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1,
                               float(scores[b, c][region].mean())))
    return out


class PromptVLM(VLM):
    """The frozen pretrained model plus the prompt learner."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.prompt = PromptLearner(cfg)
        self.prompt.apply(self._init_weights)

    @classmethod
    def zero_shot(cls, model):
        """A model of this class with no prompts around a plain model's weights: zero-shot detection."""
        cfg = dataclasses.replace(model.cfg, prompt=True, text_prompt_depth=0, image_prompt_depth=0,
                                  dense_layers=str(model.cfg.vit_layers))
        out = cls(cfg).to(model.pixel_mean.device)
        out.load_state_dict(model.state_dict(), strict=False)
        return out.eval()

    @torch.no_grad()
    def init_prompts(self, class_tokens):
        """Start the layer-1 text prompts from prompt_init's embeddings (positions 1..n_ctx of the class rows)."""
        if len(self.prompt.text_ctx):
            self.prompt.text_ctx[0].copy_(self.text.token_embedding(class_tokens[0, 1:1 + self.cfg.n_ctx]))

    def class_embeddings(self, class_tokens, prompted=True):
        """class_tokens (C, T), rows <bos> prompt_init name <eos> -> (C, embed_dim) normalised,
        the text prompts in place of prompt_init's tokens and of the first layers' outputs there."""
        prompts = self.prompt.text_prompts() if prompted else []
        if not prompts:
            return self.encode_text(class_tokens)
        t = self.text
        x = splice(t.token_embedding(class_tokens), 1, prompts[0]) + t.positional_embedding[:class_tokens.size(1)]
        for i, block in enumerate(t.blocks):
            x = block(splice(x, 1, prompts[i]) if 0 < i < len(prompts) else x, is_causal=True)
        return self._text_embedding(t, class_tokens, t.ln_final(x))

    def vit_states(self, pixels, prompts=()):
        """The class and patch tokens after each ViT block, before ln_post; image prompts appended after the
        patches (each layer's replacing the last), which the patches attend to and the states leave out."""
        v = self.visual
        x = v.embed(pixels)
        L = x.size(1)
        x = v.ln_pre(splice(x, L, prompts[0]) if len(prompts) else x)
        states = []
        for i, block in enumerate(v.blocks):
            x = block(splice(x, L, prompts[i]) if 0 < i < len(prompts) else x)
            states.append(x[:, :L])
        return states

    def score_maps(self, pixels, class_emb, prompted=True):
        """The fused map (B, C, g, g) and the layers' maps (L, B, C, g, g): per dense layer, the patch tokens' cosine
        with each class embedding times the ITC temperature, fused by softmax(fusion); unprompted: the last layer."""
        states = self.vit_states(pixels, self.prompt.image_prompts() if prompted else ())
        layers = self.prompt.dense_layers if prompted else (self.cfg.vit_layers,)
        v, g = self.visual, math.isqrt(self.visual.n_patches)

        def cosines(x, c):  # (B, P, w), (C, D) -> (B, C, g, g), in float32: the maps are argmax'ed and thresholded
            return (F.normalize(v.proj(x), dim=-1) @ c.t()).transpose(1, 2).unflatten(2, (g, g))
        maps = torch.stack([fp32_scores(cosines, v.ln_post(states[layer - 1][:, 1:]), class_emb) for layer in layers])
        maps = maps * self.logit_scale.exp().clamp(max=100)
        weights = self.prompt.fusion.softmax(0) if prompted else maps.new_ones(1)
        return (weights.view(-1, 1, 1, 1, 1).to(maps.dtype) * maps).sum(0), maps

    def forward(self, pixels, target, class_tokens):
        """pixels (B, 3, H, W), target (B, H, W) classes (0 background), class_tokens (C, T) -> {'ce', 'dice'
        (with dice_weight), 'loss'}: the fused map's cross-entropy against patch_targets, plus dice_weight x dice."""
        fused = fp32(self.score_maps(pixels, self.class_embeddings(class_tokens), prompted=True)[0])
        truth = patch_targets(target, self.cfg.patch_size, fused.size(1), self.cfg.patch_class_min)
        out = {"ce": F.cross_entropy(fused, truth)}
        out["loss"] = out["ce"]
        if self.cfg.dice_weight > 0:
            probs, truth = fused.softmax(1), F.one_hot(truth, fused.size(1)).permute(0, 3, 1, 2).to(fused.dtype)
            overlap, total = (probs * truth).sum((0, 2, 3)), (probs + truth).sum((0, 2, 3))
            out["dice"] = 1 - ((2 * overlap + 1) / (total + 1)).mean()
            out["loss"] = out["loss"] + self.cfg.dice_weight * out["dice"]
        return out

    @torch.no_grad()
    def detect(self, pixels, class_tokens, prompted=True):
        """The class map (B, H, W) (argmax of the refined softmax), the upsampled scores (B, C, H, W), the boxes."""
        fused, _ = self.score_maps(pixels, self.class_embeddings(class_tokens, prompted), prompted)
        # nearest: each patch's scores cover its own pixels and PAMR moves the edges; bilinear blending gives the
        # rim of an object about one patch wide its background neighbours' scores (results/prompt.md)
        scores = fp32(F.interpolate(fused, size=pixels.shape[-2:], mode="nearest"))
        probs = scores.softmax(1)
        if self.cfg.refine_iters > 0:
            probs = refine_masks(fp32(pixels), probs, self.cfg.refine_iters)
        classmap = probs.argmax(1)
        return classmap, scores, anchor_boxes(classmap, scores, self.cfg.min_box_area)


# -----------------------------------------------------------------------------
# batches, evaluation and the shot runs


def setup(cfg, ds):
    """The stage's classes: --classes, else the dataset's novel ones; each class's text must fit the context."""
    cfg.classes = cfg.classes or ",".join(ds.meta.get("novel_classes") or ds.meta.get("novel_shapes", []))
    if not cfg.classes:
        raise SystemExit(f"--stage prompt: {ds.path} names no novel classes; give --classes=a,b,...")
    try:
        class_rows(ds, cfg)
    except ValueError as e:  # <bos> template name <eos> longer than the context
        raise SystemExit(f"--prompt_init={cfg.model.prompt_init!r} with a class name: {e}; give a shorter "
                         f"template or a longer --context_length") from None


def start(model, cfg, run_eval):
    """Say what is trained and, with zero_shot, evaluate with no prompts; returns what eval.json gets of it."""
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    print(f"trainable parameters: {sum(trainable.values())} ("
          + ", ".join(f"{n} {k}" for n, k in trainable.items() if k) + f"); {cfg.shots} shots x {cfg.classes}, "
          f"shot sample {cfg.shot_seed}")
    out = dict(trainable_params=sum(trainable.values()))
    if cfg.zero_shot:
        zero = run_eval(prompted=False)
        print(f"zero-shot (no prompts): mIoU {zero['miou']:.3f}, AP50 {zero['ap50']:.3f}")
        out.update({f"zeroshot_{k}": zero[k] for k in ("miou", "fg_iou", "ap50")})
    return out


def class_rows(ds, cfg):
    return data.class_prompt_tokens(ds.tokenizer, cfg.classes.split(","), cfg.model.prompt_init,
                                    cfg.model.context_length)


def batches(cfg, ds, model, device, rank, world_size):
    """(fetch, place, n): every step, all K shots of each class in novel_train with their class maps, on the
    device; with augment, shifted by whole patches, mirrored and colour-permuted."""
    names = cfg.classes.split(",")
    try:
        idx = ds.shots("novel_train", names, cfg.shots, cfg.shot_seed)
        target = torch.as_tensor(np.asarray(ds.class_targets("novel_train", idx, names), np.int64), device=device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--stage prompt: {e}") from None
    images = torch.from_numpy(np.array(ds.array("novel_train", "images")[idx])).to(device)
    tokens = torch.as_tensor(class_rows(ds, cfg), dtype=torch.long, device=device)
    S, p = cfg.model.image_size, cfg.model.patch_size
    n, pos = len(idx), np.arange(S)

    def fetch(micro_step):
        x, t = images, target
        if cfg.augment:  # one gather: output pixel (i, j) reads ((i - dy) % S, (j' - dx) % S), j' mirrored or not
            rng = np.random.default_rng([cfg.seed, cfg.shot_seed, micro_step])
            shifts, flips = rng.integers(S // p, size=(n, 2)) * p, rng.random(n) < 0.5
            rows = (pos[None] - shifts[:, :1]) % S
            cols = (np.where(flips[:, None], S - 1 - pos[None], pos[None]) - shifts[:, 1:]) % S
            b, r, c = (torch.from_numpy(a).to(device)
                       for a in (np.arange(n)[:, None, None], rows[:, :, None], cols[:, None]))
            x, t = x[b, r, c][..., torch.from_numpy(rng.permutation(3)).to(device)], t[b, r, c]
        return dict(pixels=model.normalize_pixels(x), target=t, class_tokens=tokens)
    return fetch, lambda parts: parts, n


def class_iou_counts(pred, truth, n_classes):
    """(intersection, union) per class, (n_classes,) each, over every pixel of class maps pred and truth."""
    pred, truth = np.asarray(pred).ravel(), np.asarray(truth).ravel()
    inter = np.bincount(truth[pred == truth], minlength=n_classes)
    union = np.bincount(pred, minlength=n_classes) + np.bincount(truth, minlength=n_classes) - inter
    return inter, union


def box_iou(a, b):
    """(N, M) IoU of boxes a (N, 4) and b (M, 4), (x0, y0, x1, y1) with x1, y1 one past the end."""
    a, b = np.asarray(a, np.float64).reshape(-1, 1, 4), np.asarray(b, np.float64).reshape(1, -1, 4)
    inter = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None).prod(-1)
    area = lambda x: (x[..., 2:] - x[..., :2]).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def average_precision(detections, truths, classes, threshold=0.5):
    """{class: box AP at IoU threshold} (NaN for a class with no true box), all-point interpolation.
    detections: per image [(class, x0, y0, x1, y1, score)]; truths: per image [(class, x0, y0, x1, y1)]."""
    out = {}
    for c in classes:
        dets = sorted(((d[5], i, d[1:5]) for i, ds in enumerate(detections) for d in ds if d[0] == c),
                      key=lambda d: -d[0])
        gts = [np.array([t[1:5] for t in ts if t[0] == c]).reshape(-1, 4) for ts in truths]
        n_true = sum(len(g) for g in gts)
        if n_true == 0:
            out[c] = float("nan")
            continue
        matched = [np.zeros(len(g), bool) for g in gts]
        hit = np.zeros(len(dets), bool)
        for j, (_, i, box) in enumerate(dets):
            if len(gts[i]):
                iou = np.where(matched[i], -1.0, box_iou(box, gts[i])[0])
                best = int(iou.argmax())
                if iou[best] >= threshold:
                    matched[i][best] = hit[j] = True
        tp = np.cumsum(hit)
        precision = np.maximum.accumulate((tp / np.arange(1, len(dets) + 1))[::-1])[::-1]
        out[c] = float(np.sum(np.diff(tp / n_true, prepend=0.0) * precision))
    return out


def true_boxes(ds, split, idx, names):
    """Per image of idx, the true boxes (class, x0, y0, x1, y1) of the named classes, class i + 1 names[i]."""
    lookup = {value - 1: c for c, value in enumerate(ds.class_values(names), 1)}  # objects record the shape index
    return [[(lookup[o[0]], *map(int, o[3:7])) for o in rows if o[0] >= 0 and o[0] in lookup]
            for rows in ds.array(split, "objects")[np.asarray(idx)]]


@torch.no_grad()
def evaluate(model, ds, names, class_tokens, prompted=True, max_images=None, split="novel_val", batch_size=128,
             ctx=nullcontext()):
    """Few-shot detection on the first max_images of split (prompted False: zero-shot): IoU per named class, miou,
    fg_iou, box AP at IoU 0.5 (ap50); the same without the edge refinement (*_unrefined). Protocol: docs/prompt.md."""
    was_training = model.training
    model.eval()
    n = min(ds.split_size(split), max_images or ds.split_size(split))
    C = len(names) + 1
    tokens = torch.as_tensor(np.asarray(class_tokens, np.int64), device=model.pixel_mean.device)
    # per map ("" refined, "_unrefined" not): (intersection, union) per class and of the foreground; the boxes
    counts, fg, dets = {"": 0, "_unrefined": 0}, {"": 0, "_unrefined": 0}, {"": [], "_unrefined": []}
    for i in range(0, n, batch_size):
        idx = np.arange(i, min(n, i + batch_size))
        truth = ds.class_targets(split, idx, names)
        with ctx:
            classmap, scores, boxes = model.detect(model.normalize_pixels(ds.array(split, "images")[idx]), tokens,
                                                   prompted)
        unrefined = scores.argmax(1)
        dets[""] += boxes
        dets["_unrefined"] += anchor_boxes(unrefined, scores, model.cfg.min_box_area)
        for key, pred in (("", classmap.cpu().numpy()), ("_unrefined", unrefined.cpu().numpy())):
            counts[key] += np.stack(class_iou_counts(pred, truth, C))
            fg[key] += np.stack(class_iou_counts(pred > 0, truth > 0, 2))[:, 1]
    truths = true_boxes(ds, split, np.arange(n), names)
    out = {}
    for key in ("", "_unrefined"):
        iou = counts[key][0] / np.maximum(counts[key][1], 1)  # a class in neither map: 0
        ap = average_precision(dets[key], truths, range(1, C))
        out[f"miou{key}"] = float(iou[1:].mean())
        out[f"fg_iou{key}"] = float(fg[key][0] / max(fg[key][1], 1))
        out[f"ap50{key}"] = float(np.nanmean([ap[c] for c in range(1, C)]))
        if not key:
            out.update({f"iou_{name}": float(iou[c]) for c, name in enumerate(names, 1)})
            out.update({f"ap50_{name}": ap[c] for c, name in enumerate(names, 1)})
    model.train(was_training)
    return out


def run(cfg, sub_run):
    """One training run per K-shot sample (out_dir/seed<k>); out_dir/eval.json: each metric's mean and <key>_std."""
    results = [sub_run({"out_dir": os.path.join(cfg.out_dir, f"seed{k}"), "shot_seed": k,
                        "zero_shot": cfg.zero_shot and k == cfg.shot_seed},  # no prompts: one sample's as good
                       f"shot sample {k} ({k - cfg.shot_seed + 1} of {cfg.shot_seeds})")
               for k in range(cfg.shot_seed, cfg.shot_seed + cfg.shot_seeds)]
    summary = {"shot_seeds": len(results), "shots": cfg.shots, "step": max(r["step"] for r in results)}
    print(f"over {len(results)} shot samples of {cfg.shots} shots per class (mean +- std):")
    for key in [k for k, v in results[0].items() if isinstance(v, float)]:
        values = np.array([r[key] for r in results if key in r])  # zero-shot: the first sample's
        summary[key] = float(values.mean())
        summary[key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        print(f"{key:32s} {summary[key]:.4f} +- {summary[key + '_std']:.4f}")
    summary["trainable_params"] = results[0]["trainable_params"]
    data.write_file(os.path.join(cfg.out_dir, "eval.json"), json.dumps(summary, indent=1))
    return summary

"""
The instruct stage: answering questions about several images, on a pretrained model. A relation encoder
gives each image a token; pass 1 scores every image token against a global vector; pass 2 keeps each image's
best tokens, gated by their scores, and answers (prefix-LM). How it is built: docs/instruct.md.

    python train.py --config small --stage instruct --init_from out/ckpt.pt
"""

import math
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

import data
from model import VLM, Block, attention_mask, fp32, mlp_widths, transformer_flops

# what the stage changes in a preset; the ViT stays frozen unless --train_vit
PRESETS = {
    "tiny": dict(max_iters=30, warmup_iters=5, eval_interval=15, eval_images=10, instruct=True, momentum_alpha=0.0),
    "small": dict(batch_size=64, max_iters=1000, warmup_iters=30, lr=5e-4, min_lr=5e-5, eval_interval=10 ** 9,
                  eval_images=500, instruct=True, momentum_alpha=0.0),
    "base": dict(max_iters=5000, warmup_iters=200, lr=1e-4, min_lr=1e-5, instruct=True, momentum_alpha=0.0),
}
TRAINS = ("converter.", "relation.", "scorer.", "image_index", "text.blocks.", "text.ln_final.",
          "text.token_embedding.", "text.positional_embedding")  # parameter name prefixes; the rest is frozen
DROPPABLE = ("instruction", "images", "relation")


class RelationEncoder(nn.Module):
    """One relation token per image of a sample: a small bidirectional transformer over the images'
    class tokens plus image-index embeddings; padding slots are hidden."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.text_width
        self.c_in = nn.Linear(cfg.vit_width, w)
        self.index_embedding = nn.Parameter(0.02 * torch.randn(cfg.image_slots, w))
        self.blocks = nn.ModuleList(Block(w, cfg.text_heads, cfg, cfg.activation) for _ in range(cfg.relation_layers))
        self.ln_post = nn.LayerNorm(w, eps=cfg.layer_norm_eps)

    def forward(self, pooled, valid):
        """pooled (B, K, vit_width), valid (B, K) bool -> relation tokens (B, K, text_width)."""
        K = pooled.size(1)
        x = self.c_in(pooled) + self.index_embedding[:K]
        mask = attention_mask(K, K, K, key_valid=valid, device=valid.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_post(x)


class Scorer(nn.Module):
    """The relevance of image tokens x to the global vector g: <W_g g, W_x x> / sqrt(w)."""

    def __init__(self, width):
        super().__init__()
        self.c_g = nn.Linear(width, width)
        self.c_x = nn.Linear(width, width)

    def forward(self, g, x):
        """g (B, w), x (B, N, w) -> scores (B, N)."""
        return (self.c_x(x) @ self.c_g(g)[:, :, None]).squeeze(-1) / math.sqrt(g.size(-1))


class InstructVLM(VLM):
    """The pretrained model plus an image-index embedding, the relation encoder and the scorer."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.image_index = nn.Parameter(0.02 * torch.randn(cfg.image_slots, cfg.text_width))  # a token's image slot
        self.relation = RelationEncoder(cfg) if cfg.relation else None
        self.scorer = Scorer(cfg.text_width) if cfg.two_pass else None
        for module in (self.relation, self.scorer):
            if module is not None:
                module.apply(self._init_weights)

    def multi_pixels(self, images):
        """uint8 (B, K, H, W, 3), numpy or a tensor -> normalised (B, K, 3, H, W) on the model's device."""
        return self.normalize_pixels(images.reshape(-1, *images.shape[2:])).unflatten(0, images.shape[:2])

    def instruct_image_tokens(self, pixels, image_valid):
        """pixels (B, K, 3, H, W), image_valid (B, K) -> relation tokens (B, K, w) or None,
        and image tokens (B, K, T, w) plus their image's index embedding (zeros in padding slots)."""
        B, K = image_valid.shape
        vit = self.visual(pixels[image_valid])  # (n, 1 + P, vit_width)
        sample, slot = image_valid.nonzero(as_tuple=True)

        def by_slot(x):  # (n, ...) of the valid images -> (B, K, ...), zeros in the padding slots
            return x.new_zeros(B, K, *x.shape[1:]).index_put_((sample, slot), x)
        rel = self.relation(by_slot(vit[:, 0]), image_valid) if self.relation is not None else None
        # each image's converter also reads its sample's relation tokens
        context = (rel[sample], image_valid[sample]) if rel is not None else (None, None)
        return rel, by_slot(self.converter(vit[:, 1:], *context) + self.image_index[slot][:, None])

    def question_block(self, question):
        """The question in its fixed block of context_length - answer_length positions."""
        n = self.cfg.context_length - self.cfg.answer_length
        # batches() checked the training data at load; in a compiled step this check would break the graph
        if not torch.compiler.is_compiling() and (question[:, n:] != self.cfg.pad_id).any():
            raise ValueError(f"a question is longer than context_length - answer_length = {n} tokens")
        return question[:, :n]

    def instruct_prefix(self, pixels, image_valid, question, gates=True):
        """What the answer is conditioned on. Two passes: pass 1 over [relation | image tokens | question | <glob>]
        gives g; each image keeps its keep_ratio best tokens against g, gated by sigmoid(score) (gates=False: none).
        One pass: no g, every token kept. A dict: g, rel, rel_valid, image, image_valid, image_log_gate, kept."""
        cfg = self.cfg
        rel, image = self.instruct_image_tokens(pixels, image_valid)
        B, K, T, w = image.shape
        out = dict(g=None, rel=rel, rel_valid=image_valid, image=image.flatten(1, 2),
                   image_valid=image_valid.repeat_interleave(T, 1), image_log_gate=None, kept=None)
        if not cfg.two_pass:
            return out
        q = self.question_block(question)
        text = torch.cat([q, torch.full_like(q[:, :1], cfg.glob_id)], dim=1)
        parts, valid = [out["image"]], [out["image_valid"], text != cfg.pad_id]
        if rel is not None:
            parts, valid = [rel] + parts, [image_valid] + valid
        valid = torch.cat(valid, 1)
        L = valid.size(1)
        mask = attention_mask(L, L, L, key_valid=valid, device=valid.device)
        g = self.text(text, prefix=torch.cat(parts, 1), mask=mask, n_layers=cfg.pass1_layers or None)[:, -1]
        scores = self.scorer(g, out["image"]).view(B, K, T)
        n = max(1, round(cfg.keep_ratio * T))
        kept = scores.topk(n, dim=-1).indices.sort(-1).values  # (B, K, n)
        x = image.gather(2, kept[..., None].expand(-1, -1, -1, w))
        log_gate = F.logsigmoid(scores.gather(2, kept)).flatten(1) if gates else None
        out.update(g=g, image=x.flatten(1, 2), image_valid=image_valid.repeat_interleave(n, 1), image_log_gate=log_gate,
                   kept=kept)
        return out

    def answer_states(self, pre, question, answer, drop=None):
        """The answer's states from pass 2 over [g | relation | image tokens | question | answer],
        prefix-LM; a kept token's log gate is added to its attention logits (the pre-LN would undo a scaled token).
        drop: {modality: (B,) bool}, the samples whose instruction, images or relation tokens are hidden."""
        cfg, B = self.cfg, question.size(0)
        keep = {k: question.new_ones(B, 1, dtype=torch.bool) if drop is None else ~drop[k][:, None] for k in DROPPABLE}
        parts, valid = [pre["image"]], [pre["image_valid"] & keep["images"]]
        if pre["rel"] is not None:
            parts, valid = [pre["rel"]] + parts, [pre["rel_valid"] & keep["relation"]] + valid
        if pre["g"] is not None:
            parts, valid = [pre["g"][:, None]] + parts, [torch.ones_like(keep["images"])] + valid
        q = self.question_block(question)
        valid = torch.cat(valid + [(q != cfg.pad_id) & keep["instruction"], answer != cfg.pad_id], 1)
        prefix, L = torch.cat(parts, 1), valid.size(1)
        mask = attention_mask(prefix.size(1) + q.size(1), L, L, key_valid=valid, device=valid.device)
        if pre["image_log_gate"] is not None:  # as an additive mask: the log gates on the image tokens' keys
            before, after = prefix.size(1) - pre["image"].size(1), q.size(1) + answer.size(1)
            bias = F.pad(pre["image_log_gate"], (before, after)).to(self.text.token_embedding.weight.dtype)
            mask = bias[:, None, None, :].masked_fill(~mask, float("-inf"))
        h = self.text(torch.cat([q, answer], 1), prefix=prefix, mask=mask)
        return h[:, -answer.size(1):]

    def forward(self, pixels, image_valid, question, answer, drop=None):
        """pixels (B, K, 3, H, W), image_valid (B, K), question (B, T), answer (B, Ta) -> {'answer', 'loss'}: the
        answer's next-token cross-entropy. In training, modalities are dropped unless drop is given."""
        if drop is None and self.training:  # each sample hides each modality with probability drop_<modality>
            drop = {k: torch.rand(len(question), device=question.device) < getattr(self.cfg, f"drop_{k}")
                    for k in DROPPABLE}
        h = self.answer_states(self.instruct_prefix(pixels, image_valid, question), question, answer, drop)
        logits = fp32(self.text.lm_head(h[:, :-1]))
        targets = answer[:, 1:].masked_fill(answer[:, 1:] == self.cfg.pad_id, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return {"answer": loss, "loss": loss}

    @torch.no_grad()
    def answer(self, pixels, image_valid, question, drop=None):
        """Greedy answers (B, n), <eos> included, then <pad>. Pass 1 runs once; answers are short,
        so each new token reruns pass 2 without a cache."""
        cfg, B = self.cfg, question.size(0)
        pre = self.instruct_prefix(pixels, image_valid, question)
        out = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=question.device)
        done = torch.zeros(B, dtype=torch.bool, device=question.device)
        for _ in range(cfg.answer_length - 1):
            h = self.answer_states(pre, question, out, drop)
            nxt = self.text.lm_head(h[:, -1]).argmax(-1).masked_fill(done, cfg.pad_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == cfg.eos_id
            if done.all():
                break
        return out[:, 1:]

    def instruct_flops(self, n_images):
        """Forward FLOPs by part of one training sample with n_images images, padding included (docs/instruct.md)."""
        c = self.cfg
        w, vw, K = c.text_width, c.vit_width, n_images
        P = (c.image_size // c.patch_size) ** 2
        T = P if c.converter == "mlp" else c.n_queries
        R = K if c.relation else 0  # relation tokens
        Lq, Ta = c.context_length - c.answer_length, c.answer_length
        out = {"vit": K * (2 * P * 3 * c.patch_size ** 2 * vw
                           + transformer_flops(c.vit_layers, vw, 1 + P, mlp_widths(c)[0]))}
        if c.relation:
            out["relation"] = 2 * K * vw * w + transformer_flops(c.relation_layers, w, K, c.mlp_ratio * w)
        if c.converter == "mlp":
            out["converter"] = K * 2 * P * (vw * w + w * w)
        else:  # per layer: queries, keys and values, output, MLP, attention over P + R keys
            S, M = P + R, c.n_queries
            per_layer = 2 * M * w * w * (2 + 2 * c.mlp_ratio) + 4 * S * w * w + 4 * M * S * w
            out["converter"] = K * (2 * P * vw * w + c.resampler_layers * per_layer)
        n = max(1, round(c.keep_ratio * T)) if c.two_pass else T
        if c.two_pass:
            out["pass1"] = transformer_flops(c.pass1_layers or c.text_layers, w, R + K * T + Lq + 1, mlp_widths(c)[1])
            out["scorer"] = 2 * w * w + 2 * K * T * w * w + 2 * K * T * w
        out["pass2"] = transformer_flops(c.text_layers, w, int(c.two_pass) + R + K * n + Lq + Ta, mlp_widths(c)[1])
        out["logits"] = 2 * (Ta - 1) * w * c.vocab_size
        return out


# -----------------------------------------------------------------------------
# batches and evaluation


def batches(cfg, ds, model, device, rank, world_size):
    """(fetch, place, n) over the question sets of multi_train, each batch's images padded to its largest set."""
    split, m = "multi_train", cfg.model
    if not ds.has(split, "sets"):
        raise SystemExit(f"--stage instruct: {ds.path} has no multi-image question sets ({split})")
    if ds.array(split, "sets").shape[1] > m.image_slots:
        raise SystemExit(f"{ds.path}: {split} has sets of up to {ds.array(split, 'sets').shape[1]} images, more than "
                         f"the model's --image_slots={m.image_slots}")
    for key, n in (("question", m.context_length - m.answer_length), ("answer", m.answer_length)):
        if (ds.array(split, key)[:, n:] != m.pad_id).any():
            raise SystemExit(f"{ds.path}: a {key} of {split} is longer than {n} tokens; the model gives questions "
                             f"context_length - answer_length tokens and answers answer_length (--answer_length)")

    def fetch(micro_step):
        idx = data.batch_indices(ds.split_size(split), cfg.batch_size, micro_step, cfg.seed, rank, world_size,
                                 cfg.grad_accum)
        images, valid, question, answer = ds.multi_batch(split, idx)
        return dict(images=images, image_valid=valid, question=question.astype(np.int64),
                    answer=answer[:, :m.answer_length].astype(np.int64))

    def place(parts):
        x = {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in parts.items() if k != "images"}
        return dict(pixels=model.multi_pixels(torch.as_tensor(parts["images"])), **x)
    return fetch, place, ds.split_size(split)


@torch.no_grad()
def answer_sets(model, ds, split, idx, drop=None, batch_size=256, ctx=nullcontext()):
    """Greedy answers (texts) to the question sets idx of a split; drop: the modalities hidden from pass 2."""
    texts, device = [], model.pixel_mean.device
    for i in range(0, len(idx), batch_size):
        images, valid, question, _ = ds.multi_batch(split, idx[i:i + batch_size])
        hidden = {k: torch.full((len(valid),), k in (drop or ()), device=device) for k in DROPPABLE}
        with ctx:
            out = model.answer(model.multi_pixels(images), torch.from_numpy(valid).to(device),
                               torch.from_numpy(np.asarray(question, np.int64)).to(device), drop=hidden)
        texts += [data.decode_tokens(ds.tokenizer, row) for row in out.tolist()]
    return texts


def latency_ms(model, ds, split, idx, ctx=nullcontext()):
    """Median wall time of answering one question set alone (batch 1), in milliseconds."""
    times = []
    for i in idx:
        t0 = time.perf_counter()
        answer_sets(model, ds, split, np.array([i]), ctx=ctx)  # its .tolist() waits for the GPU
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def evaluate(model, ds, max_sets=None, split="multi_val", latency_sets=32, ctx=nullcontext()):
    """Exact-match accuracy of greedy answers on the first max_sets val sets, overall and per question type
    beside its majority-answer baseline, and with each modality hidden; forward GFLOPs and latency per set."""
    was_training = model.training
    model.eval()
    n = ds.split_size(split)
    idx = np.arange(min(n, max_sets or n))
    answers = lambda s, i: [data.decode_tokens(ds.tokenizer, row) for row in ds.array(s, "answer")[i]]  # noqa: E731
    truth, qtype = np.array(answers(split, idx)), ds.array(split, "qtype")[idx]
    train_answers, train_qtype = np.array(answers("multi_train", slice(None))), ds.array("multi_train", "qtype")
    right = np.array(answer_sets(model, ds, split, idx, ctx=ctx)) == truth
    majority = np.zeros(len(idx), bool)
    out = {"instruct_acc": float(right.mean())}
    for t, name in enumerate(ds.meta["qtypes"]):
        values, counts = np.unique(train_answers[train_qtype == t], return_counts=True)
        if len(values):  # a type no training set asks has no majority answer: its baseline gets none right
            majority[qtype == t] = truth[qtype == t] == values[counts.argmax()]
        if (qtype == t).any():
            out[f"instruct_acc_{name}"] = float(right[qtype == t].mean())
            out[f"instruct_majority_{name}"] = float(majority[qtype == t].mean())
    out["instruct_majority"] = float(majority.mean())
    for drop in DROPPABLE:
        if drop != "relation" or model.cfg.relation:
            said = answer_sets(model, ds, split, idx, (drop,), ctx=ctx)
            out[f"instruct_acc_no_{drop}"] = float(np.mean(np.array(said) == truth))
    flops = [model.instruct_flops(int(k)) for k in (ds.array(split, "sets")[idx] >= 0).sum(1)]
    out["instruct_gflops"] = float(np.mean([sum(f.values()) for f in flops])) / 1e9
    out["instruct_pass2_gflops"] = float(np.mean([f["pass2"] for f in flops])) / 1e9
    out["instruct_latency_ms"] = latency_ms(model, ds, split, idx[:latency_sets], ctx)
    model.train(was_training)
    return out

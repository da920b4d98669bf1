"""
The nanoVLP model: a ViT, one text transformer used with three attention masks, a converter
from image tokens to the text width, and the losses and generation built on them.

Module names follow OpenAI CLIP (conv1, class_embedding, ln_pre, ln_post, proj,
token_embedding, ln_final, text_projection, logit_scale) and GPT-2 inside each block (ln_1,
attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj), so that published weights load by a
plain key map (q, k and v of Hugging Face CLIP concatenate into c_attn).

References:
1) CLIP: https://github.com/openai/CLIP/blob/main/clip/model.py
2) nanoGPT: https://github.com/karpathy/nanoGPT/blob/master/model.py
3) BLIP (image-grounded decoding): https://arxiv.org/abs/2201.12086
"""

import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class VLMConfig:
    # image side
    image_size: int = 64
    patch_size: int = 8
    vit_width: int = 192
    vit_layers: int = 4
    vit_heads: int = 3
    # text side
    vocab_size: int = 454  # set from the tokenizer
    context_length: int = 24  # text positions, <bos> and <eos> included
    text_width: int = 192
    text_layers: int = 4
    text_heads: int = 3
    # shared
    mlp_ratio: int = 4
    activation: str = "gelu"  # 'gelu', 'quick_gelu' (OpenAI CLIP) or 'gelu_tanh' (GPT-2's gelu_new)
    text_activation: str = ""  # the text transformer's and the generator's; '' = activation
    layer_norm_eps: float = 1e-5
    embed_dim: int = 128  # the joint image-text space of ITC
    itc_temperature: float = 0.07  # ITC's initial temperature, learned from there (CLIP's 0.07)
    converter: str = "mlp"  # image tokens -> text width: 'mlp' (one token per patch) or 'resampler'
    image_positions: bool = False  # mlp: each image token also gets a learned position in the text width
    image_axes: bool = False  # mlp: each image token also reads its row and column (means, and what lies before it)
    n_queries: int = 8  # the resampler's learned queries: image tokens per image
    resampler_layers: int = 2
    # loss weights: 0 switches an objective off and it costs nothing
    itc_weight: float = 1.0  # M4 contrastive
    itm_weight: float = 1.0  # M5 image-text matching with hard negatives
    mlm_weight: float = 1.0  # M6 generator: masked text tokens
    moc_weight: float = 1.0  # M6 generator: visual codes of masked patches
    rtd_weight: float = 1.0  # M6 discriminator: replaced text tokens (lambda; ELECTRA used 50, see README)
    r2d_weight: float = 1.0  # M6 discriminator: replaced image patches
    caption_weight: float = 1.0  # M8 captioning
    itm_negatives: float = 1.0  # negative pairs per matched pair: 2 (an image's and a text's, as ALBEF), 1 or 0.5
    fused_rows: float = 1.0  # of a batch, the rows ELECTRA replaces and the fused pass reads: 1, or 0.5 (every other)
    itm_clean: bool = False  # ITM's matched pairs are the clean image and text, not ELECTRA's replaced ones
    # ELECTRA (M6)
    text_mask_rate: float = 0.15  # of the non-special text tokens
    patch_mask_rate: float = 0.15  # of the image patches
    n_codes: int = 256  # visual codebook size (k-means over patches: data.prepare_codebook)
    gen_width: int = 0  # the generator's width; 0: text_width // 4 (at most that)
    gen_layers: int = 2
    gen_heads: int = 2
    shared_vit_pass: bool = False  # one ViT pass, over ELECTRA's replaced pixels, for ITC, captioning and fused pass
    fused_vit_grad: bool = True  # the fused pass's losses (ITM, RTD, R2D) train the ViT; false: the converter and text only
    # momentum distillation (M7): alpha is the weight of the momentum model's soft targets,
    # ramped up from 0 over the first epoch; 0 switches it off (no EMA copy, no queues)
    momentum_alpha: float = 0.4
    momentum: float = 0.995  # EMA decay of the momentum encoders
    queue_size: int = 4096  # momentum image and text features of earlier batches: extra ITC negatives
    # multi-image instruction following (M9-M11): built when instruct is true (--stage instruct sets it)
    instruct: bool = False
    image_slots: int = 4  # most images of one sample (the image-index embeddings)
    relation: bool = True  # M9: the relation encoder, one relation token per image
    relation_layers: int = 2
    two_pass: bool = True  # M10: pass 1 gives the global vector g that selects the image tokens of pass 2
    keep_ratio: float = 0.5  # of each image's tokens, kept for pass 2
    drop_instruction: float = 0.1  # M11: per-sample probability of hiding a modality in pass 2 (training only)
    drop_images: float = 0.1
    drop_relation: float = 0.1
    answer_length: int = 8  # the answer block, <bos> answer <eos> <pad>...; the question gets the rest of the context
    # few-shot prompting on the frozen model (M12): built when prompt is true (--stage prompt sets it)
    prompt: bool = False
    prompt_init: str = "a photo of a"  # the words the layer-1 text prompts start from (zero-shot's template)
    n_ctx: int = 4  # prompt vectors per prompted layer: set from the tokens of prompt_init
    text_prompt_depth: int = 3  # J: text layers 1..J get prompts (0: none)
    image_prompt_depth: int = 3  # ViT layers 1..J get image prompts (0: none)
    couple: bool = True  # image prompts = one linear map per layer of that layer's text prompts (MaPLe)
    dense_layers: str = "2,3,4"  # ViT layers (1-based) whose patch tokens give score maps, fused by learned weights
    patch_class_min: float = 0.05  # a patch is trained as a class's if that class covers this much of it
    dice_weight: float = 1.0  # the dice loss beside the per-patch cross-entropy; 0 switches it off
    refine_iters: int = 20  # detection: PAMR steps that align the upsampled class map with the image's edges (0: none)
    min_box_area: int = 4  # detection: regions of fewer pixels give no box
    # pixels are normalised with these (CLIP's)
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)
    # special tokens, set from the tokenizer
    bos_id: int = 450
    eos_id: int = 449
    pad_id: int = 451
    mask_id: int = 452
    glob_id: int = 453


# -----------------------------------------------------------------------------
# attention masks: one rule serves all three uses of the text transformer


def attention_mask(n_prefix, q_len, k_len, q_start=0, key_valid=None, device=None):
    """Boolean mask (True = may attend) for queries at positions q_start..q_start+q_len-1
    over keys 0..k_len-1: a key is visible if it lies in the prefix or not after the query.
        causal:        n_prefix = 0
        prefix-LM:     n_prefix = number of prefix tokens (image tokens, instruction)
        bidirectional: n_prefix = k_len
    key_valid: optional (B, k_len) bool, False for keys hidden from every query (padding, a
    dropped modality); a query still sees itself, so that no row is empty (SDPA turns an empty
    row into NaN, which then spreads even through hidden keys). Returns (q_len, k_len), or
    (B, 1, q_len, k_len) when key_valid is given."""
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    mask = (k < n_prefix) | (k <= q)
    if key_valid is not None:
        mask = mask[None, None] & key_valid[:, None, None, :] | (k == q)
    return mask


class KVCache:
    """Keys and values of one attention layer during generation, preallocated and filled
    left to right, so each new token costs one row of attention instead of a full pass."""

    def __init__(self, batch_size, n_head, max_len, head_dim, device, dtype):
        self.k = torch.zeros(batch_size, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.len = 0

    def update(self, k, v):
        t = k.size(2)
        self.k[:, :, self.len:self.len + t] = k
        self.v[:, :, self.len:self.len + t] = v
        self.len += t
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


# -----------------------------------------------------------------------------
# building blocks


class Attention(nn.Module):

    def __init__(self, width, n_head):
        super().__init__()
        assert width % n_head == 0, f"width {width} is not divisible by {n_head} heads"
        self.n_head = n_head
        self.c_attn = nn.Linear(width, 3 * width)  # q, k, v in one matmul
        self.c_proj = nn.Linear(width, width)

    def forward(self, x, mask=None, is_causal=False, cache=None, context=None):
        """Self-attention over x, or, given context (B, S, C), cross-attention: queries from x,
        keys and values from context (the same c_attn weights, split)."""
        B, T, C = x.size()
        if context is None:
            q, k, v = self.c_attn(x).split(C, dim=2)
        else:
            w, b = self.c_attn.weight, self.c_attn.bias
            q = F.linear(x, w[:C], b[:C])
            k, v = F.linear(context, w[C:], b[C:]).split(C, dim=2)
        q, k, v = (t.view(B, t.size(1), self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, L, hs): every position so far
        # flash / memory-efficient attention kernels; is_causal takes the fastest path
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with. Written as
    silu(1.702 x) / 1.702, the same function, whose backward pass is one fused kernel
    instead of several (a few percent of a CPU training step at the base size)."""

    def forward(self, x):
        return F.silu(1.702 * x) / 1.702


# gelu_tanh: GELU's tanh approximation, Hugging Face's gelu_new and gelu_pytorch_tanh (GPT-2)
ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


def text_activation(cfg):
    """The activation of the text transformer and of the generator (ELECTRA's small text
    model): text_activation, else activation. Everything else uses activation."""
    return cfg.text_activation or cfg.activation


class MLP(nn.Module):

    def __init__(self, width, hidden, activation):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
        self.c_fc = nn.Linear(width, hidden)
        self.act = ACTIVATIONS[activation]()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width, n_head, cfg, activation):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.attn = Attention(width, n_head)
        self.ln_2 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(width, cfg.mlp_ratio * width, activation)

    def forward(self, x, mask=None, is_causal=False, cache=None, context=None):
        x = x + self.attn(self.ln_1(x), mask, is_causal, cache, context)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# the towers


def splice(x, start, vectors):
    """x (B, L, w) with positions start..start+n-1 replaced by vectors (n, w), the same for
    every row; a start of L appends them."""
    v = vectors.to(x.dtype).expand(x.size(0), -1, -1)
    return torch.cat([x[:, :start], v, x[:, start + v.size(1):]], dim=1)


def sincos_2d(grid, width):
    """(grid*grid, width) 2-D sin-cos position map (MAE): a quarter of the channels each for
    sin and cos of the column and of the row, at geometrically spaced frequencies."""
    assert width % 4 == 0, f"width {width} is not divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(width // 4) / (width // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    x, y = cols.flatten()[:, None] * omega, rows.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class VisionTransformer(nn.Module):
    """ViT as in CLIP: patches by a strided conv without bias, a class token, learned
    positions, ln_pre, pre-LN blocks, ln_post; proj maps the class token into the joint space."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        w = cfg.vit_width
        self.n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(self.n_patches + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(w, cfg.vit_heads, cfg, cfg.activation) for _ in range(cfg.vit_layers))
        self.ln_post = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)

    def forward(self, pixels, prompts=()):
        """pixels (B, 3, H, W) normalised -> tokens (B, 1 + n_patches, w) after ln_post,
        the class token first. prompts: image prompt vectors (see hidden_states)."""
        return self.ln_post(self.hidden_states(pixels, prompts, last_only=True)[-1])

    def hidden_states(self, pixels, prompts=(), last_only=False):
        """The class and patch tokens after each block: a list of (B, 1 + n_patches, w), before
        ln_post. prompts: a sequence of (n, w) image prompt vectors, one per layer from the
        first (MaPLe): the first is appended after the patch tokens (before ln_pre), each later
        one replaces the previous block's outputs at those n positions; the patches attend to
        them, the outputs leave them out. No prompts: the plain ViT. last_only: the last
        block's alone (the others are not held on to)."""
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (B, P, w)
        cls = self.class_embedding.expand(x.size(0), 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        L = x.size(1)
        if len(prompts):
            x = splice(x, L, prompts[0])
        x = self.ln_pre(x)
        states = []
        for i, block in enumerate(self.blocks):
            if 0 < i < len(prompts):
                x = splice(x, L, prompts[i])
            x = block(x)
            if not last_only or i == len(self.blocks) - 1:
                states.append(x[:, :L])
        return states


class TextTransformer(nn.Module):
    """One set of weights, three masks (DESIGN section 4):
        causal over text only           -> the CLIP text encoder, pooled at <eos>
        bidirectional over [prefix|text] -> fusion encoder (ITM, MLM, discriminator)
        prefix-LM over [prefix|text]     -> captioning and answering
    The prefix (image tokens already in the text width) carries its own positions; text
    tokens get learned positions counted from their first token."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, w))
        self.blocks = nn.ModuleList(Block(w, cfg.text_heads, cfg, text_activation(cfg)) for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Linear(w, cfg.embed_dim, bias=False)
        self.lm_head = nn.Linear(w, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied, as in GPT-2

    def forward(self, tokens, prefix=None, mask="causal", key_valid=None, caches=None, pos=0, n_prefix=None,
                key_bias=None, prompts=()):
        """tokens (B, T) at text positions pos..pos+T-1, after an optional prefix (B, M, w).
        mask: 'causal', 'prefix' (prefix visible to all, text causal) or 'bidirectional'.
        n_prefix: with mask 'prefix', the positions that form the prefix (default M; more takes
        the first text tokens in, as an instruction before its answer).
        key_bias: optional (B, M+T) float added to every query's attention logit of each key
        (log gates: a key's softmax weight is multiplied by its gate), with key_valid.
        caches: one KVCache per layer when generating.
        prompts: a sequence of (n, w) text prompt vectors, one per layer from the first (CoOp,
        MaPLe; text only, no prefix): the first replaces the token embeddings after the start
        token (positions 1..n, before the positions are added), each later one the previous
        block's outputs there. Returns hidden states (B, M+T, w)."""
        x = self.token_embedding(tokens)
        if len(prompts):
            assert prefix is None and pos == 0, "text prompts go with text alone"
            x = splice(x, 1, prompts[0])
        x = x + self.positional_embedding[pos:pos + tokens.size(1)]
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        L = x.size(1)
        past = caches[0].len if caches is not None else 0  # positions already in the cache
        if key_bias is not None and key_valid is None:
            key_valid = torch.ones(key_bias.shape, dtype=torch.bool, device=x.device)  # the general path below
        attn_mask, is_causal = None, False
        if mask == "causal" and key_valid is None and past == 0:
            is_causal = True  # the fastest kernel path
        elif mask == "bidirectional" and key_valid is None:
            pass  # everything sees everything
        elif not (mask == "causal" and L == 1 and key_valid is None):  # one new token sees all before it
            if n_prefix is None or mask != "prefix":
                n_prefix = {"causal": 0, "prefix": prefix.size(1) if prefix is not None else 0,
                            "bidirectional": past + L}[mask]
            attn_mask = attention_mask(n_prefix, L, past + L, past, key_valid, x.device)
            if key_bias is not None:
                attn_mask = torch.zeros(attn_mask.shape, dtype=x.dtype, device=x.device).masked_fill(
                    ~attn_mask, float("-inf")) + key_bias[:, None, None, :].to(x.dtype)
        for i, block in enumerate(self.blocks):
            if 0 < i < len(prompts):
                x = splice(x, 1, prompts[i])
            x = block(x, attn_mask, is_causal, caches[i] if caches is not None else None)
        return self.ln_final(x)


class MLPConverter(nn.Module):
    """ViT tokens -> text width, one token per patch: a two-layer MLP as in LLaVA-1.5."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.vit_width, cfg.text_width)
        self.act = nn.GELU()
        self.c_proj = nn.Linear(cfg.text_width, cfg.text_width)
        self.grid = cfg.image_size // cfg.patch_size
        # a patch's row and column, linearly: "another object in my row" or "one left of me" is then a
        # feature of each object's token, where from positions alone it is a pairwise (XOR-like) function
        self.c_axes = nn.Linear(4 * cfg.vit_width, cfg.text_width, bias=False) if cfg.image_axes else None
        self.positional_embedding = None
        if cfg.image_positions:  # learned, from a 2-D sin-cos map at about the scale of the outputs at initialisation
            self.positional_embedding = nn.Parameter(0.05 * sincos_2d(self.grid, cfg.text_width))

    def forward(self, patches, context=None, context_valid=None):
        """patches (B, P, vit_width) -> (B, P, text_width); the context is the resampler's."""
        h = self.c_fc(patches)
        if self.c_axes is not None:
            g, n = patches.unflatten(1, (self.grid, self.grid)), self.grid  # (B, rows, columns, w)
            axes = (g.mean(2, keepdim=True).expand_as(g), g.mean(1, keepdim=True).expand_as(g),
                    (g.cumsum(2) - g) / n, (g.cumsum(1) - g) / n)  # row, column, left of it, above it
            h = h + self.c_axes(torch.cat(axes, -1).flatten(1, 2))
        x = self.c_proj(self.act(h))
        return x if self.positional_embedding is None else x + self.positional_embedding.to(x.dtype)


class Resampler(nn.Module):
    """ViT tokens -> n_queries tokens in the text width (Flamingo's Perceiver resampler, BLIP-2's
    Q-Former without its text side): learned queries cross-attend to one image's patches, and
    to the context tokens when given (the relation tokens of the image's sample), then pass an
    MLP; resampler_layers such blocks. A fixed number of tokens per image, whatever its size."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.text_width
        self.c_in = nn.Linear(cfg.vit_width, w)
        self.queries = nn.Parameter(0.02 * torch.randn(cfg.n_queries, w))
        self.ln_kv = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(w, cfg.text_heads, cfg, cfg.activation) for _ in range(cfg.resampler_layers))
        self.ln_post = nn.LayerNorm(w, eps=cfg.layer_norm_eps)

    def forward(self, patches, context=None, context_valid=None):
        """patches (B, P, vit_width); context (B, S, text_width) with context_valid (B, S) bool.
        Returns (B, n_queries, text_width)."""
        kv = self.c_in(patches)
        mask = None
        if context is not None:
            kv = torch.cat([kv, context.to(kv.dtype)], dim=1)
            valid = torch.cat([context_valid.new_ones(patches.shape[:2]), context_valid], dim=1)
            mask = valid[:, None, None, :]  # (B, 1, 1, P + S): every query sees the same keys
        kv = self.ln_kv(kv)
        x = self.queries.to(kv.dtype).expand(patches.size(0), -1, -1)
        for block in self.blocks:
            x = block(x, mask, context=kv)
        return self.ln_post(x)


class RelationEncoder(nn.Module):
    """M9: one relation token per image of a sample. A small bidirectional transformer over the
    images' pooled ViT features (the class token) plus learned image-index embeddings, so each
    output can carry what sets its image apart from the others: comparison, order, change.
    Padding slots (valid False) are hidden from every image."""

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
        mask = attention_mask(K, K, K, key_valid=valid)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_post(x)


class Scorer(nn.Module):
    """M10: the relevance of image tokens x to the global vector g, <W_g g, W_x x> / sqrt(w)."""

    def __init__(self, width):
        super().__init__()
        self.c_g = nn.Linear(width, width)
        self.c_x = nn.Linear(width, width)

    def forward(self, g, x):
        """g (B, w), x (B, N, w) -> scores (B, N)."""
        return (self.c_x(x) @ self.c_g(g)[:, :, None]).squeeze(-1) / math.sqrt(g.size(-1))


class PromptLearner(nn.Module):
    """M12 (MaPLe): what the prompt stage trains on the frozen model. n_ctx text prompt vectors
    for each of the first text_prompt_depth layers of the text transformer; image prompt
    vectors for each of the first image_prompt_depth ViT layers, each layer's a linear map of
    that layer's text prompts (couple, one map per layer) or free vectors (couple False); and
    the logits of the softmax weights that fuse the score maps of the dense_layers."""

    def __init__(self, cfg):
        super().__init__()
        Jt, Jv, n = cfg.text_prompt_depth, cfg.image_prompt_depth, cfg.n_ctx
        if not (0 <= Jt <= cfg.text_layers and 0 <= Jv <= cfg.vit_layers):
            raise ValueError(f"prompt depths {Jt} (text), {Jv} (image) must lie in 0..{cfg.text_layers} and "
                             f"0..{cfg.vit_layers}, the layers there are")
        if cfg.couple and Jv > Jt:
            raise ValueError(f"coupled image prompts are maps of the text prompts of the same layer: image_prompt_depth "
                             f"{Jv} is more than text_prompt_depth {Jt} (set --couple=false for free image prompts)")
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
    """The class of each patch from per-pixel classes (B, H, W): the class, not background,
    that covers most of the patch if it covers at least min_fraction of it, else background.
    An object smaller than a patch still names its patch, and the upsampled map is brought
    back to the object's pixels by refine_masks. Returns (B, H / p, W / p) long."""
    share = F.avg_pool2d(F.one_hot(target, n_classes).permute(0, 3, 1, 2).float(), patch_size)[:, 1:]
    top = share.max(1)
    return torch.where(top.values >= min_fraction, top.indices + 1, 0)


def refine_masks(image, probs, iters=10, dilations=(1, 2, 4, 8)):
    """PAMR (Araslanov and Roth, 2020, https://arxiv.org/abs/2005.08104): class probabilities
    (B, C, H, W) made to follow the image's edges, with no parameters. Each step replaces a
    pixel's probabilities by a weighted mean of its 8 neighbours at each dilation, the weights
    a softmax over neighbours of -|colour difference| / (0.1 * the neighbourhood's spread),
    averaged over the channels: labels flow within regions of one colour, not across edges.
    image (B, 3, H, W) float."""
    H, W = image.shape[-2:]

    def neighbours(x):  # (B, c, H, W) -> (B, c, K, H, W), replicate padding
        out = []
        for d in dilations:
            xp = F.pad(x, (d, d, d, d), mode="replicate")
            out += [xp[:, :, d + dy:d + dy + H, d + dx:d + dx + W] for dy in (-d, 0, d) for dx in (-d, 0, d) if dy or dx]
        return torch.stack(out, dim=2)

    nb = neighbours(image)
    spread = nb.std(dim=2, keepdim=True)
    affinity = (-(nb - image[:, :, None]).abs() / (1e-8 + 0.1 * spread)).mean(1).softmax(dim=1)  # (B, K, H, W)
    for _ in range(iters):
        probs = (neighbours(probs) * affinity[:, None]).sum(2)
    return probs


def connected_regions(masks):
    """masks (N, H, W) bool -> (N, H, W) long: each 8-connected region of True its own label
    (the smallest flat index + 1 of its pixels), 0 elsewhere. Labels spread by a 3x3 min-pool
    until nothing changes."""
    N, H, W = masks.shape
    none = float(H * W + 1)
    labels = torch.arange(1, H * W + 1, dtype=torch.float32, device=masks.device).view(1, H, W).expand(N, H, W)
    labels = torch.where(masks, labels, none)
    while True:
        spread = torch.where(masks, -F.max_pool2d(-labels[:, None], 3, 1, 1)[:, 0], none)
        if torch.equal(spread, labels):
            break
        labels = spread
    return torch.where(masks, labels, 0.0).long()


def anchor_boxes(classmap, scores, min_area=1):
    """The anchor generator: every connected region of a class (not background, class 0) in a
    class map becomes a box (x0, y0, x1, y1), x1 and y1 one past the last pixel, scored by the
    mean of that class's alignment score inside the region. classmap (B, H, W) long, scores
    (B, C, H, W). Regions under min_area pixels are left out. Returns, per image, a list of
    (class, x0, y0, x1, y1, score)."""
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


def patchify(pixels, p):
    """(B, 3, H, W) -> (B, P, p*p*3): the patches in the ViT's row-major order, the pixels of
    each patch as (row, column, channel), the layout of data.patchify and the codebook."""
    B, C, H, W = pixels.shape
    x = pixels.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches, p):
    """The inverse of patchify for square images."""
    B, P, _ = patches.shape
    g = math.isqrt(P)
    return patches.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)


class Generator(nn.Module):
    """ELECTRA's generator over both modalities: a small bidirectional transformer over
    [masked patches | masked text]. Text comes in through the main model's token embedding
    table (the same Parameter, projected to the generator's width, as ELECTRA's
    embeddings_project) and goes out through it (MLM logits = h @ table^T). Patches come in as
    normalised pixels through a linear map, a masked one as a learned vector, and go out as
    logits over the visual codes (MOC)."""

    def __init__(self, cfg, token_embedding):
        super().__init__()
        w = cfg.gen_width or cfg.text_width // 4
        if w > cfg.text_width // 4:
            raise ValueError(f"gen_width {w} is more than a quarter of text_width {cfg.text_width}")
        p = cfg.patch_size
        self.n_patches = (cfg.image_size // p) ** 2
        self.token_embedding = token_embedding  # shared with the text transformer, not a copy
        self.embed_proj = nn.Linear(cfg.text_width, w)
        self.patch_embed = nn.Linear(3 * p * p, w)
        self.mask_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(self.n_patches + cfg.context_length, w))
        self.blocks = nn.ModuleList(Block(w, cfg.gen_heads, cfg, text_activation(cfg)) for _ in range(cfg.gen_layers))
        self.ln_f = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.mlm_head = nn.Linear(w, cfg.text_width)  # back to the table's width
        self.moc_head = nn.Linear(w, cfg.n_codes)

    def forward(self, patches, patch_mask, tokens):
        """patches (B, P, 3*p*p) normalised pixels, patch_mask (B, P) bool, tokens (B, T) with
        the masked ones already <mask>. Returns MLM logits (B, T, vocab) and MOC logits (B, P, K)."""
        P, T = patches.size(1), tokens.size(1)
        img = self.patch_embed(patches)
        img = torch.where(patch_mask[..., None], self.mask_embedding.to(img.dtype), img)
        txt = self.embed_proj(self.token_embedding(tokens))
        x = torch.cat([img, txt], dim=1) + self.positional_embedding[:P + T]
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return self.mlm_head(x[:, P:]) @ self.token_embedding.weight.t(), self.moc_head(x[:, :P])


def transformer_flops(layers, width, seq, mlp_ratio):
    """Forward FLOPs (2 per multiply-add) of `layers` pre-LN blocks over `seq` tokens: per token
    the matmuls of q, k, v (3 w^2), the output projection (w^2) and the MLP (2 r w^2), and the
    attention scores and weighted values over all seq keys (2 seq w); masks do not save work in
    dense attention kernels. Norms, softmax, biases and residual adds are left out."""
    return layers * (2 * seq * width * width * (4 + 2 * mlp_ratio) + 4 * seq * seq * width)


# -----------------------------------------------------------------------------
# losses


def loss_weights(cfg):
    """The weight of each pretraining objective in a VLMConfig (0: off, and not computed)."""
    return {"itc": cfg.itc_weight, "itm": cfg.itm_weight, "mlm": cfg.mlm_weight, "moc": cfg.moc_weight,
            "rtd": cfg.rtd_weight, "r2d": cfg.r2d_weight, "caption": cfg.caption_weight}


def uses_electra(cfg):
    """Whether any of ELECTRA's losses is on (then the generator runs and needs the codebook)."""
    return any(w > 0 for w in (cfg.mlm_weight, cfg.moc_weight, cfg.rtd_weight, cfg.r2d_weight))


def fused_part(cfg, x):
    """The rows of a batch that ELECTRA replaces and the fused pass reads (fused_rows): all, or
    rows 0, 2, 4... As every batch of a step starts at an even global row (an even batch size),
    these are the step's even rows in any split of it."""
    return x if cfg.fused_rows == 1 else x[::2]


def fused_pairs(cfg):
    """What the fused pass reads, from the objectives: (first, clean, replaced). first: the first
    ViT pass's image tokens (no ELECTRA, or shared_vit_pass); clean: ITM's own clean pairs beside
    the replaced ones (itm_clean); replaced: ELECTRA's replaced pairs (RTD, R2D, and ITM unless clean)."""
    on = {k: w > 0 for k, w in loss_weights(cfg).items()}
    first = not uses_electra(cfg) or cfg.shared_vit_pass
    clean = cfg.itm_clean and on["itm"] and not first
    return first, clean, (on["itm"] or on["rtd"] or on["r2d"]) and (not clean or on["rtd"] or on["r2d"])


def dist_info():
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(x):
    """Every rank's x concatenated along dim 0 (rank order), without gradient."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def sum_to_owner(grad):
    """grad (W n, ...), every rank's gradient for the rows of all ranks (rank order) -> (n, ...),
    the sum over the ranks of the gradients for this rank's own rows."""
    rank, world_size = dist_info()
    if dist.get_backend() == "nccl":
        mine = grad.new_empty(grad.size(0) // world_size, *grad.shape[1:])
        dist.reduce_scatter_tensor(mine, grad.contiguous())
        return mine
    grad = grad.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(grad)  # gloo has no reduce-scatter of tensors
    return grad.chunk(world_size)[rank]


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward pass hands each rank the sum, over every rank's loss, of the
    gradients that reached its own rows."""

    @staticmethod
    def forward(ctx, x):
        return all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        return sum_to_owner(grad)


def gather_with_grad(x):
    """Concatenate x from every rank along dim 0, keeping the gradient path to each rank's
    own rows (open_clip's gather_with_grad): the backward pass sums, on each rank, the
    gradients that every rank's loss sends to its rows. Identity when not distributed."""
    return x if dist_info()[1] == 1 else GatherWithGrad.apply(x)


def fp32(x):
    """Half-precision logits upcast to float32 for a softmax or a loss; other dtypes kept."""
    return x.float() if x.element_size() < 4 else x


def positive_mates(tokens, groups, all_tokens, all_groups):
    """(B, N) bool: column j is a positive of row i when their captions are the same text or,
    where the data knows it (groups >= 0), describe the same thing (the shapes world: the same
    scene). Such pairs are never negatives, in ITC or ITM."""
    same = (tokens[:, None, :] == all_tokens[None, :, :]).all(-1)
    if groups is not None:
        same |= (groups[:, None] == all_groups[None, :]) & (groups[:, None] >= 0)
    return same


def itc_loss(image_emb, text_emb, logit_scale, same, image_cols=None, text_cols=None, hidden=None, soft=None,
             alpha=0.0, all_image=None, all_text=None):
    """CLIP's symmetric InfoNCE on L2-normalised embeddings, with negatives from every rank.
    Each rank scores its own rows against all N columns (open_clip's local loss). same (B, N):
    which columns are positives of each row, the target spread evenly over them; with one
    positive per row this is exactly CLIP's loss.
    The momentum queue adds Q columns (image_cols, text_cols: no gradient) that are negatives
    only: hidden (B, Q) marks the queued captions that are mates of a row, left out of its
    softmax (an earlier copy of the same caption is neither a negative nor a target).
    soft: (i2t, t2i) momentum-model softmax targets over the N + Q columns, mixed in as
    alpha * soft + (1 - alpha) * target (ALBEF's momentum distillation).
    all_image, all_text: the N columns (default: every rank's rows, gathered with gradient)."""
    all_image = gather_with_grad(image_emb) if all_image is None else all_image
    all_text = gather_with_grad(text_emb) if all_text is None else all_text
    if image_cols is not None:
        all_image, all_text = torch.cat([all_image, image_cols.to(all_image.dtype)]), torch.cat([all_text, text_cols.to(all_text.dtype)])
    scale = logit_scale.exp().clamp(max=100)
    logits_i2t = fp32(scale * image_emb @ all_text.t())  # (B, N + Q)
    logits_t2i = fp32(scale * text_emb @ all_image.t())
    if image_cols is not None:
        hide = torch.cat([torch.zeros_like(same), hidden], dim=1)
        same = torch.cat([same, torch.zeros_like(hidden)], dim=1)
        logits_i2t, logits_t2i = logits_i2t.masked_fill(hide, -1e4), logits_t2i.masked_fill(hide, -1e4)  # exp() = 0, finite
    target = same.to(logits_i2t.dtype) / same.sum(1, keepdim=True)
    t_i2t = t_t2i = target
    if soft is not None:
        t_i2t, t_t2i = alpha * soft[0] + (1 - alpha) * target, alpha * soft[1] + (1 - alpha) * target
    return (F.cross_entropy(logits_i2t, t_i2t) + F.cross_entropy(logits_t2i, t_t2i)) / 2


def sample_index(weights, u):
    """Inverse-CDF sampling: for each row of weights (..., K) (non-negative, not necessarily
    summing to 1) the index whose slice of the cumulative sum holds u * total, u (...) uniform
    in [0, 1). Given its uniforms, a draw is a pure function of its row, so a row drawn on
    any rank or in any micro-batch gets the index it gets in one big batch. An entry of weight
    0 is never drawn."""
    cum = weights.cumsum(-1)
    total = cum[..., -1:]
    point = torch.minimum(u.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))  # below the total
    return torch.searchsorted(cum, point, right=True).squeeze(-1).clamp(max=weights.size(-1) - 1)


def hard_negatives(logits, same, generator=None, u=None, offset=0):
    """One hard negative per row: column j drawn with probability softmax(logits[i]) over the
    columns that are not positives of row i (same[i, j] False: the positive itself and any
    identical caption). u (B,): the row's uniforms (else drawn from generator); offset: the
    global column of row 0. Returns (index (B,), valid (B,) bool). A row with no candidate (a
    batch of one, or of identical captions) gets valid False and its own column, to be left
    out of the loss rather than turn into NaN."""
    valid = (~same).any(1)
    weights = logits.detach().float().masked_fill(same, float("-inf")).softmax(1)
    row = torch.arange(same.size(0), device=same.device) + offset
    own = (torch.arange(same.size(1), device=same.device)[None] == row[:, None]).float()
    weights = torch.where(valid[:, None], weights, own)
    if u is None:
        u = torch.rand(same.size(0), generator=generator, device=same.device)
    return sample_index(weights, u), valid


def masked_mean(x, mask, count=None):
    """Sum of x over the positions where mask is True, divided by count (default: the number
    of such positions, at least 1: a gradient path even if there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / (mask.sum().clamp(min=1) if count is None else count)


def draw_noise(cfg, B, T, generator=None, device=None):
    """The uniform draws of a pretraining batch of B rows (T text positions), in one fixed
    order: ELECTRA's text and patch masks and its token and code samples, and the two hard
    negatives of ITM. The training loop draws them for the whole step (every rank and
    micro-batch) from a generator seeded by the step and hands each micro-batch its rows, so
    that the randomness of a row does not depend on how the batch is split."""
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    shapes = dict(text_mask=(B, T), patch_mask=(B, n_patches), token=(B, T), code=(B, n_patches), neg_text=(B,),
                  neg_image=(B,))
    return {k: torch.rand(s, generator=generator, device=device) for k, s in shapes.items()}


def electra_masks(cfg, tokens, noise):
    """(text_mask, patch_mask): text_mask_rate of the non-special tokens, patch_mask_rate of
    the patches."""
    special = (tokens == cfg.bos_id) | (tokens == cfg.eos_id) | (tokens == cfg.pad_id)
    return (noise["text_mask"][:, :tokens.size(1)] < cfg.text_mask_rate) & ~special, noise["patch_mask"] < cfg.patch_mask_rate


def pretrain_counts(cfg, tokens, noise):
    """The positions that the per-token pretraining losses average over, counted in a batch:
    masked tokens (mlm), masked patches (moc), non-padding tokens (rtd) and caption targets.
    They depend on the tokens and the noise only, so the training loop counts them for the
    whole step before any forward pass; each loss divides its sum by the step's count (per
    rank and micro-batch), which makes a step's gradient independent of how its batch is split."""
    fused = fused_part(cfg, tokens)
    text_mask, patch_mask = electra_masks(cfg, fused, {k: fused_part(cfg, noise[k]) for k in ("text_mask", "patch_mask")})
    return {"mlm": text_mask.sum().float(), "moc": patch_mask.sum().float(),
            "rtd": (fused != cfg.pad_id).sum().float(), "caption": (tokens[:, 1:] != cfg.pad_id).sum().float()}


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token from logits (B, V): greedy when temperature is 0, else sampled from the
    softmax at that temperature restricted to the top_k tokens and to the smallest set whose
    probability reaches top_p (nucleus)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# the model


class VLM(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        if cfg.converter not in ("mlp", "resampler"):
            raise ValueError(f"converter must be 'mlp' or 'resampler', got {cfg.converter!r}")
        for flag in ("image_positions", "image_axes"):
            if getattr(cfg, flag) and cfg.converter != "mlp":
                raise ValueError(f"{flag} go with --converter=mlp (the resampler's tokens are its queries)")
        if cfg.itm_negatives not in (0.5, 1, 2):
            raise ValueError(f"itm_negatives must be 0.5, 1 or 2, got {cfg.itm_negatives}")
        if cfg.fused_rows not in (0.5, 1):
            raise ValueError(f"fused_rows must be 0.5 or 1, got {cfg.fused_rows}")
        if cfg.itm_clean and cfg.shared_vit_pass:
            raise ValueError("itm_clean and shared_vit_pass: the one ViT pass reads the replaced pixels, no clean ones")
        if cfg.fused_rows != 1 and cfg.shared_vit_pass:
            raise ValueError("fused_rows=0.5 and shared_vit_pass: the one ViT pass would read replaced and clean rows")
        self.cfg = cfg
        w = cfg.text_width
        self.visual = VisionTransformer(cfg)
        self.text = TextTransformer(cfg)
        self.converter = MLPConverter(cfg) if cfg.converter == "mlp" else Resampler(cfg)
        # one element, not a scalar: FSDP2 shards tensors of at least one dimension
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / cfg.itc_temperature)))
        self.generator = Generator(cfg, self.text.token_embedding)
        self.itm_head = nn.Linear(w, 2)  # on the fused state of <bos>: (no match, match)
        self.rtd_head = nn.Linear(w, 1)  # on every text position: replaced?
        self.r2d_head = nn.Linear(w, 1)  # on every image position: replaced?
        self.register_buffer("pixel_mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.image_std).view(1, 3, 1, 1), persistent=False)
        # the visual codebook, (K, p*p*3) pixels in [0, 1]: filled from the data (data.prepare_codebook)
        self.register_buffer("codebook", torch.zeros(cfg.n_codes, 3 * cfg.patch_size ** 2))
        if cfg.instruct:  # M9-M11
            if not 0 < cfg.keep_ratio <= 1:
                raise ValueError(f"keep_ratio must be in (0, 1], got {cfg.keep_ratio}")
            self.image_index = nn.Parameter(0.02 * torch.randn(cfg.image_slots, w))  # which image a token comes from
            self.relation = RelationEncoder(cfg) if cfg.relation else None
            self.scorer = Scorer(w) if cfg.two_pass else None
        self.prompt = PromptLearner(cfg) if cfg.prompt else None  # M12
        self.apply(self._init_weights)
        if cfg.image_axes:  # starts as the plain converter: the row and column context is learned in
            nn.init.zeros_(self.converter.c_axes.weight)
        for tower, width, layers in ((self.visual, cfg.vit_width, cfg.vit_layers), (self.text, cfg.text_width, cfg.text_layers)):
            self._init_tower(tower, width, layers)
        self.momentum = None
        if cfg.momentum_alpha > 0:
            # the momentum encoders: an EMA copy (one deepcopy keeps the shared embedding shared)
            self.momentum = copy.deepcopy(self._online())
            self.momentum.requires_grad_(False)
            Q, L = cfg.queue_size, cfg.context_length
            self.register_buffer("image_queue", torch.zeros(Q, cfg.embed_dim))
            self.register_buffer("text_queue", torch.zeros(Q, cfg.embed_dim))
            self.register_buffer("token_queue", torch.full((Q, L), -1, dtype=torch.long))
            self.register_buffer("group_queue", torch.full((Q,), -1, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next slot to write
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))  # slots written so far (at most Q)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "logit_scale"
        if key in state_dict and state_dict[key].dim() == 0:  # a scalar: checkpoints before it had a dimension, HF CLIP
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @staticmethod
    def _init_tower(tower, width, layers):
        """CLIP's initialisation: attention and MLP weights scaled by the width, the residual
        projections further by the depth. Large enough that, at step 0, the class token
        already reads the patches (with GPT-2's 0.02 it does not, and the image embeddings of
        all images start out equal, which stalls contrastive learning)."""
        attn_std, fc_std, proj_std = width ** -0.5, (2 * width) ** -0.5, width ** -0.5 * (2 * layers) ** -0.5
        for block in tower.blocks:
            nn.init.normal_(block.attn.c_attn.weight, std=attn_std)
            nn.init.normal_(block.attn.c_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if isinstance(tower, VisionTransformer):
            for p in (tower.class_embedding, tower.proj.weight):
                nn.init.normal_(p, std=attn_std)
            with torch.no_grad():  # learned positions, started from a 2-D sin-cos map so that space is known from step 0
                tower.positional_embedding[0].zero_()
                tower.positional_embedding[1:] = sincos_2d(int(math.isqrt(tower.n_patches)), width)
        else:
            nn.init.normal_(tower.positional_embedding, std=0.01)
            nn.init.normal_(tower.text_projection.weight, std=attn_std)

    @classmethod
    def from_pretrained(cls, name_or_path, text=None, **overrides):
        """A model started from Hugging Face weights. name_or_path: a directory written by
        save_pretrained (or export_hf_clip), or a hub name, which transformers downloads (that
        needs the network, or the files already in the hub's cache). What it loads:
            a CLIP (CLIPConfig): both towers, their projections and logit_scale; image_mean
                and image_std from preprocessor_config.json when there is one
            a GPT-2 (GPT2Config): the text transformer (its lm_head is tied to the token
                embedding, as ours); the ViT, text_projection and logit_scale start fresh
            a CLIP with text= a GPT-2: the ViT, its projection and logit_scale from the CLIP,
                the text transformer from the GPT-2; text_projection starts fresh
        The vocabulary is the checkpoint's with our specials appended, as data.py's tokenizers
        do (CLIP: <pad>, <mask>, <glob>, its own <bos> and <eos>; GPT-2: <bos>, <pad>, <mask>,
        <glob>, its <|endoftext|> as <eos>); their embedding rows start fresh. A CLIP config
        with eos_token_id 2 (OpenAI's, written before transformers fixed the id; HF then pools
        at the highest id) gets the last two ids of its vocabulary, CLIP's <|startoftext|>
        and <|endoftext|>. Everything else starts fresh as in VLM(cfg): converter, generator,
        heads, codebook, instruct and prompt parts; the momentum copy starts as the encoders.
        overrides: other VLMConfig fields (loss weights, converter, ...); context_length may be
        less than the checkpoint's (its first positions are kept); a field that the checkpoint
        fixes (a width, a depth, the vocabulary) set to another value, or a name that is no
        field, is a ValueError.
        Returns the model in float32."""
        config = hf_config(name_or_path)
        name = name_or_path if text is None else f"{name_or_path} with text={text}"
        stats = {}
        if config.model_type == "clip":
            stats = hf_image_stats(name_or_path)
            if text is None:
                text_fields = clip_text_fields(config, name_or_path)
            else:
                text_config = hf_config(text)
                if text_config.model_type != "gpt2":
                    raise ValueError(f"text={text}: a {type(text_config).__name__} (model_type "
                                     f"{text_config.model_type!r}); text= takes a GPT-2")
                text_fields = gpt2_fields(text_config, text)
            fixed = merge_towers(name, clip_vision_fields(config, name_or_path), text_fields)
        elif config.model_type == "gpt2":
            if text is not None:
                raise ValueError(f"text={text} goes with a CLIP, but {name_or_path} is a GPT-2")
            fixed = gpt2_fields(config, name_or_path)
        else:
            raise ValueError(f"{name_or_path}: a {type(config).__name__} (model_type {config.model_type!r}); "
                             "from_pretrained reads a CLIP (CLIPConfig) or a GPT-2 (GPT2Config)")
        cfg = checked_config(name, fixed, {**stats, **overrides})
        model = cls(cfg).float()
        state = {}
        if config.model_type == "clip":
            towers = ("visual", "text") if text is None else ("visual",)
            state = state_from_hf_clip(hf_weights("clip", name_or_path), cfg, towers)
        if config.model_type == "gpt2" or text is not None:
            state.update(state_from_hf_gpt2(hf_weights("gpt2", text or name_or_path), cfg))
        load_into(model, state)
        model.reset_momentum()
        return model

    def num_params(self):
        """Trainable parameters (the momentum copy is not counted)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def loss_weights(self):
        return loss_weights(self.cfg)

    # -- momentum encoders (M7) --

    def _online(self):
        """The encoders that have a momentum copy, in one fixed order."""
        return nn.ModuleDict({"visual": self.visual, "text": self.text, "generator": self.generator})

    @torch.no_grad()
    def momentum_update(self):
        """theta_m <- m * theta_m + (1 - m) * theta, after each optimizer step."""
        if self.momentum is not None:
            for pm, p in zip(self.momentum.parameters(), self._online().parameters()):
                pm.lerp_(p.detach(), 1.0 - self.cfg.momentum)

    @torch.no_grad()
    def reset_momentum(self):
        """Momentum encoders equal to the online ones, queues empty (a stage started from
        weights that had none)."""
        if self.momentum is not None:
            self.momentum.load_state_dict(self._online().state_dict())
            self.queue_ptr.zero_()
            self.queue_filled.zero_()
            self.token_queue.fill_(-1)
            self.group_queue.fill_(-1)

    @torch.no_grad()
    def enqueue(self, cols):
        """Add the momentum features of a whole step (cols: every rank's rows, pretrain_head's
        columns) to the ring-buffer queues."""
        feats = [cols[k] for k in ("image_m", "text_m")] + [self._full_length(cols["tokens"]), cols["groups"]]
        Q = self.cfg.queue_size
        n = min(feats[0].size(0), Q)
        slots = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % Q
        for queue, x in zip((self.image_queue, self.text_queue, self.token_queue, self.group_queue), feats):
            queue[slots] = x[-n:].to(queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % Q)
        self.queue_filled.add_(n).clamp_(max=Q)

    def _full_length(self, tokens):
        return F.pad(tokens, (0, self.cfg.context_length - tokens.size(1)), value=self.cfg.pad_id)

    # -- the encoders --

    def normalize_pixels(self, images):
        """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalised with the config's mean and std."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.pixel_mean) / self.pixel_std

    def image_tokens(self, vit_tokens):
        """ViT tokens -> the image tokens the text transformer reads (patches only)."""
        return self.converter(vit_tokens[:, 1:])

    @staticmethod
    def _image_embedding(visual, vit_tokens):
        return F.normalize(visual.proj(vit_tokens[:, 0]), dim=-1)

    def _text_embedding(self, text, tokens, prompts=()):
        h = text(tokens, mask="causal", prompts=prompts)
        eos = (tokens == self.cfg.eos_id).int().argmax(-1)  # pool at the first <eos>
        pooled = h[torch.arange(tokens.size(0), device=tokens.device), eos]
        return F.normalize(text.text_projection(pooled), dim=-1)

    def encode_image(self, pixels):
        """pixels (B, 3, H, W) float, normalised -> (B, embed_dim) L2-normalised."""
        return self._image_embedding(self.visual, self.visual(pixels))

    def encode_text(self, tokens):
        """tokens (B, T) <bos> ... <eos> <pad>... -> (B, embed_dim) L2-normalised."""
        return self._text_embedding(self.text, tokens)

    def fuse(self, image_tokens, tokens):
        """The fusion encoder: the text transformer, bidirectional over [image tokens | text],
        padding hidden from every query. Returns hidden states (B, P + T, w)."""
        valid = torch.cat([torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=tokens.device),
                           tokens != self.cfg.pad_id], dim=1)
        return self.text(tokens, prefix=image_tokens, mask="bidirectional", key_valid=valid)

    def itm_logits(self, image_tokens, tokens):
        """(B, 2) ITM logits (no match, match) of image-text pairs, read at <bos>."""
        return self.itm_head(self.fuse(image_tokens, tokens)[:, image_tokens.size(1)])

    # -- ELECTRA (M6) --

    def electra_inputs(self, pixels, tokens, codes, rng=None, noise=None):
        """Mask, let the generator fill in, replace. Masks (electra_masks): text_mask_rate of
        the non-special tokens and patch_mask_rate of the patches. A masked token becomes a token
        sampled from the generator's MLM distribution; a masked patch becomes the pixels of the
        centroid of a code sampled from its MOC distribution, unless that code is its own: as in
        ELECTRA, a sample equal to the original leaves the input as it was and counts as
        original, so a label never contradicts what the discriminator sees. The draws come from noise
        (draw_noise), else from rng. Returns a dict: text_mask, patch_mask, mlm_logits,
        moc_logits (with gradient, for the generator's losses), gen_input (what the generator
        read, for the momentum generator), pixels, tokens, rtd_label, r2d_label."""
        cfg = self.cfg
        p = cfg.patch_size
        if noise is None:
            noise = draw_noise(cfg, tokens.size(0), tokens.size(1), rng, tokens.device)
        patches = patchify(pixels, p)
        text_mask, patch_mask = electra_masks(cfg, tokens, noise)
        gen_input = (patches, patch_mask, tokens.masked_fill(text_mask, cfg.mask_id))
        mlm_logits, moc_logits = self.generator(*gen_input)
        with torch.no_grad():
            logits = mlm_logits.detach().float().clone()
            logits[..., [cfg.bos_id, cfg.eos_id, cfg.pad_id, cfg.mask_id]] = float("-inf")  # never sample specials
            sampled = sample_index(logits.softmax(-1), noise["token"][:, :tokens.size(1)])
            new_tokens = torch.where(text_mask, sampled, tokens)
            sampled_code = sample_index(moc_logits.detach().float().softmax(-1), noise["code"])
            mean = self.pixel_mean.view(1, 3).repeat(p * p, 1).view(-1)  # per (row, column, channel)
            std = self.pixel_std.view(1, 3).repeat(p * p, 1).view(-1)
            centroid = (self.codebook[sampled_code] - mean) / std
            replaced = patch_mask & (sampled_code != codes)
            new_pixels = unpatchify(torch.where(replaced[..., None], centroid.to(patches.dtype), patches), p)
        return dict(text_mask=text_mask, patch_mask=patch_mask, mlm_logits=mlm_logits, moc_logits=moc_logits,
                    gen_input=gen_input, pixels=new_pixels, tokens=new_tokens,
                    rtd_label=new_tokens != tokens, r2d_label=replaced)

    # -- training --

    def caption_loss(self, image_tokens, tokens, count=None):
        """Prefix-LM next-token loss on the caption given the image tokens; <pad> is ignored,
        <eos> is predicted so that generation learns to stop. Averaged over the targets, or
        summed and divided by count (pretrain_counts)."""
        h = self.text(tokens[:, :-1], prefix=image_tokens, mask="prefix")
        logits = fp32(self.text.lm_head(h[:, image_tokens.size(1):]))  # text positions; the softmax in fp32
        targets = tokens[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return masked_mean(nll, targets != self.cfg.pad_id, count)

    def forward(self, *args, stage="pretrain", **kwargs):
        """The losses of a training stage on a batch: a dict of named losses and 'loss', their
        weighted sum. stage 'pretrain': pretrain_losses; 'instruct': instruct_losses; 'prompt':
        prompt_losses."""
        losses = {"instruct": self.instruct_losses, "prompt": self.prompt_losses}.get(stage, self.pretrain_losses)
        return losses(*args, **kwargs)

    def pretrain_losses(self, pixels, tokens, codes=None, groups=None, alpha=0.0, noise=None, counts=None, offset=None):
        """pixels (B, 3, H, W) normalised, tokens (B, T) -> dict of named losses and 'loss',
        their weighted sum. An objective whose weight is 0 is not computed.
        codes (B, P): the visual code of every patch (needed by ELECTRA's MOC and R2D).
        groups (B,): captions in one group (>= 0) describe the same thing and are never
        negatives of each other; None: only identical captions are.
        alpha: weight of the momentum model's soft targets (ramped up by the training loop).
        noise: this batch's rows of the step's random draws (draw_noise; default: drawn here).
        counts: what the per-token losses divide by (pretrain_counts; default: this batch's).
        offset: the global row of this batch's first row (default rank * B).
        Under DDP the cross-sample losses read every rank's rows (gather_with_grad): with the
        step's noise and counts, the gradient averaged over ranks is that of one process on the
        concatenated batch. The two halves, pretrain_encode and pretrain_head, also serve
        gradient accumulation with cached features (train.py)."""
        B = tokens.size(0)
        if noise is None:
            noise = draw_noise(self.cfg, B, tokens.size(1), device=tokens.device)
        if counts is None:
            counts = {k: c.clamp(min=1) for k, c in pretrain_counts(self.cfg, tokens, noise).items()}
        losses, rows = self.pretrain_encode(pixels, tokens, codes, groups, noise, counts, alpha)
        cols = {k: gather_with_grad(rows[k]) for k in self.column_keys(rows)}
        offset = dist_info()[0] * B if offset is None else offset
        losses.update(self.pretrain_head(rows, cols, noise, offset, alpha, counts))
        if "image_m" in cols:
            self.enqueue(cols)
        losses["loss"] = self.weighted_sum(losses)
        return losses

    def weighted_sum(self, losses):
        weights = self.loss_weights()
        return sum(weights[k] * v for k, v in losses.items() if weights[k] > 0)

    # the rows of pretrain_encode that carry a gradient back to the encoders
    GRADIENT_KEYS = ("image_emb", "text_emb", "fused_image", "itm_image")

    def column_keys(self, rows):
        """What pretrain_head reads from every row of the step, of what rows holds (the fused
        pass's inputs only for ITM's negatives), in one fixed order."""
        keys = ("image_emb", "text_emb", "image_m", "text_m", "tokens", "groups")
        return [k for k in keys + (self.itm_pair(rows) if self.cfg.itm_weight > 0 else ()) if k in rows]

    @staticmethod
    def itm_pair(rows):
        """The keys of ITM's matched pairs in rows: the clean ones (itm_clean), else the fused pass's."""
        return ("itm_image", "itm_tokens") if "itm_image" in rows else ("fused_image", "fused_tokens")

    def pretrain_encode(self, pixels, tokens, codes, groups, noise, counts, alpha=0.0, momentum=True, per_sample=True):
        """The per-sample half of pretraining: the encoders' passes over one batch. Returns
        (losses, rows): the losses that read one sample at a time (mlm, moc, caption; none
        unless per_sample), and the batch's rows of what the cross-sample losses read
        (pretrain_head): image_emb, text_emb (ITC and the hard-negative draws), fused_image
        and fused_tokens (the fused pass's image tokens and text: the replaced ones when
        ELECTRA is on; of the fused rows only, fused_part), itm_image and itm_tokens (ITM's
        clean pairs with itm_clean), rtd_label and r2d_label, tokens, groups, and without gradient, unless
        momentum is False, the momentum model's image_m and text_m."""
        cfg = self.cfg
        on = {k: w > 0 for k, w in self.loss_weights().items()}
        electra, fused = uses_electra(cfg), on["itm"] or on["rtd"] or on["r2d"]
        losses = {}
        rows = dict(tokens=tokens, groups=groups if groups is not None else torch.full_like(tokens[:, 0], -1))
        E = None
        if cfg.fused_rows != 1 and tokens.size(0) % 2:
            raise ValueError(f"fused_rows=0.5 takes every other row of an even batch, got a batch of {tokens.size(0)}")
        part = lambda x: fused_part(cfg, x)  # noqa: E731
        if electra:
            if codes is None:
                raise ValueError("ELECTRA's objectives need the visual codes of the patches (codes=...)")
            if on["r2d"] and cfg.converter != "mlp":
                raise ValueError("R2D labels each patch, but the resampler's image tokens are its queries: "
                                 "use --converter=mlp or --r2d_weight=0")
            E = self.electra_inputs(part(pixels), part(tokens), part(codes), noise={k: part(v) for k, v in noise.items()})
        shared = E is not None and cfg.shared_vit_pass  # one ViT pass, over the replaced pixels (as FLIP's masked images)
        first, clean, replaced = fused_pairs(cfg)
        vit = self.visual(E["pixels"] if shared else pixels)
        caption = on["caption"] and per_sample
        image_tokens = None
        if caption or ((first or clean) and fused and cfg.fused_vit_grad):
            image_tokens = self.image_tokens(vit)
        if on["itc"] or on["itm"]:  # ITM draws its hard negatives from the ITC similarity
            rows.update(image_emb=self._image_embedding(self.visual, vit), text_emb=self._text_embedding(self.text, tokens))
        if self.momentum is not None and on["itc"] and momentum:
            m = self.momentum
            with torch.no_grad():  # the momentum model reads the clean pixels
                rows.update(image_m=self._image_embedding(m.visual, m.visual(pixels)), text_m=self._text_embedding(m.text, tokens))
        first_tokens = lambda: part(image_tokens) if cfg.fused_vit_grad else self.image_tokens(part(vit).detach())  # noqa: E731
        if replaced:  # the discriminator and ITM read the replaced image and text when ELECTRA is on
            if first:
                fused_image = first_tokens()
            else:
                with torch.set_grad_enabled(cfg.fused_vit_grad and torch.is_grad_enabled()):
                    second = self.visual(E["pixels"])
                fused_image = self.image_tokens(second)
            rows.update(fused_image=fused_image, fused_tokens=part(tokens) if E is None else E["tokens"])
        if clean:
            rows.update(itm_image=first_tokens(), itm_tokens=part(tokens))
        if E is not None:
            if per_sample:
                logp = fp32(E["mlm_logits"]).log_softmax(-1)
                mlm = -logp.gather(-1, part(tokens)[..., None]).squeeze(-1)  # the original token's NLL (no one-hot)
                if self.momentum is not None and on["mlm"]:
                    with torch.no_grad():
                        mlm_m, _ = self.momentum.generator(*E["gen_input"])
                    mlm = (1 - alpha) * mlm - alpha * (fp32(mlm_m).softmax(-1) * logp).sum(-1)
                losses["mlm"] = masked_mean(mlm, E["text_mask"], counts["mlm"])
                moc = F.cross_entropy(fp32(E["moc_logits"]).transpose(1, 2), part(codes).long(), reduction="none")
                losses["moc"] = masked_mean(moc, E["patch_mask"], counts["moc"])
            rows.update(rtd_label=E["rtd_label"], r2d_label=E["r2d_label"])
        if caption:
            losses["caption"] = self.caption_loss(image_tokens, tokens, counts["caption"])
        return losses, rows

    def pretrain_head(self, rows, cols, noise, offset, alpha, counts):
        """The cross-sample half of pretraining: ITC, and ITM with its hard negatives and the
        ELECTRA discriminator on the fused passes. rows: this batch's (pretrain_encode);
        cols: every row of the step, this batch's at offset (each rank's, gathered; with
        accumulation, every micro-batch's). Each batch scores its own rows against all columns
        (open_clip's local loss); ITM's hard negatives are drawn from all columns, and a
        negative image from another rank brings its gradient home through the gather."""
        cfg = self.cfg
        on = {k: w > 0 for k, w in self.loss_weights().items()}
        tokens, groups = rows["tokens"], rows["groups"]
        B = tokens.size(0)
        losses = {}
        same = positive_mates(tokens, groups, cols["tokens"], cols["groups"]) if on["itc"] or on["itm"] else None
        if on["itc"]:
            extra = {}
            if "image_m" in cols:  # the queue adds negatives; the momentum model gives soft targets over all columns
                # every slot takes part (a fixed shape, no sync to the CPU); empty slots (token -1) are hidden like mates
                hidden = positive_mates(self._full_length(tokens), groups, self.token_queue, self.group_queue)
                hidden |= self.token_queue[None, :, 0] < 0
                hide = torch.cat([torch.zeros_like(same), hidden], dim=1)
                with torch.no_grad():
                    scale = self.logit_scale.exp().clamp(max=100)
                    soft = tuple((scale * q @ torch.cat([k, queue]).t()).masked_fill(hide, float("-inf")).softmax(1)
                                 for q, k, queue in ((rows["image_m"], cols["text_m"], self.text_queue),
                                                     (rows["text_m"], cols["image_m"], self.image_queue)))
                extra = dict(image_cols=self.image_queue, text_cols=self.text_queue, hidden=hidden, soft=soft, alpha=alpha)
            losses["itc"] = itc_loss(rows["image_emb"], rows["text_emb"], self.logit_scale, same,
                                     all_image=cols["image_emb"], all_text=cols["text_emb"], **extra)
        if not (on["itm"] or on["rtd"] or on["r2d"]):
            return losses
        # the fused rows (fused_part): the batch's, or its even rows against the step's even columns
        part = lambda x: fused_part(cfg, x)  # noqa: E731
        pair_image, pair_text = self.itm_pair(rows)
        B, offset, tokens = rows[pair_image].size(0), offset // round(1 / cfg.fused_rows), part(tokens)
        # the matched pairs first: the replaced ones (RTD, R2D, and ITM unless itm_clean), then ITM's clean ones
        images = [rows[k] for k in ("fused_image", "itm_image") if k in rows]
        texts = [rows[k] for k in ("fused_tokens", "itm_tokens") if k in rows]
        start = B * (len(images) - 1)  # ITM's first row
        if on["itm"]:  # then pairs with a hard negative text or image, drawn at the ITC temperature (ALBEF)
            scale = self.logit_scale.detach().exp().clamp(max=100)
            same, noise = part(part(same).t()).t(), {k: part(noise[k]) for k in ("neg_text", "neg_image")}
            neg_t, valid_t = hard_negatives(scale * part(rows["image_emb"]) @ part(cols["text_emb"]).t(), same,
                                            u=noise["neg_text"], offset=offset)
            neg_i, valid_i = hard_negatives(scale * part(rows["text_emb"]) @ part(cols["image_emb"]).t(), same,
                                            u=noise["neg_image"], offset=offset)
            neg_image, neg_text = cols[pair_image][neg_i], cols[pair_text][neg_t]
            if cfg.itm_negatives == 2:  # each image with a negative text, each text with a negative image
                images += [rows[pair_image], neg_image]
                texts += [neg_text, rows[pair_text]]
                valid = [valid_t, valid_i]
            else:  # global rows g: a negative text where g % period == 0, a negative image half a period on
                period = round(2 / cfg.itm_negatives)  # 2 (every row) or 4 (every other row)
                g = torch.arange(B, device=tokens.device) + offset
                text_neg = g % period == 0
                pick = slice(offset % 2, None, 2) if period == 4 else slice(None)  # the even g: a slice, no sync
                images.append(torch.where(text_neg[:, None, None], rows[pair_image], neg_image)[pick])
                texts.append(torch.where(text_neg[:, None], neg_text, rows[pair_text])[pick])
                valid = [torch.where(text_neg, valid_t, valid_i)[pick]]
        P = images[0].size(1)
        h = self.fuse(torch.cat(images), torch.cat(texts))
        if on["itm"]:  # the mean over (1 + itm_negatives) B pairs (the step's, in any split); one without a negative adds 0
            labels = (torch.arange(h.size(0) - start, device=tokens.device) < B).long()
            itm = F.cross_entropy(fp32(self.itm_head(h[start:, P])), labels, reduction="none")
            count = torch.tensor((1 + cfg.itm_negatives) * B, dtype=torch.float, device=tokens.device)
            losses["itm"] = masked_mean(itm, torch.cat([valid_t.new_ones(B)] + valid), count=count)
        if on["rtd"]:  # the discriminator: the matched rows, every non-padding position
            rtd = fp32(self.rtd_head(h[:B, P:]).squeeze(-1))
            losses["rtd"] = masked_mean(F.binary_cross_entropy_with_logits(
                rtd, rows["rtd_label"].to(rtd.dtype), reduction="none"), tokens != cfg.pad_id, counts["rtd"])
        if on["r2d"]:
            r2d = fp32(self.r2d_head(h[:B, :P]).squeeze(-1))
            losses["r2d"] = F.binary_cross_entropy_with_logits(r2d, rows["r2d_label"].to(r2d.dtype))
        return losses

    @torch.no_grad()
    def generate(self, pixels, max_new_tokens=None, temperature=0.0, top_k=None, top_p=None,
                 use_cache=True, generator=None):
        """Caption images: start from <bos> after the image tokens and add one token at a
        time until every row has produced <eos> or max_new_tokens are made. Rows that have
        finished get <pad>. With use_cache, keys and values are kept (KVCache) so each step
        runs only the new token. Returns (B, n) new tokens, <eos> included."""
        cfg = self.cfg
        max_new_tokens = min(max_new_tokens or cfg.context_length - 1, cfg.context_length - 1)
        prefix = self.image_tokens(self.visual(pixels))
        B, M = prefix.shape[:2]
        tokens = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=pixels.device)
        done = torch.zeros(B, dtype=torch.bool, device=pixels.device)
        caches = None
        if use_cache:
            hs = cfg.text_width // cfg.text_heads
            caches = [KVCache(B, cfg.text_heads, M + 1 + max_new_tokens, hs, pixels.device, prefix.dtype)
                      for _ in range(cfg.text_layers)]
        for t in range(max_new_tokens):
            if use_cache and t > 0:
                h = self.text(tokens[:, -1:], caches=caches, pos=t)
            else:
                h = self.text(tokens, prefix=prefix, mask="prefix", caches=caches)
            nxt = sample_next(self.text.lm_head(h[:, -1]).float(), temperature, top_k, top_p, generator)
            nxt = nxt.masked_fill(done, cfg.pad_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == cfg.eos_id
            if done.all():
                break
        return tokens[:, 1:]

    # -- multi-image instruction following (M9-M11) --

    def instruct_image_tokens(self, pixels, image_valid):
        """pixels (B, K, 3, H, W) normalised, image_valid (B, K) bool (False: a padding slot).
        The ViT and the converter run over the real images only. Returns the relation tokens
        (B, K, w) (None without the relation encoder) and the image tokens (B, K, T, w), each
        image's tokens plus the embedding of its index; padding slots are zeros."""
        B, K = image_valid.shape
        vit = self.visual(pixels[image_valid])  # (n, 1 + P, vit_width)
        sample, slot = image_valid.nonzero(as_tuple=True)
        rel = None
        if self.relation is not None:
            pooled = vit.new_zeros(B, K, vit.size(-1))
            pooled[sample, slot] = vit[:, 0]
            rel = self.relation(pooled, image_valid)
        context = (rel[sample], image_valid[sample]) if rel is not None else (None, None)  # the sample's relation tokens
        tokens = self.converter(vit[:, 1:], *context) + self.image_index[slot][:, None]
        image = tokens.new_zeros(B, K, *tokens.shape[1:])
        image[sample, slot] = tokens
        return rel, image

    def question_block(self, question):
        """The question's tokens in the first context_length - answer_length text positions (an
        error if a question does not fit); the answer block always starts after them, so its
        position says nothing about the question."""
        cfg = self.cfg
        n = cfg.context_length - cfg.answer_length
        if (question[:, n:] != cfg.pad_id).any():
            raise ValueError(f"a question is longer than context_length - answer_length = {n} tokens")
        return question[:, :n]

    def instruct_prefix(self, pixels, image_valid, question, gates=True):
        """What the answer is conditioned on. Two passes (M10): pass 1 runs the text transformer
        bidirectionally over [relation tokens | image tokens | question | <glob>] and takes its
        state at <glob> as the global vector g; the scorer rates every image token against g,
        and each image keeps its top keep_ratio tokens (in their original order), each with
        the gate sigmoid(score) (gates=False: 1) that scales it in pass 2 (answer_states), so
        that the scorer gets a gradient. One pass: g is None and every image token is kept.
        Returns a dict: g (B, w), rel (B, K, w), rel_valid (B, K), image (B, K * n, w),
        image_valid (B, K * n), image_log_gate (B, K * n) or None, kept (B, K, n) indices."""
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
        g = self.text(text, prefix=torch.cat(parts, 1), mask="bidirectional", key_valid=torch.cat(valid, 1))[:, -1]
        scores = self.scorer(g, out["image"]).view(B, K, T)
        n = max(1, round(cfg.keep_ratio * T))
        kept = scores.topk(n, dim=-1).indices.sort(-1).values  # (B, K, n)
        x = image.gather(2, kept[..., None].expand(-1, -1, -1, w))
        log_gate = F.logsigmoid(scores.gather(2, kept)).flatten(1) if gates else None
        out.update(g=g, image=x.flatten(1, 2), image_valid=image_valid.repeat_interleave(n, 1), image_log_gate=log_gate,
                   kept=kept)
        return out

    def answer_states(self, pre, question, answer, drop=None):
        """Pass 2 (or the one pass): the text transformer over [g | relation tokens | image tokens |
        question | answer], prefix-LM (everything before the answer block sees everything; the
        answer is causal). A kept image token is scaled by its gate where it is read: its
        softmax weight in every attention is multiplied by the gate (log gate added to its
        logit). Scaling its embedding instead would do little, as the pre-LN blocks normalise
        each token before attention reads it. drop: {'instruction', 'images', 'relation'} ->
        (B,) bool, the samples whose modality is hidden from every query (M11): it then
        contributes nothing. g is never dropped. Returns the answer block's states (B, Ta, w)."""
        cfg = self.cfg
        B = question.size(0)
        keep = {k: ~drop[k] if drop is not None else question.new_ones(B, dtype=torch.bool)
                for k in ("instruction", "images", "relation")}
        parts, valid = [], []
        if pre["g"] is not None:
            parts.append(pre["g"][:, None])
            valid.append(keep["images"].new_ones(B, 1))
        if pre["rel"] is not None:
            parts.append(pre["rel"])
            valid.append(pre["rel_valid"] & keep["relation"][:, None])
        parts.append(pre["image"])
        valid.append(pre["image_valid"] & keep["images"][:, None])
        q = self.question_block(question)
        valid += [(q != cfg.pad_id) & keep["instruction"][:, None], answer != cfg.pad_id]
        prefix = torch.cat(parts, 1)
        bias = None
        if pre["image_log_gate"] is not None:
            n_image = pre["image"].size(1)
            before, after = prefix.size(1) - n_image, q.size(1) + answer.size(1)
            bias = F.pad(pre["image_log_gate"], (before, after))
        h = self.text(torch.cat([q, answer], 1), prefix=prefix, mask="prefix", key_valid=torch.cat(valid, 1),
                      n_prefix=prefix.size(1) + q.size(1), key_bias=bias)
        return h[:, -answer.size(1):]

    def sample_drop(self, B, device):
        """M11: which samples hide which modality in this training step."""
        cfg = self.cfg
        p = {"instruction": cfg.drop_instruction, "images": cfg.drop_images, "relation": cfg.drop_relation}
        return {k: torch.rand(B, device=device) < v for k, v in p.items()}

    def instruct_losses(self, pixels, image_valid, question, answer, drop=None):
        """pixels (B, K, 3, H, W), image_valid (B, K), question (B, T) and answer (B, Ta) token
        rows (<bos> ... <eos> <pad>...) -> {'answer', 'loss'}: next-token cross-entropy on the
        answer's tokens (its <eos> included), nothing else. In training, modalities are
        dropped at the configured rates unless drop is given."""
        if drop is None and self.training:
            drop = self.sample_drop(question.size(0), question.device)
        pre = self.instruct_prefix(pixels, image_valid, question)
        h = self.answer_states(pre, question, answer, drop)
        logits = fp32(self.text.lm_head(h[:, :-1]))
        targets = answer[:, 1:].masked_fill(answer[:, 1:] == self.cfg.pad_id, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return {"answer": loss, "loss": loss}

    @torch.no_grad()
    def answer(self, pixels, image_valid, question, drop=None):
        """Greedy answers (B, n) (<eos> included, then <pad>). The prefix (pass 1) is computed
        once; answers are a few tokens, so each new token reruns pass 2 without a cache."""
        cfg = self.cfg
        pre = self.instruct_prefix(pixels, image_valid, question)
        B = question.size(0)
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
        """Forward FLOPs of one training sample with n_images images, by part (transformer_flops
        for every stack; the patch conv, the converter, the scorer and the answer's logits
        counted as the matmuls they are). The question block and the whole answer block are
        counted (padding is computed too)."""
        c = self.cfg
        w, vw, K = c.text_width, c.vit_width, n_images
        P = (c.image_size // c.patch_size) ** 2
        T = P if c.converter == "mlp" else c.n_queries
        R = K if c.relation else 0  # relation tokens
        Lq, Ta = c.context_length - c.answer_length, c.answer_length
        out = {"vit": K * (2 * P * 3 * c.patch_size ** 2 * vw + transformer_flops(c.vit_layers, vw, 1 + P, c.mlp_ratio))}
        if c.relation:
            out["relation"] = 2 * K * vw * w + transformer_flops(c.relation_layers, w, K, c.mlp_ratio)
        if c.converter == "mlp":
            out["converter"] = K * 2 * P * (vw * w + w * w)
        else:  # per layer: queries, keys and values, output, MLP, attention over P + R keys
            S, M = P + R, c.n_queries
            per_layer = 2 * M * w * w * (2 + 2 * c.mlp_ratio) + 4 * S * w * w + 4 * M * S * w
            out["converter"] = K * (2 * P * vw * w + c.resampler_layers * per_layer)
        n = T
        if c.two_pass:
            n = max(1, round(c.keep_ratio * T))
            out["pass1"] = transformer_flops(c.text_layers, w, R + K * T + Lq + 1, c.mlp_ratio)
            out["scorer"] = 2 * w * w + 2 * K * T * w * w + 2 * K * T * w
        out["pass2"] = transformer_flops(c.text_layers, w, int(c.two_pass) + R + K * n + Lq + Ta, c.mlp_ratio)
        out["logits"] = 2 * (Ta - 1) * w * c.vocab_size
        return out

    # -- few-shot prompting on the frozen model (M12) --

    @torch.no_grad()
    def init_prompts(self, class_tokens):
        """Start the layer-1 text prompts from the token embeddings of prompt_init, which every
        class row holds at positions 1..n_ctx: the first layer then reads the zero-shot prompt."""
        if len(self.prompt.text_ctx):
            self.prompt.text_ctx[0].copy_(self.text.token_embedding(class_tokens[0, 1:1 + self.cfg.n_ctx]))

    def class_embeddings(self, class_tokens, prompted=True):
        """class_tokens (C, T), rows <bos> prompt_init name <eos> <pad>... -> (C, embed_dim)
        L2-normalised, the text prompts in place of prompt_init (prompted) or not (zero-shot)."""
        return self._text_embedding(self.text, class_tokens, self.prompt.text_prompts() if prompted else ())

    def score_maps(self, pixels, class_emb, prompted=True):
        """Dense scores. At each of the dense_layers, the patch tokens (through ln_post and proj
        into the joint space, normalised) against each class embedding: the cosine times the
        ITC temperature, a patch-by-class map; the maps fused by the softmax of the learned
        fusion logits. Zero-shot (prompted False): no prompts, the last layer alone.
        Returns the fused map (B, C, g, g) and the layers' maps (L, B, C, g, g)."""
        states = self.visual.hidden_states(pixels, self.prompt.image_prompts() if prompted else ())
        layers = self.prompt.dense_layers if prompted else (self.cfg.vit_layers,)
        g = math.isqrt(self.visual.n_patches)
        maps = []
        for layer in layers:
            x = F.normalize(self.visual.proj(self.visual.ln_post(states[layer - 1][:, 1:])), dim=-1)  # (B, P, D)
            maps.append((x @ class_emb.t().to(x.dtype)).transpose(1, 2).unflatten(2, (g, g)))
        maps = torch.stack(maps) * self.logit_scale.exp().clamp(max=100)
        weights = self.prompt.fusion.softmax(0) if prompted else maps.new_ones(1)
        return (weights.view(-1, 1, 1, 1, 1).to(maps.dtype) * maps).sum(0), maps

    def prompt_losses(self, pixels, target, class_tokens):
        """pixels (B, 3, H, W) normalised, target (B, H, W) the class of every pixel (0:
        background), class_tokens (C, T) -> {'ce', 'dice' (with dice_weight), 'loss'}: the
        cross-entropy at every pixel of the fused map (a patch) against the patch's class
        (patch_targets), plus dice_weight times the soft dice loss, 1 - mean over classes of
        (2 |p g| + 1) / (|p| + |g| + 1). Detection refines the upsampled map to the pixels."""
        fused, _ = self.score_maps(pixels, self.class_embeddings(class_tokens), prompted=True)
        fused = fp32(fused)
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
        """The per-pixel class map (B, H, W): the fused scores upsampled (bilinear) to the
        image, their softmax refined along the image's edges by refine_iters steps of
        refine_masks (0: none), the argmax. Also the upsampled scores (B, C, H, W) and the
        anchor generator's boxes."""
        fused, _ = self.score_maps(pixels, self.class_embeddings(class_tokens, prompted), prompted)
        scores = fp32(F.interpolate(fused, size=pixels.shape[-2:], mode="bilinear", align_corners=False))
        probs = scores.softmax(1)
        if self.cfg.refine_iters > 0:
            probs = refine_masks(fp32(pixels), probs, self.cfg.refine_iters)
        classmap = probs.argmax(1)
        return classmap, scores, anchor_boxes(classmap, scores, self.cfg.min_box_area)


# -----------------------------------------------------------------------------
# Hugging Face interop: CLIP in and out, GPT-2 in (transformers is imported in here only)

# Hugging Face's hidden_act -> ours (gelu_new, gelu_pytorch_tanh and gelu_fast are one function)
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh"}
# ours -> the hidden_act that export_hf_clip writes
HF_ACTIVATION_NAMES = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}

# our names -> Hugging Face CLIP's, per tower: its prefix, its tensors (a LayerNorm name maps
# its weight and bias), its projection into the joint space
HF_CLIP_TOWERS = {
    "visual": ("vision_model", {"conv1.weight": "embeddings.patch_embedding.weight",
                                "class_embedding": "embeddings.class_embedding",
                                "positional_embedding": "embeddings.position_embedding.weight",
                                "ln_pre": "pre_layrnorm", "ln_post": "post_layernorm"},
               ("proj.weight", "visual_projection.weight")),
    "text": ("text_model", {"token_embedding.weight": "embeddings.token_embedding.weight",
                            "positional_embedding": "embeddings.position_embedding.weight",
                            "ln_final": "final_layer_norm"},
             ("text_projection.weight", "text_projection.weight")),
}
HF_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.c_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
                 "mlp.c_proj": "mlp.fc2"}
GPT2_BLOCK = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")  # our names are GPT-2's


def hf_clip_keys(cfg, towers=("visual", "text")):
    """(our name, Hugging Face CLIP's) for logit_scale and every tensor of the towers named
    (with their projections); for c_attn, HF's three names, q, k and v, which concatenate
    into it. Our ViT applies ln_post to every token, HF's post_layernorm to the class token
    alone: the same weights, the same embedding."""
    pairs = [("logit_scale", "logit_scale")]
    for tower in towers:
        prefix, keys, (proj, their_proj) = HF_CLIP_TOWERS[tower]
        pairs.append((f"{tower}.{proj}", their_proj))
        for k, v in keys.items():
            suffixes = (".weight", ".bias") if k.startswith("ln") else ("",)
            pairs += [(f"{tower}.{k}{s}", f"{prefix}.{v}{s}") for s in suffixes]
        for i in range(cfg.vit_layers if tower == "visual" else cfg.text_layers):
            o, h = f"{tower}.blocks.{i}.", f"{prefix}.encoder.layers.{i}."
            for p in ("weight", "bias"):
                pairs += [(f"{o}{k}.{p}", f"{h}{v}.{p}") for k, v in HF_CLIP_BLOCK.items()]
                pairs.append((f"{o}attn.c_attn.{p}", tuple(f"{h}self_attn.{x}_proj.{p}" for x in "qkv")))
    return pairs


def state_from_hf_clip(sd, cfg, towers=("visual", "text")):
    """A transformers CLIPModel's state dict -> ours: logit_scale (as (1,)) and the towers
    named, with their projections."""
    out = {mine: torch.cat([sd[t] for t in theirs]) if isinstance(theirs, tuple) else sd[theirs]
           for mine, theirs in hf_clip_keys(cfg, towers)}
    out["logit_scale"] = out["logit_scale"].reshape(1)
    return out


def state_to_hf_clip(sd, cfg):
    """The inverse of state_from_hf_clip: our state dict -> a CLIPModel's (logit_scale a scalar)."""
    out = {}
    for mine, theirs in hf_clip_keys(cfg):
        out.update(zip(theirs, sd[mine].chunk(3)) if isinstance(theirs, tuple) else [(theirs, sd[mine])])
    out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def state_from_hf_gpt2(sd, cfg):
    """A transformers GPT2Model's state dict -> our text transformer. The block names are
    GPT-2's (h.i -> text.blocks.i); its Conv1D weights are stored (in, out): transposed."""
    out = {"text.token_embedding.weight": sd["wte.weight"], "text.positional_embedding": sd["wpe.weight"],
           "text.ln_final.weight": sd["ln_f.weight"], "text.ln_final.bias": sd["ln_f.bias"]}
    for i in range(cfg.text_layers):
        for k in GPT2_BLOCK:
            for p in ("weight", "bias"):
                v = sd[f"h.{i}.{k}.{p}"]
                out[f"text.blocks.{i}.{k}.{p}"] = v.t() if p == "weight" and not k.startswith("ln") else v
    return out


@torch.no_grad()
def load_into(model, state):
    """Copy state (our names) into model's tensors, in their dtype. The token embedding takes
    a smaller table into its first rows (the specials appended after a HF vocabulary keep
    theirs), the positional embedding the first context_length rows of a longer one; every
    other shape must match."""
    own = model.state_dict()
    for k, v in state.items():
        dst = own[k]
        if k == "text.token_embedding.weight":
            dst = dst[:v.size(0)]
        elif k == "text.positional_embedding":
            v = v[:dst.size(0)]
        if dst.shape != v.shape:
            raise ValueError(f"{k}: the checkpoint's shape {tuple(v.shape)} does not fit the model's "
                             f"{tuple(dst.shape)}")
        dst.copy_(v)


def hf_config(name):
    """The transformers config of a local directory or a hub name."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        if os.path.isdir(name):
            raise OSError(f"{name}: no Hugging Face model config could be read from this directory: {e}") from e
        raise OSError(f"{name!r} is not a local directory, and loading it as a Hugging Face hub name failed (that "
                      f"needs the network, or the files in the hub's cache): {e}. Give a directory written by "
                      "save_pretrained, or a hub name with the network reachable") from e


def hf_weights(kind, name):
    """The state dict of a transformers CLIPModel ('clip') or GPT2Model ('gpt2') from name."""
    import transformers
    return (transformers.CLIPModel if kind == "clip" else transformers.GPT2Model).from_pretrained(name).state_dict()


def hf_image_stats(name):
    """{'image_mean', 'image_std'} from the preprocessor_config.json of a directory or hub
    name; {} without one."""
    from transformers.utils import cached_file
    path = cached_file(name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if path is None:
        return {}
    with open(path) as f:
        pre = json.load(f)
    out = {k: tuple(float(x) for x in pre[k]) for k in ("image_mean", "image_std") if k in pre}
    if any(len(v) != 3 for v in out.values()):
        raise ValueError(f"{path}: image_mean and image_std must have 3 values (RGB), got {out}")
    return out


def hf_activation(name, tower, act):
    """Our name of a Hugging Face activation (HF_ACTIVATIONS); an error naming one we lack."""
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{name}: the {tower} tower's activation {act!r} is not one we have "
                         f"(we read {', '.join(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[act]


def hf_mlp_ratio(name, tower, hidden, intermediate):
    """Our mlp_ratio of a HF tower's widths; an error unless its MLP width is a whole multiple."""
    if intermediate % hidden:
        raise ValueError(f"{name}: the {tower} tower's MLP width {intermediate} is not a whole multiple of its width "
                         f"{hidden} (ours is mlp_ratio x width)")
    return intermediate // hidden


def clip_vision_fields(config, name):
    """VLMConfig fields of a transformers CLIPConfig's vision tower and joint space."""
    v = config.vision_config
    if v.num_channels != 3:
        raise ValueError(f"{name}: the vision tower reads {v.num_channels} channels; ours reads RGB")
    return dict(image_size=v.image_size, patch_size=v.patch_size, vit_width=v.hidden_size,
                vit_layers=v.num_hidden_layers, vit_heads=v.num_attention_heads, embed_dim=config.projection_dim,
                mlp_ratio=hf_mlp_ratio(name, "vision", v.hidden_size, v.intermediate_size),
                activation=hf_activation(name, "vision", v.hidden_act), layer_norm_eps=v.layer_norm_eps)


def clip_text_fields(config, name):
    """VLMConfig fields of a transformers CLIPConfig's text tower and vocabulary (see
    VLM.from_pretrained); a config that export_hf_clip wrote keeps its special ids."""
    t = config.text_config
    out = dict(text_width=t.hidden_size, text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads,
               context_length=t.max_position_embeddings,
               mlp_ratio=hf_mlp_ratio(name, "text", t.hidden_size, t.intermediate_size),
               text_activation=hf_activation(name, "text", t.hidden_act), layer_norm_eps=t.layer_norm_eps)
    V = t.vocab_size
    if getattr(config, "nanovlp_specials", None):
        return dict(out, vocab_size=V, **config.nanovlp_specials)
    bos, eos = (V - 2, V - 1) if t.eos_token_id == 2 else (t.bos_token_id, t.eos_token_id)
    for k, i in (("bos", bos), ("eos", eos)):
        if not isinstance(i, int) or not 0 <= i < V:
            raise ValueError(f"{name}: {k}_token_id {i!r} is not an id of its vocabulary of {V}")
    return dict(out, vocab_size=V + 3, bos_id=bos, eos_id=eos, pad_id=V, mask_id=V + 1, glob_id=V + 2)


def gpt2_fields(config, name):
    """VLMConfig fields of a transformers GPT2Config: the text tower and vocabulary (see
    VLM.from_pretrained)."""
    for has, what in ((config.add_cross_attention, "cross-attention layers"),
                      (not config.scale_attn_weights, "attention without the 1/sqrt(head size) scale"),
                      (config.scale_attn_by_inverse_layer_idx, "attention scaled by the layer index"),
                      (not config.tie_word_embeddings, "an lm_head apart from the token embedding")):
        if has:
            raise ValueError(f"{name}: this GPT-2 has {what}; ours has not")
    V, eos = config.vocab_size, config.eos_token_id
    if not isinstance(eos, int) or not 0 <= eos < V:
        raise ValueError(f"{name}: eos_token_id {eos!r} is not an id of its vocabulary of {V}")
    return dict(text_width=config.n_embd, text_layers=config.n_layer, text_heads=config.n_head,
                context_length=config.n_positions,
                mlp_ratio=hf_mlp_ratio(name, "text", config.n_embd, config.n_inner or 4 * config.n_embd),
                text_activation=hf_activation(name, "text", config.activation_function),
                layer_norm_eps=config.layer_norm_epsilon,
                vocab_size=V + 4, eos_id=eos, bos_id=V, pad_id=V + 1, mask_id=V + 2, glob_id=V + 3)


def merge_towers(name, vision, text):
    """One set of fields from a vision tower's and a text tower's: ours has one mlp_ratio and
    one layer_norm_eps, so the towers must agree on them; text_activation is '' when it is
    the vision tower's."""
    for k in ("mlp_ratio", "layer_norm_eps"):
        if vision[k] != text[k]:
            raise ValueError(f"{name}: {k} is {vision[k]} in the vision tower and {text[k]} in the text tower; "
                             f"ours has one {k} for both")
    out = {**vision, **text}
    if out["text_activation"] == out["activation"]:
        out["text_activation"] = ""
    return out


def checked_config(name, fixed, overrides):
    """VLMConfig(fixed fields, then overrides), where an override may not contradict a fixed
    field (context_length may be less; the text tower's activation is compared as used)."""
    known = {f.name for f in dataclasses.fields(VLMConfig)}
    for k in overrides:
        if k not in known:
            raise ValueError(f"{k!r} is not a VLMConfig field")
    cfg = VLMConfig(**{**fixed, **overrides})
    for k, v in fixed.items():
        if k == "text_activation":
            want, got = text_activation(VLMConfig(**fixed)), text_activation(cfg)
        else:
            want, got = v, getattr(cfg, k)
        if got != want and not (k == "context_length" and got <= want):
            raise ValueError(f"{k}={got!r} contradicts {name}, whose architecture has {k}={want!r}"
                             + (" (context_length may be less, not more)" if k == "context_length" else ""))
    return cfg


def hf_clip_config(cfg):
    """A transformers CLIPConfig of cfg's towers: sizes, activations, layer_norm_eps, the
    vocabulary and its special ids (nanovlp_specials, which VLM.from_pretrained reads back).
    HF pools the text at the first eos_token_id, as we do, except when that id is 2 (then at
    the highest id of each row, a legacy rule): an eos_id of 2 is refused."""
    from transformers import CLIPConfig
    if cfg.eos_id == 2:
        raise ValueError("eos_id 2: Hugging Face CLIP reads eos_token_id 2 as its legacy marker and pools the text at "
                         "the highest token id instead of at <eos>; give <eos> another id")
    common = dict(layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.embed_dim)
    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, intermediate_size=cfg.mlp_ratio * cfg.text_width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.context_length, hidden_act=HF_ACTIVATION_NAMES[text_activation(cfg)],
                bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id, **common)
    vision = dict(hidden_size=cfg.vit_width, intermediate_size=cfg.mlp_ratio * cfg.vit_width,
                  num_hidden_layers=cfg.vit_layers, num_attention_heads=cfg.vit_heads, image_size=cfg.image_size,
                  patch_size=cfg.patch_size, num_channels=3, hidden_act=HF_ACTIVATION_NAMES[cfg.activation], **common)
    specials = {k: getattr(cfg, k) for k in ("bos_id", "eos_id", "pad_id", "mask_id", "glob_id")}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim,
                      logit_scale_init_value=math.log(1 / 0.07), nanovlp_specials=specials)


def export_hf_clip(model, path, write_extra=None):
    """Write model's ViT, text transformer, their projections and logit_scale as a Hugging
    Face CLIP directory that transformers.CLIPModel.from_pretrained loads with equal
    embeddings and logits: config.json (hf_clip_config), model.safetensors (float32), and
    preprocessor_config.json (CLIPImageProcessor's: bicubic resize of the short side and
    centre crop to image_size, as data.load_image, then our image_mean and image_std).
    Nothing else goes out: not the converter, generator, heads, momentum copy or prompts.
    write_extra(directory), if given, writes more files (the tokenizer's: sample.py export).
    Written to a temporary directory beside path, then renamed; path must not exist yet."""
    from transformers import CLIPModel
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists: export_hf_clip writes a new directory")
    cfg = model.cfg
    hf = CLIPModel(hf_clip_config(cfg))
    hf.load_state_dict(state_to_hf_clip(model.state_dict(), cfg), strict=True)
    S = cfg.image_size
    pre = dict(image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": S}, resample=3,
               do_center_crop=True, crop_size={"height": S, "width": S}, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std), do_convert_rgb=True)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".export_hf_clip.")
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would stay with the renamed directory
        hf.save_pretrained(tmp)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump(pre, f, indent=2)
        if write_extra is not None:
            write_extra(tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

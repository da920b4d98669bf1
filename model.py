"""
The nanoVLP model: a ViT, one text transformer used with three attention masks, a converter
from image tokens to the text width, and the pretraining losses and generation built on them.
Module names follow OpenAI CLIP's and, inside each block, GPT-2's, so that published weights
load by a plain key map (hf.py). References: CLIP (github.com/openai/CLIP), nanoGPT
(github.com/karpathy/nanoGPT), ALBEF (arxiv.org/abs/2107.07651), BLIP (arxiv.org/abs/2201.12086).
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class VLMConfig:
    # image side
    image_size: int = 64  # pixels per side
    patch_size: int = 8  # pixels per patch side
    vit_width: int = 192  # the ViT's width
    vit_layers: int = 4  # the ViT's blocks
    vit_heads: int = 3  # the ViT's attention heads
    # text side
    vocab_size: int = 454  # set from the tokenizer
    context_length: int = 24  # text positions, <bos> and <eos> included
    text_width: int = 192  # the text transformer's width
    text_layers: int = 4  # the text transformer's blocks
    text_heads: int = 3  # the text transformer's attention heads
    # shared
    mlp_ratio: int = 4  # MLP width / width, in every block but where a tower's own width is given
    vit_mlp_width: int = 0  # the ViT's MLP width; 0: mlp_ratio x vit_width (a CLIP's may be any: 8192 at 1664)
    text_mlp_width: int = 0  # the text transformer's MLP width; 0: mlp_ratio x text_width
    activation: str = "gelu"  # 'gelu', 'quick_gelu' (OpenAI CLIP) or 'gelu_tanh' (GPT-2's gelu_new)
    text_activation: str = ""  # the text transformer's and the generator's; '' = activation
    layer_norm_eps: float = 1e-5  # every LayerNorm's
    embed_dim: int = 128  # the joint image-text space of ITC
    itc_temperature: float = 0.07  # ITC's initial temperature, learned from there (CLIP's 0.07)
    converter: str = "mlp"  # image tokens -> text width: 'mlp' (one token per patch) or 'resampler'
    image_positions: bool = False  # mlp: each image token also gets a learned position in the text width
    image_axes: bool = False  # mlp: each image token also reads its row and column (means, and what lies before it)
    n_queries: int = 8  # resampler: its learned queries, the image tokens per image
    resampler_layers: int = 2  # resampler: its blocks
    # pretraining losses: a weight of 0 switches an objective off, and it costs nothing
    itc_weight: float = 1.0  # contrastive (CLIP)
    itm_weight: float = 1.0  # image-text matching with hard negatives (ALBEF)
    mlm_weight: float = 1.0  # ELECTRA's generator: masked text tokens
    moc_weight: float = 1.0  # ELECTRA's generator: the visual codes of masked patches
    rtd_weight: float = 1.0  # ELECTRA's discriminator: replaced text tokens
    r2d_weight: float = 1.0  # ELECTRA's discriminator: replaced image patches
    caption_weight: float = 1.0  # captioning (prefix-LM)
    itm_negatives: float = 1.0  # negative pairs per matched pair: 2 (an image's and a text's, as ALBEF), 1 or 0.5
    fused_rows: float = 1.0  # of a batch, the rows ELECTRA replaces and the fused pass reads: 1, or 0.5 (every other)
    itm_clean: bool = False  # ITM's matched pairs are the clean image and text, not ELECTRA's replaced ones
    # ELECTRA: a small generator fills in masked tokens and patches, the discriminator finds them
    text_mask_rate: float = 0.15  # of the non-special text tokens
    patch_mask_rate: float = 0.15  # of the image patches
    n_codes: int = 256  # visual codebook size (k-means over patches: data.prepare_codebook)
    gen_width: int = 0  # the generator's width; 0: text_width // 4 (at most that)
    gen_layers: int = 2  # the generator's blocks
    gen_heads: int = 2  # the generator's attention heads
    shared_vit_pass: bool = False  # one ViT pass, over ELECTRA's replaced pixels, for ITC, captioning and fused pass
    fused_vit_grad: bool = True  # the fused pass's losses (ITM, RTD, R2D) train the ViT too; false: not the ViT
    # momentum distillation (ALBEF): an EMA copy gives soft ITC targets and queued negatives
    momentum_alpha: float = 0.4  # the soft targets' weight, ramped up over the first epoch; 0: no EMA copy, no queues
    momentum: float = 0.995  # EMA decay of the momentum encoders
    queue_size: int = 4096  # momentum image and text features of earlier batches: extra ITC negatives
    # the instruct stage (instruct.py): multi-image questions
    instruct: bool = False  # the instruct stage's model (--stage instruct sets it)
    image_slots: int = 4  # most images of one sample (the image-index embeddings)
    relation: bool = True  # the relation encoder: one token per image, what sets it apart
    relation_layers: int = 2  # the relation encoder's blocks
    two_pass: bool = True  # pass 1's global vector selects the image tokens that pass 2 reads
    keep_ratio: float = 0.5  # of each image's tokens, kept for pass 2
    pass1_layers: int = 0  # pass 1 runs the first pass1_layers text blocks (FastV scores after 2); 0: all of them
    drop_instruction: float = 0.1  # per sample, the chance that pass 2 does not see the instruction (training only)
    drop_images: float = 0.1  # the same for the image tokens
    drop_relation: float = 0.1  # the same for the relation tokens
    answer_length: int = 8  # the answer block, <bos> answer <eos> <pad>...; the question gets the rest of the context
    # the prompt stage (prompt.py): few-shot detection with prompt vectors on the frozen model
    prompt: bool = False  # the prompt stage's model (--stage prompt sets it)
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
    # pixel normalisation (CLIP's)
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)  # per RGB channel
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)  # per RGB channel
    # special tokens, set from the tokenizer
    bos_id: int = 450  # <bos>
    eos_id: int = 449  # <eos>
    pad_id: int = 451  # <pad>
    mask_id: int = 452  # <mask>: ELECTRA's masked tokens
    glob_id: int = 453  # <glob>: where pass 1 of the instruct stage reads the global vector


# -----------------------------------------------------------------------------
# attention masks: one rule serves all three uses of the text transformer


def attention_mask(n_prefix, q_len, k_len, q_start=0, key_valid=None, device=None):
    """Bool mask (True: may attend) of queries q_start.. over keys 0..k_len-1: a key is seen if it is in
    the prefix or not after the query (causal: n_prefix 0; prefix-LM: the prefix's length; bidirectional:
    k_len). key_valid (B, k_len): keys hidden from every query, but a query always sees itself (SDPA turns
    an empty row into NaN). Returns (q_len, k_len), or (B, 1, q_len, k_len) with key_valid."""
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    mask = (k < n_prefix) | (k <= q)
    if key_valid is not None:
        mask = mask[None, None] & key_valid[:, None, None, :] | (k == q)
    return mask


def padding_hidden(n_prefix, tokens, pad_id):
    """The bidirectional mask over [n_prefix image tokens | tokens (B, T)], the padding hidden as keys."""
    valid = F.pad(tokens != pad_id, (n_prefix, 0), value=True)
    L = valid.size(1)
    return attention_mask(L, L, L, key_valid=valid, device=tokens.device)


class KVCache:
    """Keys and values of one attention layer during generation, preallocated and filled left to right."""

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
        self.n_head = n_head
        self.c_attn = nn.Linear(width, 3 * width)  # q, k, v in one matmul
        self.c_proj = nn.Linear(width, width)

    def forward(self, x, mask=None, is_causal=False, cache=None, context=None):
        """Self-attention over x; with context (B, S, C), cross-attention to it (the same c_attn, split)."""
        B, T, C = x.size()
        if context is None:
            q, k, v = self.c_attn(x).split(C, dim=2)
        else:
            w, b = self.c_attn.weight, self.c_attn.bias
            q = F.linear(x, w[:C], b[:C])
            k, v = F.linear(context, w[C:], b[C:]).split(C, dim=2)
        q, k, v = (t.view(B, t.size(1), self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # B nh T hs
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, L, hs): every position so far
        # flash / memory-efficient attention kernels; is_causal takes the fastest path
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), OpenAI CLIP's activation, written as silu(1.702 x) / 1.702: the same function,
    with a fused backward kernel."""

    def forward(self, x):
        return F.silu(1.702 * x) / 1.702


# gelu_tanh: GELU's tanh approximation, Hugging Face's gelu_new and gelu_pytorch_tanh (GPT-2)
ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


def text_activation(cfg):
    """The text transformer's and the generator's activation: text_activation, else activation."""
    return cfg.text_activation or cfg.activation


class MLP(nn.Module):

    def __init__(self, width, hidden, activation):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.act = ACTIVATIONS[activation]()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width, n_head, cfg, activation, mlp_width=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.attn = Attention(width, n_head)
        self.ln_2 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(width, mlp_width or cfg.mlp_ratio * width, activation)

    def forward(self, x, mask=None, is_causal=False, cache=None, context=None):
        x = x + self.attn(self.ln_1(x), mask, is_causal, cache, context)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# the towers


def sincos_2d(grid, width):
    """(grid*grid, width) 2-D sin-cos position map (MAE): sin and cos of the column and of the row."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4) / (width // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    x, y = cols.flatten()[:, None] * omega, rows.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class VisionTransformer(nn.Module):
    """ViT as in CLIP: conv patches, a class token, learned positions, ln_pre, blocks, ln_post, proj."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.vit_width
        self.n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(self.n_patches + 1, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(w, cfg.vit_heads, cfg, cfg.activation, mlp_widths(cfg)[0])
                                    for _ in range(cfg.vit_layers))
        self.ln_post = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)

    def embed(self, pixels):
        """pixels (B, 3, H, W) normalised -> class and patch tokens plus positions (B, 1 + P, w)."""
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (B, P, w)
        cls = self.class_embedding.expand(x.size(0), 1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.positional_embedding

    def forward(self, pixels):
        """pixels (B, 3, H, W) normalised -> tokens (B, 1 + P, w) after ln_post, the class token first."""
        x = self.ln_pre(self.embed(pixels))
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class TextTransformer(nn.Module):
    """One set of weights, three masks:
        causal over text only            -> the CLIP text encoder, pooled at <eos>
        bidirectional over [prefix|text] -> the fusion encoder (ITM, the ELECTRA discriminator)
        prefix-LM over [prefix|text]     -> captioning and answering
    The prefix (image tokens already in the text width) carries its own positions; text
    tokens get learned positions counted from their first token."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, w))
        self.blocks = nn.ModuleList(Block(w, cfg.text_heads, cfg, text_activation(cfg), mlp_widths(cfg)[1])
                                    for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Linear(w, cfg.embed_dim, bias=False)
        self.lm_head = nn.Linear(w, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied, as in GPT-2

    def forward(self, tokens, prefix=None, mask="causal", caches=None, pos=0, n_layers=None):
        """tokens (B, T) at text positions pos.., after an optional prefix (B, M, w) -> states (B, M+T, w).
        mask: 'causal', 'prefix' (the prefix seen by all, the text causal), 'bidirectional', or a tensor
        for SDPA (attention_mask). caches: one KVCache per layer when generating; n_layers: the first blocks only."""
        x = self.token_embedding(tokens) + self.positional_embedding[pos:pos + tokens.size(1)]
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        L, past = x.size(1), caches[0].len if caches is not None else 0
        is_causal = isinstance(mask, str) and mask == "causal" and past == 0  # the fastest kernel path
        if isinstance(mask, str):  # bidirectional, and one new token after the cache, see every key: no mask
            n_prefix = {"causal": 0, "prefix": L - tokens.size(1), "bidirectional": None}[mask]
            mask = None if is_causal or n_prefix is None or L == 1 else attention_mask(n_prefix, L, past + L, past,
                                                                                        device=x.device)
        for i, block in enumerate(self.blocks[:n_layers]):
            x = block(x, mask, is_causal, caches[i] if caches is not None else None)
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
    """ViT tokens -> n_queries tokens in the text width (Flamingo's Perceiver resampler): learned queries
    cross-attend to one image's patches and to context tokens when given (the instruct stage's relation tokens)."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.text_width
        self.c_in = nn.Linear(cfg.vit_width, w)
        self.queries = nn.Parameter(0.02 * torch.randn(cfg.n_queries, w))
        self.ln_kv = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(w, cfg.text_heads, cfg, cfg.activation) for _ in range(cfg.resampler_layers))
        self.ln_post = nn.LayerNorm(w, eps=cfg.layer_norm_eps)

    def forward(self, patches, context=None, context_valid=None):
        """patches (B, P, vit_width), context (B, S, text_width) and context_valid (B, S) -> (B, n_queries, w)."""
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


def patchify(pixels, p):
    """(B, 3, H, W) -> (B, P, p*p*3): patches in the ViT's order, pixels as (row, column, channel)."""
    B, C, H, W = pixels.shape
    x = pixels.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches, p):
    """The inverse of patchify for square images."""
    B, P, _ = patches.shape
    g = math.isqrt(P)
    return patches.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)


class Generator(nn.Module):
    """ELECTRA's generator over [masked patches | masked text], padding hidden: a small bidirectional
    transformer. Text comes in and goes out through the main token embedding table (shared, projected to its
    width); patches come in as pixels (a masked one as a learned vector) and go out as logits over the codes."""

    def __init__(self, cfg, token_embedding):
        super().__init__()
        w = cfg.gen_width or cfg.text_width // 4
        p = cfg.patch_size
        self.n_patches = (cfg.image_size // p) ** 2
        self.token_embedding = token_embedding  # shared with the text transformer, not a copy
        self.pad_id = cfg.pad_id
        self.embed_proj = nn.Linear(cfg.text_width, w)
        self.patch_embed = nn.Linear(3 * p * p, w)
        self.mask_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(self.n_patches + cfg.context_length, w))
        self.blocks = nn.ModuleList(Block(w, cfg.gen_heads, cfg, text_activation(cfg)) for _ in range(cfg.gen_layers))
        self.ln_f = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.mlm_head = nn.Linear(w, cfg.text_width)  # back to the table's width
        self.moc_head = nn.Linear(w, cfg.n_codes)

    def forward(self, patches, patch_mask, tokens, slots):
        """patches (B, P, 3*p*p), patch_mask (B, P), tokens (B, T) masked, slots (B, S) the masked positions ->
        MLM logits at the slots (B, S, V), MOC logits (B, P, K)."""
        P, T = patches.size(1), tokens.size(1)
        img = self.patch_embed(patches)
        img = torch.where(patch_mask[..., None], self.mask_embedding.to(img.dtype), img)
        txt = self.embed_proj(self.token_embedding(tokens))
        x = torch.cat([img, txt], dim=1) + self.positional_embedding[:P + T]
        mask = padding_hidden(P, tokens, self.pad_id)
        for block in self.blocks:
            x = block(x, mask)
        x = self.ln_f(x)
        at_slots = x[:, P:].gather(1, slots[..., None].expand(-1, -1, x.size(-1)))
        return self.mlm_head(at_slots) @ self.token_embedding.weight.t(), self.moc_head(x[:, :P])


def transformer_flops(layers, width, seq, mlp_width):
    """Forward FLOPs (2 per multiply-add) of `layers` blocks over `seq` tokens: the q, k, v, output and MLP
    matmuls and attention over all keys (masks save no work); norms, softmax and biases left out."""
    return layers * (2 * seq * width * (4 * width + 2 * mlp_width) + 4 * seq * seq * width)


def mlp_widths(cfg):
    """The MLP widths of the ViT's and the text transformer's blocks."""
    return cfg.vit_mlp_width or cfg.mlp_ratio * cfg.vit_width, cfg.text_mlp_width or cfg.mlp_ratio * cfg.text_width


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
    """The rows ELECTRA replaces and the fused pass reads: all, or with fused_rows 0.5 the even rows."""
    return x if cfg.fused_rows == 1 else x[::2]


def fused_pairs(cfg):
    """(first, clean, replaced): the fused pass reads the first ViT pass's image tokens (no ELECTRA, or
    shared_vit_pass); ITM's own clean pairs (itm_clean); ELECTRA's replaced pairs (RTD, R2D, ITM unless clean)."""
    on = {k: w > 0 for k, w in loss_weights(cfg).items()}
    first = not uses_electra(cfg) or cfg.shared_vit_pass
    clean = cfg.itm_clean and on["itm"] and not first
    return first, clean, (on["itm"] or on["rtd"] or on["r2d"]) and (not clean or on["rtd"] or on["r2d"])


def dist_info():
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum, over every rank's loss, of its rows' gradients."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)  # gloo has no reduce-scatter of tensors; each rank keeps its own rows
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(x):
    """x from every rank, concatenated, with a gradient path to each rank's own rows (open_clip's)."""
    return x if dist_info()[1] == 1 else GatherWithGrad.apply(x)


def fp32(x):
    """Half-precision logits upcast to float32 for a softmax or a loss; other dtypes kept."""
    return x.float() if x.element_size() < 4 else x


def fp32_scores(fn, *xs):
    """fn(*xs) in float32 (or wider) with autocast off: the embeddings and heads whose scores rank or threshold."""
    with torch.autocast(xs[0].device.type, enabled=False):
        return fn(*map(fp32, xs))


def positive_mates(tokens, groups, all_tokens, all_groups):
    """(B, N) bool: column j is a positive of row i when their captions are the same text or, where the
    data knows it (groups >= 0), describe the same scene. Such pairs are never negatives."""
    same = (tokens[:, None, :] == all_tokens[None, :, :]).all(-1)
    if groups is not None:
        same |= (groups[:, None] == all_groups[None, :]) & (groups[:, None] >= 0)
    return same


def itc_loss(image_emb, text_emb, logit_scale, same, image_cols=None, text_cols=None, hidden=None, soft=None,
             alpha=0.0, all_image=None, all_text=None):
    """CLIP's symmetric InfoNCE, each rank's rows against every rank's columns (open_clip's local loss); the
    target spread evenly over the positives (same, (B, N)). The momentum queue adds negative-only columns
    (image_cols, text_cols), hidden (B, Q) where a queued caption is a row's mate; soft: the momentum
    model's targets over all columns, mixed in with weight alpha (ALBEF's momentum distillation)."""
    all_image = gather_with_grad(image_emb) if all_image is None else all_image
    all_text = gather_with_grad(text_emb) if all_text is None else all_text
    if image_cols is not None:
        all_image = torch.cat([all_image, image_cols.to(all_image.dtype)])
        all_text = torch.cat([all_text, text_cols.to(all_text.dtype)])
    scale = logit_scale.exp().clamp(max=100)
    logits_i2t = fp32(scale * image_emb @ all_text.t())  # (B, N + Q)
    logits_t2i = fp32(scale * text_emb @ all_image.t())
    if image_cols is not None:
        hide = torch.cat([torch.zeros_like(same), hidden], dim=1)
        same = torch.cat([same, torch.zeros_like(hidden)], dim=1)
        logits_i2t, logits_t2i = logits_i2t.masked_fill(hide, -1e4), logits_t2i.masked_fill(hide, -1e4)  # exp: 0
    target = same.to(logits_i2t.dtype) / same.sum(1, keepdim=True)
    t_i2t = t_t2i = target
    if soft is not None:
        t_i2t, t_t2i = alpha * soft[0] + (1 - alpha) * target, alpha * soft[1] + (1 - alpha) * target
    return (F.cross_entropy(logits_i2t, t_i2t) + F.cross_entropy(logits_t2i, t_t2i)) / 2


def sample_index(weights, u):
    """Inverse-CDF sampling of an index per row of weights (..., K) with uniforms u (...): a pure function of
    the row and its uniform, so a row gets the same draw on any rank and in any micro-batch."""
    cum = weights.cumsum(-1)
    total = cum[..., -1:]
    point = torch.minimum(u.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))  # below the total
    return torch.searchsorted(cum, point, right=True).squeeze(-1).clamp(max=weights.size(-1) - 1)


def hard_negatives(logits, same, generator=None, u=None, offset=0):
    """One hard negative column per row, drawn from softmax(logits) over the columns that are not its
    positives, with uniforms u; offset is row 0's global column. Returns (index, valid): a row with no
    candidate gets its own column and valid False, to be left out of the loss."""
    valid = (~same).any(1)
    weights = logits.detach().float().masked_fill(same, float("-inf")).softmax(1)
    row = torch.arange(same.size(0), device=same.device) + offset
    own = (torch.arange(same.size(1), device=same.device)[None] == row[:, None]).float()
    weights = torch.where(valid[:, None], weights, own)
    if u is None:
        u = torch.rand(same.size(0), generator=generator, device=same.device)
    return sample_index(weights, u), valid


def masked_mean(x, mask, count=None):
    """Sum of x where mask is True over count (default: the number of such positions, at least 1)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / (mask.sum().clamp(min=1) if count is None else count)


def draw_noise(cfg, B, T, generator=None, device=None):
    """The uniform draws of a pretraining batch of B rows in a fixed order (ELECTRA's masks and samples, ITM's
    negatives). Drawn for the whole step, so a row's randomness does not depend on how the batch is split."""
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    shapes = dict(text_mask=(B, T), patch_mask=(B, n_patches), token=(B, T), code=(B, n_patches), neg_text=(B,),
                  neg_image=(B,))
    return {k: torch.rand(s, generator=generator, device=device) for k, s in shapes.items()}


def mask_slots(cfg, T):
    """The most tokens a row of T masks (ELECTRA's max_predictions): 4 standard deviations above the mean, so a
    row rarely loses one; the generator computes its vocabulary-wide MLM logits at this many positions a row."""
    n, p = T - 2, cfg.text_mask_rate
    return max(1, min(n, math.ceil(n * p + 4 * math.sqrt(n * p * (1 - p)))))


def electra_masks(cfg, tokens, noise):
    """(text_mask, patch_mask): text_mask_rate of the non-special tokens (the first mask_slots of a row),
    patch_mask_rate of the patches."""
    special = (tokens == cfg.bos_id) | (tokens == cfg.eos_id) | (tokens == cfg.pad_id)
    text_mask = (noise["text_mask"][:, :tokens.size(1)] < cfg.text_mask_rate) & ~special
    text_mask &= text_mask.cumsum(1) <= mask_slots(cfg, tokens.size(1))
    return text_mask, noise["patch_mask"] < cfg.patch_mask_rate


def pretrain_counts(cfg, tokens, noise):
    """The positions the per-token losses average over in a batch: masked tokens and patches, non-padding
    tokens, caption targets. Counted for the whole step first, each loss divides by the step's count."""
    fused = fused_part(cfg, tokens)
    masks = {k: fused_part(cfg, noise[k]) for k in ("text_mask", "patch_mask")}  # the only draws it reads
    text_mask, patch_mask = electra_masks(cfg, fused, masks)
    return {"mlm": text_mask.sum().float(), "moc": patch_mask.sum().float(),
            "rtd": (fused != cfg.pad_id).sum().float(), "caption": (tokens[:, 1:] != cfg.pad_id).sum().float()}


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token from logits (B, V): greedy at temperature 0, else sampled within top_k and top_p."""
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
        self.apply(self._init_weights)
        if cfg.image_axes:  # starts as the plain converter: the row and column context is learned in
            nn.init.zeros_(self.converter.c_axes.weight)
        self._init_tower(self.visual, cfg.vit_width, cfg.vit_layers)
        self._init_tower(self.text, cfg.text_width, cfg.text_layers)
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

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @staticmethod
    def _init_tower(tower, width, layers):
        """CLIP's initialisation: weights scaled by the width, residual projections also by the depth. With
        GPT-2's 0.02 the class token does not read the patches at step 0, and contrastive learning stalls."""
        attn_std, fc_std, proj_std = width ** -0.5, (2 * width) ** -0.5, width ** -0.5 * (2 * layers) ** -0.5
        for block in tower.blocks:
            nn.init.normal_(block.attn.c_attn.weight, std=attn_std)
            nn.init.normal_(block.attn.c_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if isinstance(tower, VisionTransformer):
            for p in (tower.class_embedding, tower.proj.weight):
                nn.init.normal_(p, std=attn_std)
            with torch.no_grad():  # learned positions from a 2-D sin-cos map: space is known from step 0
                tower.positional_embedding[0].zero_()
                tower.positional_embedding[1:] = sincos_2d(int(math.isqrt(tower.n_patches)), width)
        else:
            nn.init.normal_(tower.positional_embedding, std=0.01)
            nn.init.normal_(tower.text_projection.weight, std=attn_std)

    def num_params(self):
        """Trainable parameters (the momentum copy is not counted)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- momentum encoders (ALBEF) --

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
        """Momentum encoders equal to the online ones, queues empty."""
        if self.momentum is not None:
            self.momentum.load_state_dict(self._online().state_dict())
            self.queue_ptr.zero_()
            self.queue_filled.zero_()
            self.token_queue.fill_(-1)
            self.group_queue.fill_(-1)

    @torch.no_grad()
    def enqueue(self, cols):
        """Add the momentum features of a whole step (every rank's rows) to the ring-buffer queues."""
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
        """uint8 (B, H, W, 3), numpy or a tensor -> float (B, 3, H, W) on the model's device, normalised."""
        x = images if torch.is_tensor(images) else torch.tensor(images)  # a copy: memmaps are read-only
        x = x.to(self.pixel_mean.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.pixel_mean) / self.pixel_std

    def image_tokens(self, vit_tokens):
        """ViT tokens -> the image tokens the text transformer reads (patches only)."""
        return self.converter(vit_tokens[:, 1:])

    @staticmethod
    def _image_embedding(visual, vit_tokens):
        return fp32_scores(lambda x: F.normalize(visual.proj(x), dim=-1), vit_tokens[:, 0])

    def _text_embedding(self, text, tokens, h=None):
        """The L2-normalised projection of text's causal states h (default: computed) at each row's first <eos>."""
        h = text(tokens) if h is None else h
        eos = (tokens == self.cfg.eos_id).int().argmax(-1)
        pooled = h[torch.arange(tokens.size(0), device=tokens.device), eos]
        return fp32_scores(lambda x: F.normalize(text.text_projection(x), dim=-1), pooled)

    def encode_image(self, pixels):
        """pixels (B, 3, H, W) float, normalised -> (B, embed_dim) L2-normalised."""
        return self._image_embedding(self.visual, self.visual(pixels))

    def encode_text(self, tokens):
        """tokens (B, T) <bos> ... <eos> <pad>... -> (B, embed_dim) L2-normalised."""
        return self._text_embedding(self.text, tokens)

    def fuse(self, image_tokens, tokens):
        """The fusion encoder: bidirectional over [image tokens | text], padding hidden -> states (B, P + T, w)."""
        mask = padding_hidden(image_tokens.size(1), tokens, self.cfg.pad_id)
        return self.text(tokens, prefix=image_tokens, mask=mask)

    def itm_logits(self, image_tokens, tokens):
        """(B, 2) ITM logits (no match, match) of image-text pairs, read at <bos>."""
        return fp32_scores(self.itm_head, self.fuse(image_tokens, tokens)[:, image_tokens.size(1)])

    # -- ELECTRA --

    def electra_inputs(self, pixels, tokens, codes, rng=None, noise=None):
        """Mask, let the generator fill in, replace. A masked token becomes one sampled from the MLM
        distribution, a masked patch the centroid of a code sampled from the MOC distribution; a sample equal
        to the original counts as original (ELECTRA). Draws from noise (draw_noise), else rng. Returns the
        masks, the generator's logits (MLM's at the slots) and input, the new pixels and tokens, and the RTD and
        R2D labels."""
        cfg = self.cfg
        p = cfg.patch_size
        if noise is None:
            noise = draw_noise(cfg, tokens.size(0), tokens.size(1), rng, tokens.device)
        patches = patchify(pixels, p)
        text_mask, patch_mask = electra_masks(cfg, tokens, noise)
        # each row's masked positions first (in order), then others to fill the fixed number of slots
        key = text_mask * torch.arange(tokens.size(1), 0, -1, device=tokens.device)
        slots = key.topk(mask_slots(cfg, tokens.size(1)), dim=1).indices
        gen_input = (patches, patch_mask, tokens.masked_fill(text_mask, cfg.mask_id), slots)
        mlm_logits, moc_logits = self.generator(*gen_input)
        with torch.no_grad():
            logits = mlm_logits.detach().float().clone()
            logits[..., [cfg.bos_id, cfg.eos_id, cfg.pad_id, cfg.mask_id]] = float("-inf")  # never sample specials
            sampled = sample_index(logits.softmax(-1), noise["token"][:, :tokens.size(1)].gather(1, slots))
            new_tokens = torch.where(text_mask, tokens.scatter(1, slots, sampled), tokens)  # every masked one is a slot
            sampled_code = sample_index(moc_logits.detach().float().softmax(-1), noise["code"])
            mean = self.pixel_mean.view(1, 3).repeat(p * p, 1).view(-1)  # per (row, column, channel)
            std = self.pixel_std.view(1, 3).repeat(p * p, 1).view(-1)
            centroid = (self.codebook[sampled_code] - mean) / std
            replaced = patch_mask & (sampled_code != codes)
            new_pixels = unpatchify(torch.where(replaced[..., None], centroid.to(patches.dtype), patches), p)
        return dict(text_mask=text_mask, patch_mask=patch_mask, mlm_logits=mlm_logits, moc_logits=moc_logits,
                    slots=slots, gen_input=gen_input, pixels=new_pixels, tokens=new_tokens,
                    rtd_label=new_tokens != tokens, r2d_label=replaced)

    def caption_loss(self, image_tokens, tokens, count=None):
        """Prefix-LM next-token loss of the caption given the image tokens (<eos> included, <pad> not)."""
        h = self.text(tokens[:, :-1], prefix=image_tokens, mask="prefix")
        logits = fp32(self.text.lm_head(h[:, image_tokens.size(1):]))  # text positions; the softmax in fp32
        targets = tokens[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return masked_mean(nll, targets != self.cfg.pad_id, count)

    def forward(self, pixels, tokens, codes=None, groups=None, alpha=0.0, noise=None, counts=None, offset=None):
        """pixels (B, 3, H, W) normalised, tokens (B, T) -> dict of named losses and 'loss', their weighted sum;
        an objective of weight 0 is not computed. codes (B, P): each patch's visual code (ELECTRA); groups (B,):
        captions of one group are never each other's negatives; alpha: the momentum targets' weight; noise,
        counts, offset: this batch's part of the step's draws and counts, and its first global row. Under DDP
        the cross-sample losses read every rank's rows: the gradient is that of one process on the whole batch."""
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
        weights = loss_weights(self.cfg)
        return sum(weights[k] * v for k, v in losses.items() if weights[k] > 0)

    # the rows of pretrain_encode that carry a gradient back to the encoders
    GRADIENT_KEYS = ("image_emb", "text_emb", "fused_image", "itm_image")

    def column_keys(self, rows):
        """What pretrain_head reads from every row of the step, of what rows holds, in a fixed order."""
        keys = ("image_emb", "text_emb", "image_m", "text_m", "tokens", "groups")
        return [k for k in keys + (self.itm_pair(rows) if self.cfg.itm_weight > 0 else ()) if k in rows]

    @staticmethod
    def itm_pair(rows):
        """The keys of ITM's matched pairs in rows: the clean ones (itm_clean), else the fused pass's."""
        return ("itm_image", "itm_tokens") if "itm_image" in rows else ("fused_image", "fused_tokens")

    def pretrain_encode(self, pixels, tokens, codes, groups, noise, counts, alpha=0.0, momentum=True, per_sample=True):
        """The per-sample half of pretraining, the encoders' passes over one batch: (losses, rows), the
        per-sample losses (mlm, moc, caption; with per_sample) and the rows that the cross-sample losses read:
        embeddings, the fused pass's image tokens and text, ELECTRA's labels, and the momentum embeddings."""
        cfg = self.cfg
        on = {k: w > 0 for k, w in loss_weights(self.cfg).items()}
        electra, fused = uses_electra(cfg), on["itm"] or on["rtd"] or on["r2d"]
        losses = {}
        rows = dict(tokens=tokens, groups=groups if groups is not None else torch.full_like(tokens[:, 0], -1))
        E = None
        part = lambda x: fused_part(cfg, x)  # noqa: E731
        if electra:
            if codes is None:
                raise ValueError("ELECTRA's objectives need the visual codes of the patches (codes=...)")
            fused_noise = {k: part(v) for k, v in noise.items()}
            E = self.electra_inputs(part(pixels), part(tokens), part(codes), noise=fused_noise)
        shared = E is not None and cfg.shared_vit_pass  # one ViT pass, over the replaced pixels (as FLIP's)
        first, clean, replaced = fused_pairs(cfg)
        vit = self.visual(E["pixels"] if shared else pixels)
        caption = on["caption"] and per_sample
        image_tokens = None
        if caption or ((first or clean) and fused and cfg.fused_vit_grad):
            image_tokens = self.image_tokens(vit)
        if on["itc"] or on["itm"]:  # ITM draws its hard negatives from the ITC similarity
            rows.update(image_emb=self._image_embedding(self.visual, vit), text_emb=self.encode_text(tokens))
        if self.momentum is not None and on["itc"] and momentum:
            m = self.momentum
            with torch.no_grad():  # the momentum model reads the clean pixels
                rows.update(image_m=self._image_embedding(m.visual, m.visual(pixels)),
                            text_m=self._text_embedding(m.text, tokens))
        first_tokens = lambda: (part(image_tokens) if cfg.fused_vit_grad  # noqa: E731
                                else self.image_tokens(part(vit).detach()))
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
                slots = E["slots"]
                mlm = -logp.gather(-1, part(tokens).gather(1, slots)[..., None]).squeeze(-1)  # the original's NLL
                if self.momentum is not None and on["mlm"]:
                    with torch.no_grad():
                        mlm_m, _ = self.momentum.generator(*E["gen_input"])
                    mlm = (1 - alpha) * mlm - alpha * (fp32(mlm_m).softmax(-1) * logp).sum(-1)
                losses["mlm"] = masked_mean(mlm, E["text_mask"].gather(1, slots), counts["mlm"])
                moc = F.cross_entropy(fp32(E["moc_logits"]).transpose(1, 2), part(codes).long(), reduction="none")
                losses["moc"] = masked_mean(moc, E["patch_mask"], counts["moc"])
            rows.update(rtd_label=E["rtd_label"], r2d_label=E["r2d_label"])
        if caption:
            losses["caption"] = self.caption_loss(image_tokens, tokens, counts["caption"])
        return losses, rows

    def pretrain_head(self, rows, cols, noise, offset, alpha, counts):
        """The cross-sample half: ITC, and the fused pass's ITM with hard negatives and ELECTRA's
        discriminator. rows: this batch's; cols: every row of the step (gathered), this batch's at offset."""
        cfg = self.cfg
        on = {k: w > 0 for k, w in loss_weights(self.cfg).items()}
        tokens, groups = rows["tokens"], rows["groups"]
        B = tokens.size(0)
        losses = {}
        same = positive_mates(tokens, groups, cols["tokens"], cols["groups"]) if on["itc"] or on["itm"] else None
        if on["itc"]:
            extra = {}
            if "image_m" in cols:  # the queue adds negatives; the momentum model gives soft targets over all columns
                # every slot takes part (a fixed shape, no sync); empty slots (token -1) are hidden like mates
                hidden = positive_mates(self._full_length(tokens), groups, self.token_queue, self.group_queue)
                hidden |= self.token_queue[None, :, 0] < 0
                hide = torch.cat([torch.zeros_like(same), hidden], dim=1)
                with torch.no_grad():
                    scale = self.logit_scale.exp().clamp(max=100)
                    soft = tuple((scale * q @ torch.cat([k, queue]).t()).masked_fill(hide, float("-inf")).softmax(1)
                                 for q, k, queue in ((rows["image_m"], cols["text_m"], self.text_queue),
                                                     (rows["text_m"], cols["image_m"], self.image_queue)))
                extra = dict(image_cols=self.image_queue, text_cols=self.text_queue, hidden=hidden, soft=soft,
                             alpha=alpha)
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
        if on["itm"]:  # the mean over the step's (1 + itm_negatives) B pairs; a pair without a negative adds 0
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
        """Caption images: from <bos> after the image tokens, one token at a time until every row has made
        <eos> (then <pad>) or max_new_tokens; with use_cache, only the new token runs. Returns (B, n) tokens."""
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

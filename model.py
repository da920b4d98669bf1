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

import math
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
    activation: str = "gelu"  # 'gelu' or 'quick_gelu' (OpenAI CLIP)
    layer_norm_eps: float = 1e-5
    embed_dim: int = 128  # the joint image-text space of ITC
    converter: str = "mlp"  # image tokens -> text width: 'mlp' (one token per patch)
    # loss weights: 0 switches an objective off and it costs nothing
    itc_weight: float = 1.0
    caption_weight: float = 1.0
    # pixels are normalised with these (CLIP's)
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)
    # special tokens, set from the tokenizer
    bos_id: int = 450
    eos_id: int = 449
    pad_id: int = 451


# -----------------------------------------------------------------------------
# attention masks: one rule serves all three uses of the text transformer


def attention_mask(n_prefix, q_len, k_len, q_start=0, key_valid=None, device=None):
    """Boolean mask (True = may attend) for queries at positions q_start..q_start+q_len-1
    over keys 0..k_len-1: a key is visible if it lies in the prefix or not after the query.
        causal:        n_prefix = 0
        prefix-LM:     n_prefix = number of prefix tokens (image tokens, instruction)
        bidirectional: n_prefix = k_len
    key_valid: optional (B, k_len) bool, False for padding keys. Returns (q_len, k_len) or
    (B, 1, q_len, k_len) when key_valid is given."""
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    mask = (k < n_prefix) | (k <= q)
    if key_valid is not None:
        mask = mask[None, None] & key_valid[:, None, None, :]
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

    def forward(self, x, mask=None, is_causal=False, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, L, hs): every position so far
        # flash / memory-efficient attention kernels; is_causal takes the fastest path
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):

    def __init__(self, width, hidden, activation):
        super().__init__()
        if activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"activation must be 'gelu' or 'quick_gelu', got {activation!r}")
        self.c_fc = nn.Linear(width, hidden)
        self.act = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width, n_head, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.attn = Attention(width, n_head)
        self.ln_2 = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.mlp = MLP(width, cfg.mlp_ratio * width, cfg.activation)

    def forward(self, x, mask=None, is_causal=False, cache=None):
        x = x + self.attn(self.ln_1(x), mask, is_causal, cache)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# the towers


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
        self.blocks = nn.ModuleList(Block(w, cfg.vit_heads, cfg) for _ in range(cfg.vit_layers))
        self.ln_post = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(w, cfg.embed_dim, bias=False)

    def forward(self, pixels):
        """pixels (B, 3, H, W) normalised -> tokens (B, 1 + n_patches, w) after ln_post,
        the class token first."""
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (B, P, w)
        cls = self.class_embedding.expand(x.size(0), 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


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
        self.blocks = nn.ModuleList(Block(w, cfg.text_heads, cfg) for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Linear(w, cfg.embed_dim, bias=False)
        self.lm_head = nn.Linear(w, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied, as in GPT-2

    def forward(self, tokens, prefix=None, mask="causal", key_valid=None, caches=None, pos=0):
        """tokens (B, T) at text positions pos..pos+T-1, after an optional prefix (B, M, w).
        mask: 'causal', 'prefix' (prefix visible to all, text causal) or 'bidirectional'.
        caches: one KVCache per layer when generating. Returns hidden states (B, M+T, w)."""
        x = self.token_embedding(tokens) + self.positional_embedding[pos:pos + tokens.size(1)]
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        L = x.size(1)
        past = caches[0].len if caches is not None else 0  # positions already in the cache
        attn_mask, is_causal = None, False
        if mask == "causal" and key_valid is None and past == 0:
            is_causal = True  # the fastest kernel path
        elif mask == "bidirectional" and key_valid is None:
            pass  # everything sees everything
        elif not (mask == "causal" and L == 1 and key_valid is None):  # one new token sees all before it
            n_prefix = {"causal": 0, "prefix": prefix.size(1) if prefix is not None else 0,
                        "bidirectional": past + L}[mask]
            attn_mask = attention_mask(n_prefix, L, past + L, past, key_valid, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, is_causal, caches[i] if caches is not None else None)
        return self.ln_final(x)


class MLPConverter(nn.Module):
    """ViT tokens -> text width, one token per patch: a two-layer MLP as in LLaVA-1.5."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.vit_width, cfg.text_width)
        self.act = nn.GELU()
        self.c_proj = nn.Linear(cfg.text_width, cfg.text_width)

    def forward(self, patches):
        return self.c_proj(self.act(self.c_fc(patches)))


# -----------------------------------------------------------------------------
# losses


def gather_with_grad(x):
    """Concatenate x from every rank along dim 0, keeping the gradient path to each rank's
    own rows (open_clip's gather_with_grad). Identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn
    return torch.cat(dist_fn.all_gather(x), dim=0)


def itc_loss(image_emb, text_emb, logit_scale, tokens):
    """CLIP's symmetric InfoNCE on L2-normalised embeddings, with negatives from every rank.
    Each rank scores its own rows against all columns (open_clip's local loss). Rows whose
    caption text is identical are positives of each other, the target spread evenly over
    them; with distinct captions this is exactly CLIP's loss."""
    all_image, all_text = gather_with_grad(image_emb), gather_with_grad(text_emb)
    all_tokens = gather_with_grad(tokens)  # integer: no gradient flows anyway
    scale = logit_scale.exp().clamp(max=100)
    logits_i2t = scale * image_emb @ all_text.t()  # (B, N)
    logits_t2i = scale * text_emb @ all_image.t()
    same = (tokens[:, None, :] == all_tokens[None, :, :]).all(-1).to(logits_i2t.dtype)  # (B, N) identical captions
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target)) / 2


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
        if cfg.converter != "mlp":
            raise ValueError(f"converter {cfg.converter!r} is not built yet: use 'mlp'")
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        self.text = TextTransformer(cfg)
        self.converter = MLPConverter(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.register_buffer("pixel_mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.image_std).view(1, 3, 1, 1), persistent=False)
        self.apply(self._init_weights)
        for tower, width, layers in ((self.visual, cfg.vit_width, cfg.vit_layers), (self.text, cfg.text_width, cfg.text_layers)):
            self._init_tower(tower, width, layers)

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

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def normalize_pixels(self, images):
        """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalised with the config's mean and std."""
        x = images.permute(0, 3, 1, 2).float() / 255.0
        return (x - self.pixel_mean) / self.pixel_std

    def image_tokens(self, vit_tokens):
        """ViT tokens -> the image tokens the text transformer reads (patches only)."""
        return self.converter(vit_tokens[:, 1:])

    def _image_embedding(self, vit_tokens):
        return F.normalize(self.visual.proj(vit_tokens[:, 0]), dim=-1)

    def _text_embedding(self, tokens):
        h = self.text(tokens, mask="causal")
        eos = (tokens == self.cfg.eos_id).int().argmax(-1)  # pool at the first <eos>
        pooled = h[torch.arange(tokens.size(0), device=tokens.device), eos]
        return F.normalize(self.text.text_projection(pooled), dim=-1)

    def encode_image(self, pixels):
        """pixels (B, 3, H, W) float, normalised -> (B, embed_dim) L2-normalised."""
        return self._image_embedding(self.visual(pixels))

    def encode_text(self, tokens):
        """tokens (B, T) <bos> ... <eos> <pad>... -> (B, embed_dim) L2-normalised."""
        return self._text_embedding(tokens)

    def caption_loss(self, image_tokens, tokens):
        """Prefix-LM next-token loss on the caption given the image tokens; <pad> is ignored,
        <eos> is predicted so that generation learns to stop."""
        h = self.text(tokens[:, :-1], prefix=image_tokens, mask="prefix")
        logits = self.text.lm_head(h[:, image_tokens.size(1):])  # text positions only
        targets = tokens[:, 1:].masked_fill(tokens[:, 1:] == self.cfg.pad_id, -100)
        if logits.element_size() < 4:  # bf16/fp16 logits: the softmax over the vocabulary in fp32
            logits = logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)

    def forward(self, pixels, tokens):
        """pixels (B, 3, H, W) normalised, tokens (B, T) -> dict of named losses and 'loss',
        their weighted sum. An objective whose weight is 0 is not computed."""
        cfg = self.cfg
        vit = self.visual(pixels)
        losses = {}
        if cfg.itc_weight > 0:
            losses["itc"] = itc_loss(self._image_embedding(vit), self._text_embedding(tokens), self.logit_scale, tokens)
        if cfg.caption_weight > 0:
            losses["caption"] = self.caption_loss(self.image_tokens(vit), tokens)
        weights = {"itc": cfg.itc_weight, "caption": cfg.caption_weight}
        losses["loss"] = sum(weights[k] * v for k, v in losses.items())
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

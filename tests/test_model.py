"""The model against references: explicit masks, direct formulas, the uncached path."""

import math

import pytest
import torch
import torch.nn.functional as F

import train
from model import VLM, VLMConfig, attention_mask, itc_loss, positive_mates, sample_next

CFG = VLMConfig(image_size=32, patch_size=8, vit_width=32, vit_layers=2, vit_heads=2, text_width=32, text_layers=2,
                text_heads=2, embed_dim=16, vocab_size=50, context_length=12, bos_id=47, eos_id=48, pad_id=49,
                mask_id=46, n_codes=16, queue_size=8)


def make_model(dtype=torch.float64, **changes):
    torch.manual_seed(0)
    return VLM(VLMConfig(**{**CFG.__dict__, **changes})).to(dtype).eval()


def captions(B, lengths, T=CFG.context_length):
    """<bos> random words <eos> <pad>... rows of the given lengths (words only)."""
    g = torch.Generator().manual_seed(1)
    t = torch.full((B, T), CFG.pad_id)
    for i, n in enumerate(lengths):
        t[i, 0] = CFG.bos_id
        t[i, 1:n + 1] = torch.randint(0, 40, (n,), generator=g)
        t[i, n + 1] = CFG.eos_id
    return t


def explicit_mask(kind, M, L, q_start=0, q_len=None):
    """The three masks written out position by position."""
    q_len = L if q_len is None else q_len
    mask = torch.zeros(q_len, L, dtype=torch.bool)
    for qi in range(q_len):
        i = q_start + qi
        for j in range(L):
            if kind == "bidirectional":
                mask[qi, j] = True
            elif kind == "causal":
                mask[qi, j] = j <= i
            else:  # prefix-LM: the first M positions see each other; later ones see the prefix and their past
                mask[qi, j] = j < M or j <= i
    return mask


@pytest.mark.parametrize("kind", ["causal", "prefix", "bidirectional"])
def test_attention_mask_equals_explicit_mask(kind):
    M, L = 5, 12
    n_prefix = {"causal": 0, "prefix": M, "bidirectional": L}[kind]
    assert torch.equal(attention_mask(n_prefix, L, L), explicit_mask(kind, M, L))
    # the rows of later queries, as a KV cache asks for them
    assert torch.equal(attention_mask(n_prefix, 3, L, q_start=L - 3), explicit_mask(kind, M, L, L - 3, 3))
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[1, -4:] = False
    padded = attention_mask(n_prefix, L, L, key_valid=valid)
    assert padded.shape == (2, 1, L, L)
    assert torch.equal(padded[0, 0], explicit_mask(kind, M, L))
    # a hidden key is seen by no query but itself (so that no row of the softmax is empty)
    assert torch.equal(padded[1, 0], explicit_mask(kind, M, L) & valid[1][None, :] | torch.eye(L, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["causal", "prefix", "bidirectional"])
def test_text_transformer_attention_equals_softmax_with_explicit_mask(kind):
    """Each mode of the text transformer gives the hidden states of a hand-written forward
    pass whose attention is softmax(q k^T / sqrt(d) masked) v with the explicit mask."""
    model = make_model()
    text = model.text
    B, M, T = 2, 4, 6
    prefix = None if kind == "causal" else torch.randn(B, M, CFG.text_width, dtype=torch.float64)
    tokens = captions(B, [3, 4], T)
    got = text(tokens, prefix=prefix, mask=kind)
    x = text.token_embedding(tokens) + text.positional_embedding[:T]
    if prefix is not None:
        x = torch.cat([prefix, x], 1)
    mask = explicit_mask(kind, 0 if prefix is None else M, x.size(1))
    for block in text.blocks:
        h = block.ln_1(x)
        q, k, v = block.attn.c_attn(h).split(CFG.text_width, dim=2)
        heads = lambda t: t.view(B, -1, CFG.text_heads, CFG.text_width // CFG.text_heads).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, -1, CFG.text_width)
        x = x + block.attn.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
    torch.testing.assert_close(got, text.ln_final(x), rtol=1e-10, atol=1e-10)


def test_masks_limit_what_each_position_sees():
    """Behaviour: changing a later text token never changes an earlier position under the
    causal and prefix-LM masks, and changes everything under the bidirectional mask; changing
    an image token changes every text position under prefix-LM."""
    model = make_model()
    B, M, T = 1, 4, 8
    prefix = torch.randn(B, M, CFG.text_width, dtype=torch.float64)
    a = captions(B, [6], T)
    b = a.clone()
    b[0, 5] = (a[0, 5] + 1) % 40
    for kind, p in (("causal", None), ("prefix", prefix), ("bidirectional", prefix)):
        ha, hb = model.text(a, prefix=p, mask=kind), model.text(b, prefix=p, mask=kind)
        changed = (ha - hb).abs().amax(-1)[0] > 1e-12
        first_text = 0 if p is None else M
        if kind == "bidirectional":
            assert changed.all()
        else:
            assert not changed[:first_text + 5].any() and changed[first_text + 5:].all()
    p2 = prefix.clone()
    p2[0, -1] += torch.randn(CFG.text_width, dtype=torch.float64)  # not a constant: LayerNorm removes those
    changed = (model.text(a, prefix=prefix, mask="prefix") - model.text(a, prefix=p2, mask="prefix")).abs().amax(-1)[0]
    assert (changed > 1e-12).all()


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=10),
                                      dict(temperature=0.8, top_p=0.9), dict(temperature=1.5)])
def test_kv_cache_generation_equals_uncached(sampling):
    model = make_model()
    pixels = torch.randn(4, 3, CFG.image_size, CFG.image_size, dtype=torch.float64)
    out = [model.generate(pixels, use_cache=cached, generator=torch.Generator().manual_seed(7), **sampling)
           for cached in (True, False)]
    assert out[0].shape == out[1].shape and out[0].size(1) > 1
    assert torch.equal(out[0], out[1])


def test_generation_stops_at_eos_and_pads_finished_rows():
    model = make_model()
    pixels = torch.randn(8, 3, CFG.image_size, CFG.image_size, dtype=torch.float64)
    out = model.generate(pixels, temperature=1.0, generator=torch.Generator().manual_seed(0))
    for row in out.tolist():
        if CFG.eos_id in row:
            after = row[row.index(CFG.eos_id) + 1:]
            assert all(t == CFG.pad_id for t in after)
    # make <eos> the most likely token everywhere: every row stops after one token
    with torch.no_grad():
        model.text.ln_final.weight.zero_()
        model.text.ln_final.bias.copy_(model.text.token_embedding.weight[CFG.eos_id] * 10)
    assert torch.equal(model.generate(pixels), torch.full((8, 1), CFG.eos_id))


def test_sample_next_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits).item() == 0
    draw = lambda **kw: {sample_next(logits, generator=g, **kw).item() for _ in range(300)}  # noqa: E731
    assert draw(temperature=1.0, top_k=1) == {0}
    assert draw(temperature=1.0, top_p=1e-6) == {0}
    assert draw(temperature=1.0, top_k=2) == {0, 1}
    assert draw(temperature=1.0, top_p=0.7) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert draw(temperature=1.0, top_p=0.85) == {0, 1, 2}
    # temperature: frequencies follow softmax(logits / T)
    big = logits.expand(20000, -1)
    counts = torch.bincount(sample_next(big, temperature=2.0, generator=g), minlength=4).double() / 20000
    torch.testing.assert_close(counts, (logits[0].double() / 2.0).softmax(-1), atol=0.015, rtol=0)


def test_itc_loss_equals_the_formula():
    torch.manual_seed(0)
    B = 6
    img = F.normalize(torch.randn(B, 8, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(B, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    tokens = torch.arange(B)[:, None].repeat(1, 3)  # all captions different

    def reference(targets):
        s = math.exp(scale.item())
        total = 0.0
        for i in range(B):
            row = [s * (img[i] @ txt[j]).item() for j in range(B)]
            col = [s * (txt[i] @ img[j]).item() for j in range(B)]
            lse_r, lse_c = math.log(sum(map(math.exp, row))), math.log(sum(map(math.exp, col)))
            total += sum(targets[i][j] * (lse_r - row[j]) + targets[i][j] * (lse_c - col[j]) for j in range(B)) / 2
        return total / B

    mates = lambda t: positive_mates(t, None, t, None)  # noqa: E731
    eye = [[float(i == j) for j in range(B)] for i in range(B)]
    assert math.isclose(itc_loss(img, txt, scale, mates(tokens)).item(), reference(eye), rel_tol=1e-12)
    # captions 0, 1 and 4 are the same text: each is a positive of the others, weight 1/3
    tokens[1] = tokens[0]
    tokens[4] = tokens[0]
    group = {0, 1, 4}
    soft = [[(1 / 3 if j in group else 0.0) if i in group else float(i == j) for j in range(B)] for i in range(B)]
    assert math.isclose(itc_loss(img, txt, scale, mates(tokens)).item(), reference(soft), rel_tol=1e-12)
    # the temperature is clamped at 100
    big = torch.tensor(math.log(1000.0), dtype=torch.float64)
    assert math.isclose(itc_loss(img, txt, big, mates(tokens)).item(),
                        itc_loss(img, txt, torch.tensor(math.log(100.0), dtype=torch.float64), mates(tokens)).item(),
                        rel_tol=1e-12)


def test_logit_scale_starts_at_the_configured_temperature():
    # the parameter is created in float32 (then the test model is cast to float64)
    assert math.isclose(make_model().logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)  # CLIP's, the default
    assert math.isclose(make_model(itc_temperature=0.03).logit_scale.exp().item(), 1 / 0.03, rel_tol=1e-6)


def test_encoders_are_normalised_and_pool_at_eos():
    model = make_model()
    tokens = captions(3, [2, 5, 9])
    emb = model.encode_text(tokens)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    # whatever follows <eos> does not change the embedding
    noisy = tokens.clone()
    noisy[0, 4:] = 7
    torch.testing.assert_close(model.encode_text(noisy)[0], emb[0], rtol=0, atol=1e-12)
    # and the pooled position is the <eos>: the hidden state there, projected
    h = model.text(tokens, mask="causal")
    ref = F.normalize(model.text.text_projection(h[1, 6]), dim=-1)
    torch.testing.assert_close(emb[1], ref)
    pixels = torch.randn(2, 3, CFG.image_size, CFG.image_size, dtype=torch.float64)
    torch.testing.assert_close(model.encode_image(pixels).norm(dim=-1), torch.ones(2, dtype=torch.float64))


def test_caption_loss_equals_the_log_likelihood_from_incremental_decoding():
    """Teacher forcing over the whole caption equals the mean negative log-likelihood of its
    tokens computed one token at a time through the KV cache (an independent path)."""
    from model import KVCache
    model = make_model()
    pixels = torch.randn(2, 3, CFG.image_size, CFG.image_size, dtype=torch.float64)
    tokens = captions(2, [3, 6])
    image_tokens = model.image_tokens(model.visual(pixels))
    loss = model.caption_loss(image_tokens, tokens)
    nll, count = 0.0, 0
    for b in range(2):
        caches = [KVCache(1, CFG.text_heads, 32, CFG.text_width // CFG.text_heads, "cpu", torch.float64)
                  for _ in range(CFG.text_layers)]
        h = model.text(tokens[b:b + 1, :1], prefix=image_tokens[b:b + 1], mask="prefix", caches=caches)
        t = 1
        while True:
            logp = model.text.lm_head(h[0, -1]).log_softmax(-1)
            nll -= logp[tokens[b, t]].item()
            count += 1
            if tokens[b, t] == CFG.eos_id:
                break
            h = model.text(tokens[b:b + 1, t:t + 1], caches=caches, pos=t)
            t += 1
    assert math.isclose(loss.item(), nll / count, rel_tol=1e-9)


def test_zero_weight_switches_an_objective_off():
    model = make_model(dtype=torch.float32, itc_weight=0.0, itm_weight=0.0, mlm_weight=0.0, moc_weight=0.0,
                       rtd_weight=0.0, r2d_weight=0.0)
    pixels = torch.randn(2, 3, CFG.image_size, CFG.image_size)
    losses = model(pixels, captions(2, [3, 4]))
    assert set(losses) == {"caption", "loss"}
    losses["loss"].backward()
    assert model.text.text_projection.weight.grad is None and model.logit_scale.grad is None
    assert model.visual.conv1.weight.grad is not None


def test_vit_is_built_as_in_clip():
    model = make_model()
    v = model.visual
    assert v.conv1.bias is None and v.conv1.stride == (CFG.patch_size, CFG.patch_size)
    n_patches = (CFG.image_size // CFG.patch_size) ** 2
    assert v.positional_embedding.shape == (n_patches + 1, CFG.vit_width)
    pixels = torch.randn(2, 3, CFG.image_size, CFG.image_size, dtype=torch.float64)
    assert v(pixels).shape == (2, n_patches + 1, CFG.vit_width)
    assert model.image_tokens(v(pixels)).shape == (2, n_patches, CFG.text_width)
    assert model.text.lm_head.weight is model.text.token_embedding.weight


def test_quick_gelu_is_x_sigmoid_1702x_with_its_gradient():
    from model import QuickGELU
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64, requires_grad=True)
    y = QuickGELU()(x)
    torch.testing.assert_close(y, x * torch.sigmoid(1.702 * x), rtol=1e-12, atol=1e-15)
    (grad,) = torch.autograd.grad(y.sum(), x)
    s = torch.sigmoid(1.702 * x)
    torch.testing.assert_close(grad, s + 1.702 * x * s * (1 - s), rtol=1e-12, atol=1e-15)


def test_image_positions_add_a_learned_position_to_each_image_token():
    model = make_model(image_positions=True)
    c, P = model.converter, (CFG.image_size // CFG.patch_size) ** 2
    vit = torch.randn(2, 1 + P, CFG.vit_width, dtype=torch.float64)
    plain = c.c_proj(F.gelu(c.c_fc(vit[:, 1:])))
    torch.testing.assert_close(model.image_tokens(vit), plain + c.positional_embedding)
    grid = CFG.image_size // CFG.patch_size
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(CFG.text_width // 4) / (CFG.text_width // 4))
    x, y = cols.flatten()[:, None] * omega, rows.flatten()[:, None] * omega  # MAE's map, written out
    torch.testing.assert_close(c.positional_embedding, 0.05 * torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], 1).double())
    assert make_model().converter.positional_embedding is None
    with pytest.raises(SystemExit, match="image_positions"):
        train.validate(train.TrainConfig(model=VLMConfig(**{**CFG.__dict__, "image_positions": True, "converter": "resampler"})))


def test_image_axes_add_each_tokens_row_and_column():
    model = make_model(image_axes=True)
    c, n = model.converter, CFG.image_size // CFG.patch_size
    assert not c.c_axes.weight.any()  # the plain converter at the start
    torch.nn.init.normal_(c.c_axes.weight, std=0.1)
    vit = torch.randn(2, 1 + n * n, CFG.vit_width, dtype=torch.float64)
    p = vit[:, 1:]
    expected = torch.empty(2, n * n, CFG.text_width, dtype=torch.float64)
    for i in range(n * n):  # patch i sits in row i // n, column i % n
        r, k = divmod(i, n)
        row = p[:, [j for j in range(n * n) if j // n == r]].mean(1)
        col = p[:, [j for j in range(n * n) if j % n == k]].mean(1)
        left = sum((p[:, r * n + j] for j in range(k)), torch.zeros_like(row)) / n
        above = sum((p[:, j * n + k] for j in range(r)), torch.zeros_like(row)) / n
        expected[:, i] = c.c_proj(F.gelu(c.c_fc(p[:, i]) + c.c_axes(torch.cat([row, col, left, above], -1))))
    torch.testing.assert_close(model.image_tokens(vit), expected)
    assert make_model().converter.c_axes is None
    with pytest.raises(SystemExit, match="image_axes"):
        train.validate(train.TrainConfig(model=VLMConfig(**{**CFG.__dict__, "image_axes": True, "converter": "resampler"})))

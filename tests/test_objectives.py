"""The pretraining objectives against references: hard-negative sampling, ELECTRA's masking,
replacement and labels, the shared embedding table, the EMA formula, ITC with the momentum
queue, and ROC-AUC."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import train
from eval import roc_auc
from model import VLMConfig, hard_negatives, itc_loss, patchify, positive_mates, unpatchify
from test_model import CFG, captions, make_model


def images_and_codes(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(B, 3, CFG.image_size, CFG.image_size, generator=g, dtype=torch.float64)
    P = (CFG.image_size // CFG.patch_size) ** 2
    return pixels, torch.randint(0, CFG.n_codes, (B, P), generator=g)


# -----------------------------------------------------------------------------
# ITM hard negatives


def test_hard_negatives_never_draw_a_positive_or_an_identical_caption():
    g = torch.Generator().manual_seed(0)
    tokens = captions(6, [2, 3, 2, 4, 3, 2])
    tokens[3] = tokens[0]  # rows 0 and 3 are the same caption
    same = positive_mates(tokens, None, tokens, None)
    assert same[0, 3] and same[3, 0] and same.sum() == 6 + 2
    logits = torch.randn(6, 6, generator=g)
    logits[0, 3] = logits[3, 0] = 50.0  # the identical caption is by far the most similar
    logits.fill_diagonal_(60.0)
    for _ in range(300):
        idx, valid = hard_negatives(logits, same, g)
        assert valid.all() and not same[torch.arange(6), idx].any()


def test_hard_negatives_follow_the_softmax_over_the_candidates():
    g = torch.Generator().manual_seed(1)
    n = 40000
    logits = torch.tensor([[5.0, 0.0, 1.0, 2.0]]).repeat(n, 1)
    same = torch.tensor([[True, False, False, False]]).repeat(n, 1)
    idx, valid = hard_negatives(logits, same, g)
    assert valid.all()
    freq = torch.bincount(idx, minlength=4).double() / n
    expected = torch.tensor([0.0, *torch.tensor([0.0, 1.0, 2.0]).softmax(0).tolist()], dtype=torch.float64)
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


@pytest.mark.parametrize("negatives", [0.5, 1, 2])
def test_pretraining_draws_itm_negatives_at_the_itc_temperature(monkeypatch, negatives):
    """The step's hard negatives are drawn with probability softmax(exp(logit_scale) * cos) over
    the candidates (ALBEF), not softmax(cos). The pairs after the B matched ones: with 2 negatives
    every image with a negative text, then every text with a negative image; with 1, row i pairs
    its image with a negative text for even i, its text with a negative image for odd i; with
    0.5, the same for the even rows only (negative texts where i % 4 == 0)."""
    import model as model_module
    drawn, fused = [], []
    real = model_module.hard_negatives
    monkeypatch.setattr(model_module, "hard_negatives", lambda logits, same, **kw: drawn.append((logits, same)) or
                        real(logits, same, **kw))
    model = make_model(mlm_weight=0, moc_weight=0, rtd_weight=0, r2d_weight=0, momentum_alpha=0, caption_weight=0,
                       itm_negatives=negatives)
    model.logit_scale.data.fill_(math.log(30.0))
    real_fuse = model.fuse
    monkeypatch.setattr(model, "fuse", lambda image, text: fused.append(text) or real_fuse(image, text))
    B = 6
    tokens = captions(B, [2, 3, 4, 5, 3, 2])
    pixels, _ = images_and_codes(B)
    noise = model_module.draw_noise(model.cfg, B, tokens.size(1))
    model(pixels, tokens, noise=noise)
    with torch.no_grad():
        cos = model.encode_image(pixels) @ model.encode_text(tokens).t()
    (logits_t, same), (logits_i, _) = drawn
    for logits, sim in ((logits_t, cos), (logits_i, cos.t())):
        u = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000  # the draw as a function of its uniform
        idx, _ = real(logits[:1].expand(len(u), -1), same[:1].expand(len(u), -1), u=u)
        freq = torch.bincount(idx, minlength=B).double() / len(u)
        expected = (30.0 * sim[0]).masked_fill(same[0], float("-inf")).softmax(0)
        torch.testing.assert_close(freq, expected, atol=1e-4, rtol=0)
    neg_t, _ = real(logits_t, same, u=noise["neg_text"])
    if negatives == 2:
        expected = [tokens[neg_t], tokens]
    else:
        period = round(2 / negatives)
        expected = [tokens[neg_t[i]] if i % period == 0 else tokens[i] for i in range(0, B, period // 2)]
    assert torch.equal(fused[0][B:], torch.cat(expected) if negatives == 2 else torch.stack(expected))


@pytest.mark.parametrize("fused_rows", [1, 0.5])
def test_itm_clean_pairs_the_clean_image_and_text_and_electra_reads_its_rows(monkeypatch, fused_rows):
    """With itm_clean the fused pass reads the replaced pairs first (RTD, R2D), then ITM's
    matched pairs: the clean image tokens and clean text; ITM's loss is that of its own rows.
    With fused_rows 0.5 all of them are the batch's rows 0, 2, 4 (ELECTRA replaces those only)."""
    import model as model_module
    model = make_model(itc_weight=0, caption_weight=0, momentum_alpha=0, itm_clean=True, fused_rows=fused_rows)
    fused = []
    real_fuse = model.fuse
    monkeypatch.setattr(model, "fuse", lambda image, text: fused.append((image, text)) or real_fuse(image, text))
    B = 6
    tokens = captions(B, [2, 3, 4, 5, 3, 2])
    pixels, codes = images_and_codes(B)
    noise = model_module.draw_noise(model.cfg, B, tokens.size(1))
    noise["text_mask"][:, 1] = noise["patch_mask"][:, 0] = 0.0  # every row has a masked word and patch
    losses = model(pixels, tokens, codes, noise=noise)
    rows = slice(None, None, round(1 / fused_rows))
    n = len(range(B)[rows])
    sliced = {k: v[rows] for k, v in noise.items()}
    E = model.electra_inputs(pixels[rows], tokens[rows], codes[rows], noise=sliced)
    (image, text), = fused
    torch.testing.assert_close(image[:n], model.image_tokens(model.visual(E["pixels"])))
    assert torch.equal(text[:n], E["tokens"]) and E["text_mask"][:, 1].all()
    torch.testing.assert_close(image[n:2 * n], model.image_tokens(model.visual(pixels))[rows])
    assert torch.equal(text[n:2 * n], tokens[rows]) and image.size(0) == 3 * n
    h = real_fuse(image, text)
    labels = torch.tensor([1] * n + [0] * n)
    torch.testing.assert_close(losses["itm"], F.cross_entropy(model.itm_head(h[n:, image.size(1)]), labels))


@pytest.mark.parametrize("shared", [False, True])
def test_fused_vit_grad_false_keeps_the_fused_losses_out_of_the_vit(shared):
    """With fused_vit_grad off, ITM, RTD and R2D train the converter and the text transformer
    but not the ViT; on, they reach it (through ELECTRA's second ViT pass, or the shared one)."""
    B = 4
    tokens = captions(B, [2, 3, 4, 5])
    pixels, codes = images_and_codes(B)
    for on in (True, False):
        model = make_model(itc_weight=0, mlm_weight=0, moc_weight=0, caption_weight=0, momentum_alpha=0,
                           shared_vit_pass=shared, fused_vit_grad=on).train()
        model(pixels, tokens, codes)["loss"].backward()
        vit = [p.grad for p in model.visual.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert bool(vit) == on
        assert model.converter.c_fc.weight.grad.abs().sum() > 0 and model.text.blocks[0].attn.c_attn.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("B", [1, 5])
def test_a_row_without_candidates_is_flagged_not_nan(B):
    tokens = captions(1, [3]).repeat(B, 1)  # a batch of one, or of identical captions
    same = positive_mates(tokens, None, tokens, None)
    idx, valid = hard_negatives(torch.randn(B, B), same)
    assert not valid.any() and torch.equal(idx, torch.arange(B))
    model = make_model(dtype=torch.float32)
    pixels, codes = images_and_codes(B)
    losses = model(pixels.float(), tokens, codes)
    assert all(torch.isfinite(v) for v in losses.values())
    # the ITM loss is then the positives' alone
    assert losses["itm"] > 0


def test_groups_make_paraphrases_positives():
    tokens = captions(4, [2, 3, 4, 5])
    groups = torch.tensor([7, 7, -1, -1])  # -1: nothing known, only identical text counts
    same = positive_mates(tokens, groups, tokens, groups)
    assert same.tolist() == [[True, True, False, False], [True, True, False, False],
                             [False, False, True, False], [False, False, False, True]]


# -----------------------------------------------------------------------------
# ELECTRA


def test_patchify_matches_the_data_layout_and_round_trips():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, CFG.image_size, CFG.image_size, 3), dtype=np.uint8)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
    ours = patchify(pixels, CFG.patch_size)
    np.testing.assert_allclose(ours.numpy(), data.patchify(images, CFG.patch_size), rtol=0, atol=1e-7)
    assert torch.equal(unpatchify(ours, CFG.patch_size), pixels)
    # patch k is the k-th token of the ViT's patch conv (row-major)
    model = make_model()
    conv = model.visual.conv1(pixels).flatten(2).transpose(1, 2)
    w = model.visual.conv1.weight.permute(0, 2, 3, 1).reshape(CFG.vit_width, -1)  # (out, row, column, channel)
    torch.testing.assert_close(conv, ours @ w.t())


def test_masking_never_touches_special_tokens():
    model = make_model(text_mask_rate=0.5, patch_mask_rate=0.5)
    tokens = captions(64, [1 + i % 9 for i in range(64)])
    pixels, codes = images_and_codes(64)
    E = model.electra_inputs(pixels, tokens, codes, rng=torch.Generator().manual_seed(0))
    special = (tokens == CFG.bos_id) | (tokens == CFG.eos_id) | (tokens == CFG.pad_id)
    assert not E["text_mask"][special].any()
    rate = E["text_mask"].sum() / (~special).sum()
    assert 0.4 < rate < 0.6 and 0.4 < E["patch_mask"].float().mean() < 0.6


def test_mlm_reads_the_generator_at_the_masked_tokens_only():
    """The MLM loss with momentum targets equals its formula over the generator's logits at every position,
    read at the masked tokens; a row masks at most mask_slots of its tokens, the first ones."""
    import model as model_module
    model = make_model(itc_weight=0, itm_weight=0, moc_weight=0, rtd_weight=0, r2d_weight=0, caption_weight=0,
                       momentum_alpha=0.4)
    B, K = 6, model_module.mask_slots(model.cfg, CFG.context_length)
    tokens = captions(B, [10, 9, 3, 1, 6, 10])
    pixels, codes = images_and_codes(B)
    noise = model_module.draw_noise(model.cfg, B, tokens.size(1), torch.Generator().manual_seed(0))
    noise["text_mask"][0] = 0.0  # row 0 draws all 10 of its words
    E = model.electra_inputs(pixels, tokens, codes, noise=noise)
    assert K == 7 and E["text_mask"][0].tolist() == [False] + [True] * K + [False] * 4
    assert E["text_mask"][1:].sum() > 0
    every = torch.arange(tokens.size(1)).expand(B, -1)
    logp = model.generator(*E["gen_input"][:3], every)[0].log_softmax(-1)
    soft = model.momentum.generator(*E["gen_input"][:3], every)[0].softmax(-1)
    nll = -logp.gather(-1, tokens[..., None]).squeeze(-1)
    want = (0.6 * nll - 0.4 * (soft * logp).sum(-1))[E["text_mask"]].mean()
    torch.testing.assert_close(model(pixels, tokens, codes, noise=noise, alpha=0.4)["mlm"], want)


def test_replacement_and_labels_follow_the_samples():
    """The generator is made to put all its probability on a chosen token (code): the
    original at even positions, another one at odd positions. The replaced inputs and the
    RTD/R2D labels must follow position by position, a sample equal to the original
    counting as original and leaving its token or patch as it was."""
    model = make_model(text_mask_rate=0.6, patch_mask_rate=0.6)
    model.codebook.copy_(torch.rand(CFG.n_codes, 3 * CFG.patch_size ** 2))
    B = 8
    tokens = captions(B, [3, 5, 7, 9, 2, 4, 6, 8])
    pixels, codes = images_and_codes(B)
    T, P = tokens.size(1), codes.size(1)
    odd_t, odd_p = torch.arange(T) % 2 == 1, torch.arange(P) % 2 == 1
    want_tokens = torch.where(odd_t, (tokens + 1) % 40, tokens)
    want_codes = torch.where(odd_p, (codes + 1) % CFG.n_codes, codes)

    def fake_generator(patches, patch_mask, masked_tokens, slots):
        mlm = F.one_hot(want_tokens.gather(1, slots), CFG.vocab_size).double() * 200.0
        moc = F.one_hot(want_codes, CFG.n_codes).double() * 200.0
        return mlm.requires_grad_(), moc.requires_grad_()

    model.generator.forward = fake_generator
    E = model.electra_inputs(pixels, tokens, codes, rng=torch.Generator().manual_seed(0))
    tm, pm = E["text_mask"], E["patch_mask"]
    assert tm.any() and pm.any() and (tm & ~odd_t).any() and (pm & ~odd_p).any()
    assert torch.equal(E["tokens"], torch.where(tm, want_tokens, tokens))
    assert torch.equal(E["rtd_label"], E["tokens"] != tokens)
    assert torch.equal(E["rtd_label"], tm & odd_t)
    assert torch.equal(E["r2d_label"], pm & odd_p)
    # replaced patches hold their sampled centroid's pixels (normalised), the others are untouched
    p = CFG.patch_size
    mean = torch.tensor(CFG.image_mean, dtype=torch.float64).repeat(p * p)
    std = torch.tensor(CFG.image_std, dtype=torch.float64).repeat(p * p)
    centroid = (model.codebook[want_codes] - mean) / std
    torch.testing.assert_close(patchify(E["pixels"], p), torch.where((pm & odd_p)[..., None], centroid, patchify(pixels, p)))


def test_generator_reads_and_writes_the_main_embedding_table():
    model = make_model(dtype=torch.float32)
    table = model.text.token_embedding.weight
    assert model.generator.token_embedding.weight is table
    assert model.generator.token_embedding.weight.data_ptr() == table.data_ptr()
    assert (model.generator.mlm_head.out_features == CFG.text_width
            and CFG.text_width // (model.generator.embed_proj.out_features) >= 4)
    with pytest.raises(SystemExit, match="quarter"):
        train.validate(train.TrainConfig(model=VLMConfig(**{**CFG.__dict__, "gen_width": CFG.text_width // 2})))
    # the MLM loss alone trains the shared table
    model = make_model(dtype=torch.float32, itc_weight=0, itm_weight=0, moc_weight=0, rtd_weight=0, r2d_weight=0,
                       caption_weight=0, momentum_alpha=0, text_mask_rate=0.5)
    pixels, codes = images_and_codes(4)
    model(pixels.float(), captions(4, [5, 6, 7, 8]), codes)["loss"].backward()
    assert model.text.token_embedding.weight.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# momentum distillation


def test_ema_update_equals_the_formula():
    model = make_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.momentum.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    before = [p.clone() for p in model.momentum.parameters()]
    online = list(model._online().parameters())
    assert len(online) == len(before) and model.momentum.generator.token_embedding.weight is model.momentum.text.token_embedding.weight
    model.momentum_update()
    for old, new, p in zip(before, model.momentum.parameters(), online):
        torch.testing.assert_close(new, 0.995 * old + 0.005 * p, rtol=0, atol=1e-12)


def test_itc_with_queue_and_soft_targets_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    B, Q, D = 3, 4, 5
    unit = lambda *s: F.normalize(torch.randn(*s, D, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    img, txt, qi, qt = unit(B), unit(B), unit(Q), unit(Q)
    same = torch.eye(B, dtype=torch.bool)
    hidden = torch.zeros(B, Q, dtype=torch.bool)
    hidden[1, 2] = True  # a queued caption identical to caption 1: left out of row 1's softmax
    soft_i2t = torch.rand(B, B + Q, generator=g, dtype=torch.float64).softmax(1)
    soft_t2i = torch.rand(B, B + Q, generator=g, dtype=torch.float64).softmax(1)
    for soft in (soft_i2t, soft_t2i):  # the model gives hidden columns no soft mass either
        soft[1, B + 2] = 0.0
        soft /= soft.sum(1, keepdim=True)
    scale, alpha = torch.tensor(math.log(20.0), dtype=torch.float64), 0.3
    loss = itc_loss(img, txt, scale, same, qi, qt, hidden, (soft_i2t, soft_t2i), alpha)
    cols_t, cols_i = torch.cat([txt, qt]), torch.cat([img, qi])
    ref = 0.0
    for i in range(B):
        keep = [j for j in range(B + Q) if not (j >= B and hidden[i, j - B])]
        for q, cols, soft in ((img[i], cols_t, soft_i2t), (txt[i], cols_i, soft_t2i)):
            logits = {j: 20.0 * (q @ cols[j]).item() for j in keep}
            lse = math.log(sum(math.exp(v) for v in logits.values()))
            ref += sum((alpha * soft[i, j].item() + (1 - alpha) * float(i == j)) * (lse - logits[j]) for j in keep) / 2
    assert math.isclose(loss.item(), ref / B, rel_tol=1e-12)
    # no queue and alpha 0: CLIP's loss
    plain = itc_loss(img, txt, scale, same)
    empty = itc_loss(img, txt, scale, same, qi[:0], qt[:0], hidden[:, :0], (soft_i2t[:, :B], soft_t2i[:, :B]), 0.0)
    assert math.isclose(empty.item(), plain.item(), rel_tol=1e-12)


def test_queue_is_a_ring_of_the_latest_momentum_features():
    model = make_model(dtype=torch.float32)  # queue_size 8
    seen = []
    for step in range(4):
        tokens = captions(3, [2 + step, 3, 4])
        pixels, codes = images_and_codes(3, seed=step)
        with torch.no_grad():
            want = model._image_embedding(model.momentum.visual, model.momentum.visual(pixels.float()))
        model(pixels.float(), tokens, codes, alpha=0.4)
        seen += list(want)
        assert int(model.queue_filled) == min(8, 3 * (step + 1))
    # 12 rows went in; the ring holds the last 8, the slot after the pointer being the oldest
    ptr = int(model.queue_ptr)
    ring = torch.cat([model.image_queue[ptr:], model.image_queue[:ptr]])
    torch.testing.assert_close(ring, torch.stack(seen[-8:]))


# -----------------------------------------------------------------------------
# switches and metrics


@pytest.mark.parametrize("on", ["itc", "itm", "mlm", "rtd", "caption"])
def test_each_objective_alone_runs_only_its_own_parts(on):
    weights = {k: 0.0 for k in ("itc_weight", "itm_weight", "mlm_weight", "moc_weight", "rtd_weight", "r2d_weight",
                                "caption_weight")}
    weights[f"{on}_weight"] = 1.0
    model = make_model(dtype=torch.float32, momentum_alpha=0, **weights)
    calls = {"generator": 0, "fuse": 0}
    for name in calls:
        module_fn = getattr(model, name).forward if name == "generator" else model.fuse

        def counted(*a, _name=name, _fn=module_fn, **k):
            calls[_name] += 1
            return _fn(*a, **k)
        if name == "generator":
            model.generator.forward = counted
        else:
            model.fuse = counted
    pixels, codes = images_and_codes(4)
    losses = model(pixels.float(), captions(4, [2, 3, 4, 5]), codes)
    assert on in losses and losses["loss"].item() == pytest.approx(losses[on].item())
    assert (calls["generator"] > 0) == (on in ("mlm", "rtd"))
    assert (calls["fuse"] > 0) == (on in ("itm", "rtd"))


def test_roc_auc_equals_the_pairwise_count():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 200).astype(float)  # many ties
    labels = rng.random(200) < 0.3
    pairs = [(1.0 if s > t else 0.5 if s == t else 0.0) for s, t in
             itertools.product(scores[labels], scores[~labels])]
    assert math.isclose(roc_auc(scores, labels), float(np.mean(pairs)), rel_tol=1e-12)
    assert roc_auc([0.1, 0.9], [False, True]) == 1.0 and math.isnan(roc_auc([0.1, 0.2], [True, True]))


def test_inverse_cdf_sampling_never_draws_a_zero_weight():
    """u at 0 and just below 1 (where u * total can round up to the total) land on the first
    and last entries of non-zero weight; u in between follows the cumulative sums."""
    from model import sample_index
    weights = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0]] * 5)
    u = torch.tensor([0.0, 0.299, 0.3, 0.5, 1.0 - 2 ** -24])
    assert sample_index(weights, u).tolist() == [1, 1, 3, 3, 3]
    big = torch.full((1, 1000), 1e-3)
    big[0, -1] = 0.0
    assert sample_index(big, torch.tensor([1.0 - 2 ** -24])).item() == 998

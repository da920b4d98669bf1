"""bfloat16 autocast, the GPU's training dtype, on the CPU: a tiny run trains, and every score that
ranks or thresholds (retrieval embeddings, ITM margins and so CapFilt's filter, prompt score maps)
is computed in float32 from the autocast states, against a float64 reference of the same heads."""

import json
import os

import torch
import torch.nn.functional as F

import test_prompt
import train
from eval import itm_margins
from model import VLM
from test_model import CFG, captions

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def test_tiny_run_trains_in_bfloat16(tmp_path, world_root, tiny_world):
    out = str(tmp_path / "run")
    train.main(["--config", "tiny", f"--out_dir={out}", f"--data_dir={world_root}", "--dtype=bfloat16",
                "--max_iters=40"])
    steps = [d for d in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in d]
    assert steps[-1]["step"] == 40 and steps[-1]["caption"] < 0.9 * steps[0]["caption"]
    assert all(torch.isfinite(torch.tensor(d["loss"])) for d in steps)
    metrics = json.load(open(os.path.join(out, "eval.json")))
    assert 0 <= metrics["retrieval_i2t_r1"] <= 1 and 0 <= metrics["itm_auc"] <= 1


def model_and_inputs():
    torch.manual_seed(0)
    model = VLM(CFG).eval()
    pixels = torch.randn(4, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(0))
    return model, pixels, captions(4, [3, 5, 1, 8])


def assert_float32_of(got, want):
    """got is float32 and equals the float64 reference to float32 rounding (a bfloat16 head is ~1e-2 off)."""
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_embeddings_are_float32_projections_of_the_autocast_states():
    model, pixels, tokens = model_and_inputs()
    with BF16:
        image_emb, text_emb = model.encode_image(pixels), model.encode_text(tokens)
        vit, h = model.visual(pixels), model.text(tokens)
    assert (vit - model.visual(pixels)).abs().max() > 1e-3  # the tower did run in bfloat16
    eos = (tokens == CFG.eos_id).int().argmax(-1)
    assert_float32_of(image_emb, F.normalize(vit[:, 0].double() @ model.visual.proj.weight.double().t(), dim=-1))
    assert_float32_of(text_emb, F.normalize(h[torch.arange(4), eos].double() @ model.text.text_projection.weight.double().t(),
                                            dim=-1))


@torch.no_grad()
def test_itm_margins_are_float32_from_the_autocast_fused_state():
    model, pixels, tokens = model_and_inputs()
    with BF16:
        image_tokens = model.image_tokens(model.visual(pixels))
        h = model.fuse(image_tokens, tokens)[:, image_tokens.size(1)]
    pairs = torch.tensor([[0, 0], [1, 2], [3, 1]])
    margin = itm_margins(model, image_tokens, tokens, pairs, "cpu", ctx=BF16)
    w, b = model.itm_head.weight.double(), model.itm_head.bias.double()
    with BF16:
        h = model.fuse(image_tokens[pairs[:, 0]], tokens[pairs[:, 1]])[:, image_tokens.size(1)]
    logits = h.double() @ w.t() + b
    assert_float32_of(margin, logits[:, 1] - logits[:, 0])


@torch.no_grad()
def test_prompt_score_maps_are_float32_cosines_of_the_autocast_states():
    model = test_prompt.make_model().float()
    x = test_prompt.pixels().float()
    class_emb = model.class_embeddings(captions(3, [2, 1, 3]))
    with BF16:
        fused, maps = model.score_maps(x, class_emb)
        states = model.vit_states(x, model.prompt.image_prompts())
    v, g = model.visual, 4
    scale = model.logit_scale.exp().double()
    for layer, got in zip(model.prompt.dense_layers, maps):
        patches = F.normalize(v.ln_post(states[layer - 1][:, 1:]).double() @ v.proj.weight.double().t(), dim=-1)
        assert_float32_of(got, scale * (patches @ class_emb.double().t()).transpose(1, 2).unflatten(2, (g, g)))
    assert fused.dtype == torch.float32

"""Few-shot detection with coupled prompt vectors (M12) against references: towers written out
with the prompts spliced in by hand, hand-computed boxes, IoU and AP, and the frozen backbone
checked bit for bit after a run of the stage."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train
from model import VLM, VLMConfig
from prompt import (PromptVLM, anchor_boxes, average_precision, box_iou, class_iou_counts, patch_targets,
                    refine_masks)
from test_model import CFG, captions
from conftest import ROOT
from test_sample_eval import run_sample

PCFG = VLMConfig(**{**CFG.__dict__, "prompt": True, "n_ctx": 3, "text_prompt_depth": 2, "image_prompt_depth": 2,
                    "dense_layers": "1,2", "momentum_alpha": 0.0})


def make_model(**changes):
    torch.manual_seed(0)
    model = PromptVLM(VLMConfig(**{**PCFG.__dict__, **changes})).double().eval()
    with torch.no_grad():  # prompts away from their start, so that every path is exercised
        for p in model.prompt.parameters():
            p.normal_()
    return model


def pixels(B=3, seed=0):
    return torch.randn(B, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def test_no_prompts_leave_the_frozen_model_bit_identical():
    torch.manual_seed(0)
    plain = VLM(VLMConfig(**{**CFG.__dict__, "momentum_alpha": 0.0})).eval()
    prompted = PromptVLM(VLMConfig(**{**PCFG.__dict__, "text_prompt_depth": 0, "image_prompt_depth": 0})).eval()
    prompted.load_state_dict(plain.state_dict(), strict=False)
    x, tokens = pixels().float(), captions(4, [3, 5, 1, 8])
    assert torch.equal(prompted.visual.ln_post(prompted.vit_states(x, prompted.prompt.image_prompts())[-1]), plain.visual(x))
    assert torch.equal(prompted.class_embeddings(tokens), plain.encode_text(tokens))
    assert torch.equal(prompted.encode_image(x), plain.encode_image(x))
    assert sum(p.numel() for p in prompted.prompt.parameters()) == 2  # the fusion logits alone


def reference_vit_states(model, x, prompts):
    """The ViT written out: the first prompts appended after the patches before ln_pre, each
    later layer's replacing the last n tokens before its block; states without the prompts."""
    v = model.visual
    h = v.conv1(x).flatten(2).transpose(1, 2)
    h = torch.cat([v.class_embedding.expand(len(x), 1, -1), h], 1) + v.positional_embedding
    L, n = h.size(1), prompts[0].size(0)
    h = v.ln_pre(torch.cat([h, prompts[0].expand(len(x), -1, -1)], 1))
    states = []
    for i, block in enumerate(v.blocks):
        if 0 < i < len(prompts):
            h = torch.cat([h[:, :L], prompts[i].expand(len(x), -1, -1)], 1)
        h = block(h)
        assert h.size(1) == L + n
        states.append(h[:, :L])
    return states


def test_image_prompts_are_the_coupling_of_the_text_prompts_and_enter_the_vit():
    model = make_model()
    p = model.prompt
    image = p.image_prompts()
    assert len(image) == 2
    for j, f in enumerate(p.coupling):
        assert torch.allclose(image[j], p.text_ctx[j] @ f.weight.t() + f.bias, atol=1e-12)
    x = pixels()
    for ours, ref in zip(model.vit_states(x, image), reference_vit_states(model, x, image)):
        assert torch.allclose(ours, ref, atol=1e-12)
    # uncoupled: free image vectors from the same code
    free = make_model(couple=False)
    assert len(free.prompt.coupling) == 0 and free.prompt.image_ctx.shape == (2, 3, CFG.vit_width)
    assert all(torch.equal(a, b) for a, b in zip(free.prompt.image_prompts(), free.prompt.image_ctx))


def test_text_prompts_replace_the_tokens_after_the_start_token():
    model = make_model(image_prompt_depth=1)
    t, tokens = model.text, captions(4, [4, 5, 6, 8])
    ctx = model.prompt.text_prompts()
    h = t.token_embedding(tokens)
    h = torch.cat([h[:, :1], ctx[0].expand(4, -1, -1), h[:, 4:]], 1) + t.positional_embedding[:tokens.size(1)]
    for i, block in enumerate(t.blocks):
        if i == 1:
            h = torch.cat([h[:, :1], ctx[1].expand(4, -1, -1), h[:, 4:]], 1)
        h = block(h, is_causal=True)
    h = t.ln_final(h)
    eos = (tokens == CFG.eos_id).int().argmax(-1)
    ref = F.normalize(t.text_projection(h[torch.arange(4), eos]), dim=-1)
    assert torch.allclose(model.class_embeddings(tokens), ref, atol=1e-12)


def test_score_maps_per_layer_and_fused_with_a_one_hot_weight():
    model = make_model()
    x, tokens = pixels(), captions(3, [4, 5, 6])
    emb = model.class_embeddings(tokens)
    fused, maps = model.score_maps(x, emb)
    states = model.vit_states(x, model.prompt.image_prompts())
    g = CFG.image_size // CFG.patch_size
    for k, layer in enumerate((1, 2)):
        patches = F.normalize(model.visual.proj(model.visual.ln_post(states[layer - 1][:, 1:])), dim=-1)
        ref = model.logit_scale.exp() * torch.einsum("bpd,cd->bcp", patches, emb).view(3, 3, g, g)
        assert torch.allclose(maps[k], ref, atol=1e-12)
        with torch.no_grad():
            model.prompt.fusion.copy_(torch.tensor([0.0 if i == k else float("-inf") for i in range(2)]))
        assert torch.equal(model.score_maps(x, emb)[0], maps[k])
    with torch.no_grad():
        model.prompt.fusion.copy_(torch.tensor([0.3, -0.2]))
    w = torch.tensor([0.3, -0.2], dtype=torch.float64).softmax(0)
    assert torch.allclose(model.score_maps(x, emb)[0], w[0] * maps[0] + w[1] * maps[1], atol=1e-12)


def test_detect_gives_each_patch_its_scores_at_all_its_pixels_then_refines():
    model = make_model(refine_iters=0)
    x, tokens = pixels(), captions(3, [4, 5, 6])
    with torch.no_grad():
        fused = model.score_maps(x, model.class_embeddings(tokens))[0]
    p = CFG.patch_size
    ref = fused.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)  # patch (i, j) -> its p x p pixels
    classmap, scores, boxes = model.detect(x, tokens)
    assert torch.equal(scores, ref) and torch.equal(classmap, ref.argmax(1))
    assert boxes == anchor_boxes(ref.argmax(1), ref, model.cfg.min_box_area)
    model.cfg.refine_iters = 3
    assert torch.equal(model.detect(x, tokens)[0], refine_masks(x, ref.softmax(1), 3).argmax(1))


def test_prompt_config_errors_are_clear():
    def check(**changes):
        train.validate(train.TrainConfig(model=VLMConfig(**{**PCFG.__dict__, **changes})))
    with pytest.raises(SystemExit, match="coupled image prompts"):
        check(text_prompt_depth=1, image_prompt_depth=2)
    with pytest.raises(SystemExit, match="dense_layers"):
        check(dense_layers="1,5")
    with pytest.raises(SystemExit, match="prompt depths"):
        check(text_prompt_depth=3)


def test_anchor_boxes_are_the_regions_true_bounds():
    classmap = torch.zeros(1, 12, 12, dtype=torch.long)
    classmap[0, 1:3, 1:4] = 1  # a 2x3 block
    classmap[0, 5, 5] = classmap[0, 6, 6] = classmap[0, 7, 5] = 1  # joined through corners (8-connected)
    classmap[0, 9:12, 0:2] = 2
    classmap[0, 0:4, 8:12] = 2
    classmap[0, 1:3, 9:11] = 0  # a ring-shaped region with a hole
    scores = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    boxes = sorted(anchor_boxes(classmap, scores)[0])
    expect = [(1, 1, 1, 4, 3), (1, 5, 5, 7, 8), (2, 0, 9, 2, 12), (2, 8, 0, 12, 4)]
    assert [b[:5] for b in boxes] == expect
    for c, x0, y0, x1, y1, s in boxes:
        region = torch.zeros(12, 12, dtype=torch.bool)
        region[y0:y1, x0:x1] = classmap[0, y0:y1, x0:x1] == c
        assert s == pytest.approx(scores[0, c][region].mean().item(), abs=1e-6)
    assert sorted(b[:5] for b in anchor_boxes(classmap, scores, min_area=4)[0]) == [
        (1, 1, 1, 4, 3), (2, 0, 9, 2, 12), (2, 8, 0, 12, 4)]


def test_iou_and_ap50_equal_hand_computed_values():
    pred = np.array([[0, 1, 1], [2, 2, 0], [0, 0, 1]])
    truth = np.array([[0, 1, 0], [2, 1, 0], [0, 2, 1]])
    inter, union = class_iou_counts(pred, truth, 3)
    # class 1: pred at (0,1),(0,2),(2,2); truth at (0,1),(1,1),(2,2): 2 shared of 4
    # class 2: pred at (1,0),(1,1); truth at (1,0),(2,1): 1 shared of 3
    assert inter.tolist() == [3, 2, 1] and union.tolist() == [5, 4, 3]
    assert box_iou([0, 0, 2, 2], [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]]).tolist() == [[1 / 7, 1.0, 0.0]]
    truths = [[(1, 0, 0, 10, 10)], [(1, 20, 20, 30, 30), (2, 0, 0, 4, 4)]]
    detections = [[(1, 0, 0, 10, 10, 0.9), (1, 0, 0, 10, 10, 0.6)],  # the second is a duplicate: a false positive
                  [(1, 20, 20, 26, 30, 0.8), (1, 21, 20, 30, 30, 0.7), (2, 0, 0, 4, 4, 0.5)]]
    # class 1 in score order: 0.9 a hit; 0.8 overlaps its truth by IoU 0.6, a hit; 0.7 overlaps the
    # same truth by 0.9, already matched: a miss; the duplicate: a miss. Precision 1, 1, 2/3, 1/2 at
    # recall 1/2, 1, 1, 1 -> AP = 1/2 * 1 + 1/2 * 1 = 1
    ap = average_precision(detections, truths, [1, 2])
    assert ap[1] == pytest.approx(1.0) and ap[2] == pytest.approx(1.0)
    # a false positive ranked first: precision 0, 1/2, 2/3 at recall 0, 1/2, 1 -> AP = 1/2 * 2/3 + 1/2 * 2/3
    detections[0].insert(0, (1, 40, 40, 50, 50, 0.95))
    assert average_precision(detections, truths, [1])[1] == pytest.approx(2 / 3)
    # half the truths never found: recall stops at 1/2
    assert average_precision([[(1, 0, 0, 10, 10, 0.9)], []], truths, [1])[1] == pytest.approx(0.5)
    assert np.isnan(average_precision(detections, truths, [3])[3])


def test_patch_targets_name_the_patch_of_a_small_object():
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 1, 1] = 2  # 1 of 16 pixels of patch (0, 0)
    target[0, 4:8, 4:8] = 1  # fills patch (1, 1)
    target[0, 4, 0:2] = 1
    target[0, 5:7, 0:2] = 2  # patch (1, 0): class 2 covers more than class 1
    assert patch_targets(target, 4, 3, 0.05).tolist() == [[[2, 0], [2, 1]]]
    assert patch_targets(target, 4, 3, 0.1).tolist() == [[[0, 0], [2, 1]]]


def test_refine_masks_averages_within_a_colour_and_stops_at_edges():
    # a flat image: every neighbour weighs the same, so one step is the mean over them
    image = torch.zeros(1, 3, 6, 6, dtype=torch.float64)
    probs = torch.rand(1, 2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = torch.zeros_like(probs)
    for y in range(6):
        for x in range(6):
            nb = [probs[0, :, min(max(y + dy, 0), 5), min(max(x + dx, 0), 5)]
                  for d in (1, 2) for dy in (-d, 0, d) for dx in (-d, 0, d) if dy or dx]
            ref[0, :, y, x] = torch.stack(nb).mean(0)
    assert torch.allclose(refine_masks(image, probs, iters=1, dilations=(1, 2)), ref, atol=1e-12)
    # two colours: labels flow inside each half and not across the edge between them
    image = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    image[:, :, :, 4:] = 1.0
    probs = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    probs[:, 0, :, :4] = probs[:, 1, :, 4:] = 1.0
    probs[:, :, 0, 0] = torch.tensor([0.2, 0.8])  # a wrong pixel inside the left half
    refined = refine_masks(image, probs, iters=20)
    assert (refined.argmax(1)[0, :, :4] == 0).all() and (refined.argmax(1)[0, :, 4:] == 1).all()


def test_shots_are_k_per_class_disjoint_and_seeded(tiny_world):
    names = list(tiny_world.meta["novel_shapes"])
    idx = tiny_world.shots("novel_train", names, 2, seed=0)
    assert len(idx) == 6 and len(set(idx.tolist())) == 6
    target = tiny_world.class_targets("novel_train", idx, names)
    for c in range(3):
        assert all((target[i] == c + 1).any() for i in range(2 * c, 2 * c + 2))
    assert set(np.unique(target)) <= {0, 1, 2, 3}
    assert np.array_equal(idx, tiny_world.shots("novel_train", names, 2, seed=0))
    assert not np.array_equal(idx, tiny_world.shots("novel_train", names, 2, seed=1))
    with pytest.raises(ValueError, match="no class 'kite'"):
        tiny_world.class_targets("novel_train", idx, ["kite"])
    with pytest.raises(ValueError, match="fewer than 1000 shots"):
        tiny_world.shots("novel_train", names, 1000, seed=0)


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory, world_root, tiny_run):
    out = str(tmp_path_factory.mktemp("prompt_run"))
    summary = train.main(["--config", "tiny", "--stage", "prompt", f"--init_from={tiny_run}/ckpt.pt",
                          f"--out_dir={out}", f"--data_dir={world_root}", "--max_iters=8"])
    return out, summary


def test_prompt_stage_trains_only_prompts_and_leaves_the_backbone_bit_identical(prompt_run, tiny_run):
    out, summary = prompt_run
    init = torch.load(os.path.join(tiny_run, "ckpt.pt"), weights_only=True)["model"]
    m = train.PRESETS["tiny"].model
    Jt, Jv, n = 2, 2, 4  # the tiny stage preset's depths; 'a photo of a' is 4 tokens of the world's tokenizer
    expected = Jt * n * m.text_width + Jv * (m.text_width * m.vit_width + m.vit_width) + 2
    with open(os.path.join(out, "eval.json")) as f:
        result = json.load(f)
    assert result["trainable_params"] == summary["trainable_params"] == expected
    assert result["shot_seeds"] == 2 and {"miou", "miou_std", "ap50", "ap50_std", "fg_iou", "zeroshot_miou"} <= set(result)
    for k in range(2):
        ckpt = torch.load(os.path.join(out, f"seed{k}", "ckpt.pt"), weights_only=True)
        state = ckpt["model"]
        assert ckpt["config"]["shot_seed"] == k
        backbone = [key for key in state if not key.startswith("prompt.")]
        assert backbone and all(torch.equal(state[key], init[key]) for key in backbone)
        assert sum(state[key].numel() for key in state if key.startswith("prompt.")) == expected
        assert not torch.equal(state["prompt.fusion"], torch.zeros(2))  # the prompts did train
    values = [json.load(open(os.path.join(out, f"seed{k}", "eval.json")))["miou"] for k in range(2)]
    assert result["miou"] == pytest.approx(np.mean(values))
    assert result["miou_std"] == pytest.approx(np.std(values, ddof=1))
    zero = [json.load(open(os.path.join(out, f"seed{k}", "eval.json"))).get("zeroshot_miou") for k in range(2)]
    assert zero[0] is not None and zero[1] is None  # no prompts: the same for every sample, evaluated once
    assert result["zeroshot_miou"] == zero[0] and result["zeroshot_miou_std"] == 0


def test_prompt_stage_resume_keeps_finished_samples(prompt_run, world_root):
    out, summary = prompt_run
    # evaluating a sample's checkpoint on its own keeps what its training run wrote
    res = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--ckpt", os.path.join(out, "seed0", "ckpt.pt")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    with open(os.path.join(out, "seed0", "eval.json")) as f:
        assert {"miou", "ap50", "trainable_params", "zeroshot_miou", "step"} <= set(json.load(f))
    again = train.main(["--config", "tiny", "--stage", "prompt", f"--out_dir={out}", f"--data_dir={world_root}",
                        "--resume"])
    assert again["miou"] == summary["miou"] and again["ap50"] == summary["ap50"]


def test_sample_detect_writes_an_overlay(prompt_run, tiny_world, tmp_path):
    out, _ = prompt_run
    path = tmp_path / "novel.png"
    Image.fromarray(tiny_world.array("novel_val", "images")[0]).save(path)
    res = run_sample("--ckpt", os.path.join(out, "seed0", "ckpt.pt"), "detect", str(path), "--out", str(tmp_path / "d.png"))
    assert res.returncode == 0, res.stderr
    size = tiny_world.image_size
    with Image.open(tmp_path / "d.png") as im:
        assert im.size == (4 * size, 4 * size) and im.mode == "RGB"
    assert "wrote" in res.stdout
    bad = run_sample("--ckpt", os.path.join(out, "seed0", "ckpt.pt"), "detect", str(tmp_path / "missing.png"))
    assert bad.returncode != 0 and "missing.png" in bad.stderr


def test_prompt_stage_stops_when_the_loss_is_under_the_threshold(tiny_run, world_root, tmp_path):
    args = ["--config", "tiny", "--stage", "prompt", f"--init_from={tiny_run}/ckpt.pt", f"--data_dir={world_root}",
            "--shot_seeds=1", "--max_iters=50"]
    stopped = train.main(args + [f"--out_dir={tmp_path / 'a'}", "--stop_loss=100"])
    assert stopped["step"] == 1  # any loss is under 100: one step, then stop
    full = train.main(args + [f"--out_dir={tmp_path / 'b'}", "--stop_loss=0", "--max_iters=3"])
    assert full["step"] == 3
    assert torch.load(tmp_path / "a" / "seed0" / "ckpt.pt", weights_only=True)["step"] == 1

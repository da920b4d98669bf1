"""Multi-image instruction following (M3 resampler, M9-M11) against references: a pass written
out position by position, an independent top-k, the PyTorch FLOP counter, invariances."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import data
import train
from conftest import ROOT
from eval import load_checkpoint
from instruct import InstructVLM, answer_sets
from model import Attention, VLMConfig
from test_model import CFG
from test_sample_eval import run_sample

ICFG = VLMConfig(**{**CFG.__dict__, "instruct": True, "glob_id": 45, "answer_length": 4, "momentum_alpha": 0.0,
                    "n_queries": 3, "keep_ratio": 0.5})
PAD, BOS, EOS = CFG.pad_id, CFG.bos_id, CFG.eos_id


def make_model(**changes):
    torch.manual_seed(0)
    return InstructVLM(VLMConfig(**{**ICFG.__dict__, **changes})).double().eval()


def batch(n_images=(2, 4, 3), seed=0):
    """A mixed batch: sample b has n_images[b] images; questions of 3-6 words, answers of 1-2."""
    g = torch.Generator().manual_seed(seed)
    B, K = len(n_images), max(n_images)
    pixels = torch.randn(B, K, 3, CFG.image_size, CFG.image_size, generator=g, dtype=torch.float64)
    valid = torch.arange(K)[None, :] < torch.tensor(n_images)[:, None]
    pixels[~valid] = 0
    question = torch.full((B, CFG.context_length), PAD)
    answer = torch.full((B, ICFG.answer_length), PAD)
    for b in range(B):
        nq, na = 3 + b % 4, 1 + b % 2
        question[b, :nq + 2] = torch.tensor([BOS, *torch.randint(0, 40, (nq,), generator=g).tolist(), EOS])
        answer[b, :na + 2] = torch.tensor([BOS, *torch.randint(0, 40, (na,), generator=g).tolist(), EOS])
    return pixels, valid, question, answer


def reference_answer_states(model, parts, part_valid, question, answer, gates=None):
    """The text transformer over [parts | question block | answer] with its mask written out
    position by position (a key is seen if it is the query itself, or valid and either before
    the answer block or not after the query) and attention written out by hand: the softmax
    weight of key j is exp(q.k_j / sqrt(d)) * gates[j], normalised over the keys seen."""
    text = torch.cat([question[:, :CFG.context_length - ICFG.answer_length], answer], 1)
    x = torch.cat(parts + [model.text.token_embedding(text) + model.text.positional_embedding[:text.size(1)]], 1)
    valid = torch.cat(part_valid + [text != PAD], 1)
    B, L = valid.shape
    gates = torch.ones(B, L, dtype=x.dtype) if gates is None else gates
    n_prefix = L - answer.size(1)
    mask = torch.zeros(B, 1, L, L, dtype=torch.bool)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                mask[b, 0, i, j] = i == j or (bool(valid[b, j]) and (j < n_prefix or j <= i))
    w, nh = CFG.text_width, CFG.text_heads
    for block in model.text.blocks:
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(w, dim=2)
        q, k, v = (t.view(B, L, nh, w // nh).transpose(1, 2) for t in (q, k, v))
        weight = ((q @ k.transpose(-1, -2)) / (w // nh) ** 0.5).exp() * gates[:, None, None, :] * mask
        y = (weight / weight.sum(-1, keepdim=True)) @ v
        x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, L, w))
        x = x + block.mlp(block.ln_2(x))
    return model.text.ln_final(x)[:, -answer.size(1):]


@pytest.mark.parametrize("converter", ["mlp", "resampler"])
def test_pass2_at_keep_1_equals_one_pass_fed_g_position_by_position(converter):
    """keep_ratio 1.0 with gates fixed to 1: pass 2 is the one-pass model (the same weights)
    fed [g | relation tokens | every image token | question | answer]."""
    two = make_model(converter=converter, keep_ratio=1.0)
    one = make_model(converter=converter, two_pass=False)
    one.load_state_dict({k: v for k, v in two.state_dict().items() if not k.startswith("scorer.")})
    pixels, valid, question, answer = batch()
    with torch.no_grad():
        pre = two.instruct_prefix(pixels, valid, question, gates=False)
        got = two.answer_states(pre, question, answer)
        base = one.instruct_prefix(pixels, valid, question)
        assert base["g"] is None and base["image"].shape == pre["image"].shape
        want = reference_answer_states(one, [pre["g"][:, None], base["rel"], base["image"]],
                                       [torch.ones(3, 1, dtype=torch.bool), base["rel_valid"], base["image_valid"]],
                                       question, answer)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_pass2_reads_each_kept_token_weighted_by_its_gate():
    """Pass 2 with gates: every attention weight of a kept image token is multiplied by its
    gate sigmoid(score), against the hand-written reference; and the gate changes the output."""
    model = make_model(keep_ratio=0.5)
    pixels, valid, question, answer = batch()
    with torch.no_grad():
        pre = model.instruct_prefix(pixels, valid, question)
        got = model.answer_states(pre, question, answer)
        B = len(valid)
        ones = torch.ones(B, 1, dtype=torch.float64)
        gates = torch.cat([ones, torch.ones_like(pre["rel_valid"], dtype=torch.float64), pre["image_log_gate"].exp(),
                           torch.ones(B, question.size(1) - ICFG.answer_length + answer.size(1), dtype=torch.float64)], 1)
        want = reference_answer_states(model, [pre["g"][:, None], pre["rel"], pre["image"]],
                                       [ones.bool(), pre["rel_valid"], pre["image_valid"]], question, answer, gates)
        ungated = model.answer_states(dict(pre, image_log_gate=None), question, answer)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (got - ungated).abs().max() > 1e-6


@pytest.mark.parametrize("keep_ratio", [0.25, 0.5])
def test_kept_tokens_are_exactly_the_top_scores_with_their_gates(keep_ratio):
    model = make_model(keep_ratio=keep_ratio)
    pixels, valid, question, _ = batch()
    with torch.no_grad():
        pre = model.instruct_prefix(pixels, valid, question)
        _, image = model.instruct_image_tokens(pixels, valid)
        B, K, T, w = image.shape
        scores = model.scorer(pre["g"], image.flatten(1, 2)).view(B, K, T)
    n = round(keep_ratio * T)
    assert pre["kept"].shape == (B, K, n)
    kept_tokens = pre["image"].view(B, K, n, w)
    for b in range(B):
        for k in range(int(valid[b].sum())):
            top = sorted(np.argsort(-scores[b, k].numpy(), kind="stable")[:n].tolist())  # an independent top-n
            assert pre["kept"][b, k].tolist() == top
            torch.testing.assert_close(kept_tokens[b, k], image[b, k, top], rtol=0, atol=0)
            gate = pre["image_log_gate"].view(B, K, n)[b, k].exp()
            torch.testing.assert_close(gate, torch.sigmoid(scores[b, k, top]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("converter, two_pass", [("mlp", True), ("resampler", True), ("mlp", False)])
def test_padding_images_do_not_change_other_samples(converter, two_pass):
    """A 2-image sample alone (K = 2) and in a batch padded to 4 images: the same loss and
    answer states, through the ViT, relation encoder, converter, pass 1, top-k and pass 2."""
    model = make_model(converter=converter, two_pass=two_pass)
    pixels, valid, question, answer = batch((2, 4, 3))
    with torch.no_grad():
        mixed = model.answer_states(model.instruct_prefix(pixels, valid, question), question, answer)
        alone = model.answer_states(model.instruct_prefix(pixels[:1, :2], valid[:1, :2], question[:1]),
                                    question[:1], answer[:1])
        garbage = pixels.clone()
        garbage[0, 2:] = torch.randn_like(garbage[0, 2:])  # what lies in a padding slot does not matter either
        other = model.answer_states(model.instruct_prefix(garbage, valid, question), question, answer)
        loss_alone = model(pixels[:1, :2], valid[:1, :2], question[:1], answer[:1])["loss"]
    torch.testing.assert_close(mixed[:1], alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(other, mixed, rtol=1e-10, atol=1e-10)
    # the loss of the one-sample batch is that sample's own loss in the mixed batch
    logits = model.text.lm_head(mixed[:1, :-1])
    want = F.cross_entropy(logits[0], answer[0, 1:].masked_fill(answer[0, 1:] == PAD, -100), ignore_index=-100)
    torch.testing.assert_close(loss_alone, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("modality", ["instruction", "images", "relation"])
def test_a_dropped_modality_contributes_nothing(modality):
    """Hidden from pass 2 for sample 0: new values of that modality leave sample 0's answer
    states unchanged; without the drop the same change does change them."""
    model = make_model()
    pixels, valid, question, answer = batch()
    with torch.no_grad():
        pre = model.instruct_prefix(pixels, valid, question)
        changed, q2 = dict(pre), question.clone()
        if modality == "instruction":
            q2[0, 1:3] = (question[0, 1:3] + 1) % 40
        elif modality == "images":
            changed["image"] = pre["image"] + torch.randn_like(pre["image"])
        else:
            changed["rel"] = pre["rel"] + torch.randn_like(pre["rel"])
        drop = {k: torch.tensor([k == modality, False, False]) for k in ("instruction", "images", "relation")}
        a, b = model.answer_states(pre, question, answer, drop), model.answer_states(changed, q2, answer, drop)
        c, d = model.answer_states(pre, question, answer), model.answer_states(changed, q2, answer)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-12)
    assert (c[0] - d[0]).abs().max() > 1e-6


def test_loss_covers_only_answer_tokens():
    """The loss is the mean of -log p over the answer's tokens and its <eos> (no <bos>, no
    padding, no question token), each predicted from the position before it, by the reference
    pass; and it does not change when the question's tokens' own predictions would."""
    model = make_model(two_pass=False, relation=False)
    pixels, valid, question, answer = batch()
    with torch.no_grad():
        loss = model(pixels, valid, question, answer)["loss"]
        pre = model.instruct_prefix(pixels, valid, question)
        h = reference_answer_states(model, [pre["image"]], [pre["image_valid"]], question, answer)
        logp = model.text.lm_head(h).log_softmax(-1)
    terms = []
    for b in range(answer.size(0)):
        row = answer[b].tolist()
        for j in range(1, row.index(EOS) + 1):  # targets: every token after <bos>, <eos> included
            terms.append(-logp[b, j - 1, row[j]])
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("converter, two_pass, relation, pass1_layers, mlp_width", [
    ("mlp", True, True, 0, 0), ("mlp", False, True, 0, 0), ("resampler", True, True, 0, 0),
    ("resampler", True, False, 0, 0), ("mlp", True, False, 0, 0), ("mlp", True, True, 1, 0), ("mlp", True, True, 0, 37)])
def test_flop_count_equals_pytorch_flop_counter(converter, two_pass, relation, pass1_layers, mlp_width):
    """instruct_flops against torch.utils.flop_counter over one training forward (attention in
    SDPA's math path, which the counter sees as matmuls); mlp_width: the towers' own MLP widths."""
    model = make_model(converter=converter, two_pass=two_pass, relation=relation, keep_ratio=0.25,
                       pass1_layers=pass1_layers, vit_mlp_width=mlp_width, text_mlp_width=mlp_width + 2).float()
    for n in (2, 4):
        pixels, valid, question, answer = batch((n,))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(pixels.float(), valid, question, answer)
        assert counter.get_total_flops() == sum(model.instruct_flops(n).values())
    assert make_model(keep_ratio=0.5).instruct_flops(4)["pass2"] < make_model(keep_ratio=1.0).instruct_flops(4)["pass2"]


def test_pass1_on_the_first_layers_reads_their_states():
    """pass1_layers=k: pass 1's global vector is the final norm of the <glob> state after the first k text
    blocks (a model cut to k blocks gives it); k = every block is the full pass."""
    pixels, valid, question, answer = batch()
    model = make_model(pass1_layers=1)
    cut = make_model(pass1_layers=0)
    cut.text.blocks = cut.text.blocks[:1]
    torch.testing.assert_close(model.instruct_prefix(pixels, valid, question)["g"],
                               cut.instruct_prefix(pixels, valid, question)["g"], rtol=0, atol=0)
    full, every = make_model(pass1_layers=0), make_model(pass1_layers=ICFG.text_layers)
    torch.testing.assert_close(full.instruct_prefix(pixels, valid, question)["g"],
                               every.instruct_prefix(pixels, valid, question)["g"], rtol=0, atol=0)
    assert not torch.equal(full.instruct_prefix(pixels, valid, question)["g"],
                           model.instruct_prefix(pixels, valid, question)["g"])


def test_cross_attention_is_attention_with_keys_from_the_context():
    """Cross-attention to x itself is self-attention; hidden context keys change nothing."""
    torch.manual_seed(0)
    attn = Attention(16, 2).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x, context=x), attn(x), rtol=1e-12, atol=1e-12)
    model = make_model(converter="resampler")
    patches = torch.randn(2, 4, CFG.vit_width, dtype=torch.float64)
    rel = torch.randn(2, 3, CFG.text_width, dtype=torch.float64)
    rel_valid = torch.tensor([[True, True, False], [True, False, False]])
    rel2 = rel.clone()
    rel2[~rel_valid] = 99.0
    with torch.no_grad():
        a, b = model.converter(patches, rel, rel_valid), model.converter(patches, rel2, rel_valid)
        c = model.converter(patches, rel + torch.randn_like(rel), rel_valid)  # not a constant: LayerNorm removes those
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert (a - c).abs().max() > 1e-6  # the valid relation tokens are read


def test_question_too_long_for_its_block_is_a_clear_error():
    model = make_model()
    pixels, valid, question, answer = batch()
    question[0, :] = 5  # fills the answer's positions too
    with pytest.raises(ValueError, match="longer than context_length - answer_length"):
        model(pixels, valid, question, answer)


def test_multi_batch_pads_each_batch_to_its_largest_set(tiny_world):
    sets = tiny_world.array("multi_train", "sets")
    counts = (sets >= 0).sum(1)
    idx = np.array([int(np.flatnonzero(counts == 2)[0]), int(np.flatnonzero(counts == 3)[0])])
    images, valid, question, answer = tiny_world.multi_batch("multi_train", idx)
    assert images.shape[:2] == valid.shape == (2, 3)
    assert valid.sum(1).tolist() == [2, 3] and not images[0, 2].any()
    pool = tiny_world.array("multi_train", "images")
    for b, i in enumerate(idx):
        for k in range(counts[i]):
            assert np.array_equal(images[b, k], pool[sets[i, k]])
    assert np.array_equal(question, tiny_world.array("multi_train", "question")[idx])


def test_instruct_stage_trains_only_its_parts_and_reports_accuracy(tiny_run, world_root, tmp_path):
    """--stage instruct from a pretrain run: the ViT and the pretraining heads do not move, the
    converter, relation encoder, scorer and text transformer do; eval.json has the accuracy
    per question type beside the majority baseline, the drop accuracies, FLOPs and latency."""
    out = str(tmp_path / "instruct")
    metrics = train.main(["--config", "tiny", "--stage", "instruct", f"--init_from={tiny_run}/ckpt.pt",
                          f"--out_dir={out}", f"--data_dir={world_root}", "--max_iters=12"])
    before = torch.load(os.path.join(tiny_run, "ckpt.pt"), weights_only=True)["model"]
    after = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert after["config"]["stage"] == "instruct" and after["config"]["model"]["instruct"]
    state = after["model"]
    for name in ("visual.conv1.weight", "visual.proj.weight", "itm_head.weight", "text.text_projection.weight"):
        assert torch.equal(state[name], before[name]), name
    for name in ("text.blocks.0.attn.c_attn.weight", "converter.c_fc.weight"):
        assert not torch.equal(state[name], before[name]), name
    assert "relation.index_embedding" in state and "scorer.c_g.weight" in state
    with open(os.path.join(out, "eval.json")) as f:
        saved = json.load(f)
    for name in ("count", "most", "largest", "change", "sequence"):
        assert 0 <= saved[f"instruct_acc_{name}"] <= 1 and 0 <= saved[f"instruct_majority_{name}"] <= 1
    for key in ("instruct_acc", "instruct_acc_no_instruction", "instruct_acc_no_images", "instruct_acc_no_relation",
                "instruct_gflops", "instruct_pass2_gflops", "instruct_latency_ms"):
        assert key in saved and saved[key] == metrics[key]
    assert saved["instruct_pass2_gflops"] < saved["instruct_gflops"]


def test_instruct_stage_needs_a_checkpoint():
    with pytest.raises(SystemExit, match="--init_from"):
        train.main(["--config", "tiny", "--stage", "instruct"])


@pytest.fixture(scope="module")
def tiny_instruct(tiny_run, world_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny_instruct"))
    train.main(["--config", "tiny", "--stage", "instruct", f"--init_from={tiny_run}/ckpt.pt", f"--out_dir={out}",
                f"--data_dir={world_root}", "--max_iters=4", "--converter=resampler"])
    return out


def test_sample_answers_a_question_about_image_files(tiny_instruct, tiny_world, tmp_path):
    """sample.py answer on PNGs of a val set gives what the evaluation's batched answering gives."""
    sets = tiny_world.array("multi_val", "sets")
    i = int(np.flatnonzero((sets >= 0).sum(1) == 3)[0])
    paths = []
    for k, j in enumerate(sets[i, :3]):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(np.asarray(tiny_world.array("multi_val", "images")[j])).save(paths[-1])
    question = data.decode_tokens(tiny_world.tokenizer, tiny_world.array("multi_val", "question")[i])
    result = run_sample("--ckpt", f"{tiny_instruct}/ckpt.pt", "answer", *paths, "--question", question)
    assert result.returncode == 0, result.stderr[-2000:]
    model, _, _ = load_checkpoint(f"{tiny_instruct}/ckpt.pt")
    assert result.stdout.strip() == answer_sets(model, tiny_world, "multi_val", np.array([i]))[0].strip()
    too_many = run_sample("--ckpt", f"{tiny_instruct}/ckpt.pt", "answer", *paths * 2, "--question", question)
    assert too_many.returncode != 0 and "at most 4" in too_many.stderr


def test_instruct_ablation_runner_writes_its_table(tiny_run, world_root, tmp_path):
    """Two rows over two seeds: each cell the mean ± std of the seeds' eval.json; a second call keeps the runs."""
    table = tmp_path / "instruct.md"
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--ablation", "--stage=instruct", "--config", "tiny",
           "--rows", "one-pass,keep-0.25", "--seeds=1,2", "--max_iters=3", f"--init_from={tiny_run}/ckpt.pt",
           f"--ablation_dir={tmp_path / 'runs'}", f"--table={table}", f"--data_dir={world_root}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = table.read_text().splitlines()
    assert lines[0].startswith("Ablation: `python eval.py --ablation --stage=instruct --config tiny --max_iters=3 ")
    assert "--rows=one-pass,keep-0.25 --seeds=1,2`; 3 steps per row, seeds 1,2: the mean" in lines[0]
    header = next(line for line in lines if line.startswith("| config"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert {"instruct_acc", "instruct_acc_count", "instruct_acc_no_images", "instruct_pass2_gflops",
            "instruct_latency_ms", "wall_time_s"} <= set(cols)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines
            if line.startswith("| ") and not line.startswith("| config")}
    assert list(rows) == ["one-pass", "keep-0.25", "majority answer"]
    for name in ("one-pass", "keep-0.25"):
        saved = [json.load(open(tmp_path / "runs" / name / f"seed{s}" / "eval.json")) for s in (1, 2)]
        for key in ("instruct_acc", "instruct_latency_ms"):
            values = [m[key] for m in saved]
            cell = rows[name][cols.index(key)]
            if values[0] == values[1]:
                assert float(cell) == pytest.approx(values[0], abs=5e-4)
            else:
                mean, std = (float(x) for x in cell.split(" ± "))
                assert mean == pytest.approx(np.mean(values), abs=5e-4)
                assert std == pytest.approx(np.std(values, ddof=1), abs=5e-4)
    # a quarter of the tokens in pass 2 costs less than all of them in the one pass (the same for both seeds)
    gflops = {name: float(rows[name][cols.index("instruct_pass2_gflops")]) for name in ("one-pass", "keep-0.25")}
    assert gflops["keep-0.25"] < gflops["one-pass"]
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and again.stdout.count("finished before, kept") == 4
    assert table.read_text() == "\n".join(lines) + "\n"

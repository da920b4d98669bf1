"""bench.py: the FLOP formula against PyTorch's FLOP counter, the peak table, the Hugging Face
side-by-side and the generation benchmark's outputs. No timing is asserted."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
from conftest import ROOT
from eval import ABLATION_ROWS, OBJECTIVES_OFF
from hf import load_into, state_from_hf_clip
from model import VLM, VLMConfig
from parallel import checkpoint_blocks

CFG = VLMConfig(image_size=32, patch_size=8, vit_width=32, vit_layers=2, vit_heads=2, text_width=32, text_layers=2,
                text_heads=2, embed_dim=16, vocab_size=60, context_length=12, n_codes=16, queue_size=8)
ITC = dict(OBJECTIVES_OFF, itc_weight=1.0)
# the objective sets whose passes differ: ITC alone, everything, and the cases where a pass runs
# without a gradient (ITM without ITC, ELECTRA's generator feeding only the discriminator)
OBJECTIVES = {
    "itc": ITC,
    "all": {},
    "itc+momentum": dict(ITC, momentum_alpha=0.4),
    "itm": dict(OBJECTIVES_OFF, itm_weight=1.0),
    "itm+mlm": dict(OBJECTIVES_OFF, itm_weight=1.0, mlm_weight=1.0),
    "rtd": dict(OBJECTIVES_OFF, rtd_weight=1.0),
    "mlm+momentum": dict(OBJECTIVES_OFF, mlm_weight=1.0, momentum_alpha=0.4),
    "caption": dict(OBJECTIVES_OFF, caption_weight=1.0),
    "all, one ViT pass, two negatives": dict(shared_vit_pass=True, itm_negatives=2),
    "all, half the negatives": dict(itm_negatives=0.5),
    "all, the fused pass not training the ViT": dict(fused_vit_grad=False),
    "all, one ViT pass, not trained by the fused pass": dict(shared_vit_pass=True, fused_vit_grad=False),
    "itm, not training the ViT": dict(OBJECTIVES_OFF, itc_weight=1.0, itm_weight=1.0, fused_vit_grad=False),
    "all, image axes": dict(image_axes=True),
    "all, ELECTRA and the fused pass on half the rows": dict(fused_rows=0.5, image_axes=True),
    "all, half the rows, the fused pass not training the ViT": dict(fused_rows=0.5, fused_vit_grad=False, itm_negatives=2),
    "all, ITM on clean pairs": dict(itm_clean=True, fused_rows=0.5),
    "all, ITM on clean pairs, the fused pass not training the ViT": dict(itm_clean=True, fused_vit_grad=False),
    "itm+mlm on clean pairs": dict(OBJECTIVES_OFF, itm_weight=1.0, mlm_weight=1.0, itm_clean=True),
    "itm+mlm on clean pairs, not training the ViT": dict(OBJECTIVES_OFF, itm_weight=1.0, mlm_weight=1.0, itm_clean=True,
                                                         fused_vit_grad=False),
    "itm+caption on half the rows": dict(OBJECTIVES_OFF, itm_weight=1.0, caption_weight=1.0, fused_rows=0.5,
                                         itm_negatives=0.5, fused_vit_grad=False),
    "all, image axes, the fused pass not training the ViT": dict(image_axes=True, fused_vit_grad=False),
    "resampler": dict(OBJECTIVES_OFF, itc_weight=1.0, itm_weight=1.0, caption_weight=1.0, converter="resampler",
                      n_queries=4),
    "all, MLP widths of their own (no multiple of the widths)": dict(vit_mlp_width=52, text_mlp_width=70),
}


def counted_flops(name, B=4):
    """(forward, forward + backward) FLOPs of one pretraining step as FlopCounterMode sees them,
    attention in SDPA's math path (matmuls the counter sees), and the model's config."""
    c = bench.bench_model_config(CFG, **OBJECTIVES[name])
    torch.manual_seed(0)
    model = VLM(c).double().train()
    batch = bench.random_batch(model, B, "cpu")
    batch["pixels"] = batch["pixels"].double()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        loss = model(**batch, groups=None, alpha=0.4)["loss"]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as backward:
        loss.backward()
    return forward.get_total_flops(), forward.get_total_flops() + backward.get_total_flops(), c


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_pretrain_flops_equal_flop_counter_forward_and_training_step(name):
    """The formula counts the same ops as the counter (mm, addmm, bmm, convolution and their
    backwards), so the tolerance is zero: forward exactly, and the training step exactly, as
    the formula gives the pixel-reading layers (patch conv, generator patch embedding) no input
    gradient (b = 1) and every pass that reaches no loss no backward (b = 0)."""
    forward, training, c = counted_flops(name)
    assert bench.pretrain_flops(c, 4, backward=False) == forward
    assert bench.pretrain_flops(c, 4) == training
    # the plain rule of thumb, 3 x forward for every pass with a backward, only overcounts
    rule = sum(f * (3 if b else 1) for _, f, b in bench.pretrain_terms(c, 4))
    assert rule >= training


def test_pretrain_terms_follow_the_objectives():
    def terms(**changes):
        return {n: b for n, _, b in bench.pretrain_terms(bench.bench_model_config(CFG, **changes), 4)}
    itc = terms(**ITC)
    assert set(itc) == {"vit.conv", "vit.blocks", "itc.image_proj", "itc.text", "itc.text_proj", "itc.logits"}
    full = terms()
    assert full["momentum.vit"] == full["itm.hard_negatives"] == 0 and full["vit.conv"] == 1
    assert {"electra.vit.blocks", "fused.blocks", "caption.lm_head", "generator.mlm_logits"} <= set(full)
    assert "electra.vit.blocks" not in terms(shared_vit_pass=True)
    flops = lambda **changes: {n: f for n, f, _ in bench.pretrain_terms(bench.bench_model_config(CFG, **changes), 4)}  # noqa: E731
    no_itm = flops(itm_weight=0)["fused.blocks"]
    assert flops()["fused.blocks"] == 2 * no_itm and flops(itm_negatives=2)["fused.blocks"] == 3 * no_itm  # B rows + B or 2B
    assert 2 * flops(itm_negatives=0.5)["fused.blocks"] == 3 * no_itm  # B + B/2 rows


def test_peak_lookup_by_device_name_and_override():
    known = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H200": 989, "NVIDIA A100-SXM4-80GB": 312,
             "NVIDIA A100 80GB PCIe": 312, "NVIDIA A10G": 70, "NVIDIA A10": 125, "NVIDIA L4": 121, "NVIDIA L40S": 362,
             "NVIDIA L40": 181, "NVIDIA GeForce RTX 4090": 165, "NVIDIA GeForce RTX 3090": 71,
             "Tesla V100-SXM2-16GB": 125, "Tesla T4": 65}
    for name, tflops in known.items():
        assert bench.peak_tflops(name) == tflops, name
    assert bench.peak_tflops("Some Future Accelerator 9000") is None
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", override=100.0) == 100.0
    assert bench.resolve_peak(bench.BenchConfig(peak_tflops=50.0), "cpu") == (50.0, "--peak_tflops")
    assert bench.resolve_peak(bench.BenchConfig(), "cpu") == bench.cpu_peak()


def test_cpu_peak_is_threads_times_clock_times_flops_per_cycle():
    threads = torch.get_num_threads()
    peak, why = bench.cpu_peak("processor\t: 0\ncpu MHz\t\t: 2600.000\nflags\t\t: fpu sse avx2 fma avx512f\n")
    assert peak == pytest.approx(threads * 2.6e9 * 32 / 1e12) and "32 float32 FLOP/cycle" in why
    assert bench.cpu_peak("cpu MHz : 2000\nflags : fpu sse2\n")[0] == pytest.approx(threads * 2e9 * 16 / 1e12)
    peak, why = bench.cpu_peak("flags : fma\n")
    assert peak is None and "--peak_tflops" in why


def test_bench_flags_are_split_from_train_flags():
    b, rest = bench.parse_bench_args(["--config", "tiny", "--steps=7", "--mode", "generate", "--batch_size=3"])
    assert (b.mode, b.steps, b.warmup) == ("generate", 7, bench.DEFAULT_STEPS["generate"][1])
    assert rest == ["--config", "tiny", "--batch_size=3"]
    for bad in (["--mode=nope"], ["--vs=hf", "--mode=loader"], ["--vs=timm"], ["--steps=x"]):
        with pytest.raises(SystemExit):
            bench.parse_bench_args(bad)
    with pytest.raises(SystemExit):
        bench.main(["--config", "tiny", "--no_such_flag=1"])


def test_hf_clip_has_our_dimensions_and_our_itc_loss():
    """Per part, the HF model has our parameter counts; with its weights copied into ours, the
    two give the same contrastive loss on the same batch: the side-by-side times one model."""
    for activation in ("gelu", "quick_gelu"):
        c = bench.bench_model_config(CFG, activation=activation, **ITC)
        torch.manual_seed(0)
        ours, hf = VLM(c).double(), bench.hf_clip(c).double()
        counts = bench.clip_param_counts(ours, hf)
        assert all(o == h for o, h in counts.values()), counts
        assert sum(h for _, h in counts.values()) == sum(p.numel() for p in hf.parameters())
        load_into(ours, state_from_hf_clip(hf.state_dict(), c))
        batch = bench.random_batch(ours, 6, "cpu")
        pixels, tokens = batch["pixels"].double(), batch["tokens"]
        mask = (tokens != c.pad_id).long()
        theirs = hf(input_ids=tokens, attention_mask=mask, pixel_values=pixels, return_loss=True).loss
        torch.testing.assert_close(ours(pixels=pixels, tokens=tokens)["loss"], theirs, rtol=1e-10, atol=1e-10)


def test_vs_hf_runs_a_training_step_of_each(tmp_path):
    path = str(tmp_path / "bench.json")
    out = bench.main(["--config", "tiny", "--vs", "hf", "--steps=2", "--warmup=0", "--batch_size=4", f"--json={path}"])
    assert out["ours_samples_per_s"] > 0 and out["hf_samples_per_s"] > 0 and out["ratio"] > 0
    assert out["params_ours"] == out["params_hf"] < out["params_ours_total"]
    assert (out["ours_mfu"] is None) == (bench.cpu_peak()[0] is None)  # a CPU's peak from /proc/cpuinfo
    with open(path) as f:
        assert json.load(f)["params_hf"] == out["params_hf"]
    assert not os.path.exists(path + ".tmp")


def test_vs_itc_lm_times_both_steps_and_their_ratio():
    out = bench.main(["--config", "tiny", "--vs", "itc_lm", "--steps=2", "--warmup=0", "--batch_size=4"])
    tiny = bench.train.PRESETS["tiny"].model
    assert out["all_flops_per_step"] == bench.pretrain_flops(bench.bench_model_config(tiny), 4)
    itc_lm = bench.bench_model_config(tiny, **{**OBJECTIVES_OFF, "itc_weight": 1.0, "caption_weight": 1.0})
    assert out["itc_lm_flops_per_step"] == bench.pretrain_flops(itc_lm, 4) < out["all_flops_per_step"]
    assert out["cost_ratio"] == pytest.approx(out["itc_lm_samples_per_s"] / out["all_samples_per_s"])


def test_vs_two_ablation_rows_times_each_row_step():
    out = bench.main(["--config", "tiny", "--vs", "ITC+LM+ELECTRA,ITC+LM+MLM+MOC", "--steps=2", "--warmup=0",
                      "--batch_size=4"])
    tiny = bench.train.PRESETS["tiny"].model
    for row in ("ITC+LM+ELECTRA", "ITC+LM+MLM+MOC"):
        flops = bench.pretrain_flops(bench.bench_model_config(tiny, **ABLATION_ROWS[row]), 4)
        assert out[f"{row}_flops_per_step"] == flops
    assert out["ITC+LM+MLM+MOC_flops_per_step"] < out["ITC+LM+ELECTRA_flops_per_step"]  # no discriminator
    assert out["cost_ratio"] == pytest.approx(out["ITC+LM+MLM+MOC_samples_per_s"] / out["ITC+LM+ELECTRA_samples_per_s"])
    for vs in ("ITC+LM", "ITC,ITC+LM,all", "ITC,nothing"):
        with pytest.raises(SystemExit, match="--vs takes hf, itc_lm or two ablation rows"):
            bench.main(["--config", "tiny", "--vs", vs])


def test_generate_mode_cached_equals_uncached_with_exactly_new_tokens(capsys):
    """30 new tokens at the tiny preset (context 24): the bench raises the context and keeps
    every row going; bench_generate raises if a call made another number of tokens."""
    out = bench.main(["--config", "tiny", "--mode", "generate", "--new_tokens=30", "--steps=1", "--warmup=0",
                      "--batch_size=3", "--peak_tflops=1"])
    assert out["identical"] is True
    assert out["cached_tokens_per_s"] > 0 and out["uncached_tokens_per_s"] > 0
    assert "identical outputs  True" in capsys.readouterr().out


def test_instruct_mode_times_one_pass_against_two(capsys):
    """Three variants of one model, each timed: the FLOPs per set are instruct_flops' (pass 1 on 1 of the 2 tiny
    blocks costs less than on both)."""
    out = bench.main(["--config", "tiny", "--mode", "instruct", "--steps=1", "--warmup=0", "--batch_size=2"])
    tiny = bench.train.PRESETS["tiny"].model
    flops = {name: sum(bench.InstructVLM(bench.bench_model_config(tiny, instruct=True, **changes))
                       .instruct_flops(3).values()) / 1e9
             for name, changes in (("one_pass", dict(two_pass=False)), ("two_passes", dict(pass1_layers=0)),
                                   ("two_passes_pass_1_on_1_block", dict(pass1_layers=1)))}
    assert {name: out[name]["gflops"] for name in flops} == pytest.approx(flops)
    assert flops["two_passes_pass_1_on_1_block"] < flops["two_passes"]
    assert all(out[name]["latency_ms"] > 0 and out[name]["sets_per_s"] > 0 for name in flops)
    assert "pass 1 on 1 block" in capsys.readouterr().out


def test_train_and_loader_modes_run(world_root, tiny_world):
    out = bench.main(["--config", "tiny", "--steps=1", "--warmup=0", "--batch_size=4", "--peak_tflops=0.001"])
    assert out["flops_per_step"] == bench.pretrain_flops(bench.bench_model_config(bench.train.PRESETS["tiny"].model), 4)
    assert 0 < out["train_mfu"]
    for workers in (0, 1):
        out = bench.main(["--config", "tiny", "--mode", "loader", f"--data_dir={world_root}", "--steps=3", "--warmup=1",
                          f"--num_workers={workers}"])
        assert out["loader_samples_per_s"] > 0


DIRECT = """
import sys, torch
sys.path.insert(0, {root!r})
import bench, configurator, train
preset, overrides = configurator.parse_args({args!r}, train.PRESETS)
cfg = configurator.apply_overrides(train.PRESETS[preset], overrides)
step, _ = bench.memory_step(cfg, bench.bench_model_config(cfg.model), cfg.batch_size,
                            torch.autocast("cpu", dtype=torch.bfloat16))
step()  # libraries and kernels loaded, the allocator settled

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # the peak resident size starts again from here
before = status("VmRSS")
step()
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's peak resident size is the reference")
def test_memory_estimate_on_fake_tensors_is_within_10_percent_of_the_real_step():
    """--mode memory counts a step's peak on fake tensors; the same step run for real grows the process's
    resident memory (VmHWM, with every allocation of 64 KiB or more its own mapping, so that a free returns
    it at once) by as much, within 10%."""
    args = ["--config", "small", "--batch_size=48"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    result = subprocess.run([sys.executable, "-c", DIRECT.format(root=ROOT, args=args)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    direct = int(result.stdout.split()[-1])
    cfg = bench.train.PRESETS["small"]
    _, estimate, _ = bench.step_memory(cfg, bench.bench_model_config(cfg.model), 48,
                                             torch.autocast("cpu", dtype=torch.bfloat16))
    assert abs(estimate - direct) <= 0.1 * direct, (estimate, direct)


def test_memory_mode_reports_the_peak_and_the_largest_batch_that_fits(capsys):
    out = bench.main(["--config", "tiny", "--mode", "memory", "--memory_gb=0.05"])
    assert out["peak_gb"] == pytest.approx(out["persistent_gb"] + out["step_gb"])
    fit = out["largest_batch_that_fits"]
    assert fit % 8 == 0 and fit > 0
    cfg, ctx = bench.train.PRESETS["tiny"], torch.autocast("cpu", dtype=torch.bfloat16)
    mcfg = bench.bench_model_config(cfg.model)
    assert sum(bench.step_memory(cfg, mcfg, fit, ctx)[:2]) <= 0.85 * 0.05e9  # it fits with 15% to spare
    assert sum(bench.step_memory(cfg, mcfg, fit + 8, ctx)[:2]) > 0.85 * 0.05e9  # and 8 more do not


def test_checkpointed_text_blocks_give_the_same_step_in_less_memory():
    """--checkpoint recomputes the text blocks' activations in the backward pass: the same loss and
    gradients, bit for bit, and a smaller peak in --mode memory."""
    cfg = bench.train.PRESETS["tiny"]
    mcfg = bench.bench_model_config(cfg.model)
    steps = []
    for on in (False, True):
        torch.manual_seed(0)
        model = checkpoint_blocks(VLM(mcfg), on)
        batch = bench.random_batch(model, 8, "cpu")
        torch.manual_seed(1)
        loss = model(**batch, groups=None, alpha=0.4)["loss"]
        loss.backward()
        steps.append((loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.equal(steps[0][0], steps[1][0]) and steps[0][1].keys() == steps[1][1].keys()
    assert all(torch.equal(steps[0][1][n], steps[1][1][n]) for n in steps[0][1])
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    plain = bench.step_memory(cfg, mcfg, 32, ctx)[1]
    checkpointed = bench.step_memory(dataclasses.replace(cfg, checkpoint=True), mcfg, 32, ctx)[1]
    assert checkpointed < 0.9 * plain, (checkpointed, plain)

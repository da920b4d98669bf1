"""
Benchmark nanoVLP: training throughput and MFU, a side-by-side with Hugging Face CLIP, data
loading, captioning with and without the KV cache, and the memory of a step.

    python bench.py --config small                        # samples/s and MFU of the pretraining step
    python bench.py --config base --batch_size=8 --steps=5   # any train.py flag applies
    python bench.py --config small --vs hf                # the ITC step: ours against transformers.CLIPModel
    python bench.py --config small --vs itc_lm            # every objective against ITC + captioning, one run
    python bench.py --config small --vs ITC+LM+ELECTRA,ITC+LM+MLM+MOC   # any two ablation rows of eval.py
    python bench.py --config small --mode loader          # pretraining batches from the shapes world (--num_workers=N)
    python bench.py --config small --mode generate        # caption tokens/s, KV cache on and off
    python bench.py --config base --mode memory --vocab_size=49408   # a step's peak memory; the largest batch that fits
    python bench.py --config small --mode instruct        # answering 3-image sets: one pass against two
    python bench.py --config small --json out/bench.json  # the numbers also as JSON (written atomically)

The bench's own flags are BenchConfig's; every other flag is train.py's and means what it means there.
The model runs on random data of the right shapes. What is measured, and the FLOP formula: docs/bench.md.
"""

import copy
import functools
import math
import os
import re
import sys
import time
import typing
import warnings
import weakref
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import configurator
import data
import train
from eval import ABLATION_ROWS, OBJECTIVES_OFF, write_json
from hf import hf_clip_config
from instruct import InstructVLM
from model import VLM, VLMConfig, fused_pairs, loss_weights, mask_slots, mlp_widths, transformer_flops, uses_electra
from parallel import checkpoint_blocks, compile_mode, compile_model


@dataclass
class BenchConfig:
    mode: str = "train"  # 'train' (the pretraining step), 'loader', 'generate' (captioning), 'memory' or 'instruct'
    memory_gb: float = 80.0  # memory: the accelerator's memory in GB (1e9 bytes); a step fits with 15% to spare
    vs: str = ""  # mode train, side by side: 'hf' (ITC against transformers.CLIPModel), 'itc_lm' (the preset
    # against ITC+LM) or two ablation rows 'ROW,ROW' (eval.py's ABLATION_ROWS)
    steps: int = 0  # timed steps (generate: timed calls of each kind); 0: the mode's default
    warmup: int = -1  # untimed steps first; -1: the mode's default
    new_tokens: int = 64  # generate: tokens per caption, exactly
    n_images: int = 3  # instruct: images per question set
    peak_tflops: float = 0.0  # the accelerator's peak for MFU; 0: from PEAK_TFLOPS by device name
    json: str = ""  # also write the numbers to this JSON file


DEFAULT_STEPS = {"train": (20, 3), "loader": (200, 10), "generate": (3, 1), "memory": (1, 1),
                 "instruct": (30, 3)}  # (steps, warmup)

# dense bf16 (V100, T4: fp16) tensor-core peaks, TFLOP/s; the first match wins, \b keeps A10 from matching A100
PEAK_TFLOPS = [
    (r"\bB200\b", 2250), (r"\bGH200\b", 989), (r"\bH200 NVL\b", 835), (r"\bH200\b", 989),
    (r"\bH100 PCIe\b", 756), (r"\bH100 NVL\b", 835), (r"\bH100\b", 989),  # the SXM part: "NVIDIA H100 80GB HBM3"
    (r"\bA100\b", 312), (r"\bA30\b", 165), (r"\bA40\b", 150), (r"\bA10G\b", 70), (r"\bA10\b", 125),
    (r"\bL40S\b", 362), (r"\bL40\b", 181), (r"\bL4\b", 121),
    (r"\bRTX 4090\b", 165), (r"\bRTX 3090\b", 71), (r"\bRTX A6000\b", 155),
    (r"\bV100S\b", 130), (r"\bV100-PCIE\b", 112), (r"\bV100\b", 125), (r"\bT4\b", 65),
]


def peak_tflops(device_name, override=0.0):
    """The peak TFLOP/s for MFU: override when > 0, else the first PEAK_TFLOPS match, else None."""
    if override > 0:
        return float(override)
    return next((float(tflops) for pattern, tflops in PEAK_TFLOPS if re.search(pattern, device_name, re.IGNORECASE)),
                None)


# -----------------------------------------------------------------------------
# FLOPs of one pretraining step (the formula: docs/bench.md)


def pretrain_terms(c, batch_size):
    """The terms of one pretraining step on one process, as VLM.pretrain_losses runs it for the loss
    weights of c: a list of (name, forward FLOPs, b), b the backward's multiple of the forward (2: input and
    weight gradients, 1: weight gradient only, 0: no backward). The formula: docs/bench.md."""
    on = {k: w > 0 for k, w in loss_weights(c).items()}
    electra, fused = uses_electra(c), on["itm"] or on["rtd"] or on["r2d"]
    B, N = batch_size, batch_size
    P = (c.image_size // c.patch_size) ** 2
    M = P if c.converter == "mlp" else c.n_queries
    T, w, vw, D, V, r = c.context_length, c.text_width, c.vit_width, c.embed_dim, c.vocab_size, c.mlp_ratio
    distill = c.momentum_alpha > 0 and on["itc"]  # momentum encoders, soft targets and the queue
    Q = c.queue_size if distill else 0
    # forward FLOPs on one image: the ViT's patch conv and blocks, the converter (no relation tokens)
    vit_mlp, text_mlp = mlp_widths(c)
    conv, vit = 2 * P * 3 * c.patch_size ** 2 * vw, transformer_flops(c.vit_layers, vw, 1 + P, vit_mlp)
    converter = 2 * P * (vw * w + w * w + 4 * vw * w * c.image_axes) if c.converter == "mlp" else \
        2 * P * vw * w + c.resampler_layers * (2 * M * w * w * (2 + 2 * r) + 4 * P * w * w + 4 * M * P * w)

    def text(n):
        return transformer_flops(c.text_layers, w, n, text_mlp)

    # shared_vit_pass: one ViT pass over the replaced pixels serves everything, else the fused pass reads a second one
    shared = electra and c.shared_vit_pass
    one_pass, clean, replaced = fused_pairs(c)
    # the first pass's image tokens get a gradient from captioning, and from the fused pass when they are its input
    tokens_grad = on["caption"] or ((one_pass or clean) and fused and c.fused_vit_grad)
    Bf, Nf = (B, N) if c.fused_rows == 1 else (B // 2, N // 2)  # the rows ELECTRA and the fused pass take
    vit_grad = on["itc"] or tokens_grad
    terms = [("vit.conv", B * conv, vit_grad), ("vit.blocks", B * vit, 2 * vit_grad)]
    if tokens_grad:
        terms.append(("converter", B * converter, 2))
    # a converter whose input has no gradient: its input map computes the weight gradient only
    conv_in = 2 * P * vw * w * (1 + 4 * c.image_axes)  # c_fc (and c_axes) of the mlp, c_in of the resampler

    def detached_converter(name, rows):
        return [(name + ".in", rows * conv_in, 1), (name, rows * (converter - conv_in), 2)]
    if (one_pass or clean) and fused and not c.fused_vit_grad:
        terms += detached_converter("fused.converter", Bf)
    if on["itc"] or on["itm"]:  # ITM draws its hard negatives from the embeddings
        terms += [("itc.image_proj", 2 * B * vw * D, 2 * on["itc"]), ("itc.text", B * text(T), 2 * on["itc"]),
                  ("itc.text_proj", 2 * B * w * D, 2 * on["itc"])]
    if on["itc"]:
        terms.append(("itc.logits", 2 * 2 * B * (N + Q) * D, 2))
    if distill:
        terms += [("momentum.vit", B * (conv + vit) + 2 * B * vw * D, 0),
                  ("momentum.text", B * text(T) + 2 * B * w * D, 0),
                  ("momentum.soft_targets", 2 * 2 * B * (N + Q) * D, 0)]
    if electra:
        g, p2, S = c.gen_width or w // 4, 3 * c.patch_size ** 2, mask_slots(c, T)  # MLM logits at S slots a row
        gen = [("generator.patch_embed", Bf * 2 * P * p2 * g, on["mlm"] or on["moc"]),
               ("generator.blocks", Bf * (2 * T * w * g + transformer_flops(c.gen_layers, g, P + T, r * g)),
                2 * (on["mlm"] or on["moc"])),
               ("generator.mlm_logits", Bf * (2 * S * g * w + 2 * S * w * V), 2 * on["mlm"]),
               ("generator.moc_logits", Bf * 2 * P * g * c.n_codes, 2 * on["moc"])]
        terms += gen
        if c.momentum_alpha > 0 and on["mlm"]:  # soft MLM targets from the momentum generator
            terms.append(("momentum.generator", sum(f for _, f, _ in gen), 0))
        if replaced and not shared:  # the discriminator reads the replaced pixels through the ViT again
            if c.fused_vit_grad:
                terms += [("electra.vit.conv", Bf * conv, 1), ("electra.vit.blocks", Bf * vit, 2),
                          ("electra.converter", Bf * converter, 2)]
            else:
                terms += [("electra.vit.conv", Bf * conv, 0), ("electra.vit.blocks", Bf * vit, 0)]
                terms += detached_converter("electra.converter", Bf)
    if fused:
        # matched pairs, then pairs with a negative text or image (0.5: the even rows of the batch)
        neg = {0.5: (Bf + 1) // 2, 1: Bf, 2: 2 * Bf}[c.itm_negatives] if on["itm"] else 0
        R = Bf * (replaced + clean) + neg  # matched pairs (replaced, clean or both), then negative pairs
        terms.append(("fused.blocks", R * text(M + T), 2))
        if on["itm"]:
            terms += [("itm.head", 2 * (Bf + neg) * w * 2, 2), ("itm.hard_negatives", 2 * 2 * Bf * Nf * D, 0)]
        terms += [("rtd.head", 2 * Bf * T * w, 2)] if on["rtd"] else []
        terms += [("r2d.head", 2 * Bf * M * w, 2)] if on["r2d"] else []
    if on["caption"]:
        terms += [("caption.blocks", B * text(M + T - 1), 2), ("caption.lm_head", 2 * B * (T - 1) * w * V, 2)]
    return [(name, flops, int(b)) for name, flops, b in terms]


def pretrain_flops(c, batch_size, backward=True):
    """FLOPs of one pretraining step: the sum over pretrain_terms of F (1 + b), or of F alone."""
    return sum(f * (1 + b if backward else 1) for _, f, b in pretrain_terms(c, batch_size))


# -----------------------------------------------------------------------------
# pieces of a benchmark


def bench_model_config(mcfg, **changes):
    """The model config with the special tokens at the top 5 ids of its vocabulary, and any changes."""
    V = mcfg.vocab_size
    if V < 6:
        raise SystemExit(f"--vocab_size={V}: the bench needs at least one word besides the 5 special tokens")
    ids = dict(eos_id=V - 5, bos_id=V - 4, pad_id=V - 3, mask_id=V - 2, glob_id=V - 1)
    return VLMConfig(**{**asdict(mcfg), **ids, **changes})


def random_batch(model, batch_size, device, seed=0):
    """Pretraining inputs of the right shapes: random images (normalised), token rows
    <bos> words <eos> <pad>..., random visual codes."""
    c = model.cfg
    g = torch.Generator().manual_seed(seed)
    B, T, P = batch_size, c.context_length, (c.image_size // c.patch_size) ** 2
    images = torch.randint(0, 256, (B, c.image_size, c.image_size, 3), dtype=torch.uint8, generator=g)
    n = torch.randint(1, T - 1, (B, 1), generator=g)  # words per caption
    pos = torch.arange(T)[None]
    words = torch.randint(0, c.vocab_size - 5, (B, T), generator=g)
    tokens = torch.where(pos <= n, words, torch.where(pos == n + 1, c.eos_id, c.pad_id))
    tokens[:, 0] = c.bos_id
    codes = torch.randint(0, c.n_codes, (B, P), generator=g)
    return dict(pixels=model.normalize_pixels(images.to(device)), tokens=tokens.to(device), codes=codes.to(device))


def timed(fn, n, device_type):
    """Seconds to run fn() n times, the device synchronised before and after (the timer reads the work done)."""
    synchronize = torch.accelerator.synchronize if device_type in ("cuda", "mps") else lambda: None
    synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize()
    return time.perf_counter() - t0


def optimizer_step(model, loss_fn, cfg, device_type, ctx, after=None):
    """A function that takes one training step as train.py does (autocast, grad scaler, clipping,
    AdamW, zero_grad), then after()."""
    optimizer = train.configure_optimizer(model, cfg, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=train.pick_runtime(cfg)[2] == torch.float16)

    def step():
        with ctx:
            loss = loss_fn()
        scaler.scale(loss).backward()
        train.optimizer_step(model, optimizer, scaler, cfg)
        if after is not None:
            after()
    step.optimizer = optimizer
    return step


def cpu_peak(info=None):
    """(float32 peak TFLOP/s of the cores torch uses, how it was found) from /proc/cpuinfo (or info):
    threads x clock x 32 FLOP per cycle with FMA, 16 without; (None, why) without a clock."""
    try:
        info = open("/proc/cpuinfo").read() if info is None else info
        mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M).group(1))
    except (OSError, AttributeError):
        return None, "no clock in /proc/cpuinfo: give --peak_tflops"
    per_cycle = 32 if re.search(r"^flags\s*:.*\bfma\b", info, re.M) else 16
    threads = torch.get_num_threads()
    why = f"{threads} threads x {mhz / 1e3:.2f} GHz x {per_cycle} float32 FLOP/cycle"
    return threads * mhz * 1e6 * per_cycle / 1e12, why


def resolve_peak(bench, device_type):
    """(peak TFLOP/s or None, where it comes from or why there is none)."""
    if device_type == "cpu" and bench.peak_tflops <= 0:
        return cpu_peak()
    name = torch.cuda.get_device_name() if device_type == "cuda" else device_type
    peak = peak_tflops(name, bench.peak_tflops)
    if peak is None:
        return None, f"no peak known for {name}: give --peak_tflops"
    return peak, "--peak_tflops" if bench.peak_tflops > 0 else f"{name}, dense 16-bit tensor peak"


def throughput(name, flops_per_step, batch_size, steps, seconds, peak):
    """samples/s, step ms, achieved TFLOP/s and MFU (None without a peak) of one timed run."""
    achieved = flops_per_step * steps / seconds
    return {f"{name}_samples_per_s": batch_size * steps / seconds, f"{name}_step_ms": 1e3 * seconds / steps,
            f"{name}_tflops": achieved / 1e12, f"{name}_mfu": achieved / (peak * 1e12) if peak else None}


def print_table(title, rows):
    """A two-column table: rows of (label, value)."""
    print(f"\n{title}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def fmt_mfu(mfu, why):
    return f"{100 * mfu:.2f}% (peak: {why})" if mfu is not None else f"n/a ({why})"


def runtime(cfg):
    """(device, device type, dtype, autocast context, compile mode) as train.py picks them."""
    device, device_type, dtype, ctx = train.pick_runtime(cfg)
    return device, device_type, dtype, ctx, compile_mode(cfg, device_type)


# -----------------------------------------------------------------------------
# the benchmarks


def pretrain_step(cfg, mcfg, device, device_type, ctx, compiled):
    """(model, a function that takes one pretraining step of it on a fixed random batch)."""
    torch.manual_seed(cfg.seed)  # eager and compiled steps start from the same weights
    with torch.device(device):  # made there: no copy (and none of fake tensors, which --mode memory uses)
        raw = VLM(mcfg)
    raw.codebook.uniform_()  # random centroids: the cost is the same
    model = compile_model(checkpoint_blocks(raw, cfg.checkpoint), compiled)
    batch = random_batch(raw, cfg.batch_size, device, cfg.seed)
    step = optimizer_step(raw, lambda: model(**batch, groups=None, alpha=mcfg.momentum_alpha)["loss"], cfg, device_type,
                          ctx, after=raw.momentum_update)
    return raw, step


def peak_memory(device_type):
    """GiB at the CUDA allocator's peak so far; None elsewhere."""
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device_type == "cuda" else None


def dynamo_counts():
    """(graphs compiled, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def bench_train(cfg, bench):
    """Samples/s, FLOPs and MFU of the pretraining step with the preset's objectives; compiled, also the
    eager step in alternating blocks, the compile time and the graphs compiled after the first step."""
    device, device_type, dtype, ctx, compiled = runtime(cfg)
    mcfg = bench_model_config(cfg.model)
    raw, step = pretrain_step(cfg, mcfg, device, device_type, ctx, compiled)
    flops = pretrain_flops(mcfg, cfg.batch_size)
    peak, why = resolve_peak(bench, device_type)
    out = dict(params=raw.num_params(), flops_per_step=flops,
               forward_flops_per_step=pretrain_flops(mcfg, cfg.batch_size, backward=False))
    if compiled == "false":
        timed(step, bench.warmup, device_type)
        out.update(throughput("train", flops, cfg.batch_size, bench.steps, timed(step, bench.steps, device_type), peak))
        out["peak_memory_gib"] = peak_memory(device_type)
    else:
        first_s = timed(step, 1, device_type)  # tracing and compiling, then the step
        out["peak_memory_gib"] = peak_memory(device_type)  # before the eager copy is made
        graphs, breaks = dynamo_counts()
        eager = pretrain_step(cfg, mcfg, device, device_type, ctx, "false")[1]
        each, rates, n, blocks, _ = alternate({"train": step, "eager": eager}, dict.fromkeys(("train", "eager"), flops),
                                              cfg, bench, device_type)
        out.update(**each["train"], **each["eager"], compile_s=first_s - each["eager"]["eager_step_ms"] / 1e3,
                   graphs=graphs, graph_breaks=breaks, recompiles=dynamo_counts()[0] - graphs)
        out["compiled_over_eager"] = out["train_samples_per_s"] / out["eager_samples_per_s"]
    objectives = ", ".join(k for k, v in loss_weights(raw.cfg).items() if v > 0)
    objectives += " + momentum" if raw.momentum else ""
    rows = [("parameters", f"{out['params'] / 1e6:.2f}M"),
            ("step", f"{out['train_step_ms']:.1f} ms"),
            ("samples/s", f"{out['train_samples_per_s']:.4g}"),
            ("FLOPs/step", f"{flops / 1e9:.2f} GFLOP (forward {out['forward_flops_per_step'] / 1e9:.2f})"),
            ("achieved", f"{out['train_tflops'] * 1e3:.1f} GFLOP/s"),
            ("MFU", fmt_mfu(out["train_mfu"], why))]
    if out["peak_memory_gib"] is not None:
        rows.append(("peak memory", f"{out['peak_memory_gib']:.2f} GiB allocated (torch.cuda.max_memory_allocated)"))
    if compiled != "false":
        rows += [("eager samples/s", f"{out['eager_samples_per_s']:.4g} (alternating blocks: {n} steps each in "
                                     f"{blocks}; compiled {min(rates['train']):.4g}..{max(rates['train']):.4g}, "
                                     f"eager {min(rates['eager']):.4g}..{max(rates['eager']):.4g})"),
                 ("compiled / eager", f"{out['compiled_over_eager']:.3f}"),
                 ("compile", f"{out['compile_s']:.1f} s (the first step less an eager one)"),
                 ("graphs", f"{graphs} compiled in the first step, {out['recompiles']} after it; "
                            f"{breaks} graph breaks")]
    print_table(f"pretraining step: {objectives} | {device} {dtype} compile {compiled} | batch {cfg.batch_size}, "
                f"{bench.steps} steps after {bench.warmup} warm-up", rows)
    print_table("FLOPs by term (GFLOP per step: forward x (1 + b))", [
        (name, f"{f * (1 + b) / 1e9:8.3f}  (b={b})") for name, f, b in pretrain_terms(mcfg, cfg.batch_size)])
    return out


def hf_clip(mcfg):
    """transformers.CLIPModel with our model's dimensions (random weights, SDPA attention)."""
    from transformers import CLIPModel
    return CLIPModel._from_config(hf_clip_config(mcfg), attn_implementation="sdpa")


def clip_param_counts(ours, hf):
    """{part: (ours, Hugging Face's)} parameter counts of the vision tower, text tower and temperature."""
    def count(*modules):
        unique = {id(p): p for m in modules for p in m.parameters()}
        return sum(p.numel() for p in unique.values())
    return {"vision": (count(ours.visual), count(hf.vision_model, hf.visual_projection)),
            "text": (count(ours.text), count(hf.text_model, hf.text_projection)),
            "logit_scale": (ours.logit_scale.numel(), hf.logit_scale.numel())}


def bench_vs_hf(cfg, bench):
    """The ITC step side by side: ours with ITC alone against transformers.CLIPModel of the same
    dimensions, on one batch, timed in alternating blocks."""
    import transformers
    device, device_type, dtype, ctx, compiled = runtime(cfg)
    mcfg = bench_model_config(cfg.model, **{**OBJECTIVES_OFF, "itc_weight": 1.0})
    ours_raw = VLM(mcfg).to(device)
    hf_raw = hf_clip(mcfg).to(device).train()
    ours = compile_model(ours_raw, compiled)
    hf = compile_model(hf_raw, compiled, (transformers.models.clip.modeling_clip.CLIPEncoderLayer,))
    batch = random_batch(ours_raw, cfg.batch_size, device, cfg.seed)
    pixels, tokens = batch["pixels"], batch["tokens"]
    mask = (tokens != mcfg.pad_id).long()
    losses = {"ours": lambda: ours(pixels=pixels, tokens=tokens)["loss"],
              "hf": lambda: hf(input_ids=tokens, attention_mask=mask, pixel_values=pixels, return_loss=True).loss}
    steps = {name: optimizer_step(m, losses[name], cfg, device_type, ctx)
             for name, m in (("ours", ours_raw), ("hf", hf_raw))}
    flops = pretrain_flops(mcfg, cfg.batch_size)  # the same matmuls in both (HF's q, k, v apart)
    each, rates, n, blocks, why = alternate(steps, dict.fromkeys(steps, flops), cfg, bench, device_type)
    counts = clip_param_counts(ours_raw, hf_raw)
    out = {**each["ours"], **each["hf"]}
    out.update(ratio=out["ours_samples_per_s"] / out["hf_samples_per_s"], flops_per_step=flops,
               params_ours=sum(o for o, _ in counts.values()), params_hf=sum(h for _, h in counts.values()),
               params_ours_total=ours_raw.num_params())
    rows = [(label, f"{out[name + '_samples_per_s']:8.4g} samples/s  {out[name + '_step_ms']:8.1f} ms/step  "
                    f"{out[name + '_tflops'] * 1e3:7.1f} GFLOP/s  blocks {min(rates[name]):.4g}..{max(rates[name]):.4g}"
                    f"  MFU {fmt_mfu(out[name + '_mfu'], why)}")
            for name, label in (("ours", "ours (ITC)"), ("hf", f"HF CLIPModel {transformers.__version__}"))]
    rows.append(("ours / HF", f"{out['ratio']:.3f}"))
    rows += [(f"params {part}", f"ours {o:,}  HF {h:,}" + ("  equal" if o == h else "  DIFFERENT"))
             for part, (o, h) in counts.items()]
    rows.append(("params note", f"ours also holds {out['params_ours_total'] - out['params_ours']:,} parameters that "
                                f"ITC does not use (converter, generator, heads); HF's position_ids are buffers"))
    print_table(f"ITC step, ours vs Hugging Face | {device} {dtype} compile {compiled} | batch {cfg.batch_size}, "
                f"{n} steps each in {blocks} alternating blocks after {bench.warmup} warm-up | "
                f"{flops / 1e9:.2f} GFLOP/step", rows)
    return out


def vs_rows(vs):
    """{key: ablation row} of a --vs naming two rows ('ROW,ROW'; 'all' is the preset), or of 'itc_lm'."""
    return {"all": "all", "itc_lm": "ITC+LM"} if vs == "itc_lm" else {row: row for row in vs.split(",")}


def bench_vs_rows(cfg, bench):
    """The pretraining steps of two ablation rows of the same model (itc_lm: the preset's against ITC+LM),
    timed in alternating blocks: what the one's objectives cost against the other's."""
    device, device_type, dtype, ctx, compiled = runtime(cfg)
    rows = vs_rows(bench.vs)
    steps, flops = {}, {}
    for name, row in rows.items():
        mcfg = bench_model_config(cfg.model, **ABLATION_ROWS[row])
        steps[name] = pretrain_step(cfg, mcfg, device, device_type, ctx, compiled)[1]
        flops[name] = pretrain_flops(mcfg, cfg.batch_size)
    each, rates, n, blocks, why = alternate(steps, flops, cfg, bench, device_type)
    out = {k: v for name in steps for k, v in [*each[name].items(), (f"{name}_flops_per_step", flops[name])]}
    first, second = rows
    out["cost_ratio"] = out[f"{second}_samples_per_s"] / out[f"{first}_samples_per_s"]
    table = [(f"{row} ({name})" if name != row else row,
              f"{out[name + '_samples_per_s']:8.4g} samples/s  {out[name + '_step_ms']:8.1f} ms/step  "
              f"{flops[name] / 1e9:6.2f} GFLOP/step  {out[name + '_tflops'] * 1e3:6.1f} GFLOP/s  "
              f"blocks {min(rates[name]):.4g}..{max(rates[name]):.4g}  MFU {fmt_mfu(out[name + '_mfu'], why)}")
             for name, row in rows.items()]
    table.append(("cost ratio", f"{out['cost_ratio']:.2f} ({rows[second]} samples/s over {rows[first]}'s)"))
    print_table(f"pretraining step, {rows[first]} against {rows[second]} | {device} {dtype} compile {compiled} | "
                f"batch {cfg.batch_size}, {n} steps each in {blocks} alternating blocks after {bench.warmup} warm-up",
                table)
    return out


class PeakMemory(TorchDispatchMode):
    """Bytes of tensor storage alive and their peak, counted at every op from when it is entered (a storage is
    freed when its last tensor goes), and the largest storages made: real or fake tensors alike."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak, self.largest = {}, 0, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(storage := t.untyped_storage()) not in self.live:
                self.live[id(storage)] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                self.largest = sorted(self.largest + [(storage.nbytes(), str(func), tuple(t.shape))])[-3:]
                weakref.finalize(storage, self.free, id(storage))
        return out

    def free(self, key):
        self.now -= self.live.pop(key)


def memory_step(cfg, mcfg, batch_size, ctx):
    """(a pretraining step function on the CPU, the bytes of weights, buffers and AdamW state after a first step)."""
    raw, step = pretrain_step(replace(cfg, batch_size=batch_size), mcfg, "cpu", "cpu", ctx, "false")
    step()  # AdamW makes its state in its first step
    tensors = [*raw.parameters(), *raw.buffers(), *(v for s in step.optimizer.state.values() for v in s.values())]
    return step, sum({id(s := t.untyped_storage()): s.nbytes() for t in tensors if torch.is_tensor(t)}.values())


def step_memory(cfg, mcfg, batch_size, ctx):
    """(bytes of weights, buffers and AdamW state; the peak bytes a training step adds to them; its three largest
    storages), counted on fake tensors, so that any size fits this machine."""
    with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")  # deepcopy's check, harmless
        step, persistent = memory_step(cfg, mcfg, batch_size, ctx)
        with PeakMemory() as tracked:
            step()
    return persistent, tracked.peak, tracked.largest


def bench_memory(cfg, bench):
    """The peak memory of one pretraining step at the preset's batch, under the CUDA dtype policy (bf16 autocast
    unless --dtype says otherwise), and the largest batch whose step fits --memory_gb with 15% to spare."""
    policy = "bfloat16" if cfg.dtype == "auto" else cfg.dtype  # CUDA's default, on the CPU's autocast
    _, _, dtype, ctx = train.pick_runtime(replace(cfg, device="cpu", dtype=policy))
    mcfg, budget = bench_model_config(cfg.model), 0.85 * bench.memory_gb * 1e9
    measure = functools.cache(lambda batch: step_memory(cfg, mcfg, batch, ctx))  # each size once
    persistent, step_bytes, largest = measure(cfg.batch_size)

    def fits(batch):
        return batch == 0 or sum(measure(batch)[:2]) <= budget
    lo, hi = 0, 8  # the largest multiple of 8 that fits: doubling, then bisection
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    fit = lo
    out = dict(persistent_gb=persistent / 1e9, step_gb=step_bytes / 1e9, peak_gb=(persistent + step_bytes) / 1e9,
               per_sample_mb=step_bytes / cfg.batch_size / 1e6, fits=persistent + step_bytes <= budget,
               largest_batch_that_fits=fit,
               memory_gb=bench.memory_gb, vocab_size=mcfg.vocab_size, dtype=str(dtype))
    print_table(f"memory of a pretraining step | {dtype} autocast (CUDA's dtype policy, on fake tensors) | batch "
                f"{cfg.batch_size}, vocabulary {mcfg.vocab_size}", [
                    ("weights, buffers, AdamW", f"{out['persistent_gb']:.2f} GB"),
                    ("the step adds", f"{out['step_gb']:.2f} GB at its peak (gradients, saved activations, "
                                      f"transients; {out['per_sample_mb']:.1f} MB a sample)"),
                    ("peak", f"{out['peak_gb']:.2f} GB of {bench.memory_gb:g} GB: "
                             f"{'fits' if out['fits'] else 'does NOT fit'} with 15% to spare"),
                    ("largest batch that fits", f"{fit} (a multiple of 8; each size measured, not extrapolated)"),
                    *((f"largest storage {i + 1}", f"{n / 1e9:.2f} GB from {op} {shape}")
                      for i, (n, op, shape) in enumerate(reversed(largest)))])
    return out


def alternate(steps, flops, cfg, bench, device_type):
    """Time step functions ({name: fn}) in alternating blocks, so that all see the same machine: ({name: its
    throughput at flops[name] per step}, {name: samples/s per block}, steps each, blocks, where the peak comes from)."""
    for step in steps.values():
        timed(step, bench.warmup, device_type)
    per_block = math.ceil(bench.steps / 6)  # about 6 blocks each, at least --steps steps in all
    blocks = math.ceil(bench.steps / per_block)
    seconds, rates = {k: 0.0 for k in steps}, {k: [] for k in steps}
    for i in range(blocks):  # the first step first in even blocks, the other in odd ones
        for name in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
            t = timed(steps[name], per_block, device_type)
            seconds[name] += t
            rates[name].append(cfg.batch_size * per_block / t)
    peak, why = resolve_peak(bench, device_type)
    return ({name: throughput(name, flops[name], cfg.batch_size, blocks * per_block, seconds[name], peak)
             for name in steps}, rates, blocks * per_block, blocks, why)


def bench_loader(cfg, bench):
    """Pretraining batches as the training loop takes them, place(next(stream)), read in this process
    or by --num_workers loader processes."""
    device, device_type, _, _, _ = runtime(cfg)
    ds = train.load_data(cfg, 0, 1)
    cfg.model = train.fit_model_to_data(cfg.model, ds)
    model = VLM(copy.deepcopy(cfg.model)).to(device)  # place() normalises the pixels with it
    fetch, place, n = train.pretrain_batches(cfg, ds, model, device, 0, 1)
    stream = data.host_batches(fetch, 0, cfg.num_workers, device_type == "cuda")
    timed(lambda: place(next(stream)), bench.warmup, device_type)  # with workers: their start-up too
    seconds = timed(lambda: place(next(stream)), bench.steps, device_type)
    out = {"loader_samples_per_s": cfg.batch_size * bench.steps / seconds,
           "loader_batch_ms": 1e3 * seconds / bench.steps}
    print_table(f"data loader: {ds.path} ({cfg.train_split}, {n} images) | {device} | {cfg.num_workers} workers | "
                f"batch {cfg.batch_size}, {bench.steps} batches after {bench.warmup}", [
                    ("samples/s", f"{out['loader_samples_per_s']:.0f}"), ("batch", f"{out['loader_batch_ms']:.2f} ms")])
    return out


def bench_generate(cfg, bench):
    """Greedy captioning of a batch, exactly new_tokens tokens, with and without the KV cache: tokens/s
    of each, and whether they agree. eos_id is -1, which no model emits, so that no row stops early."""
    device, device_type, dtype, ctx, _ = runtime(cfg)
    n = bench.new_tokens
    mcfg = bench_model_config(cfg.model, context_length=max(cfg.model.context_length, n + 1), momentum_alpha=0.0,
                              eos_id=-1)
    model = VLM(mcfg).to(device).eval()
    pixels = random_batch(model, cfg.batch_size, device, cfg.seed)["pixels"]
    outputs = {}

    def run(use_cache):
        with ctx:
            outputs[use_cache] = model.generate(pixels, max_new_tokens=n, use_cache=use_cache)
    seconds = {True: 0.0, False: 0.0}
    for i in range(bench.warmup + bench.steps):
        for use_cache in ((True, False) if i % 2 == 0 else (False, True)):
            t = timed(lambda: run(use_cache), 1, device_type)
            if i >= bench.warmup:
                seconds[use_cache] += t
    for use_cache, tokens in outputs.items():
        if tokens.shape != (cfg.batch_size, n):
            raise RuntimeError(f"generate (use_cache={use_cache}) made {tuple(tokens.shape)} tokens, "
                               f"not {(cfg.batch_size, n)}")
    made = cfg.batch_size * n * bench.steps
    same = outputs[True] == outputs[False]
    out = {"cached_tokens_per_s": made / seconds[True], "uncached_tokens_per_s": made / seconds[False],
           "identical": bool(same.all()), "rows_identical": same.all(1).float().mean().item(),
           "tokens_equal": same.float().mean().item()}
    out["speedup"] = out["cached_tokens_per_s"] / out["uncached_tokens_per_s"]
    M = (mcfg.image_size // mcfg.patch_size) ** 2 if mcfg.converter == "mlp" else mcfg.n_queries
    rows = [("KV cache", f"{out['cached_tokens_per_s']:.0f} tokens/s"),
            ("no cache", f"{out['uncached_tokens_per_s']:.0f} tokens/s"),
            ("speed-up", f"{out['speedup']:.2f}x"),
            ("identical outputs", f"{out['identical']} (rows {100 * out['rows_identical']:.1f}%, "
                                  f"tokens {100 * out['tokens_equal']:.1f}%)")]
    if dtype != torch.float32:
        rows.append(("why", f"in {dtype} the cached step rounds the new position's states alone and the uncached "
                            "pass all of them, in other kernel shapes; greedy picks can differ at near-ties, and a "
                            "row differs from there on (float32: identical)"))
    print_table(f"greedy captioning: {n} new tokens after {M} image tokens | {device} {dtype} | "
                f"batch {cfg.batch_size}, {bench.steps} calls each after {bench.warmup}", rows)
    return out


def bench_instruct(cfg, bench):
    """Answering question sets of n_images images: one pass against two (pass 1 through every text block, and
    through the first --pass1_layers, default 1), in alternating rounds: the latency of one set alone, the sets/s
    of a batch, forward FLOPs per set. eos_id is -1, which no model emits: each answer takes answer_length - 1 steps."""
    device, device_type, dtype, ctx, _ = runtime(cfg)
    k = cfg.model.pass1_layers or 1
    variants = {"one pass": dict(two_pass=False), "two passes": dict(two_pass=True, pass1_layers=0),
                f"two passes, pass 1 on {k} block{'s' * (k > 1)}": dict(two_pass=True, pass1_layers=k)}
    models = {}
    for name, changes in variants.items():
        torch.manual_seed(cfg.seed)
        mcfg = bench_model_config(cfg.model, instruct=True, momentum_alpha=0.0, eos_id=-1, **changes)
        models[name] = InstructVLM(mcfg).to(device).eval()
    c, B, K = models["one pass"].cfg, cfg.batch_size, bench.n_images
    g = torch.Generator().manual_seed(cfg.seed)
    pixels = torch.randn(B, K, 3, c.image_size, c.image_size, generator=g).to(device)
    question = torch.full((B, c.context_length - c.answer_length), c.pad_id)
    question[:, 0], question[:, 9] = c.bos_id, c.vocab_size - 5  # <bos> 8 words <eos> (its id; the model's is -1)
    question[:, 1:9] = torch.randint(0, c.vocab_size - 5, (B, 8), generator=g)
    question, valid = question.to(device), torch.ones(B, K, dtype=torch.bool, device=device)
    seconds = {name: {1: 0.0, B: 0.0} for name in models}
    for i in range(bench.warmup + bench.steps):
        for name in (list(models) if i % 2 == 0 else list(models)[::-1]):
            for n in (1, B):
                with ctx:
                    t = timed(lambda: models[name].answer(pixels[:n], valid[:n], question[:n]), 1, device_type)
                seconds[name][n] += t if i >= bench.warmup else 0.0
    out, rows = {}, []
    for name, model in models.items():
        gflops = sum(model.instruct_flops(K).values()) / 1e9
        key = name.replace(", ", "_").replace(" ", "_")
        out[key] = dict(latency_ms=1000 * seconds[name][1] / bench.steps, sets_per_s=B * bench.steps / seconds[name][B],
                        gflops=gflops)
        rows.append((name, f"{out[key]['latency_ms']:.1f} ms a set alone | {out[key]['sets_per_s']:.0f} sets/s at "
                           f"batch {B} | {gflops:.3f} GFLOP a set (training forward)"))
    print_table(f"answering sets of {K} images, keep {c.keep_ratio} | {device} {dtype} | {bench.steps} rounds after "
                f"{bench.warmup}, alternating", rows)
    return out


# -----------------------------------------------------------------------------
# the command line


def parse_bench_args(argv):
    """(BenchConfig, the other arguments): the bench's own flags (--key=value or --key value) taken out."""
    hints, values, rest = typing.get_type_hints(BenchConfig), {}, []
    args = iter(argv)
    for arg in args:
        key, eq, raw = arg[2:].partition("=")
        if not arg.startswith("--") or key not in hints:
            rest.append(arg)
            continue
        raw = raw if eq else next(args, None)
        if raw is None:
            raise SystemExit(f"--{key} needs a value")
        try:
            values[key] = configurator.parse_value(key, raw, hints[key])
        except ValueError as e:
            raise SystemExit(str(e)) from None
    bench = BenchConfig(**values)
    if bench.mode not in DEFAULT_STEPS:
        raise SystemExit(f"unknown --mode {bench.mode!r}; modes: {', '.join(DEFAULT_STEPS)}")
    rows = set(vs_rows(bench.vs).values())
    two_rows = len(rows) == 2 and rows <= ABLATION_ROWS.keys()
    if bench.vs and (bench.mode != "train" or bench.vs != "hf" and not two_rows):
        raise SystemExit(f"--vs takes hf, itc_lm or two ablation rows ROW,ROW ({', '.join(ABLATION_ROWS)}), with "
                         f"--mode train (got --vs={bench.vs!r}, --mode={bench.mode})")
    folder = os.path.dirname(os.path.abspath(bench.json)) if bench.json else "."
    if not (bench.steps >= 0 and bench.warmup >= -1 and bench.new_tokens >= 1 and bench.n_images >= 1 and
            bench.memory_gb > 0 and bench.peak_tflops >= 0):
        raise SystemExit(f"--steps must be at least 0 (0: the mode's default), --warmup at least -1, --new_tokens and "
                         f"--n_images at least 1, --memory_gb above 0, --peak_tflops at least 0; got {bench}")
    if bench.json and (os.path.isdir(bench.json) or not os.path.isdir(folder)):
        raise SystemExit(f"--json {bench.json}: give a file in a folder that exists")
    steps, warmup = DEFAULT_STEPS[bench.mode]
    bench.steps = bench.steps if bench.steps > 0 else steps
    bench.warmup = bench.warmup if bench.warmup >= 0 else warmup
    return bench, rest


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        lines = configurator.flag_lines(BenchConfig())
        print(__doc__.strip(), "", *lines, "and every flag of train.py (train.py --help)", sep="\n")
        raise SystemExit(0)
    bench, rest = parse_bench_args(argv)
    preset, overrides = configurator.parse_args(rest, train.PRESETS)
    if overrides.get("stage", "pretrain") != "pretrain":
        raise SystemExit("bench.py measures the pretraining step: --stage does not apply")
    cfg = train.apply_overrides(train.PRESETS[preset], overrides)
    if cfg.grad_accum != 1:
        raise SystemExit("bench.py times steps of one batch: set --batch_size, not --grad_accum")
    configurator.validate(cfg)
    if bench.mode == "instruct" and bench.n_images > cfg.model.image_slots:
        raise SystemExit(f"--n_images={bench.n_images}: the model takes at most --image_slots={cfg.model.image_slots}")
    torch.manual_seed(cfg.seed)
    modes = {"train": bench_train, "loader": bench_loader, "generate": bench_generate, "memory": bench_memory,
             "instruct": bench_instruct}
    run = bench_vs_hf if bench.vs == "hf" else bench_vs_rows if bench.vs else modes[bench.mode]
    t0 = time.time()
    out = run(cfg, bench)
    out.update(config=preset, mode=bench.mode + (f"_vs_{bench.vs}" if bench.vs else ""), batch_size=cfg.batch_size,
               steps=bench.steps, warmup=bench.warmup, wall_s=time.time() - t0, torch=torch.__version__,
               device=train.pick_runtime(cfg)[0], threads=torch.get_num_threads(), overrides=overrides)
    print(f"\nwall time {out['wall_s']:.1f} s")
    if bench.json:
        write_json(bench.json, out)
    return out


assert not {f.name for f in fields(BenchConfig)} & set(configurator.config_fields(train.PRESETS['small'])), \
    "a bench flag shadows a train.py flag"

if __name__ == "__main__":
    main()

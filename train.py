"""
Train a nanoVLP model.

    python train.py --config small                        # one CPU or GPU
    python train.py --config tiny --max_iters=50          # any field can be overridden
    python train.py --config small --stage prompt --init_from out/ckpt.pt   # a later stage, from a pretrained run
    python train.py --config small --stage capfilt --init_from out-web/ckpt.pt   # bootstrap the web captions
    python train.py --config small --stage finetune --init_from out/ckpt.pt # continue on a small clean set
    python train.py --config base --data=data/coco --init_from=openai/clip-vit-base-patch32   # real data (data.py), published weights
    torchrun --standalone --nproc_per_node=8 train.py --config base   # DDP on 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 \
        train.py --config base                             # 2 nodes: the same on the other with --node_rank=1

Every field of TrainConfig below, of VLMConfig (model.py) and of WorldConfig (data.py) is a
flag: `--key=value` (or `--key value`; a bare `--flag` means true). A run writes
out_dir/ckpt.pt, out_dir/log.jsonl (one JSON object per logged step) and out_dir/eval.json
(the final metrics); `--resume` continues from out_dir/ckpt.pt.
"""

import copy
import hashlib
import json
import math
import os
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from data import WorldConfig
from eval import (OBJECTIVES_OFF, binary_metrics, evaluate, evaluate_instruct, evaluate_prompt, generate_captions,
                  image_tokens_of, itm_margins, load_checkpoint, multi_pixels, write_json)
from model import (VLM, VLMConfig, all_gather, dist_info, draw_noise, fp32, pretrain_counts, sum_to_owner,
                   uses_electra)

STAGES = ("pretrain", "capfilt", "finetune", "instruct", "prompt")
FLIP_STREAM = 0x666C6970  # 'flip': its random stream's key, apart from data.py's (seed, epoch, ...) streams
CAPTION_DRAWS = 720720  # the least common multiple of 1..16: divisible by every count of valid captions
PRETRAINING = ("pretrain", "finetune")  # the stages whose steps are pretraining steps (every objective, M1-M8)


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    data: str = "shapes"  # 'shapes': generate (once) and use the shapes world; or a prepared dataset directory
    data_dir: str = "data"  # where generated worlds are cached
    train_split: str = "train"  # the split to train on: 'train' (clean captions) or 'web' (noisy)
    stage: str = "pretrain"  # one of STAGES
    init_from: str = ""  # start from these weights: a checkpoint (ckpt.pt), or a Hugging Face CLIP or GPT-2 (hub name or directory)
    init_text: str = ""  # with a Hugging Face CLIP as init_from: a Hugging Face GPT-2 for the text transformer
    resume: bool = False  # continue from out_dir/ckpt.pt
    eval_interval: int = 200  # steps between evaluations on the first eval_images val images
    eval_images: int = 256
    rerank_k: int = 8  # evaluation: ITM re-ranks the top rerank_k of ITC retrieval
    log_interval: int = 10  # steps between log.jsonl lines
    ckpt_interval: int = 200  # steps between checkpoints (the last step is always saved)
    train_vit: bool = False  # instruct: fine-tune the ViT too (frozen by default; pretrain and finetune train it)
    train_images: int = 0  # train on the first N images of train_split only (0: all of it); finetune: a small clean set
    # CapFilt (M13): bootstrap the captions of a noisy split with a captioner and an ITM filter
    capfilt_split: str = "web"  # the split whose captions are bootstrapped
    capfilt_tune: str = "separate"  # 'separate': captioner (LM) and filter (ITC+ITM) fine-tuned apart from
    # init_from on train_split (BLIP); 'shared': one model fine-tuned with all three; 'none': init_from is both
    capfilt_synthetic: bool = True  # add the captioner's captions (false: the filter alone, no captioner)
    capfilt_top_p: float = 0.9  # nucleus sampling of the synthetic captions
    capfilt_temperature: float = 1.0
    capfilt_threshold: float = 0.5  # a caption is kept when the filter's p(match) is at least this
    capfilt_data: str = ""  # where the cleaned dataset goes; default beside the source: <source>-capfilt-<hash>
    # the prompt stage (M12): few-shot detection of named classes on the frozen model
    classes: str = ""  # comma-separated class names; default the dataset's novel classes
    shots: int = 16  # K: training images per class, all of them in every step
    shot_seed: int = 0  # the first K-shot sample the stage trains on
    shot_seeds: int = 3  # the stage runs samples shot_seed.. of them (out_dir/seed<k>); out_dir/eval.json: mean and std
    stop_loss: float = 0.0  # stop as soon as the training loss is under this (0: run max_iters steps)
    augment: bool = True  # shift by whole patches, mirror and permute the colour channels of the shots
    flip: bool = False  # pretraining: mirror half the images left to right, 'left' and 'right' swapped in their captions
    # data
    batch_size: int = 128  # per rank and micro-step
    num_workers: int = 0  # loader processes per rank that read batches ahead (0: read in the training process)
    grad_accum: int = 1  # micro-steps per optimizer step
    fsdp: bool = False  # with several ranks: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    # optimizer: AdamW, linear warmup, then cosine decay to min_lr at max_iters
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_iters: int = 100
    max_iters: int = 2000
    # system
    device: str = "auto"  # 'auto' picks cuda, then mps, then cpu
    dtype: str = "auto"  # 'auto': bfloat16 on CUDA where supported, else float16 with a grad scaler; float32 off CUDA
    compile: str = "auto"  # 'auto' (on for CUDA, off elsewhere), 'true' or 'false'
    seed: int = 1337
    # the model and the shapes world
    model: VLMConfig = field(default_factory=VLMConfig)
    world: WorldConfig = field(default_factory=WorldConfig)


PRESETS = {
    # tests: seconds on a CPU
    "tiny": TrainConfig(
        out_dir="out-tiny", batch_size=32, max_iters=40, warmup_iters=5, eval_interval=20, eval_images=32,
        log_interval=5, ckpt_interval=20,
        model=VLMConfig(image_size=48, patch_size=16, vit_width=32, vit_layers=2, vit_heads=2,
                        text_width=32, text_layers=2, text_heads=2, embed_dim=32, queue_size=128),
        world=WorldConfig(n_train=512, n_val=64, n_test=64, n_web=128, n_novel_train=32, n_novel_val=16,
                          n_multi_train=40, n_multi_val=10, grid=3)),
    # the embedded default: a 2-core CPU in under 10 minutes, world generation included
    "small": TrainConfig(
        out_dir="out", batch_size=64, max_iters=1050, warmup_iters=60, eval_interval=10 ** 9, lr=1e-3, min_lr=1e-4,
        model=VLMConfig(image_size=64, patch_size=16, vit_width=128, vit_layers=4, vit_heads=4,
                        text_width=128, text_layers=4, text_heads=4, embed_dim=128, itc_temperature=0.03,
                        fused_rows=0.5, itm_negatives=0.5, image_axes=True, caption_weight=2.0)),  # results/small-run.md
    # GPU: ViT-B/16 at 224 px, a CLIP-B text transformer
    "base": TrainConfig(
        out_dir="out-base", batch_size=256, num_workers=4, max_iters=20000, warmup_iters=2000, eval_interval=2000, eval_images=1000,
        lr=5e-4, min_lr=5e-5, weight_decay=0.2, ckpt_interval=1000,
        model=VLMConfig(image_size=224, patch_size=16, vit_width=768, vit_layers=12, vit_heads=12,
                        text_width=512, text_layers=12, text_heads=8, embed_dim=512, context_length=77,
                        activation="quick_gelu")),
}

# M1-M8 continued on a small clean set at a lower rate (the shapes world: its first 2,000
# clean images, 4 captions each; on real data, the whole clean split)
_FINETUNE = {
    "tiny": dict(max_iters=10, warmup_iters=2, eval_interval=10 ** 9, train_images=128, lr=3e-4, min_lr=3e-5),
    "small": dict(max_iters=200, warmup_iters=20, eval_interval=10 ** 9, train_images=2000, lr=2e-4, min_lr=2e-5),
    "base": dict(max_iters=2000, warmup_iters=200, lr=1e-5, min_lr=1e-6, weight_decay=0.05),
}

# what a stage changes in a preset (before the command line's flags); a stage other than
# pretrain writes to <preset's out_dir>-<stage> unless --out_dir is given
STAGE_PRESETS = {
    # M3, M9-M11 and the text transformer on the multi-image question sets; the ViT is frozen
    "instruct": {
        "tiny": dict(max_iters=30, warmup_iters=5, eval_interval=15, eval_images=10, instruct=True, momentum_alpha=0.0),
        "small": dict(batch_size=64, max_iters=1000, warmup_iters=30, lr=5e-4, min_lr=5e-5, eval_interval=10 ** 9,
                      eval_images=500, instruct=True, momentum_alpha=0.0),
        "base": dict(max_iters=5000, warmup_iters=200, lr=1e-4, min_lr=1e-5, instruct=True, momentum_alpha=0.0),
    },
    "finetune": _FINETUNE,
    "capfilt": _FINETUNE,  # its captioner's and filter's fine-tuning runs
    # M12 on the frozen model: prompts, couplings and fusion weights on K shots of each novel class
    "prompt": {
        "tiny": dict(max_iters=20, warmup_iters=2, eval_interval=10 ** 9, shots=2, shot_seeds=2, lr=1e-2,
                     weight_decay=0.0, prompt=True, momentum_alpha=0.0, text_prompt_depth=2, image_prompt_depth=2,
                     dense_layers="1,2"),
        "small": dict(max_iters=300, warmup_iters=10, lr=5e-3, min_lr=5e-4, weight_decay=0.0, eval_interval=10 ** 9,
                      stop_loss=0.1, prompt=True, momentum_alpha=0.0, text_prompt_depth=4, image_prompt_depth=4),
        "base": dict(max_iters=1000, warmup_iters=50, lr=3.5e-3, min_lr=3.5e-4, weight_decay=0.0, eval_interval=10 ** 9,
                     stop_loss=0.1, prompt=True, momentum_alpha=0.0, text_prompt_depth=9, image_prompt_depth=9,
                     dense_layers="8,10,12"),
    },
}
# the parameters each stage trains (name prefixes); the rest are frozen
STAGE_TRAINS = {"instruct": ("converter.", "relation.", "scorer.", "image_index", "text.blocks.", "text.ln_final.",
                             "text.token_embedding.", "text.positional_embedding"),
                "prompt": ("prompt.",)}

# -----------------------------------------------------------------------------
# configuration from the command line


def config_fields():
    """{flag name: (dataclass holding it, attribute path)}; every name is unique."""
    out = {}
    for f in fields(TrainConfig):
        if f.name in ("model", "world"):
            for g in fields(VLMConfig if f.name == "model" else WorldConfig):
                assert g.name not in out, f"config name {g.name} is ambiguous"
                out[g.name] = (f.name, g.name)
        else:
            out[f.name] = (None, f.name)
    return out


def parse_value(key, raw, typ):
    """Convert a command-line string to the field's type, or raise ValueError saying why."""
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key} takes true or false, got {raw!r}")
    if typ is tuple:
        try:
            return tuple(float(x) for x in raw.split(","))
        except ValueError:
            raise ValueError(f"--{key} takes comma-separated numbers, got {raw!r}") from None
    try:
        return typ(raw)
    except ValueError:
        raise ValueError(f"--{key} takes a{'n' if typ is int else ''} {typ.__name__}, got {raw!r}") from None


def parse_args(argv):
    """(preset name, {field: value}) from argv; any mistake is a SystemExit naming it."""
    known = config_fields()
    preset, overrides, i = "small", {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}: flags look like --key=value")
        key, eq, raw = arg[2:].partition("=")
        typ = None
        if key in known:
            owner, name = known[key]
            typ = typing.get_type_hints({None: TrainConfig, "model": VLMConfig, "world": WorldConfig}[owner])[name]
        if not eq:  # --key value, or a bare boolean --flag
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if typ is bool and (nxt is None or nxt.startswith("--")):
                raw = "true"
            elif nxt is None:
                raise SystemExit(f"--{key} needs a value")
            else:
                raw, i = nxt, i + 1
        i += 1
        if key == "config":
            if raw not in PRESETS:
                raise SystemExit(f"unknown --config {raw!r}; presets: {', '.join(PRESETS)}")
            preset = raw
            continue
        if key not in known:
            raise SystemExit(f"unknown config key --{key}. Valid keys:\n  config, " + ", ".join(sorted(known)))
        try:
            overrides[key] = parse_value(key, raw, typ)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if overrides.get("stage", "pretrain") not in STAGES:
        raise SystemExit(f"unknown --stage {overrides['stage']!r}; stages: {', '.join(STAGES)}")
    return preset, overrides


def apply_overrides(cfg, overrides):
    cfg = copy.deepcopy(cfg)
    known = config_fields()
    for key, value in overrides.items():
        owner, name = known[key]
        setattr(cfg if owner is None else getattr(cfg, owner), name, value)
    return cfg


def stage_overrides(preset, overrides):
    """What a run changes in its preset: what its stage changes (and the stage's out_dir),
    then the flags."""
    stage = overrides.get("stage", "pretrain")
    if stage == "pretrain":
        return overrides
    return {"out_dir": f"{PRESETS[preset].out_dir}-{stage}", **STAGE_PRESETS.get(stage, {}).get(preset, {}), **overrides}


def config_from_dict(d):
    d = dict(d)
    return TrainConfig(**{**d, "model": VLMConfig(**d["model"]), "world": WorldConfig(**d["world"])})


# -----------------------------------------------------------------------------
# pieces of the run


def setup_distributed(cfg):
    """(rank, local_rank, world_size); torchrun sets RANK for DDP. NCCL on CUDA, else gloo."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    use_cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


def pick_device(cfg, local_rank):
    if cfg.device != "auto":
        return cfg.device
    if torch.cuda.is_available():
        return f"cuda:{local_rank}"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(cfg, device_type):
    if cfg.dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_runtime(cfg, local_rank=0):
    """(device, its type, dtype, autocast context: a no-op in float32); TF32 matmuls on CUDA."""
    device = pick_device(cfg, local_rank)
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = pick_dtype(cfg, device_type)
    return device, device_type, dtype, torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def load_data(cfg, rank, world_size):
    """The prepared dataset (the shapes world generated on first use) with, when a pretraining
    stage uses ELECTRA, its visual codebook; rank 0 prepares while the others wait."""
    m = cfg.model
    path = cfg.data if cfg.data != "shapes" else data.world_dir(cfg.data_dir, cfg.world, m.image_size, m.context_length)
    if rank == 0:
        if cfg.data == "shapes":
            data.prepare_world(cfg.data_dir, cfg.world, m.image_size, m.context_length)
        if uses_electra(m) and cfg.stage in PRETRAINING:
            data.prepare_codebook(path, m.patch_size, m.n_codes)
    if world_size > 1:
        dist.barrier()
    try:
        return data.Dataset(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--data: {e}") from None


def fit_model_to_data(mcfg, ds):
    """The model config with the tokenizer's vocabulary and special tokens, checked against
    the dataset's image size and caption length."""
    if ds.image_size != mcfg.image_size:
        raise SystemExit(f"{ds.path} holds {ds.image_size} px images but the model takes {mcfg.image_size}: "
                         f"set --image_size={ds.image_size}")
    if ds.context_length > mcfg.context_length:
        raise SystemExit(f"{ds.path} holds captions of {ds.context_length} tokens, more than the model's "
                         f"--context_length={mcfg.context_length}")
    tok = ds.tokenizer
    ids = {k: tok.encode_single_token(t) for k, t in (("bos_id", data.BOS), ("eos_id", data.EOS), ("pad_id", data.PAD),
                                                      ("mask_id", data.MASK), ("glob_id", data.GLOB))}
    if mcfg.prompt:  # the layer-1 text prompts take the places of prompt_init's tokens
        ids["n_ctx"] = len(tok.encode_ordinary(mcfg.prompt_init))
        if ids["n_ctx"] == 0:
            raise SystemExit("--prompt_init is empty: the text prompts start from its tokens, one vector each")
    return VLMConfig(**{**asdict(mcfg), "vocab_size": tok.n_vocab, **ids})


def check_tokenizer(ckpt, ds):
    """Stop if a checkpoint's tokenizer is not the dataset's: its token ids would mean other
    words. The world's BPE and GPT-2's are one kind of encoding (sample.py export writes the
    world's as GPT-2 files), so between those two only the ranks are compared."""
    kind = lambda k: "gpt2" if k == "bpe" else k  # noqa: E731
    if (kind(ckpt["tokenizer"]["kind"]), ckpt["tokenizer"]["bpe"]) != (kind(ds.meta["tokenizer"]["kind"]), ds.bpe_text):
        raise SystemExit(f"the tokenizer of the starting weights ({ckpt['data_path']}) is not that of {ds.path}: "
                         f"use the data they were trained on, or data prepared with their tokenizer (data.py --tokenizer)")


def load_weights(model, state, strict, log=print):
    """A checkpoint's weights into the model. A new stage (strict False) may add parts (they
    start fresh) and leave parts out (not loaded): both are named, by module."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise SystemExit(f"the checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    modules = lambda keys: sorted({".".join(k.split(".")[:2 if k.startswith("converter") else 1]) for k in keys})  # noqa: E731
    if missing:
        log(f"new, initialised fresh: {', '.join(modules(missing))}")
    if unexpected:
        log(f"in the checkpoint, not used: {', '.join(modules(unexpected))}")


def freeze_for_stage(model, stage, train_vit=False):
    """Only the parameters the stage trains (STAGE_TRAINS, and the ViT with train_vit) keep
    requires_grad."""
    if train_vit and stage == "prompt":
        raise SystemExit("--train_vit does not apply to --stage prompt: it trains the prompts on a frozen model")
    if stage in STAGE_TRAINS:
        trains = STAGE_TRAINS[stage] + (("visual.",) if train_vit else ())
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(trains))


def compile_enabled(cfg, device_type):
    """--compile: 'auto' compiles on CUDA only."""
    return cfg.compile == "true" or (cfg.compile == "auto" and device_type == "cuda")


def optimizer_step(model, optimizer, scaler, cfg):
    """After a step's backward passes: unscale, clip the gradient norm, step, zero the gradients."""
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def configure_optimizer(model, cfg, device_type):
    """AdamW; no weight decay on 1-D parameters (biases, norms), embeddings and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 or "embedding" in name or name == "logit_scale" else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device_type in ("cuda", "cpu"))


def get_lr(it, cfg):
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    if it >= cfg.max_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def save_checkpoint(path, state, scaler, step, cfg, ds):
    """Everything a resume needs, written to a temporary file and renamed into place. state:
    (model, optimizer) state dicts (full_state). The batches need no saved state: they are a
    function of (seed, step)."""
    ckpt = {
        "model": state[0],
        "optimizer": state[1],
        "scaler": scaler.state_dict(),
        "step": step,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "config": asdict(cfg),
        "tokenizer": {"kind": ds.meta["tokenizer"]["kind"], "bpe": ds.bpe_text},
        "data_path": os.path.abspath(ds.path),
    }
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


def pretrain_batches(cfg, ds, raw_model, device, rank, world_size):
    """(fetch, place, n): fetch(micro_step) reads this rank's batch of that micro-step on the
    host (numpy: images by index arrays, from the first train_images of the split or all of
    it, one caption each, and what the objectives need besides: visual codes, paraphrase
    groups; or, from a dataset that streams its train split, the next samples of the shards);
    place(parts) makes the pretraining losses' keyword arguments on the device."""
    split = cfg.train_split
    electra = uses_electra(cfg.model)
    if ds.stream is not None and split == "train":
        fetch, n_train = stream_fetch(cfg, ds, rank, world_size)
    else:
        fetch, n_train = prepared_fetch(cfg, ds, split, rank, world_size, electra)
    codebook = ds.codebook(cfg.model.patch_size, cfg.model.n_codes) if electra else None
    shapes = ds.meta["kind"] == "shapes"

    def fetch_batch(micro_step):
        parts, rows = fetch(micro_step), []
        if cfg.flip:
            parts["images"], parts["tokens"], rows = data.mirror(parts["images"], parts["tokens"], ds.tokenizer,
                                                                 flip_draw(cfg, micro_step, rank, world_size))
            if len(rows) and "groups" in parts:  # a mirrored row shows another scene (a real image: its own mirror)
                parts["groups"][rows] = [data.mirrored_scene(g) for g in parts["groups"][rows]] if shapes \
                    else parts["groups"][rows] + ds.split_size(cfg.train_split)
        if electra and "codes" not in parts:  # streamed images: their codes are computed here
            parts["codes"] = data.visual_codes(parts["images"], codebook, cfg.model.patch_size)
        elif electra and len(rows):  # mirrored patches have codes of their own
            parts["codes"][rows] = data.visual_codes(parts["images"][rows], codebook, cfg.model.patch_size)
        return parts

    def place(parts):
        x = {k: to_device(v, device) for k, v in parts.items()}
        return dict(pixels=raw_model.normalize_pixels(x["images"]), tokens=x["tokens"], groups=x.get("groups"),
                    codes=x.get("codes"))
    return fetch_batch, place, n_train


def prepared_fetch(cfg, ds, split, rank, world_size, electra):
    """(fetch, n) over a prepared split: batches by data.batch_indices, one caption per image."""
    if split not in ds.meta["splits"] or not ds.has(split, "tokens"):
        raise SystemExit(f"--train_split {split!r}: {ds.path} has no captioned split of that name")
    if cfg.train_images < 0:
        raise SystemExit(f"--train_images must be at least 0 (0: the whole split), got {cfg.train_images}")
    n_train = min(ds.split_size(split), cfg.train_images or ds.split_size(split))
    n_captions = ds.array(split, "tokens").shape[1]
    # real data: an image may have fewer valid captions than slots (data.py repeats them to
    # fill the slots); a draw from [0, CAPTION_DRAWS) modulo its count picks one of them uniformly
    valid = ds.array(split, "n_captions") if ds.has(split, "n_captions") else None
    if valid is not None:
        if n_captions > 16:
            raise SystemExit(f"{ds.path}: {n_captions} caption slots per image; at most 16 are drawn from uniformly")
        n_captions = CAPTION_DRAWS
    # captions known to be true of their scene (not the noisy web split): paraphrases of one scene are never negatives
    clean = ds.has(split, "scene") and not ds.has(split, "corruption")
    if electra:
        ds.codes(split, cfg.model.patch_size, cfg.model.n_codes)  # computed once here, not in each loader worker

    def fetch(micro_step):
        idx, caption = data.batch_indices(n_train, cfg.batch_size, micro_step, cfg.seed, rank, world_size,
                                          cfg.grad_accum, n_captions)
        if valid is not None:
            caption = caption % valid[idx]
        images, tokens = ds.image_text_batch(split, idx, caption)
        parts = dict(images=images, tokens=tokens.astype(np.int64))
        if clean:
            parts["groups"] = ds.array(split, "scene")[idx].astype(np.int64)
        if electra:
            parts["codes"] = ds.codes(split, cfg.model.patch_size, cfg.model.n_codes)[idx].astype(np.int64)
        return parts
    return fetch, n_train


def stream_fetch(cfg, ds, rank, world_size):
    """(fetch, n) over webdataset shards (data.ShardBatches): micro-step s is read by stream
    s mod n of this rank, n = max(1, num_workers), so each loader worker serves one stream and
    a run resumed with the same ranks and workers reads the same batches. Every sample is its
    own group (no groups); n is the shards' sample count."""
    if cfg.train_images:
        raise SystemExit(f"--train_images={cfg.train_images} (a flag, or the finetune stage's preset): {ds.path} "
                         f"streams its train split from webdataset shards; give --train_images=0 to stream them all")
    batches = data.ShardBatches(ds.stream["shards"], ds.stream["counts"], rank, world_size, max(1, cfg.num_workers),
                                cfg.seed, ds.tokenizer, ds.context_length, ds.image_size, cfg.batch_size)

    def fetch(micro_step):
        images, tokens = batches.fetch(micro_step)
        return dict(images=images, tokens=tokens.astype(np.int64))
    return fetch, ds.stream["samples"]


def flip_draw(cfg, micro_step, rank, world_size):
    """(batch_size,) bool: which samples of this rank's micro-batch --flip mirrors, drawn per
    place of the optimizer step's whole batch (as data.batch_indices orders it), so the draw
    does not depend on how the step is split."""
    t, i = divmod(micro_step, cfg.grad_accum)
    u = np.random.default_rng([cfg.seed, FLIP_STREAM, t]).random(cfg.batch_size * cfg.grad_accum * world_size)
    start = (rank * cfg.grad_accum + i) * cfg.batch_size
    return u[start:start + cfg.batch_size] < 0.5


def instruct_batches(cfg, ds, raw_model, device, rank, world_size):
    """(fetch, place, n) for the instruct stage: multi-image question sets of multi_train, the
    images of a batch padded to its largest set. The questions and answers are checked once
    against the model's layout of them (question block, answer block)."""
    split, m = "multi_train", cfg.model
    if not ds.has(split, "sets"):
        raise SystemExit(f"--stage instruct: {ds.path} has no multi-image question sets ({split})")
    if ds.array(split, "sets").shape[1] > m.image_slots:
        raise SystemExit(f"{ds.path}: {split} has sets of up to {ds.array(split, 'sets').shape[1]} images, more than "
                         f"the model's --image_slots={m.image_slots}")
    n_question = m.context_length - m.answer_length
    for key, n in (("question", n_question), ("answer", m.answer_length)):
        if (ds.array(split, key)[:, n:] != m.pad_id).any():
            raise SystemExit(f"{ds.path}: a {key} of {split} is longer than {n} tokens; the model gives questions "
                             f"context_length - answer_length tokens and answers answer_length (--answer_length)")

    def fetch(micro_step):
        idx = data.batch_indices(ds.split_size(split), cfg.batch_size, micro_step, cfg.seed, rank, world_size,
                                 cfg.grad_accum)
        images, valid, question, answer = ds.multi_batch(split, idx)
        return dict(images=images, image_valid=valid, question=question.astype(np.int64),
                    answer=answer[:, :m.answer_length].astype(np.int64))

    def place(parts):
        x = {k: to_device(v, device) for k, v in parts.items() if k != "images"}
        return dict(stage="instruct", pixels=multi_pixels(raw_model, torch.as_tensor(parts["images"]), device), **x)
    return fetch, place, ds.split_size(split)


def prompt_batches(cfg, ds, raw_model, device, rank, world_size):
    """(fetch, place, n) for the prompt stage: every step all the K-shot images of novel_train
    (sample shot_seed, K per named class) with their class maps (a class not named is
    background), and the class prompt rows; they stay on the device, so fetch makes the
    step's augmented batch there and place passes it on. With augment, each step sees each
    image (and its map) shifted cyclically by a random whole number of patches down and
    right, mirrored left-right with probability 1/2 and with its colour channels in a random
    order: the patch grid cuts the shifted images where it cut the originals."""
    names = cfg.classes.split(",")
    try:
        idx = ds.shots("novel_train", names, cfg.shots, cfg.shot_seed)
        target = to_long(ds.class_targets("novel_train", idx, names), device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--stage prompt: {e}") from None
    images = torch.from_numpy(np.array(ds.array("novel_train", "images")[idx])).to(device)
    tokens = to_long(class_rows(ds, cfg), device)
    S, p = cfg.model.image_size, cfg.model.patch_size
    n, pos = len(idx), np.arange(S)

    def fetch(micro_step):
        x, t = images, target
        if cfg.augment:  # one gather: output pixel (i, j) reads ((i - dy) % S, (j' - dx) % S), j' mirrored or not
            rng = np.random.default_rng([cfg.seed, cfg.shot_seed, micro_step])
            shifts, flips = rng.integers(S // p, size=(n, 2)) * p, rng.random(n) < 0.5
            rows = (pos[None] - shifts[:, :1]) % S
            cols = (np.where(flips[:, None], S - 1 - pos[None], pos[None]) - shifts[:, 1:]) % S
            b, r, c = (torch.from_numpy(a).to(device) for a in (np.arange(n)[:, None, None], rows[:, :, None], cols[:, None]))
            x, t = x[b, r, c], t[b, r, c]
            x = x[..., torch.from_numpy(rng.permutation(3)).to(device)]
        return dict(stage="prompt", pixels=raw_model.normalize_pixels(x), target=t, class_tokens=tokens)
    return fetch, lambda parts: parts, len(idx)


def to_device(x, device):
    """A host array (numpy, or a tensor from a loader worker, pinned on CUDA) on the device."""
    return torch.as_tensor(x).to(device, non_blocking=True)


class HostBatches(torch.utils.data.IterableDataset):
    """fetch(s) for s = start, start + 1, ... read by a DataLoader: loader worker w of n reads
    the micro-steps s = start + w, start + w + n, ..., which the DataLoader hands out in turn,
    so the sequence is the same with any number of workers. Micro-steps are disjoint parts of
    the epoch walk (data.batch_indices), so every rank and worker reads its own samples."""

    def __init__(self, fetch, start):
        self.fetch, self.start = fetch, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        s = self.start + w
        while True:
            yield self.fetch(s)
            s += n


def host_batches(fetch, start, num_workers, pin_memory):
    """An endless iterator over fetch(start), fetch(start + 1), ...: in this process, or in
    num_workers loader processes that read ahead (two micro-steps each)."""
    if num_workers == 0:
        return iter(HostBatches(fetch, start))
    if "fork" not in torch.multiprocessing.get_all_start_methods():
        raise SystemExit("--num_workers needs the 'fork' start method (Linux); use --num_workers=0 here")
    loader = torch.utils.data.DataLoader(HostBatches(fetch, start), batch_size=None, num_workers=num_workers,
                                         pin_memory=pin_memory, prefetch_factor=2, multiprocessing_context="fork")
    return iter(loader)


def class_rows(ds, cfg):
    return data.class_prompt_tokens(ds.tokenizer, cfg.classes.split(","), cfg.model.prompt_init, cfg.model.context_length)


def to_long(a, device):
    return torch.from_numpy(np.asarray(a, np.int64)).to(device, non_blocking=True)


class Logger:
    """log.jsonl on rank 0: one JSON object per line. On resume the lines after the
    checkpoint's step (work that was lost) are dropped."""

    def __init__(self, path, enabled, resume_step=None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        elif enabled and resume_step is None and os.path.exists(path):
            os.remove(path)

    def log(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------
# one optimizer step's forward and backward passes


def step_noise(cfg, step, n_rows, device):
    """The random draws of a pretraining step for all its n_rows rows (every rank and
    micro-batch; model.draw_noise), from a generator seeded by (seed, step): the same on every
    rank and again on resume."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
    return draw_noise(cfg.model, n_rows, cfg.model.context_length, gen, device)


def sync_gradients(model):
    """Average the gradients over the ranks in one all-reduce. The parameters that have one are
    the same on every rank (the objectives decide which); the others keep none, as one
    process's would (AdamW skips them)."""
    params = [p for p in model.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def uses_feature_cache(mcfg, grad_accum):
    """Accumulated pretraining steps with a cross-sample loss (ITC, ITM) go through
    cached_pretrain_step."""
    return grad_accum > 1 and (mcfg.itc_weight > 0 or mcfg.itm_weight > 0)


def cached_steps(cfg):
    """Whether the run's steps are cached_pretrain_step's (a pretraining stage, uses_feature_cache)."""
    return cfg.stage in PRETRAINING and uses_feature_cache(cfg.model, cfg.grad_accum)


def shard(model, cfg):
    """FSDP2 (--fsdp with several ranks), in place: each transformer block (every module list
    named blocks: the towers', the generator's, the resampler's and relation encoder's when
    built, and the momentum copies') is a unit whose parameters are
    gathered for its forward and backward passes and sharded again after; the rest of the
    model is the root unit. Gradients are reduce-scattered and the optimizer keeps its shard
    of the state only. Call before torch.compile and before making the optimizer."""
    if not cfg.fsdp or dist_info()[1] == 1:
        return
    if cached_steps(cfg):
        raise SystemExit("--fsdp runs the model through its forward pass only; accumulation with cached features "
                         "(--grad_accum > 1 with ITC or ITM) calls its parts: use DDP, or --grad_accum=1")
    from torch.distributed.fsdp import fully_shard
    for name, module in model.named_modules():
        if name.endswith(".blocks"):
            for block in module:
                fully_shard(block)
    fully_shard(model)


def full_state(raw_model, optimizer, cfg):
    """(model, optimizer) state dicts with whole tensors: the plain module's (no DDP or
    torch.compile prefixes), or with --fsdp gathered from every rank's shards to rank 0's CPU
    (a collective: every rank calls it; the others get empty dicts), the optimizer state then
    keyed by parameter name, on any number of ranks. optimizer None: the model's alone."""
    if not cfg.fsdp:
        return raw_model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(raw_model, options=options),
            get_optimizer_state_dict(raw_model, optimizer, options=options) if optimizer is not None else None)


def load_optimizer(raw_model, optimizer, state, cfg):
    """A checkpoint's optimizer state (full_state's format) into the optimizer. A moment saved
    for a scalar logit_scale (checkpoints before it had one dimension) takes its new shape."""
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(raw_model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
    for p, s in optimizer.state.items():
        for key, v in s.items():
            if key != "step" and torch.is_tensor(v) and v.shape != p.shape and v.numel() == p.numel():
                s[key] = v.reshape(p.shape)


def wrap_ddp(model, raw_model, cfg, device_type, local_rank):
    """DDP around the (compiled) model when there are several ranks, except under FSDP and
    for the steps that cached_pretrain_step runs: they average the gradients themselves."""
    if dist_info()[1] == 1 or cfg.fsdp or cached_steps(cfg):
        return model
    # pretraining with an objective off leaves some parameters without a gradient
    unused = cfg.stage != "instruct" and any(w == 0 for w in raw_model.loss_weights().values())
    return DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, find_unused_parameters=unused)


def train_step(model, raw_model, batches, scaler, ctx, noise=None):
    """The forward and backward passes of one optimizer step over its micro-batches (a list of
    model keyword arguments; the gradients are left in .grad). Returns the losses, averaged
    over the micro-batches (this rank's; global_losses averages over the ranks).
    Pretraining batches (those with tokens) get their rows of noise, the step's random draws
    (step_noise), and the step's counts: each loss is the one of the step's whole batch, so
    W ranks x k micro-batches of B rows give the gradient of one batch of k W B rows. The
    global batch is ordered rank by rank, each rank's micro-batches in turn (data.batch_indices
    reads it so). With k > 1, ITC and ITM go through cached_pretrain_step; otherwise DDP (or
    FSDP2) reduces the gradients on the last micro-batch's backward pass only."""
    k, (rank, world_size) = len(batches), dist_info()
    pretrain = "tokens" in batches[0]
    if pretrain:
        B = batches[0]["tokens"].size(0)
        offsets = [(rank * k + i) * B for i in range(k)]
        if noise is None:
            noise = draw_noise(raw_model.cfg, k * world_size * B, raw_model.cfg.context_length, device=batches[0]["tokens"].device)
        noise = [{name: x[o:o + B] for name, x in noise.items()} for o in offsets]
        counts = [pretrain_counts(raw_model.cfg, b["tokens"], n) for b, n in zip(batches, noise)]
        counts = {name: torch.stack([c[name] for c in counts]).sum() for name in counts[0]}
        if world_size > 1:
            stacked = torch.stack(list(counts.values()))
            dist.all_reduce(stacked)
            counts = dict(zip(counts, stacked))
        counts = {name: c.clamp(min=1) / (k * world_size) for name, c in counts.items()}  # per micro-batch and rank
        if uses_feature_cache(raw_model.cfg, k):
            return cached_pretrain_step(raw_model, batches, noise, counts, offsets, scaler, ctx)
        batches = [{**b, "noise": n, "counts": counts, "offset": o} for b, n, o in zip(batches, noise, offsets)]
    total = {}
    for i, batch in enumerate(batches):
        sync = nullcontext()
        if isinstance(model, DDP) and i < k - 1:
            sync = model.no_sync()
        elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch only
            model.set_requires_gradient_sync(i == k - 1)
        with sync:
            with ctx:
                losses = model(**batch)
            scaler.scale(losses["loss"] / k).backward()
        for name, v in losses.items():
            total[name] = total.get(name, 0) + v.detach() / k
    return total


def cached_pretrain_step(raw_model, batches, noise, counts, offsets, scaler, ctx):
    """Gradient accumulation in which ITC and ITM see the whole step's batch (GradCache,
    open_clip's accum_freq, generalised to the fused passes):
    1. every micro-batch's encoders run without a graph (model.pretrain_encode) and their
       representations of every row of the step, gathered over the ranks, are cached;
    2. the cross-sample losses (model.pretrain_head) run one micro-batch of rows at a time
       against all the cached columns, their backward passes filling the fused passes'
       parameter gradients and the cache's gradients (summed back to the rank of each row);
    3. each micro-batch's encoders run again with a graph, and the backward pass takes its
       per-sample losses plus the cached gradients of its representations.
    Same weights and same noise, so pass 3 recomputes pass 1's values, and the gradient is
    that of one batch of all the rows. The encoders run twice (one of them without a
    graph); memory is one micro-batch's activations plus the cached representations. The
    momentum queue is read before and filled after, as one big batch would. The gradients
    are averaged over the ranks once, at the end."""
    m, k, world_size = raw_model, len(batches), dist_info()[1]
    B = batches[0]["tokens"].size(0)
    alpha = batches[0].get("alpha", 0.0)
    inputs = [{key: b.get(key) for key in ("pixels", "tokens", "codes", "groups")} for b in batches]
    with torch.no_grad(), ctx:
        encoded = [m.pretrain_encode(**x, noise=n, counts=counts, alpha=alpha, per_sample=False)[1]
                   for x, n in zip(inputs, noise)]
    local = {key: torch.cat([e[key] for e in encoded]) for key in encoded[0]}
    col_keys = m.column_keys(local)  # one order on every rank: each gather is a collective
    grad_keys = [key for key in m.GRADIENT_KEYS if key in local]
    # every rank's rows for the columns, this rank's for the rest; leaves of at least float32 where gradients collect
    cache = {key: all_gather(x) if world_size > 1 and key in col_keys else x for key, x in local.items()}
    for key in grad_keys:
        cache[key] = fp32(cache[key]).requires_grad_(True)
    cols = {key: cache[key] for key in col_keys}
    n = {key: x.size(0) // k for key, x in local.items()}  # rows per batch: B, or fewer (model.fused_part)
    total = {}
    for i, o in enumerate(offsets):
        rows = {key: x[o * n[key] // B:][:n[key]] if key in col_keys else x[i * n[key]:(i + 1) * n[key]]
                for key, x in cache.items()}
        with ctx:
            losses = m.pretrain_head(rows, cols, noise[i], o, alpha, counts)
        scaler.scale(m.weighted_sum(losses) / k).backward()
        for name, v in losses.items():
            total[name] = total.get(name, 0) + v.detach() / k
    if "image_m" in cols:
        m.enqueue(cols)
    grads = {}
    for key in grad_keys:
        g = cache[key].grad
        if g is not None and world_size > 1 and key in col_keys:  # what every rank's losses sent this rank's rows
            g = sum_to_owner(g)
        grads[key] = g
    for i, x in enumerate(inputs):
        with ctx:
            losses, rows = m.pretrain_encode(**x, noise=noise[i], counts=counts, alpha=alpha, momentum=False)
        surrogate = scaler.scale(m.weighted_sum(losses) / k) if losses else 0.0
        for key in grad_keys:
            if grads[key] is not None:
                surrogate = surrogate + (rows[key] * grads[key][i * n[key]:(i + 1) * n[key]].to(rows[key].dtype)).sum()
        surrogate.backward()
        for name, v in losses.items():
            total[name] = total.get(name, 0) + v.detach() / k
    if world_size > 1:
        sync_gradients(m)
    total["loss"] = m.weighted_sum(total)
    return total


def global_losses(losses):
    """The step's losses averaged over the ranks (a collective: every rank calls it)."""
    if dist_info()[1] == 1:
        return {name: v.item() for name, v in losses.items()}
    stacked = torch.stack([losses[name] for name in losses])
    dist.all_reduce(stacked)
    return dict(zip(losses, (stacked / dist_info()[1]).tolist()))


# -----------------------------------------------------------------------------
# the run


def train(cfg, ckpt=None, init=None):
    """Run a stage: ckpt resumes a run, init (a checkpoint) gives the starting weights."""
    rank, local_rank, world_size = setup_distributed(cfg)
    master = rank == 0
    device, device_type, dtype, ctx = pick_runtime(cfg, local_rank)
    use_compile = compile_enabled(cfg, device_type)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    os.makedirs(cfg.out_dir, exist_ok=True)

    ds = load_data(cfg, rank, world_size)
    cfg.model = fit_model_to_data(cfg.model, ds)
    if init is not None:
        check_tokenizer(init, ds)
    prompt = cfg.stage == "prompt"
    if prompt:
        if world_size > 1:
            raise SystemExit("--stage prompt trains a few thousand parameters on a few dozen images: run it as one process")
        cfg.classes = cfg.classes or ",".join(ds.meta.get("novel_classes") or ds.meta.get("novel_shapes", []))
        if not cfg.classes:
            raise SystemExit(f"--stage prompt: {ds.path} names no novel classes; give --classes=a,b,...")
    if cfg.stop_loss > 0 and world_size > 1:
        raise SystemExit("--stop_loss decides on one process's loss: run it as one process")
    if cfg.stage in PRETRAINING and cfg.model.fused_rows != 1 and cfg.batch_size % 2:
        raise SystemExit(f"--fused_rows={cfg.model.fused_rows} takes every other row: --batch_size must be even, "
                         f"got {cfg.batch_size}")
    try:
        model = VLM(cfg.model)
    except ValueError as e:  # a model flag that does not fit (prompt depths, dense layers, ...)
        raise SystemExit(f"--stage {cfg.stage}: {e}") from None
    if init is not None:
        load_weights(model, init["model"], strict=cfg.stage == "pretrain", log=print if master else lambda *a: None)
    if uses_electra(cfg.model) and cfg.stage in PRETRAINING:
        # the data's own codebook: its codes are the MOC targets (an init's may be another's)
        model.codebook.copy_(torch.from_numpy(ds.codebook(cfg.model.patch_size, cfg.model.n_codes)))
    freeze_for_stage(model, cfg.stage, cfg.train_vit)
    model.to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    if prompt and ckpt is None:
        model.init_prompts(to_long(class_rows(ds, cfg), device))
    if cfg.fsdp and world_size > 1 and dtype == torch.float16:
        raise SystemExit("--fsdp with float16: the grad scaler would check each rank's shards alone; use "
                         "--dtype=bfloat16 (or float32), or DDP")
    shard(model, cfg)
    optimizer = configure_optimizer(model, cfg, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    step = 0
    if ckpt is not None:
        load_optimizer(model, optimizer, ckpt["optimizer"], cfg)
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] and device_type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        step = ckpt["step"]
    start_step = step
    instruct = cfg.stage == "instruct"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad} if prompt else {}
    raw_model = model
    if use_compile:
        model = torch.compile(model)
    pretrain = cfg.stage in PRETRAINING
    model = wrap_ddp(model, raw_model, cfg, device_type, local_rank)
    logger = Logger(os.path.join(cfg.out_dir, "log.jsonl"), master, start_step if ckpt is not None else None)
    if master:
        print(f"{raw_model.num_params() / 1e6:.2f}M trainable parameters | device {device} | {dtype} | compile {use_compile} "
              f"| {world_size} rank(s) | data {ds.path}")
    make_batches = instruct_batches if instruct else prompt_batches if prompt else pretrain_batches
    fetch, place, n_train = make_batches(cfg, ds, raw_model, device, rank, world_size)
    if cfg.num_workers < 0:
        raise SystemExit(f"--num_workers must be at least 0, got {cfg.num_workers}")
    # the prompt stage's batches are made on the device: no loader processes
    stream = host_batches(fetch, start_step * cfg.grad_accum, 0 if prompt else cfg.num_workers, device_type == "cuda")

    def run_eval(show_captions=False, **kw):
        """The metrics on rank 0 (None on the others), after printing a few val captions with
        show_captions. Under FSDP every rank calls it: the weights are gathered into a whole
        copy of the model on rank 0."""
        m = raw_model
        if cfg.fsdp and world_size > 1:
            state = full_state(raw_model, None, cfg)[0]
            if not master:
                return None
            m = VLM(cfg.model).to(device)
            m.load_state_dict(state)
        if instruct:
            return evaluate_instruct(m, ds, device, ctx=ctx, **kw)
        if prompt:
            return evaluate_prompt(m, ds, device, cfg.classes.split(","), class_rows(ds, cfg), ctx=ctx, **kw)
        if show_captions and cfg.model.caption_weight > 0 and ds.has("val", "tokens"):
            print_captions(m, ds, device, ctx)
        return evaluate(m, ds, device, ctx=ctx, rerank_k=cfg.rerank_k, **kw)

    if prompt:
        trainable = {n: p.numel() for n, p in raw_model.named_parameters() if p.requires_grad}
        print(f"trainable parameters: {sum(trainable.values())} ("
              + ", ".join(f"{n} {k}" for n, k in trainable.items() if k) + f"); {cfg.shots} shots x {cfg.classes}, "
              f"shot sample {cfg.shot_seed}")
        zero_shot = run_eval(prompted=False)
        print(f"zero-shot (no prompts): mIoU {zero_shot['miou']:.3f}, AP50 {zero_shot['ap50']:.3f}")

    samples_per_step = n_train if prompt else cfg.batch_size * cfg.grad_accum * world_size
    steps_per_epoch = max(1, n_train // samples_per_step)
    pbar = tqdm(total=cfg.max_iters, initial=step, disable=not master, dynamic_ncols=True, desc=cfg.stage)
    t_start = t_log = time.time()
    while True:
        if (master or cfg.fsdp) and step > start_step and step % cfg.eval_interval == 0 and step < cfg.max_iters:
            subset = dict(max_sets=cfg.eval_images) if instruct else dict(max_images=cfg.eval_images) if prompt \
                else dict(max_images=cfg.eval_images, heldout=False)
            metrics = run_eval(**subset)
        if master and step > start_step and step % cfg.eval_interval == 0 and step < cfg.max_iters:
            logger.log(step=step, kind="eval", **metrics)
            pbar.write(f"step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                     if k.endswith(("r1", "acc", "miou", "ap50"))))
        done = step >= cfg.max_iters or (cfg.stop_loss > 0 and step > start_step and losses["loss"].item() < cfg.stop_loss)
        if step > start_step and (step % cfg.ckpt_interval == 0 or done) and (master or cfg.fsdp):
            state = full_state(raw_model, optimizer, cfg)
            if master:
                save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), state, scaler, step, cfg, ds)
        if done:
            break
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        alpha = cfg.model.momentum_alpha * min(1.0, step / steps_per_epoch)  # ramped up over the first epoch
        batches = [place(next(stream)) for _ in range(cfg.grad_accum)]  # micro-steps step * grad_accum + 0, 1, ...
        noise = None
        if pretrain:
            batches = [{**b, "alpha": alpha} for b in batches]
            noise = step_noise(cfg, step, cfg.batch_size * cfg.grad_accum * world_size, device)
        losses = train_step(model, raw_model, batches, scaler, ctx, noise)
        optimizer_step(model, optimizer, scaler, cfg)
        raw_model.momentum_update()
        step += 1
        pbar.update(1)
        if step % cfg.log_interval == 0:
            values = global_losses(losses)  # the step's whole batch (a collective: every rank)
        if step % cfg.log_interval == 0 and master:
            dt, t_log = time.time() - t_log, time.time()
            speed = samples_per_step * cfg.log_interval / dt
            logger.log(step=step, lr=lr, alpha=alpha, samples_per_s=speed, time_s=time.time() - t_start, **values)
            pbar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.1e}", samples_s=f"{speed:.0f}")
    pbar.close()
    changed = [n for n, p in raw_model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    if changed:
        raise RuntimeError(f"--stage {cfg.stage} changed frozen parameters: {', '.join(changed)}")
    metrics = run_eval(show_captions=pretrain) if master or cfg.fsdp else None
    if master:
        metrics.update(step=step, train_time_s=time.time() - t_start)
        if prompt:
            metrics.update(trainable_params=sum(trainable.values()),
                           **{f"zeroshot_{k}": zero_shot[k] for k in ("miou", "fg_iou", "ap50")})
        write_json(os.path.join(cfg.out_dir, "eval.json"), metrics)
        logger.log(kind="eval", **metrics)
        for k, v in metrics.items():
            print(f"{k:32s} {v:.4f}")
    if world_size > 1:
        dist.destroy_process_group()
    return metrics if master else None


def print_captions(model, ds, device, ctx, n=8):
    """Print the greedy captions of the first n val images beside their first true caption:
    what the model has learned, at a glance."""
    images = ds.array("val", "images")[:n]
    said = generate_captions(model, ds.tokenizer, images, device, ctx=ctx)
    true = [data.decode_tokens(ds.tokenizer, row) for row in ds.array("val", "tokens")[:n, 0]]
    print(f"captions of the first {len(said)} val images (true | generated):")
    for t, g in zip(true, said):
        print(f"  {t:<60s} | {g}")


def start_state(cfg, changes, overrides):
    """(config, checkpoint to resume or None, checkpoint to start from or None) of a run."""
    if cfg.resume:
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        if not os.path.exists(path):
            raise SystemExit(f"--resume: no checkpoint at {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        # the run continues with its own config; flags given now (say a larger max_iters) still apply
        return apply_overrides(config_from_dict(ckpt["config"]), overrides), ckpt, None
    if not cfg.init_from:
        if cfg.init_text:
            raise SystemExit("--init_text goes with --init_from (a Hugging Face CLIP for the ViT)")
        return cfg, None, None
    known = config_fields()
    model_changes = {k: v for k, v in changes.items() if known[k][0] == "model"}
    if os.path.isfile(cfg.init_from):
        if cfg.init_text:
            raise SystemExit("--init_text goes with a Hugging Face CLIP as --init_from, not with a checkpoint")
        init = torch.load(cfg.init_from, map_location="cpu", weights_only=True)
    elif cfg.init_from.endswith(".pt"):
        raise SystemExit(f"--init_from: no checkpoint at {cfg.init_from}")
    else:
        init = hf_init(cfg.init_from, cfg.init_text, model_changes, cfg.seed)
    # the architecture comes with the weights; what the stage and the flags set on the model still applies
    cfg.model = apply_overrides(config_from_dict({**asdict(cfg), "model": init["config"]["model"]}), model_changes).model
    return cfg, None, init


def hf_init(name, text, model_changes, seed):
    """A Hugging Face CLIP or GPT-2 (a hub name, or a directory written by save_pretrained) as
    a starting checkpoint: its weights in our layout (VLM.from_pretrained, the model flags
    given applied), its architecture, and the tokenizer of its text side, which the data
    must have been prepared with (data.py --tokenizer). The parts that start fresh are drawn
    from seed, so every rank, and every run of the same seed, starts from the same weights."""
    try:
        with torch.random.fork_rng(devices=[]):  # built on the CPU: no GPU's generator is touched
            torch.manual_seed(seed)
            model = VLM.from_pretrained(name, text=text or None, **model_changes)
        kind, bpe = data.hf_tokenizer(text or name)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--init_from {name}{' --init_text ' + text if text else ''}: {e}") from None
    return {"model": model.state_dict(), "config": {"model": asdict(model.cfg)}, "tokenizer": {"kind": kind, "bpe": bpe},
            "data_path": text or name}


def sub_run(cfg, changes, overrides, run, name):
    """One of the runs a stage is made of (the prompt stage's shot samples, CapFilt's
    captioner and filter): cfg with the fields of run, in run['out_dir']; its metrics. With
    --resume a finished run (its eval.json written by its training: eval.py alone does not
    mark it finished) is kept, an unfinished one resumed, one not started started afresh."""
    finished = os.path.join(run["out_dir"], "eval.json")
    if cfg.resume and os.path.exists(finished):
        with open(finished) as f:
            result = json.load(f)
        if "train_time_s" in result:
            print(f"--- {name}: finished before, kept")
            return result
    if cfg.resume and not os.path.exists(os.path.join(run["out_dir"], "ckpt.pt")):
        run = {**run, "resume": False}
        if not cfg.init_from:
            raise SystemExit(f"--resume: {name} has not started; give --init_from PATH to start it")
    print(f"--- {name}")
    return train(*start_state(apply_overrides(cfg, run), {**changes, **run}, {**overrides, **run}))


def prompt_stage(cfg, changes, overrides):
    """The prompt stage: one run per K-shot sample k = shot_seed .. shot_seed + shot_seeds - 1
    in out_dir/seed<k>, then out_dir/eval.json with each metric's mean and standard deviation
    (<key>_std, n - 1 in the denominator) over the samples (the steps taken: their most).
    --resume keeps finished samples (an eval.json written by their training run) and resumes
    or starts the others."""
    if cfg.shot_seeds < 1:
        raise SystemExit(f"--shot_seeds must be at least 1, got {cfg.shot_seeds}")
    results = []
    for k in range(cfg.shot_seed, cfg.shot_seed + cfg.shot_seeds):
        run = {"out_dir": os.path.join(cfg.out_dir, f"seed{k}"), "shot_seed": k}
        results.append(sub_run(cfg, changes, overrides, run, f"shot sample {k} ({k - cfg.shot_seed + 1} of {cfg.shot_seeds})"))
    keys = [k for k, v in results[0].items() if isinstance(v, float)]
    summary = {"shot_seeds": len(results), "shots": cfg.shots, "step": max(r["step"] for r in results)}
    for key in keys:
        values = np.array([r[key] for r in results])
        summary[key] = float(values.mean())
        summary[key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    summary["trainable_params"] = results[0]["trainable_params"]
    write_json(os.path.join(cfg.out_dir, "eval.json"), summary)
    print(f"over {len(results)} shot samples of {cfg.shots} shots per class (mean +- std):")
    for key in keys:
        print(f"{key:32s} {summary[key]:.4f} +- {summary[key + '_std']:.4f}")
    return summary


# -----------------------------------------------------------------------------
# CapFilt (M13): a captioner writes a caption for every image of a noisy split, an ITM filter
# keeps the captions it judges matched, and the result is a new prepared dataset

# the objectives of the captioner's and the filter's fine-tuning runs (every other weight 0)
CAPFILT_ROLES = {"captioner": dict(caption_weight=1.0), "filter": dict(itc_weight=1.0, itm_weight=1.0)}
# the fields that decide a cleaned set (with init_from): they name its default directory and go in its report
CAPFILT_SETTINGS = ("capfilt_split", "capfilt_tune", "capfilt_synthetic", "capfilt_top_p", "capfilt_temperature",
                    "capfilt_threshold", "init_from", "seed")


def itm_threshold(p):
    """The ITM margin (logit of match minus logit of no match) at which p(match) = p:
    log(p / (1 - p)); -inf at 0 and +inf at 1, so that `margin >= itm_threshold(p)` is
    p(match) >= p with nothing rounded: 0 keeps every caption and 1 none."""
    return -math.inf if p <= 0 else math.inf if p >= 1 else math.log(p / (1 - p))


@torch.no_grad()
def bootstrap(captioner, filt, ds, cfg, device, ctx=nullcontext(), chunk=512):
    """CapFilt's model work over the split cfg.capfilt_split, chunk images at a time: the
    captioner writes one caption per image (nucleus sampling at capfilt_top_p and
    capfilt_temperature, the draws seeded by cfg.seed), and the filter gives the ITM margin of
    each image with its own (first) caption and with the synthetic one. Returns (synthetic
    tokens (N, T) int32, texts, problems: '' or why a synthetic caption is unusable ('empty',
    'too long': it did not end within the context; 'off': no captioner), margins (N, 2)
    float32 [own, synthetic], -inf where there is no synthetic caption)."""
    split, T = cfg.capfilt_split, ds.context_length
    images, own = ds.array(split, "images"), ds.array(split, "tokens")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    tokens, texts, problems, margins = [], [], [], []
    for i in tqdm(range(0, len(images), chunk), desc="capfilt", dynamic_ncols=True):
        x = images[i:i + chunk]
        chunk_texts = [""] * len(x) if captioner is None else generate_captions(
            captioner, ds.tokenizer, x, device, batch_size=chunk, ctx=ctx, generator=generator,
            temperature=cfg.capfilt_temperature, top_p=cfg.capfilt_top_p)
        chunk_tokens, chunk_problems = data.encode_checked(ds.tokenizer, chunk_texts, T)
        image_tokens = image_tokens_of(filt, x, device, ctx=ctx)
        pairs = torch.arange(len(x))[:, None].expand(-1, 2)
        margin = lambda t: itm_margins(filt, image_tokens, torch.from_numpy(np.asarray(t, np.int64)), pairs,  # noqa: E731
                                       device, ctx=ctx).cpu()
        margins.append(torch.stack([margin(own[i:i + chunk, 0]), torch.full((len(x),), -torch.inf) if captioner is None
                                    else margin(chunk_tokens)], 1))
        if captioner is None:
            chunk_problems = ["off"] * len(x)
        tokens.append(chunk_tokens)
        texts += chunk_texts
        problems += chunk_problems
    return np.concatenate(tokens), texts, problems, torch.cat(margins).numpy()


def capfilt_keep(margins, problems, p):
    """(N, 2) bool: which captions the filter keeps, [own, synthetic]: those whose margin is at
    least itm_threshold(p), a synthetic one only if it is usable (no problem)."""
    threshold = itm_threshold(p)
    return np.stack([margins[:, 0] >= threshold, (margins[:, 1] >= threshold) & (np.asarray(problems) == "")], 1)


def capfilt_report(ds, split, keep, problems, margins, texts):
    """The counts (each source's kept and dropped add up to the split's images); where the
    split records which of its captions are corrupted (the shapes world's web split), the
    filter's precision and recall at finding them (a dropped caption is a prediction of
    "corrupted") and the ROC-AUC of -margin; where its scenes are known, the same for the
    synthetic captions that do not parse to their image's scene; and, where both are known,
    the share of wrong captions among those kept, before (own_wrong_before) and after."""
    N = len(keep)
    problems = np.array(problems)
    usable = problems == ""
    report = {"images": N, "images_kept": int(keep.any(1).sum()), "images_dropped": int((~keep.any(1)).sum()),
              "own_kept": int(keep[:, 0].sum()), "own_dropped": int((~keep[:, 0]).sum()),
              "synthetic_kept": int(keep[:, 1].sum()), "synthetic_dropped": int((~keep[:, 1] & usable).sum()),
              **{f"synthetic_{p.replace(' ', '_')}": int((problems == p).sum()) for p in ("empty", "too long", "off")}}
    synthetic_wrong = None
    if ds.has(split, "scene") and ds.meta.get("kind") == "shapes":
        scene = ds.array(split, "scene")[:]
        synthetic_wrong = np.array([data.parse_caption(t) != s for t, s in zip(texts, scene)]) & usable
        if usable.any():
            report.update(synthetic_parse_acc=float(1 - synthetic_wrong[usable].mean()), **binary_metrics(
                "synthetic_wrong", -margins[usable, 1], synthetic_wrong[usable], pred=~keep[usable, 1]))
    if ds.has(split, "corruption"):
        corruption = ds.array(split, "corruption")[:]
        corrupted = corruption > 0
        report.update(corrupted=int(corrupted.sum()), own_wrong_before=float(corrupted.mean()),
                      **binary_metrics("corrupted", -margins[:, 0], corrupted, pred=~keep[:, 0]))
        for k, kind in enumerate(ds.meta.get("corruptions", [])[1:], start=1):
            report[f"corrupted_recall_{kind}"] = float((~keep[corruption == k, 0]).mean()) if (corruption == k).any() \
                else float("nan")
        if synthetic_wrong is not None or not keep[:, 1].any():
            wrong_kept = (keep[:, 0] & corrupted).sum() + (0 if synthetic_wrong is None else (keep[:, 1] & synthetic_wrong).sum())
            report["wrong_after"] = float(wrong_kept / max(1, keep.sum()))
    return report


def cleaned_split(ds, split, keep, synthetic):
    """The arrays of the cleaned train split: every image of split with a kept caption, and two
    caption slots per image: [own, synthetic] when both are kept, else the kept one twice, so
    that drawing a slot at random weighs each kept caption of an image equally. Besides:
    caption_source (0 the image's own caption, 1 synthetic), source_index (the image's index
    in split) and, where the split has it, the corruption of the own caption, kept or not."""
    rows = np.flatnonzero(keep.any(1))
    own, syn, k = ds.array(split, "tokens")[rows, 0], synthetic[rows], keep[rows]
    arrays = dict(images=ds.array(split, "images")[rows], source_index=rows,
                  tokens=np.stack([np.where(k[:, :1], own, syn), np.where(k[:, 1:], syn, own)], 1),
                  caption_source=np.stack([~k[:, 0], k[:, 1]], 1).astype(np.int8))
    if ds.has(split, "corruption"):
        arrays["corruption"] = ds.array(split, "corruption")[rows]
    return arrays


def capfilt_source(cfg):
    """(the source dataset, where the cleaned set goes), every setting
    checked before any work starts. The source is --data, or else the data init_from was
    trained on. The cleaned set goes to capfilt_data, or beside the source as
    <source>-capfilt-<hash of the settings, init_from and out_dir>; never into or around
    the source or the run's out_dir, nor over a directory CapFilt did not write."""
    if cfg.capfilt_tune not in ("separate", "shared", "none"):
        raise SystemExit(f"--capfilt_tune takes separate, shared or none, got {cfg.capfilt_tune!r}")
    if not 0 <= cfg.capfilt_threshold <= 1 or not 0 < cfg.capfilt_top_p <= 1 or cfg.capfilt_temperature < 0:
        raise SystemExit("--capfilt_threshold must be in [0, 1], --capfilt_top_p in (0, 1] and --capfilt_temperature >= 0")
    if not cfg.init_from:
        raise SystemExit("--stage capfilt: give --init_from PATH (with --resume too: finished fine-tuning runs are kept)")
    if "RANK" in os.environ:
        raise SystemExit("--stage capfilt runs as one process")
    if not os.path.exists(cfg.init_from):
        raise SystemExit(f"--init_from: no checkpoint at {cfg.init_from}")
    init = torch.load(cfg.init_from, map_location="cpu", weights_only=True)
    try:
        ds = data.Dataset(cfg.data if cfg.data != "shapes" else init["data_path"])
    except FileNotFoundError as e:
        raise SystemExit(f"--stage capfilt: {e}") from None
    check_tokenizer(init, ds)
    split, m = cfg.capfilt_split, init["config"]["model"]
    if split not in ds.meta["splits"] or not ds.has(split, "tokens"):
        raise SystemExit(f"--capfilt_split {split!r}: {ds.path} has no captioned split of that name")
    if cfg.capfilt_tune == "none" and (m["itm_weight"] == 0 or cfg.capfilt_synthetic and m["caption_weight"] == 0):
        raise SystemExit(f"--capfilt_tune=none: {cfg.init_from} is used as it is, and it was trained without ITM "
                         f"(the filter) or without captioning (the captioner)")
    settings = {k: getattr(cfg, k) for k in CAPFILT_SETTINGS}
    key = json.dumps({**settings, "init_from": os.path.abspath(cfg.init_from), "out_dir": os.path.abspath(cfg.out_dir)},
                     sort_keys=True)
    out = os.path.realpath(cfg.capfilt_data or f"{os.path.normpath(ds.path)}-capfilt-{hashlib.sha256(key.encode()).hexdigest()[:8]}")
    inside = lambda a, b: os.path.commonpath([a, b]) == b  # noqa: E731  a is b or lies within it
    source, run_dir = os.path.realpath(ds.path), os.path.realpath(cfg.out_dir)
    if any(inside(out, other) or inside(other, out) for other in (source, run_dir)):
        raise SystemExit(f"--capfilt_data {out}: the cleaned set is a new directory, not in or around the source "
                         f"dataset ({source}) or the run's out_dir ({run_dir})")
    if os.path.exists(out) and "capfilt" not in (data.Dataset(out).meta if os.path.exists(os.path.join(out, "meta.json")) else {}):
        raise SystemExit(f"--capfilt_data {out} exists and is not a set CapFilt wrote: give a new path")
    return ds, out


def capfilt_stage(cfg, changes, overrides):
    """CapFilt: fine-tune the captioner and the filter (capfilt_tune), bootstrap the captions of
    capfilt_split, and write the cleaned set as a new prepared dataset (capfilt_source says
    where): its train split from cleaned_split, the source's val and test splits copied, the
    report in its meta.json. Writes report.json, capfilt.npz (every decision and margin) and
    eval.json (the report's numbers) to out_dir."""
    ds, out = capfilt_source(cfg)
    t0 = time.time()
    roles = {"separate": dict(CAPFILT_ROLES), "shared": {"shared": {k: v for w in CAPFILT_ROLES.values() for k, v in w.items()}},
             "none": {}}[cfg.capfilt_tune]
    if not cfg.capfilt_synthetic:
        roles.pop("captioner", None)
    paths = {}
    for name, weights in roles.items():  # each on the source dataset's train_split, from init_from
        run = {"out_dir": os.path.join(cfg.out_dir, name), "stage": "finetune", "data": ds.path, **OBJECTIVES_OFF, **weights}
        sub_run(cfg, changes, overrides, run, f"{name}: fine-tuning on {cfg.train_split}")
        paths[name] = os.path.join(run["out_dir"], "ckpt.pt")
    filter_path = paths.get("filter", paths.get("shared", cfg.init_from))
    captioner_path = paths.get("captioner", paths.get("shared", cfg.init_from)) if cfg.capfilt_synthetic else None
    device, _, _, ctx = pick_runtime(cfg)
    filt = load_checkpoint(filter_path, device)[0]
    captioner = None if captioner_path is None else filt if captioner_path == filter_path else \
        load_checkpoint(captioner_path, device)[0]
    split = cfg.capfilt_split
    print(f"bootstrapping {ds.split_size(split)} images of {split}: nucleus p {cfg.capfilt_top_p}, "
          f"threshold p(match) >= {cfg.capfilt_threshold}")
    t_boot = time.time()
    synthetic, texts, problems, margins = bootstrap(captioner, filt, ds, cfg, device, ctx)
    t_boot = time.time() - t_boot
    keep = capfilt_keep(margins, problems, cfg.capfilt_threshold)
    report = capfilt_report(ds, split, keep, problems, margins, texts)
    report.update(data_path=out, source=os.path.abspath(ds.path), filter=filter_path, captioner=captioner_path,
                  **{k: getattr(cfg, k) for k in CAPFILT_SETTINGS},
                  examples=[{"own": data.decode_tokens(ds.tokenizer, ds.array(split, "tokens")[i, 0]), "synthetic": texts[i],
                             "kept": keep[i].tolist(), "p_match": (1 / (1 + np.exp(-margins[i].astype(np.float64)))).tolist()}
                            for i in range(min(8, len(keep)))])
    os.makedirs(cfg.out_dir, exist_ok=True)
    for stale in ("eval.json", "report.json"):  # of an earlier run: this one's replace them, or say why not
        if os.path.exists(os.path.join(cfg.out_dir, stale)):
            os.remove(os.path.join(cfg.out_dir, stale))
    npz = os.path.join(cfg.out_dir, "capfilt.npz")
    np.savez(npz + ".tmp.npz", margins=margins, keep=keep, problems=np.array(problems), synthetic=synthetic)
    os.replace(npz + ".tmp.npz", npz)
    write_json(os.path.join(cfg.out_dir, "report.json"), report)
    for key, value in report.items():
        if key != "examples":
            print(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
    if not keep.any():
        raise SystemExit(f"the filter kept no caption of {split} at --capfilt_threshold={cfg.capfilt_threshold}: "
                         f"no dataset written (the report is in {cfg.out_dir}/report.json)")
    arrays = cleaned_split(ds, split, keep, synthetic)
    meta = {k: v for k, v in ds.meta.items() if k != "splits"}
    meta["capfilt"] = {k: v for k, v in report.items() if k != "examples"}
    data.write_dataset(out, {"train": arrays}, meta, ds.bpe_text, copy_from=ds,
                       copy_splits=[s for s in ("val", "test") if s in ds.meta["splits"]], replace=True)
    print(f"cleaned dataset: {out} ({len(arrays['images'])} images, {int(keep.sum())} captions); "
          f"pretrain on it with --data={out}")
    metrics = {key: v for key, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.update(bootstrap_time_s=t_boot, capfilt_time_s=time.time() - t0)
    write_json(os.path.join(cfg.out_dir, "eval.json"), metrics)
    return metrics


def main(argv=None):
    preset, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    changes = stage_overrides(preset, overrides)
    cfg = apply_overrides(PRESETS[preset], changes)
    if cfg.stage != "pretrain" and not (cfg.init_from or cfg.resume):
        raise SystemExit(f"--stage {cfg.stage} starts from a pretrained checkpoint: give --init_from PATH")
    if cfg.stage == "prompt":
        return prompt_stage(cfg, changes, overrides)
    if cfg.stage == "capfilt":
        return capfilt_stage(cfg, changes, overrides)
    return train(*start_state(cfg, changes, overrides))


if __name__ == "__main__":
    main()

"""
Train a nanoVLP model.

    python train.py --config small                        # the embedded default: a 2-core CPU, under 10 minutes
    python train.py --config tiny --max_iters=50          # any flag (python train.py --help) changes the preset
    python train.py --config small --stage instruct --init_from out/ckpt.pt  # a later stage (instruct, prompt,
                                                          # capfilt, finetune) from a pretrained run
    python train.py --config base --data=data/coco --init_from=openai/clip-vit-base-patch32  # real data, weights
    torchrun --standalone --nproc_per_node=8 train.py --config base   # DDP on 8 GPUs

A run writes out_dir/ckpt.pt, log.jsonl and eval.json; --resume continues from out_dir/ckpt.pt.
"""

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import capfilt
import data
import instruct
import prepare
import prompt
from configurator import PRETRAINING, apply_overrides, cached_steps, config_fields, parse_args, validate
from data import WorldConfig
from eval import build_model, check_tokenizer, evaluate, is_checkpoint, print_captions, read_checkpoint, write_json
from hf import hf_init
from parallel import (cached_pretrain_step, checkpoint_blocks, compile_mode, compile_model, full_state, global_losses,
                      load_optimizer, setup_distributed, shard, uses_feature_cache, wait_for_rank0, wrap_ddp)
from model import VLMConfig, dist_info, draw_noise, pretrain_counts, uses_electra


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # ckpt.pt, log.jsonl and eval.json go here
    data: str = "shapes"  # 'shapes': generate (once) and use the shapes world; or a prepared dataset directory
    data_dir: str = "data"  # where generated worlds are cached
    train_split: str = "train"  # the split to train on: 'train' (clean captions) or 'web' (noisy)
    stage: str = "pretrain"  # pretrain, finetune, capfilt, instruct or prompt
    init_from: str = ""  # start from a checkpoint (ckpt.pt), or a Hugging Face CLIP or GPT-2 (hub name or directory)
    init_text: str = ""  # with a Hugging Face CLIP as init_from: a Hugging Face GPT-2 for the text transformer
    resume: bool = False  # continue from out_dir/ckpt.pt
    eval_interval: int = 200  # steps between evaluations on the first eval_images val images
    eval_images: int = 256  # how many val images (or question sets) the periodic evaluations read
    rerank_k: int = 8  # evaluation: ITM re-ranks the top rerank_k of ITC retrieval
    log_interval: int = 10  # steps between log.jsonl lines
    ckpt_interval: int = 200  # steps between checkpoints (the last step is always saved)
    train_vit: bool = False  # instruct: fine-tune the ViT too (frozen by default; pretrain and finetune train it)
    train_images: int = 0  # train on the first N images of train_split only (0: all of it); finetune: a small clean set
    # CapFilt: bootstrap the captions of a noisy split with a captioner and an ITM filter
    capfilt_split: str = "web"  # the split whose captions are bootstrapped
    capfilt_tune: str = "separate"  # 'separate': captioner and filter fine-tuned apart (BLIP); 'shared': one; 'none'
    capfilt_synthetic: bool = True  # add the captioner's captions (false: the filter alone, no captioner)
    capfilt_top_p: float = 0.9  # nucleus sampling of the synthetic captions
    capfilt_temperature: float = 1.0  # the sampling temperature of the synthetic captions
    capfilt_threshold: float = 0.5  # a caption is kept when the filter's p(match) is at least this
    capfilt_data: str = ""  # where the cleaned dataset goes; default beside the source: <source>-capfilt-<hash>
    capfilt_clean: bool = True  # the cleaned set also holds train_split's images and captions (BLIP); false: not
    # the prompt stage: few-shot detection of named classes on the frozen model
    classes: str = ""  # comma-separated class names; default the dataset's novel classes
    shots: int = 16  # K: training images per class, all of them in every step
    shot_seed: int = 0  # the first K-shot sample the stage trains on
    shot_seeds: int = 3  # the stage runs samples shot_seed.. of them (out_dir/seed<k>); out_dir/eval.json: mean and std
    stop_loss: float = 0.0  # stop as soon as the training loss is under this (0: run max_iters steps)
    augment: bool = True  # shift by whole patches, mirror and permute the colour channels of the shots
    zero_shot: bool = True  # also evaluate with no prompts (the same for every sample: run on the first alone)
    # data
    flip: bool = False  # pretraining: mirror half the images, 'left' and 'right' swapped in their captions
    batch_size: int = 128  # per rank and micro-step
    num_workers: int = 0  # loader processes per rank that read batches ahead (0: read in the training process)
    grad_accum: int = 1  # micro-steps per optimizer step
    fsdp: bool = False  # with several ranks: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    # optimizer: AdamW, linear warmup, then cosine decay to min_lr at max_iters
    lr: float = 1e-3  # the peak learning rate
    min_lr: float = 1e-4  # the learning rate at max_iters
    weight_decay: float = 0.1  # AdamW's, on matrices only
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.98  # AdamW's second-moment decay
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_iters: int = 100  # steps of linear warmup
    max_iters: int = 2000  # optimizer steps in all
    # system
    device: str = "auto"  # 'auto' picks cuda, then mps, then cpu
    dtype: str = "auto"  # 'auto': bfloat16 on CUDA where supported, else float16 with a grad scaler; float32 off CUDA
    compile: str = "auto"  # 'regional' (each block), 'true' (the whole step), 'false'; 'auto': regional on CUDA
    checkpoint: bool = False  # recompute the text transformer's block activations in the backward pass (less memory)
    seed: int = 1337  # initial weights, batches and every random draw
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
    # the embedded default: a 2-core CPU in under 10 minutes, world generation included (results/small-run.md)
    "small": TrainConfig(
        out_dir="out", batch_size=64, max_iters=1050, warmup_iters=60, eval_interval=10 ** 9, lr=1e-3, min_lr=1e-4,
        model=VLMConfig(image_size=64, patch_size=16, vit_width=128, vit_layers=4, vit_heads=4,
                        text_width=128, text_layers=4, text_heads=4, embed_dim=128, itc_temperature=0.03,
                        fused_rows=0.5, itm_negatives=0.5, image_axes=True, caption_weight=2.0)),
    # GPU: ViT-B/16 at 224 px, a CLIP-B text transformer; the batch fits 80 GB with 15% spare (bench.py --mode memory)
    "base": TrainConfig(
        out_dir="out-base", batch_size=160, num_workers=4, max_iters=20000, warmup_iters=2000, eval_interval=2000,
        eval_images=1000, lr=5e-4, min_lr=5e-5, weight_decay=0.2, ckpt_interval=1000,
        model=VLMConfig(image_size=224, patch_size=16, vit_width=768, vit_layers=12, vit_heads=12,
                        text_width=512, text_layers=12, text_heads=8, embed_dim=512, context_length=77,
                        activation="quick_gelu")),
}

# pretraining continued on a small clean set at a lower rate (the shapes world: its first 2,000 images)
_FINETUNE = {
    "tiny": dict(max_iters=10, warmup_iters=2, eval_interval=10 ** 9, train_images=128, lr=3e-4, min_lr=3e-5),
    "small": dict(max_iters=200, warmup_iters=20, eval_interval=10 ** 9, train_images=2000, lr=2e-4, min_lr=2e-5),
    "base": dict(max_iters=2000, warmup_iters=200, lr=1e-5, min_lr=1e-6, weight_decay=0.05),
}

STAGE_FILES = {"instruct": instruct, "prompt": prompt}  # the stages with a model, batches and evaluation of their own
STAGE_PRESETS = {"instruct": instruct.PRESETS, "prompt": prompt.PRESETS, "finetune": _FINETUNE, "capfilt": _FINETUNE}
STAGE_TRAINS = {"instruct": instruct.TRAINS, "prompt": prompt.TRAINS}  # the parameters a stage trains; the rest frozen


def stage_overrides(preset, overrides):
    """What a run changes in its preset: its stage's changes (and out_dir <preset's>-<stage>), then the flags."""
    stage = overrides.get("stage", "pretrain")
    if stage == "pretrain":
        return overrides
    out_dir = f"{PRESETS[preset].out_dir}-{stage}"
    return {"out_dir": out_dir, **STAGE_PRESETS.get(stage, {}).get(preset, {}), **overrides}


def config_from_dict(d):
    return TrainConfig(**{**d, "model": VLMConfig(**d["model"]), "world": WorldConfig(**d["world"])})


# -----------------------------------------------------------------------------
# pieces of the run


def pick_runtime(cfg, local_rank=0):
    """(device, its type, dtype, autocast context: a no-op in float32). 'auto': CUDA, then MPS, then the CPU;
    bfloat16 on CUDA where supported, else float16 (with a grad scaler), float32 elsewhere."""
    cuda = torch.cuda.is_available()
    device = cfg.device if cfg.device != "auto" else f"cuda:{local_rank}" if cuda else \
        "mps" if torch.backends.mps.is_available() else "cpu"
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    half = torch.bfloat16 if device_type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "auto": half if device_type == "cuda" else torch.float32}[cfg.dtype]
    if device_type == "cuda":  # TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    return device, device_type, dtype, ctx


def load_data(cfg, rank, world_size):
    """The prepared dataset (the shapes world made on first use) and its codebook; rank 0 prepares, the others wait."""
    m = cfg.model
    path = cfg.data if cfg.data != "shapes" else data.world_dir(cfg.data_dir, cfg.world, m.image_size, m.context_length)
    try:
        if rank == 0:
            if cfg.data == "shapes":
                data.prepare_world(cfg.data_dir, cfg.world, m.image_size, m.context_length)
            if uses_electra(m) and cfg.stage in PRETRAINING:
                prepare.prepare_codebook(path, m.patch_size, m.n_codes)
        if world_size > 1:
            wait_for_rank0()
        return data.Dataset(path)
    except (OSError, ValueError) as e:  # a path that is no dataset, a world the flags cannot make
        where = f"--data {cfg.data}" if cfg.data != "shapes" else f"the shapes world (--data_dir={cfg.data_dir}, " \
            f"--image_size={m.image_size}, --context_length={m.context_length})"
        raise SystemExit(f"{where}: {e}") from None


def fit_model_to_data(mcfg, ds):
    """The model config with the tokenizer's vocabulary and specials, checked against the dataset's sizes."""
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


def load_weights(model, state, strict, log=print):
    """A checkpoint's weights into the model; a new stage's parts start fresh, both named by module."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise SystemExit(f"the checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    modules = lambda keys: sorted({".".join(k.split(".")[:1 + k.startswith("converter")]) for k in keys})  # noqa: E731
    if missing:
        log(f"new, initialised fresh: {', '.join(modules(missing))}")
    if unexpected:
        log(f"in the checkpoint, not used: {', '.join(modules(unexpected))}")


def freeze_for_stage(model, stage, train_vit=False):
    """Only the parameters the stage trains (and the ViT with train_vit) keep requires_grad."""
    if stage in STAGE_TRAINS:
        trains = STAGE_TRAINS[stage] + (("visual.",) if train_vit else ())
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(trains))


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
    """Everything a resume needs, written to a temporary file and renamed into place. The batches need no
    state: they are a function of (seed, step)."""
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
    data.write_file(path, lambda f: torch.save(ckpt, f))


def pretrain_batches(cfg, ds, model, device, rank, world_size):
    """(fetch, place, n): fetch(micro_step) reads this rank's batch of that micro-step on the host
    (data.pretrain_fetch; a streamed train split from its shards), place(parts) makes the losses'
    arguments on the device; n is the samples of an epoch."""
    stream = prepare.stream_fetch(cfg, ds, rank, world_size) if ds.stream and cfg.train_split == "train" else None
    fetch, n = data.pretrain_fetch(cfg, ds, rank, world_size, uses_electra(cfg.model), stream)

    def place(parts):
        x = {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in parts.items()}
        return dict(pixels=model.normalize_pixels(x["images"]), tokens=x["tokens"], groups=x.get("groups"),
                    codes=x.get("codes"))
    return fetch, place, n


class Logger:
    """log.jsonl on rank 0, one JSON object a line; on resume the lines after the checkpoint's step go."""

    def __init__(self, path, enabled, resume_step=None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and os.path.exists(path):
            with open(path) as f:
                data.write_file(path, "".join(line for line in f if json.loads(line).get("step", 0) <= resume_step))
        elif enabled and resume_step is None and os.path.exists(path):
            os.remove(path)

    def log(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------
# one optimizer step's forward and backward passes


def step_noise(cfg, step, n_rows, device):
    """The random draws of a pretraining step's rows (model.draw_noise), seeded by (seed, step), on every rank."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
    return draw_noise(cfg.model, n_rows, cfg.model.context_length, gen, device)


def trim_text(batches, pad_id):
    """The step's tokens cut to the bucket of its longest caption on any rank, a multiple of a quarter of the
    context rounded up to 8: the text passes skip the padding (no query reads it) in at most 4 shapes."""
    longest = torch.stack([(b["tokens"] != pad_id).sum(1).max() for b in batches]).max()
    if dist_info()[1] > 1:
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)  # the gathers need one length on every rank
    T = batches[0]["tokens"].size(1)
    quantum = 8 * math.ceil(T / 32)
    return [{**b, "tokens": b["tokens"][:, :min(T, quantum * math.ceil(int(longest) / quantum))]} for b in batches]


def train_step(model, raw_model, batches, scaler, ctx, noise=None):
    """The forward and backward passes of one optimizer step over its micro-batches; returns their mean
    losses. Pretraining batches get their rows of the step's noise and the step's counts, so W ranks x k
    micro-batches of B rows give the gradient of one batch of k W B rows (docs/exactness.md); with k > 1,
    ITC and ITM go through cached_pretrain_step."""
    k, (rank, world_size) = len(batches), dist_info()
    pretrain = "tokens" in batches[0]
    if pretrain:
        batches = trim_text(batches, raw_model.cfg.pad_id)
        B = batches[0]["tokens"].size(0)
        offsets = [(rank * k + i) * B for i in range(k)]
        if noise is None:
            noise = draw_noise(raw_model.cfg, k * world_size * B, raw_model.cfg.context_length,
                               device=batches[0]["tokens"].device)
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


# -----------------------------------------------------------------------------
# the run


def train(cfg, ckpt=None, init=None):
    """Run a stage: ckpt resumes a run, init (a checkpoint) gives the starting weights."""
    rank, local_rank, world_size = setup_distributed(cfg)
    master = rank == 0
    device, device_type, dtype, ctx = pick_runtime(cfg, local_rank)
    compiled = compile_mode(cfg, device_type)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    os.makedirs(cfg.out_dir, exist_ok=True)

    validate(cfg, world_size)
    ds = load_data(cfg, rank, world_size)
    cfg.model = fit_model_to_data(cfg.model, ds)
    if init is not None:
        check_tokenizer(init, ds)
    stage = STAGE_FILES.get(cfg.stage)  # None: a pretraining step
    pretrain, prompted = stage is None, cfg.stage == "prompt"
    if prompted:
        prompt.setup(cfg, ds)
    model = build_model(cfg.model)
    if init is not None:
        load_weights(model, init["model"], strict=cfg.stage == "pretrain", log=print if master else lambda *a: None)
    if uses_electra(cfg.model) and pretrain:
        # the data's own codebook: its codes are the MOC targets (an init's may be another's)
        model.codebook.copy_(torch.from_numpy(ds.codebook(cfg.model.patch_size, cfg.model.n_codes)))
    freeze_for_stage(model, cfg.stage, cfg.train_vit)
    model.to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    elif prompted:
        model.init_prompts(torch.as_tensor(prompt.class_rows(ds, cfg), dtype=torch.long, device=device))
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
    raw_model = model
    model = compile_model(checkpoint_blocks(model, cfg.checkpoint), compiled)
    model = wrap_ddp(model, raw_model, cfg, device_type, local_rank, cached_steps(cfg))
    logger = Logger(os.path.join(cfg.out_dir, "log.jsonl"), master, start_step if ckpt is not None else None)
    if master:
        print(f"{raw_model.num_params() / 1e6:.2f}M trainable parameters | device {device} | {dtype} | "
              f"compile {compiled} | {world_size} rank(s) | data {ds.path}")
    make_batches = pretrain_batches if pretrain else stage.batches
    fetch, place, n_train = make_batches(cfg, ds, raw_model, device, rank, world_size)
    # the prompt stage's batches are made on the device: no loader processes
    workers = 0 if prompted else cfg.num_workers
    stream = data.host_batches(fetch, start_step * cfg.grad_accum, workers, device_type == "cuda")

    def run_eval(show_captions=False, subset=False, **kw):
        """The metrics on rank 0 (None on the others); subset: the first eval_images. Under FSDP every rank
        calls it, and rank 0 evaluates a whole copy of the model."""
        m = raw_model
        if cfg.fsdp and world_size > 1:
            state = full_state(raw_model, None, cfg)[0]
            if not master:
                return None
            m = build_model(cfg.model).to(device)
            m.load_state_dict(state)
        if cfg.stage == "instruct":
            return instruct.evaluate(m, ds, ctx=ctx, max_sets=cfg.eval_images if subset else None)
        if prompted:
            return prompt.evaluate(m, ds, cfg.classes.split(","), prompt.class_rows(ds, cfg), ctx=ctx,
                                   max_images=cfg.eval_images if subset else None, **kw)
        if show_captions and cfg.model.caption_weight > 0 and ds.has("val", "tokens"):
            print_captions(m, ds, ctx)
        if subset:
            kw.update(max_images=cfg.eval_images, heldout=False)
        return evaluate(m, ds, device, ctx=ctx, rerank_k=cfg.rerank_k, **kw)

    extra = prompt.start(raw_model, cfg, run_eval) if prompted else {}
    samples_per_step = n_train if prompted else cfg.batch_size * cfg.grad_accum * world_size
    steps_per_epoch = max(1, n_train // samples_per_step)
    pbar = tqdm(total=cfg.max_iters, initial=step, disable=not master, dynamic_ncols=True, desc=cfg.stage)
    t_start = t_log = time.time()
    while True:
        if (master or cfg.fsdp) and step > start_step and step % cfg.eval_interval == 0 and step < cfg.max_iters:
            metrics = run_eval(subset=True)
            if master:
                logger.log(step=step, kind="eval", **metrics)
                pbar.write(f"step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                         if k.endswith(("r1", "acc", "miou", "ap50"))))
        stop = cfg.stop_loss > 0 and step > start_step and losses["loss"].item() < cfg.stop_loss
        done = step >= cfg.max_iters or stop
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
            batches = [{**b, "alpha": torch.tensor(alpha, dtype=torch.float64)} for b in batches]  # no recompile
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
    train_time = time.time() - t_start  # the steps alone, not the evaluation below
    metrics = run_eval(show_captions=pretrain) if master or cfg.fsdp else None
    if master:
        metrics.update(step=step, train_time_s=train_time, **extra)
        write_json(os.path.join(cfg.out_dir, "eval.json"), metrics)
        logger.log(kind="eval", **metrics)
        for k, v in metrics.items():
            print(f"{k:32s} {v:.4f}")
    if world_size > 1:
        dist.destroy_process_group()
    return metrics if master else None


def start_state(cfg, changes, overrides):
    """(config, checkpoint to resume or None, checkpoint to start from or None) of a run."""
    if cfg.resume:
        ckpt = read_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), "--resume")
        # the run continues with its own config; flags given now (say a larger max_iters) still apply
        return apply_overrides(config_from_dict(ckpt["config"]), overrides), ckpt, None
    if not cfg.init_from:
        return cfg, None, None
    known = config_fields(cfg)
    model_changes = {k: v for k, v in changes.items() if known[k][0] == "model"}
    if is_checkpoint(cfg.init_from):
        if cfg.init_text:
            raise SystemExit("--init_text goes with a Hugging Face CLIP as --init_from, not with a checkpoint")
        init = read_checkpoint(cfg.init_from, "--init_from")
    else:
        init = hf_init(cfg.init_from, cfg.init_text, model_changes, cfg.seed)
    # the architecture comes with the weights; what the stage and the flags set on the model still applies
    cfg.model = apply_overrides(config_from_dict({**asdict(cfg), "model": init["config"]["model"]}),
                                model_changes).model
    return cfg, None, init


def sub_run(cfg, changes, overrides, run, name):
    """One run of a stage made of several (the prompt stage's shot samples, CapFilt's fine-tuning runs). With
    --resume a finished run (its training wrote eval.json) is kept, an unfinished one resumed."""
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


def checked_config(argv):
    """(config, the flags' changes to the preset, the flags) of a command line, every flag checked before any work."""
    preset, overrides = parse_args(argv, PRESETS)
    changes = stage_overrides(preset, overrides)
    cfg = apply_overrides(PRESETS[preset], changes)
    validate(cfg)
    return cfg, changes, overrides


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--check"]:  # the flags checked, nothing run (the ablation runner's check of each row)
        checked_config(argv[1:])
        return print("flags ok")
    cfg, changes, overrides = checked_config(argv)
    if cfg.stage == "prompt":
        return prompt.run(cfg, lambda run, name: sub_run(cfg, changes, overrides, run, name))
    if cfg.stage == "capfilt":
        return capfilt.run(cfg, lambda run, name: sub_run(cfg, changes, overrides, run, name), pick_runtime(cfg))
    return train(*start_state(cfg, changes, overrides))


if __name__ == "__main__":
    main()

"""Pretraining steps split over ranks and micro-batches, for the equivalence tests in
test_distributed.py. Imported by the tests for the one-process reference, and run by them
under `torchrun --nproc_per_node=2` (gloo) as

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_step.py OBJECTIVES GRAD_ACCUM DTYPE WRAP STATES OUT

which runs the same steps on each rank's part of the batch with WRAP ('ddp', 'fsdp', or 'ddp-true' /
'ddp-regional': DDP around the model compiled as --compile does it), each
step after the first from the reference state in STATES ('-': from its own), and saves, on
rank 0, what run_steps returns."""

import os
import sys
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import parallel  # noqa: E402
import train  # noqa: E402
from model import VLM, VLMConfig, draw_noise  # noqa: E402

N, STEPS = 16, 2  # rows of the global batch, optimizer steps
OBJECTIVES = {
    "itc": dict(itm_weight=0.0, mlm_weight=0.0, moc_weight=0.0, rtd_weight=0.0, r2d_weight=0.0, caption_weight=0.0,
                momentum_alpha=0.0),
    "all": dict(momentum_alpha=0.4),  # every objective, momentum distillation and its queue
    # the other step layouts: one ViT pass over the replaced pixels, ITM negatives for half the
    # rows, the fused pass not training the ViT
    "all-variants": dict(momentum_alpha=0.4, shared_vit_pass=True, itm_negatives=0.5, fused_vit_grad=False),
    # ELECTRA and the fused pass on every other row, ITM on the clean pairs, image tokens with their
    # rows and columns; ITM on the clean pairs with the fused pass not training the ViT
    "all-half-rows": dict(momentum_alpha=0.4, fused_rows=0.5, itm_clean=True, image_axes=True),
    "all-clean-itm": dict(momentum_alpha=0.4, itm_clean=True, fused_vit_grad=False),
}


def config(objectives):
    base = VLMConfig(image_size=32, patch_size=8, vit_width=32, vit_layers=2, vit_heads=2, text_width=32, text_layers=2,
                     text_heads=2, embed_dim=16, vocab_size=50, context_length=12, bos_id=47, eos_id=48, pad_id=49,
                     mask_id=46, glob_id=45, n_codes=16, queue_size=2 * N, momentum=0.9)
    return VLMConfig(**{**asdict(base), **OBJECTIVES[objectives]})


def make_model(cfg, dtype=torch.float32):
    torch.manual_seed(0)
    model = VLM(cfg).to(dtype)
    model.codebook.copy_(torch.rand(model.codebook.shape, generator=torch.Generator().manual_seed(1)))
    return model


def global_batch(cfg, step):
    """N rows: images, captions of random lengths (two rows repeat a caption: identical
    texts are never negatives), paraphrase groups of two rows (-1 for a few rows: none
    known), visual codes. The first step's first 8 captions fit 8 of the 12 positions: alone,
    rank 0 would cut its tokens shorter than rank 1 (train.trim_text)."""
    g = torch.Generator().manual_seed(100 + step)
    P = (cfg.image_size // cfg.patch_size) ** 2
    tokens = torch.full((N, cfg.context_length), cfg.pad_id)
    for i in range(N):
        n = int(torch.randint(1, 7 if step == 0 and i < N // 2 else cfg.context_length - 1, (1,), generator=g))
        tokens[i, 0], tokens[i, n + 1] = cfg.bos_id, cfg.eos_id
        tokens[i, 1:n + 1] = torch.randint(0, 40, (n,), generator=g)
    tokens[5] = tokens[2]
    groups = torch.arange(N) // 2
    groups[-3:] = -1
    return dict(pixels=torch.randn(N, 3, cfg.image_size, cfg.image_size, generator=g), tokens=tokens,
                codes=torch.randint(0, cfg.n_codes, (N, P), generator=g), groups=groups, alpha=0.4)


def run_steps(model, raw_model, grad_accum, rank=0, world_size=1, states=None):
    """STEPS optimizer steps (SGD) on this rank's rows of each global batch, in grad_accum
    micro-batches. Returns the losses and the gradients of every step and the parameters
    and buffers (momentum encoders, queues) after it. Given the states of a reference run,
    each step after the first starts from the reference's state, so that a step is compared
    with its reference from the same weights."""
    cfg, out = raw_model.cfg, {"losses": [], "grads": [], "states": []}
    optimizer = torch.optim.SGD(raw_model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(STEPS):
        if step > 0 and states is not None:
            raw_model.load_state_dict(states[step - 1])
        batch = {k: v.to(raw_model.logit_scale.dtype) if k == "pixels" else v for k, v in global_batch(cfg, step).items()}
        B = N // (world_size * grad_accum)
        mine = [{k: v if k == "alpha" else v[(rank * grad_accum + i) * B:(rank * grad_accum + i + 1) * B]
                 for k, v in batch.items()} for i in range(grad_accum)]
        noise = draw_noise(cfg, N, cfg.context_length, torch.Generator().manual_seed(step))
        losses = train.train_step(model, raw_model, mine, scaler, nullcontext(), noise)
        out["losses"].append(parallel.global_losses(losses))
        out["grads"].append({n: whole(p.grad) for n, p in raw_model.named_parameters() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        raw_model.momentum_update()
        out["states"].append({k: whole(v) for k, v in raw_model.state_dict().items()})
    return out


def whole(t):
    """A copy of t; an FSDP shard gathered from every rank."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.clone()


if __name__ == "__main__":
    objectives, grad_accum, dtype, wrap, states, path = sys.argv[1:]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    raw = make_model(config(objectives), getattr(torch, dtype))
    cfg = train.TrainConfig(model=raw.cfg, grad_accum=int(grad_accum), fsdp=wrap == "fsdp")
    parallel.shard(raw, cfg)
    model = parallel.compile_model(raw, wrap.partition("-")[2] or "false")
    model = parallel.wrap_ddp(model, raw, cfg, "cpu", 0, train.cached_steps(cfg))
    result = run_steps(model, raw, cfg.grad_accum, dist.get_rank(), dist.get_world_size(),
                       torch.load(states, weights_only=True) if states != "-" else None)
    if dist.get_rank() == 0:
        torch.save(result, path)
    dist.barrier()
    dist.destroy_process_group()

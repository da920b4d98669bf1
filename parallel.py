"""
Many ranks and many micro-batches: DDP and FSDP2 set-up, torch.compile (whole or per block),
gradients averaged by hand, whole checkpoints from shards, and gradient accumulation in which
the contrastive and matching losses see the whole step's batch (cached_pretrain_step). The
gathers that the losses themselves use (gather_with_grad) live in model.py.
"""

import datetime
import functools
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import Block, dist_info, fp32, loss_weights


def all_gather(x):
    """Every rank's x concatenated along dim 0 (rank order), without gradient."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def sum_to_owner(grad):
    """grad (W n, ...) for every rank's rows -> (n, ...): the sum over ranks of this rank's rows' gradients."""
    rank, world_size = dist_info()
    if dist.get_backend() == "nccl":
        mine = grad.new_empty(grad.size(0) // world_size, *grad.shape[1:])
        dist.reduce_scatter_tensor(mine, grad.contiguous())
        return mine
    grad = grad.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(grad)  # gloo has no reduce-scatter of tensors
    return grad.chunk(world_size)[rank]


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


def wait_for_rank0():
    """Every rank waits here until rank 0 is done preparing data, for hours if need be: NCCL's default timeout
    (10 minutes) is shorter than preparing a large world, so the wait is a gloo barrier of its own."""
    dist.barrier(group=dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6)))


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


def shard(model, cfg):
    """FSDP2 (--fsdp with several ranks), in place: every transformer block is a unit whose
    parameters are gathered for its passes and sharded again after, the rest of the model the
    root unit. Call before torch.compile and before making the optimizer."""
    if not cfg.fsdp or dist_info()[1] == 1:
        return
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
    """A checkpoint's optimizer state (full_state's format) into the optimizer."""
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(raw_model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def checkpoint_blocks(model, on=True):
    """--checkpoint: each text block's activations are recomputed in the backward pass instead of kept, for
    the fused and captioning passes' memory at about a third more compute. Returns the model."""
    for block in model.text.blocks if on else ():
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
    return model


def compile_mode(cfg, device_type):
    """--compile as it runs: 'auto' is 'regional' on CUDA and 'false' elsewhere."""
    return cfg.compile if cfg.compile != "auto" else ("regional" if device_type == "cuda" else "false")


def compile_model(model, mode, blocks=(Block,)):
    """'true': the whole step traced as one graph (minutes to compile); 'regional': each transformer block
    compiled alone and the rest eager, the blocks of one shape sharing one compile (seconds)."""
    if mode == "regional":
        for m in model.modules():
            if isinstance(m, blocks):
                m.compile()
    if mode != "true":
        return model
    # the instruct step's ViT reads a batch's valid images only: a data-dependent shape, traced (not a graph
    # break) with the patch conv kept in its layout (channels-last fails Inductor's stride check on it)
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._inductor.config.layout_optimization = False
    return torch.compile(model)


def wrap_ddp(model, raw_model, cfg, device_type, local_rank, cached):
    """DDP around the (compiled) model when there are several ranks, except under FSDP and
    for cached steps (cached_pretrain_step): they average the gradients themselves."""
    if dist_info()[1] == 1 or cfg.fsdp or cached:
        return model
    # pretraining with an objective off leaves some parameters without a gradient
    unused = cfg.stage != "instruct" and any(w == 0 for w in loss_weights(raw_model.cfg).values())
    return DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, find_unused_parameters=unused)


def cached_pretrain_step(raw_model, batches, noise, counts, offsets, scaler, ctx):
    """Gradient accumulation in which ITC and ITM see the whole step's batch (GradCache,
    open_clip's accum_freq, generalised to the fused passes):
    1. every micro-batch's encoders run without a graph (model.pretrain_encode), and their
       representations of every row of the step, gathered over the ranks, are cached;
    2. the cross-sample losses (model.pretrain_head) run a micro-batch of rows at a time
       against all the cached columns; their backward passes fill the fused passes'
       gradients and the cache's (summed back to each row's rank);
    3. each micro-batch's encoders run again with a graph, and the backward pass takes its
       per-sample losses plus the cached gradients of its representations.
    Same weights and noise, so the gradient is that of one batch of all the rows; memory is
    one micro-batch's activations plus the cache. The gradients are averaged over the ranks once."""
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

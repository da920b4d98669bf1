"""Splitting a step does not change it: the losses and every gradient of a step on 2 ranks
(torchrun, gloo), in 4 micro-batches, or both, equal those of one process on the whole
batch, for ITC alone and for every objective with momentum distillation. Two steps each,
so that the second reads the queue the first filled; each starts from the reference's
weights and queues."""

import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

import train
from dist_step import N, OBJECTIVES, config, global_batch, make_model, run_steps
from model import draw_noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel(g, w):
    """|g - w| / |w| in the 2-norm."""
    return ((g - w).norm() / w.norm()).item()


def assert_same_steps(got, want, tol, tol_each=None):
    """The losses within tol relative; the gradient of all the parameters together, and the
    parameters and floating buffers after each step, within tol relative in norm; each
    parameter's gradient within tol_each (default tol); integer buffers (queued tokens,
    pointers) equal. In float32 a gradient that is a small sum of large terms of both signs
    (a LayerNorm bias) carries the rounding of the terms: up to 1.1e-6 of its norm was seen
    for the same step computed two ways; float64 shows the match is exact to rounding."""
    tol_each = tol if tol_each is None else tol_each
    for step, (g, w) in enumerate(zip(got["losses"], want["losses"])):
        assert g.keys() == w.keys()
        for name in w:
            assert abs(g[name] - w[name]) <= tol * abs(w[name]), (step, name, g[name], w[name])
    for step, (g, w) in enumerate(zip(got["grads"], want["grads"])):
        assert g.keys() == w.keys(), (step, set(g) ^ set(w))
        assert rel(torch.cat([g[n].flatten() for n in w]), torch.cat([w[n].flatten() for n in w])) <= tol, step
        for name in w:
            assert rel(g[name], w[name]) <= tol_each, (step, name, rel(g[name], w[name]))
    for step, (g, w) in enumerate(zip(got["states"], want["states"])):
        for name in w:
            if w[name].is_floating_point():
                assert (g[name] - w[name]).norm() <= tol * w[name].norm(), (step, name)
            else:
                assert torch.equal(g[name], w[name]), (step, name)


def reference(objectives, dtype=torch.float32):
    model = make_model(config(objectives), dtype)
    return run_steps(model, model, grad_accum=1)


# float32: 1e-6 for the whole gradient, 1e-5 for each parameter's; float64: 1e-12 for each
PRECISIONS = {torch.float32: (1e-6, 1e-5), torch.float64: (1e-12, 1e-12)}


def test_a_step_on_trimmed_text_equals_the_full_length_step():
    """train_step cuts the captions to the bucket of the step's longest (8 of 12 positions for these 8 rows):
    every objective's loss and gradient equal those of the model on the full-length tokens (float64)."""
    cfg, lengths = config("all"), []
    batch = {k: v if k == "alpha" else v[:N // 2].double() if k == "pixels" else v[:N // 2]
             for k, v in global_batch(cfg, 0).items()}
    noise = draw_noise(cfg, N // 2, cfg.context_length, torch.Generator().manual_seed(0))
    model, full = make_model(cfg, torch.float64), make_model(cfg, torch.float64)
    trimmed = train.train_step(lambda **b: lengths.append(b["tokens"].size(1)) or model(**b), model, [batch],
                               torch.amp.GradScaler("cpu", enabled=False), nullcontext(), noise)
    want = full(**batch, noise=noise)
    want["loss"].backward()
    assert lengths == [8] and trimmed.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(trimmed[name], want[name].detach(), rtol=1e-12, atol=0)
    for (name, p), q in zip(model.named_parameters(), full.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or rel(p.grad, q.grad) <= 1e-12, name


@pytest.mark.parametrize("objectives", list(OBJECTIVES))
@pytest.mark.parametrize("dtype", list(PRECISIONS))
def test_grad_accum_equals_one_big_batch(objectives, dtype):
    """4 micro-batches of 4 rows against one batch of 16."""
    want = reference(objectives, dtype)
    model = make_model(config(objectives), dtype)
    assert_same_steps(run_steps(model, model, grad_accum=4, states=want["states"]), want, *PRECISIONS[dtype])


def torchrun_steps(tmp_path, objectives, grad_accum, dtype, wrap, states):
    path, out = str(tmp_path / "states.pt"), str(tmp_path / "rank0.pt")
    torch.save(states, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "tests", "dist_step.py"), objectives, str(grad_accum),
                             str(dtype).removeprefix("torch."), wrap, path if states is not None else "-", out],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("objectives,grad_accum,dtype", [("itc", 1, torch.float32), ("all", 1, torch.float32),
                                                         ("all", 1, torch.float64), ("itc", 2, torch.float64),
                                                         ("all", 2, torch.float64), ("all-variants", 2, torch.float64),
                                                         ("all-half-rows", 2, torch.float64)])
def test_two_ranks_equal_one_process(tmp_path, objectives, grad_accum, dtype):
    """2 DDP ranks of 8 rows (or of 2 micro-batches of 4) against one process on all 16."""
    want = reference(objectives, dtype)
    assert_same_steps(torchrun_steps(tmp_path, objectives, grad_accum, dtype, "ddp", want["states"]), want,
                      *PRECISIONS[dtype])


@pytest.mark.parametrize("objectives,mode", [("itc", "true")])
def test_two_compiled_ranks_equal_one_process(tmp_path, objectives, mode):
    """DDP around the compiled model (--compile=true: the whole step, gather-with-grad inside it) on
    2 ranks: the losses, gradients and weights of one eager process, in float32 within 1e-5 (compiled
    kernels sum in another order: test_compile.py sees up to 4e-6 in one process)."""
    want = reference(objectives)
    assert_same_steps(torchrun_steps(tmp_path, objectives, 1, torch.float32, f"ddp-{mode}", want["states"]), want,
                      1e-5)


def test_fsdp_equals_one_process(tmp_path):
    """FSDP2 on 2 ranks, every objective: the losses, gradients and weights of one process,
    and so of DDP (float64; both steps from the run's own weights)."""
    want = reference("all", torch.float64)
    assert_same_steps(torchrun_steps(tmp_path, "all", 1, torch.float64, "fsdp", None), want, *PRECISIONS[torch.float64])


WAIT = """
import datetime, sys, time
import torch.distributed as dist
sys.path.insert(0, {root!r})
import parallel
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))  # a stand-in for NCCL's 10 minutes
if dist.get_rank() == 0:
    time.sleep(6)  # rank 0 prepares the data, past the default group's timeout
{wait}
print("rank", dist.get_rank(), "through")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("wait, ok", [("parallel.wait_for_rank0()", True), ("dist.barrier()", False)])
def test_ranks_wait_for_data_past_the_process_group_timeout(tmp_path, wait, ok):
    """The other ranks wait for rank 0's data preparation however long it takes (a plain barrier
    on the default group times out: the reference that the test can fail)."""
    script = tmp_path / "wait.py"
    script.write_text(WAIT.format(root=ROOT, wait=wait))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=300)
    assert (result.returncode == 0) == ok, result.stderr[-2000:]
    assert (result.stdout.count("through") == 2) == ok

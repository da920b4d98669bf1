"""The training script: configuration errors, learning, checkpoints, resume and DDP."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import train
from model import VLM
from conftest import ROOT


def run_script(args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, **kw)


def test_help_lists_every_flag_with_its_default_and_meaning(capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            train.main([flag])
        assert e.value.code == 0
        out = capsys.readouterr().out
        lines = {line.split("=")[0].strip(): line for line in out.splitlines() if line.startswith("    --")}
        assert set(lines) == {f"--{k}" for k in train.config_fields(train.PRESETS["small"])}
        assert lines["--batch_size"].split()[0] == f"--batch_size={train.PRESETS['small'].batch_size}"
        assert "per rank and micro-step" in lines["--batch_size"]  # the field's comment is its meaning
        assert out.index("TrainConfig") < out.index("--lr=") < out.index("VLMConfig") < out.index("--vit_width=")


def test_unknown_key_is_a_clear_error_listing_the_valid_keys():
    result = run_script(["--config", "tiny", "--batchsize=8"])
    assert result.returncode != 0
    assert "unknown config key --batchsize" in result.stderr and "batch_size" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--batch_size=eight"], "--batch_size takes an int, got 'eight'"),
    (["--lr=fast"], "--lr takes a float"),
    (["--resume=maybe"], "--resume takes true or false"),
    (["--config", "huge"], "unknown --config 'huge'"),
    (["--stage", "finetune"], "--stage finetune starts from a pretrained checkpoint: give --init_from PATH"),
    (["--stage", "capfilt", "--init_from=x", "--capfilt_tune=twice"], "--capfilt_tune takes separate, shared or none"),
    (["--stage", "capfilt", "--init_from=x", "--capfilt_threshold=1.5"], "--capfilt_threshold must be in [0, 1]"),
    (["--stage", "dance"], "unknown --stage 'dance'"),
    (["--max_iters"], "--max_iters needs a value"),
])
def test_bad_values_are_clear_errors(args, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "tiny", *args])
    assert message in str(e.value)


def test_an_odd_batch_with_half_the_rows_fused_is_a_clear_error(tmp_path, world_root, tiny_world):
    with pytest.raises(SystemExit, match="--fused_rows=0.5 takes every other row: --batch_size must be even, got 7"):
        train.main(["--config", "tiny", f"--out_dir={tmp_path}", f"--data_dir={world_root}", "--fused_rows=0.5",
                    "--batch_size=7"])


def test_overrides_reach_every_config_and_keep_types():
    preset, overrides = train.parse_args(["--config", "tiny", "--lr=3e-4", "--vit_layers", "3", "--n_val=7",
                                          "--resume", "--image_mean=0.5,0.5,0.5"], train.PRESETS)
    cfg = train.apply_overrides(train.PRESETS[preset], overrides)
    assert (cfg.lr, cfg.model.vit_layers, cfg.world.n_val, cfg.resume) == (3e-4, 3, 7, True)
    assert cfg.model.image_mean == (0.5, 0.5, 0.5)
    assert train.PRESETS["tiny"].lr != 3e-4  # presets are not modified
    # a bare boolean flag means true for the model's and the world's fields too, last or not
    for argv in (["--image_positions"], ["--image_positions", "--lr=1e-3"], ["--image_positions", "true"]):
        assert train.parse_args(argv, train.PRESETS)[1]["image_positions"] is True


def test_tiny_run_lowers_its_loss_and_writes_its_files(tiny_run):
    lines = [json.loads(line) for line in open(os.path.join(tiny_run, "log.jsonl"))]
    steps = [d for d in lines if "loss" in d]
    first, last = steps[0], steps[-1]
    # the losses against fixed targets fall (ITC's columns grow while the momentum queue fills,
    # and RTD gets harder as the generator improves, so their sum is not the measure)
    assert last["step"] == 60 and last["caption"] < 0.9 * first["caption"] and last["mlm"] < first["mlm"]
    assert last["rtd"] < 0.6 * first["rtd"] and last["loss"] < 0.9 * first["loss"]
    metrics = json.load(open(os.path.join(tiny_run, "eval.json")))
    for key in ("retrieval_i2t_r1", "retrieval_t2i_r10", "zeroshot_shape_acc", "zeroshot_colour_acc",
                "caption_parse_acc", "heldout_retrieval_i2t_r1", "heldout_caption_parse_acc"):
        assert 0.0 <= metrics[key] <= 1.0
    ckpt = torch.load(os.path.join(tiny_run, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 60 and set(ckpt) >= {"model", "optimizer", "scaler", "rng", "config", "tokenizer"}
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert train.config_from_dict(ckpt["config"]).model.vocab_size == ckpt["model"]["text.token_embedding.weight"].shape[0]


def test_killed_run_resumes_to_the_same_parameters(tmp_path, world_root, tiny_world):
    common = ["--config", "tiny", f"--data_dir={world_root}", "--max_iters=80", "--ckpt_interval=5",
              "--eval_interval=1000"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert run_script(common + [f"--out_dir={full}"]).returncode == 0
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *common, f"--out_dir={cut}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_path = os.path.join(cut, "ckpt.pt")
    deadline = time.time() + 300
    while not os.path.exists(ckpt_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    killed_at = torch.load(ckpt_path, weights_only=True)["step"]
    assert killed_at < 80, "the run finished before it could be killed"
    result = run_script(common + [f"--out_dir={cut}", "--resume"])
    assert result.returncode == 0, result.stderr
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(ckpt_path, weights_only=True)
    assert a["step"] == b["step"] == 80
    # the momentum encoders and the queues are part of the saved state, and resume to the same values
    assert int(a["model"]["queue_filled"]) > 0 and any(k.startswith("momentum.") for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    steps = [json.loads(line).get("step") for line in open(os.path.join(cut, "log.jsonl")) if "loss" in line]
    assert steps == sorted(set(steps)), "log.jsonl has each step once after the resume"


def test_two_process_torchrun_on_cpu(tmp_path, world_root, tiny_world):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), "--config", "tiny", f"--data_dir={world_root}",
                             f"--out_dir={out}", "--max_iters=10", "--eval_interval=1000"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 rank(s)" in result.stdout
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 10 and os.path.exists(os.path.join(out, "eval.json"))


def test_loader_workers_read_the_same_batches_and_ranks_read_disjoint_samples(tiny_world):
    """Two loader workers per rank give the sequence one process reads; over one epoch the
    two ranks' four workers read every training image once."""
    cfg = train.apply_overrides(train.PRESETS["tiny"], {"mlm_weight": 0.0, "moc_weight": 0.0, "rtd_weight": 0.0,
                                                        "r2d_weight": 0.0})
    model = VLM(cfg.model)
    W, n_images = 2, tiny_world.split_size("train")
    steps = n_images // (cfg.batch_size * W)
    seen = []
    for rank in range(W):
        fetch, place, n = train.pretrain_batches(cfg, tiny_world, model, "cpu", rank, W)
        alone = data.host_batches(fetch, 3, 0, False)
        workers = data.host_batches(fetch, 3, 2, False)
        for s in range(steps):
            a, b = next(alone), next(workers)
            assert a.keys() == b.keys() == {"images", "tokens", "groups"}
            for key in a:
                assert torch.equal(torch.as_tensor(a[key]), b[key]), (rank, s, key)
            assert torch.equal(place(b)["pixels"], place(fetch(3 + s))["pixels"])
        epoch = data.host_batches(fetch, 0, 2, False)
        seen += [im.tobytes() for _ in range(steps) for im in next(epoch)["images"].numpy()]
    images = tiny_world.array("train", "images")
    assert len({im.tobytes() for im in images}) == n_images  # every image is distinct
    assert sorted(seen) == sorted(im.tobytes() for im in images)


def test_fsdp_run_saves_whole_weights_and_resumes(tmp_path, world_root, tiny_world):
    """--fsdp under torchrun: the checkpoint holds whole tensors that a plain model loads, the
    final evaluation runs, and --resume continues from the sharded optimizer state."""
    out = str(tmp_path / "fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              os.path.join(ROOT, "train.py"), "--config", "tiny", f"--data_dir={world_root}", f"--out_dir={out}",
              "--eval_interval=1000", "--ckpt_interval=2", "--fsdp"]
    for args in (["--max_iters=4"], ["--max_iters=6", "--resume"]):
        result = subprocess.run(common + args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 6 and os.path.exists(os.path.join(out, "eval.json"))
    model = VLM(train.config_from_dict(ckpt["config"]).model)
    model.load_state_dict(ckpt["model"])  # whole tensors, the names of the plain module
    assert ckpt["config"]["fsdp"] and torch.isfinite(model.logit_scale).all()
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl")) if "loss" in line]
    assert steps == [5]  # tiny logs every 5 steps: the resumed run's one line


def test_a_pretraining_run_ends_by_showing_val_captions_beside_the_true_ones(tiny_world, capsys):
    import data
    from contextlib import nullcontext
    import eval as evaluation
    from eval import generate_captions
    from model import VLM
    model = VLM(train.fit_model_to_data(train.PRESETS["tiny"].model, tiny_world)).eval()
    evaluation.print_captions(model, tiny_world, nullcontext(), n=3)
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[1:]]
    said = generate_captions(model, tiny_world.tokenizer, tiny_world.array("val", "images")[:3])
    true = [data.decode_tokens(tiny_world.tokenizer, r) for r in tiny_world.array("val", "tokens")[:3, 0]]
    assert [(t.strip(), g) for t, g in rows] == list(zip(true, said))

"""CapFilt (M13) and fine-tuning (M14): the filter's decisions against the threshold rule, the
report's counts and rates against the decisions, the cleaned dataset against the source
arrays, the source left byte for byte as it was, nucleus sampling at p near 0 against greedy
decoding, and the experiment runner end to end."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import capfilt as cf
import data
import train
from conftest import ROOT
from eval import CAPFILT_STEPS, binary_metrics, generate_captions, load_checkpoint
from model import VLM


def checksums(path):
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest() for f in sorted(os.listdir(path))}


def capfilt(tiny_run, world_root, out, *flags):
    return train.main(["--config", "tiny", "--stage", "capfilt", f"--init_from={tiny_run}/ckpt.pt", f"--out_dir={out}",
                       f"--data_dir={world_root}", f"--capfilt_data={out}-data", *flags])


def decisions(out):
    z = np.load(os.path.join(out, "capfilt.npz"))
    return z["margins"], z["keep"], list(z["problems"]), z["synthetic"]


def test_threshold_0_keeps_every_caption_and_1_none_and_the_source_is_untouched(tmp_path, tiny_run, world_root, tiny_world):
    before = checksums(tiny_world.path)
    N = tiny_world.split_size("web")
    capfilt(tiny_run, world_root, str(tmp_path / "all"), "--capfilt_tune=none", "--capfilt_threshold=0")
    margins, keep, problems, _ = decisions(tmp_path / "all")
    usable = np.array(problems) == ""
    assert keep[:, 0].all() and (keep[:, 1] == usable).all()
    report = json.load(open(tmp_path / "all" / "report.json"))
    assert (report["own_kept"], report["own_dropped"], report["synthetic_kept"]) == (N, 0, usable.sum())
    assert report["images_kept"] == N and report["corrupted_recall"] == 0.0

    with pytest.raises(SystemExit, match="kept no caption of web at --capfilt_threshold=1.0"):
        capfilt(tiny_run, world_root, str(tmp_path / "none"), "--capfilt_tune=none", "--capfilt_threshold=1")
    _, keep, problems, _ = decisions(tmp_path / "none")
    assert not keep.any()
    report = json.load(open(tmp_path / "none" / "report.json"))
    assert (report["own_kept"], report["synthetic_kept"], report["images_kept"]) == (0, 0, 0)
    assert report["own_dropped"] == N
    assert report["synthetic_dropped"] + report["synthetic_empty"] + report["synthetic_too_long"] == N
    assert not os.path.exists(tmp_path / "none-data")
    assert checksums(tiny_world.path) == before  # nothing written, changed or added in the source


def test_report_and_cleaned_dataset_follow_the_decisions(tmp_path, tiny_run, world_root, tiny_world):
    out = str(tmp_path / "cf")
    capfilt(tiny_run, world_root, out, "--capfilt_tune=none", "--capfilt_threshold=0")
    margins = decisions(out)[0]
    p = float(1 / (1 + np.exp(-np.median(margins[:, 0]))))  # about half of the web captions pass
    metrics = capfilt(tiny_run, world_root, out, "--capfilt_tune=none", f"--capfilt_threshold={p}")
    margins2, keep, problems, synthetic = decisions(out)
    np.testing.assert_array_equal(margins2, margins)  # seeded sampling: the same captions, the same scores
    usable = np.array(problems) == ""
    logit = np.log(p / (1 - p))
    np.testing.assert_array_equal(keep, np.stack([margins[:, 0] >= logit, (margins[:, 1] >= logit) & usable], 1))
    assert 0 < keep[:, 0].sum() < len(keep)

    report = json.load(open(os.path.join(out, "report.json")))
    N = tiny_world.split_size("web")
    assert report["own_kept"] + report["own_dropped"] == N
    assert report["synthetic_kept"] + report["synthetic_dropped"] + report["synthetic_empty"] + report["synthetic_too_long"] == N
    assert report["images_kept"] + report["images_dropped"] == N
    corrupted = tiny_world.array("web", "corruption")[:] > 0
    dropped = ~keep[:, 0]
    assert report["corrupted"] == corrupted.sum()
    hand = binary_metrics("x", [0.0, 1, 2, 3, 4], [1, 0, 1, 0, 1], pred=[1, 1, 0, 0, 1])  # 2 of 3 dropped are wrong
    assert (hand["x_precision"], hand["x_recall"], hand["x_auc"]) == (2 / 3, 2 / 3, 0.5)
    assert report["corrupted_precision"] == pytest.approx((dropped & corrupted).sum() / dropped.sum())
    assert report["corrupted_recall"] == pytest.approx((dropped & corrupted).sum() / corrupted.sum())
    assert metrics["corrupted_recall"] == pytest.approx(report["corrupted_recall"])
    wrong_synthetic = np.array([data.parse_caption(t) != s for t, s in
                                zip(report_texts(tiny_world, synthetic), tiny_world.array("web", "scene"))]) & usable
    wrong_kept = (keep[:, 0] & corrupted).sum() + (keep[:, 1] & wrong_synthetic).sum()
    assert report["wrong_after"] == pytest.approx(wrong_kept / keep.sum())

    ds = data.Dataset(report["data_path"])  # a normal prepared dataset: its train split is cleaned_split's
    rows, C = np.flatnonzero(keep.any(1)), 128  # after the fine-tuning's clean images (the tiny preset's 128)
    np.testing.assert_array_equal(ds.array("train", "source_index")[C:], rows)
    np.testing.assert_array_equal(ds.array("train", "images")[C:], tiny_world.array("web", "images")[rows])
    np.testing.assert_array_equal(ds.array("train", "images")[:C], tiny_world.array("train", "images")[:C])
    own = tiny_world.array("web", "tokens")[:, 0]
    for i, r in enumerate(rows, start=C):  # the first slot holds the web caption when it was kept, else the synthetic
        np.testing.assert_array_equal(ds.array("train", "tokens")[i, 0], own[r] if keep[r, 0] else synthetic[r])
    assert ds.meta["splits"] == {"train": C + len(rows), "val": tiny_world.split_size("val"),
                                 "test": tiny_world.split_size("test")}
    for split in ("val", "test"):
        np.testing.assert_array_equal(ds.array(split, "images"), tiny_world.array(split, "images"))
    assert ds.bpe_text == tiny_world.bpe_text and not ds.has("train", "scene")  # no paraphrase groups: not known true


@pytest.mark.parametrize("clean", [None, "train"])
def test_cleaned_split_holds_the_clean_split_and_each_kept_caption(tiny_world, clean):
    """BLIP's bootstrapped set: the clean split as it is, then each web image with its kept captions
    ([own, synthetic], or the kept one), repeated to fill the clean split's 4 slots."""
    N = 8
    keep = np.array([[1, 1], [1, 0], [0, 1], [0, 0]] * 2, bool)  # both kept, own only, synthetic only, none
    synthetic = np.arange(N)[:, None].repeat(tiny_world.context_length, 1).astype(np.int32) + 1000
    split = "web"
    own = tiny_world.array(split, "tokens")[:N, 0]
    small = cf.cleaned_split(tiny_world, split, keep, synthetic, clean)  # the first N images of web
    C = 0 if clean is None else tiny_world.split_size(clean)
    slots = 2 if clean is None else 4
    if clean is not None:
        np.testing.assert_array_equal(small["tokens"][:C], tiny_world.array(clean, "tokens"))
        np.testing.assert_array_equal(small["images"][:C], tiny_world.array(clean, "images"))
        assert (small["n_captions"][:C] == 4).all() and small["clean"][:C].all()
        assert not small["caption_source"][:C].any()
        assert small["source_index"][:C].tolist() == list(range(C)) and not small["corruption"][:C].any()
    expected = {(1, 1): lambda i: [own[i], synthetic[i]], (1, 0): lambda i: [own[i], own[i]],
                (0, 1): lambda i: [synthetic[i], synthetic[i]]}
    rows = [i for i in range(N) if keep[i].any()]
    assert small["source_index"][C:].tolist() == rows and not small["clean"][C:].any()
    assert len(small["images"]) == C + len(rows) and small["tokens"].shape[1] == slots
    for j, i in enumerate(rows, start=C):
        kind = tuple(keep[i].astype(int))
        np.testing.assert_array_equal(small["tokens"][j], np.stack(expected[kind](i) * (slots // 2)))
        assert small["n_captions"][j] == sum(kind)
        sources = {(1, 1): [0, 1], (1, 0): [0, 0], (0, 1): [1, 1]}[kind]
        assert small["caption_source"][j].tolist() == sources * (slots // 2)
        np.testing.assert_array_equal(small["images"][j], tiny_world.array(split, "images")[i])
        assert small["corruption"][j] == tiny_world.array(split, "corruption")[i]


def report_texts(ds, synthetic):
    return [data.decode_tokens(ds.tokenizer, row) for row in synthetic]


def test_nucleus_sampling_with_p_near_zero_is_greedy_decoding(tiny_run, tiny_world):
    model, tok, _ = load_checkpoint(os.path.join(tiny_run, "ckpt.pt"))
    cfg = train.apply_overrides(train.PRESETS["tiny"], {"capfilt_top_p": 1e-9, "capfilt_temperature": 1.0})
    _, texts, _, _ = cf.bootstrap(model, model, tiny_world, cfg, "cpu", chunk=48)
    assert texts == generate_captions(model, tok, tiny_world.array("web", "images"), batch_size=48)


def test_separate_captioner_and_filter_then_the_cleaned_set_pretrains(tmp_path, tiny_run, world_root, tiny_world, capsys):
    before = checksums(tiny_world.path)
    out = str(tmp_path / "cf")
    capfilt(tiny_run, world_root, out, "--capfilt_threshold=0")
    assert checksums(tiny_world.path) == before  # the fine-tuning runs read the source too: still untouched
    init = torch.load(os.path.join(tiny_run, "ckpt.pt"), weights_only=True)
    runs = {name: torch.load(os.path.join(out, name, "ckpt.pt"), weights_only=True) for name in ("captioner", "filter")}
    weights = lambda c: {k: c["config"]["model"][f"{k}_weight"] for k in ("itc", "itm", "caption", "mlm", "rtd")}  # noqa: E731
    assert weights(runs["captioner"]) == dict(itc=0, itm=0, caption=1, mlm=0, rtd=0)
    assert weights(runs["filter"]) == dict(itc=1, itm=1, caption=0, mlm=0, rtd=0)
    for c in runs.values():  # each fine-tuned apart from the same start, on the clean split's first images
        assert (c["config"]["stage"], c["config"]["train_split"], c["config"]["train_images"]) == ("finetune", "train", 128)
        assert not torch.equal(c["model"]["text.blocks.0.attn.c_attn.weight"], init["model"]["text.blocks.0.attn.c_attn.weight"])
    assert not torch.equal(runs["captioner"]["model"]["visual.conv1.weight"], runs["filter"]["model"]["visual.conv1.weight"])

    mtimes = {n: os.path.getmtime(os.path.join(out, n, "ckpt.pt")) for n in runs}
    capsys.readouterr()
    capfilt(tiny_run, world_root, out, "--capfilt_threshold=0", "--resume")  # finished runs are kept, not retrained
    assert capsys.readouterr().out.count("finished before, kept") == 2
    assert mtimes == {n: os.path.getmtime(os.path.join(out, n, "ckpt.pt")) for n in runs}

    cleaned = json.load(open(os.path.join(out, "report.json")))["data_path"]
    metrics = train.main(["--config", "tiny", f"--data={cleaned}", f"--out_dir={tmp_path / 'again'}", "--max_iters=3"])
    assert metrics["step"] == 3 and "retrieval_i2t_r1" in metrics


def test_finetune_continues_on_the_first_clean_images_at_its_own_rate(tmp_path, tiny_run, world_root, tiny_world):
    metrics = train.main(["--config", "tiny", "--stage", "finetune", f"--init_from={tiny_run}/ckpt.pt",
                          f"--out_dir={tmp_path}", f"--data_dir={world_root}"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    preset = train.STAGE_PRESETS["finetune"]["tiny"]
    assert metrics["step"] == preset["max_iters"] == ckpt["step"]
    assert (ckpt["config"]["lr"], ckpt["config"]["train_images"]) == (preset["lr"], preset["train_images"])
    cfg = train.config_from_dict(ckpt["config"])
    model = VLM(cfg.model)
    fetch, place, n = train.pretrain_batches(cfg, tiny_world, model, "cpu", 0, 1)
    assert n == preset["train_images"]
    images = tiny_world.array("train", "images")
    first, rest = {im.tobytes() for im in images[:n]}, {im.tobytes() for im in images[n:]}
    assert not first & rest  # every image is distinct, so an image says which index it came from
    pixels = lambda x: np.asarray(model.normalize_pixels(torch.from_numpy(np.array(x))))  # noqa: E731
    allowed = {pixels(im[None])[0].tobytes() for im in images[:n]}
    for step in range(6):  # every image of a batch is one of the first n
        assert all(p.numpy().tobytes() in allowed for p in place(fetch(step))["pixels"])


def test_the_cleaned_set_never_goes_over_the_source_or_a_foreign_directory(tmp_path, tiny_run, world_root, tiny_world):
    before = checksums(tiny_world.path)
    for target, message in ((world_root, "not in or around the source"), (tiny_world.path + "/", "not in or around"),
                            (os.path.join(tiny_world.path, "x"), "not in or around"), (str(tmp_path), "or the run's out_dir"),
                            (str(tmp_path / "run" / "filter"), "or the run's out_dir")):
        with pytest.raises(SystemExit, match=message):
            train.main(["--config", "tiny", "--stage", "capfilt", f"--init_from={tiny_run}/ckpt.pt",
                        f"--out_dir={tmp_path / 'run'}", f"--capfilt_data={target}", "--capfilt_tune=none"])
    (tmp_path / "mine").mkdir()
    with pytest.raises(SystemExit, match="is not a set CapFilt wrote"):
        train.main(["--config", "tiny", "--stage", "capfilt", f"--init_from={tiny_run}/ckpt.pt",
                    f"--out_dir={tmp_path / 'run'}", f"--capfilt_data={tmp_path / 'mine'}", "--capfilt_tune=none"])
    assert checksums(tiny_world.path) == before and os.listdir(tmp_path / "mine") == []


def test_the_filter_keeps_a_margin_at_the_threshold_and_drops_one_below(tiny_world):
    margins = np.array([[0.0, 0.0], [-1e-6, 1e-6], [-1e30, 1e30], [5.0, 5.0]], np.float32)
    problems = ["", "", "", "too long"]
    keep = cf.capfilt_keep(margins, problems, 0.5)  # p(match) >= 0.5: margin >= 0
    assert keep.tolist() == [[True, True], [False, True], [False, True], [True, False]]
    assert cf.capfilt_keep(margins, problems, 0.0)[:, 0].all() and not cf.capfilt_keep(margins, problems, 1.0).any()


def test_a_checkpoint_is_refused_on_data_with_another_tokenizer(tmp_path, tiny_run, world_root, tiny_world):
    other = data.prepare_world(str(tmp_path), train.apply_overrides(train.PRESETS["tiny"], {"world_seed": 1}).world,
                               tiny_world.image_size, tiny_world.context_length, log=lambda *a: None)
    assert data.Dataset(other).bpe_text != tiny_world.bpe_text
    with pytest.raises(SystemExit, match="is not that of"):
        train.main(["--config", "tiny", "--stage", "finetune", f"--init_from={tiny_run}/ckpt.pt", f"--data={other}",
                    f"--out_dir={tmp_path / 'run'}"])


def test_capfilt_experiment_runs_every_step_and_resumes(tmp_path, world_root, tiny_world):
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--ablation", "--stage=capfilt", "--config", "tiny",
           "--max_iters=20", f"--ablation_dir={tmp_path}", f"--table={tmp_path / 'capfilt.md'}", f"--data_dir={world_root}",
           "--capfilt_threshold=0.1"]
    # --rows: a step and the steps its model needs, no more; the whole experiment then keeps them
    part = subprocess.run([*cmd, "--rows=cleaned"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert part.returncode == 0, part.stderr[-3000:]
    assert list(json.load(open(tmp_path / "experiment.json"))) == ["command", "web", "noisy-set", "noisy", "capfilt",
                                                                    "cleaned"]
    assert [line.split(" | ")[0] for line in open(tmp_path / "capfilt.md") if line.startswith("| ")] == [
        "| config", "| web", "| noisy", "| cleaned", "| config", "| noisy-set", "| capfilt"]
    assert "--capfilt_threshold=0.1 --rows=cleaned`. Val split" in open(tmp_path / "capfilt.md").read()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("finished before, kept") == 5
    done = json.load(open(tmp_path / "experiment.json"))
    assert sorted(done) == sorted(["command", *(step[0] for step in CAPFILT_STEPS)])  # every step, once
    for name in ("web", "noisy", "cleaned", "clean"):
        assert done[name]["step"] == 20
    assert done["noisy-finetune"]["step"] == train.STAGE_PRESETS["finetune"]["tiny"]["max_iters"]
    for name, made_by in (("cleaned", "capfilt"), ("noisy", "noisy-set")):
        assert torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["data_path"] == done[made_by]["data_path"]
    noisy = data.Dataset(done["noisy-set"]["data_path"])  # the fine-tuning's 128 clean images and the whole web split
    assert noisy.split_size("train") == 128 + tiny_world.split_size("web")
    assert torch.load(tmp_path / "capfilt" / "filter" / "ckpt.pt", weights_only=True)["config"]["init_from"].endswith(
        os.path.join("noisy", "ckpt.pt"))
    table = open(tmp_path / "capfilt.md").read()
    assert "--capfilt_threshold=0.1`. Val split" in table  # the whole experiment: no --rows in its header
    row = next(line for line in table.splitlines() if line.startswith("| cleaned-finetune |"))
    pipeline = sum(done[n]["wall_time_s"] for n in ("web", "noisy-set", "noisy", "capfilt", "cleaned",
                                                    "cleaned-finetune"))
    assert row.strip(" |").split(" | ")[-1] == str(pipeline)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert again.returncode == 0 and again.stdout.count("finished before, kept") == len(CAPFILT_STEPS)
    assert open(tmp_path / "capfilt.md").read() == table
    other = subprocess.run([*cmd[:6], "--max_iters=30", *cmd[7:]], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert other.returncode != 0 and "holds an experiment of other arguments" in other.stderr
    fixed = subprocess.run([*cmd, "--capfilt_data=x"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert fixed.returncode != 0 and "sets --capfilt_data=x itself" in fixed.stderr

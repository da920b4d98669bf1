"""sample.py on image files it writes itself, and the evaluation protocols against references."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as evaluation
import train
from conftest import ROOT


def run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory, tiny_world):
    """Val images of the world saved as PNGs in several modes (the content stays the same)."""
    d = tmp_path_factory.mktemp("images")
    img = tiny_world.array("val", "images")[0]
    paths = {"rgb": d / "rgb.png", "rgba": d / "rgba.png", "palette": d / "palette.png"}
    Image.fromarray(img).save(paths["rgb"])
    Image.fromarray(np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], -1)).save(paths["rgba"])
    Image.fromarray(img).quantize(256).save(paths["palette"])
    return {k: str(v) for k, v in paths.items()}


def test_sample_captions_images_like_the_evaluation_does(tiny_run, tiny_world, image_files):
    ckpt = os.path.join(tiny_run, "ckpt.pt")
    result = run_sample("--ckpt", ckpt, "caption", image_files["rgb"], image_files["rgba"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(image_files["rgb"] + ": ")
    model, tok, _ = evaluation.load_checkpoint(ckpt)
    expect = evaluation.generate_captions(model, tok, tiny_world.array("val", "images")[:1])[0]
    assert lines[0] == f"{image_files['rgb']}: {expect}"
    assert lines[1].split(": ", 1)[1] == expect  # the RGBA copy reads as the same image
    sampled = run_sample("--ckpt", ckpt, "caption", image_files["palette"], "--temperature=1.0", "--top_p=0.9",
                         "--num_samples=2")
    assert sampled.returncode == 0 and len(sampled.stdout.strip().splitlines()) == 2


def test_sample_scores_and_classifies(tiny_run, image_files):
    ckpt = os.path.join(tiny_run, "ckpt.pt")
    texts = ["a small red circle", "a large blue square", "a small white ring"]
    result = run_sample("--ckpt", ckpt, "score", image_files["rgb"], "--texts", *texts)
    assert result.returncode == 0, result.stderr
    rows = result.stdout.strip().splitlines()
    assert [r.split("  ")[-1] for r in rows] == texts
    assert abs(sum(float(r.split("%")[0]) for r in rows) - 100) < 0.1
    result = run_sample("--ckpt", ckpt, "classify", image_files["rgb"], "--labels", "circle", "square",
                        "--template", "a small red {}", "--template", "a large blue {}")
    assert result.returncode == 0, result.stderr
    assert sorted(r.split()[-1] for r in result.stdout.strip().splitlines()) == ["circle", "square"]


def test_sample_reports_bad_files_clearly(tiny_run, tmp_path):
    ckpt = os.path.join(tiny_run, "ckpt.pt")
    missing = run_sample("--ckpt", ckpt, "caption", str(tmp_path / "nope.png"))
    assert missing.returncode != 0 and "image not found" in missing.stderr and "nope.png" in missing.stderr
    assert "Traceback" not in missing.stderr
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    broken = run_sample("--ckpt", ckpt, "caption", str(tmp_path / "broken.jpg"))
    assert broken.returncode != 0 and "broken.jpg" in broken.stderr and "Traceback" not in broken.stderr
    no_ckpt = run_sample("--ckpt", str(tmp_path / "none.pt"), "caption", str(tmp_path / "broken.jpg"))
    assert no_ckpt.returncode != 0 and f"--ckpt: no checkpoint at {tmp_path / 'none.pt'}" in no_ckpt.stderr


def test_one_checkpoint_loader_names_a_bad_file_and_takes_a_run_directory(tiny_run, tiny_world, image_files, tmp_path):
    """A file cut short, one that is not a zip, an empty one and a torch file of something else each stop with
    the flag and the path named, in every script; a run directory stands for its ckpt.pt."""
    good = os.path.join(tiny_run, "ckpt.pt")
    assert evaluation.is_checkpoint(tiny_run) and not evaluation.is_checkpoint(str(tmp_path))  # tmp_path: a HF name
    assert evaluation.read_checkpoint(tiny_run)["step"] == torch.load(good, weights_only=True)["step"] == 60
    raw = open(good, "rb").read()
    bad = {"cut.pt": raw[:len(raw) // 2], "text.pt": b"not a checkpoint", "empty.pt": b""}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SystemExit, match=f"--init_from: {tmp_path / name} cannot be read as a checkpoint"):
            evaluation.read_checkpoint(str(tmp_path / name), "--init_from")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(SystemExit, match="foreign.pt is not a checkpoint written by train.py"):
        evaluation.read_checkpoint(str(tmp_path / "foreign.pt"))
    with pytest.raises(SystemExit, match=f"--ckpt: no checkpoint at {tmp_path / 'ckpt.pt'}"):
        evaluation.read_checkpoint(str(tmp_path))  # a directory without one
    # the scripts: sample.py and eval.py as processes, train.py's --init_from and --resume in this one
    from_dir = run_sample("--ckpt", tiny_run, "caption", image_files["rgb"])
    assert from_dir.returncode == 0 and from_dir.stdout.startswith(image_files["rgb"])
    cut = str(tmp_path / "cut.pt")
    for script in ("sample.py", "eval.py"):
        args = ["caption", image_files["rgb"]] if script == "sample.py" else []
        result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--ckpt", cut, *args],
                                capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert result.returncode != 0 and f"--ckpt: {cut} cannot be read" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    run = ["--config", "tiny", f"--data_dir={os.path.dirname(tiny_world.path)}", "--max_iters=1"]
    with pytest.raises(SystemExit, match=f"--init_from: {cut} cannot be read"):
        train.main([*run, f"--init_from={cut}", f"--out_dir={tmp_path / 'a'}"])
    os.makedirs(tmp_path / "b")
    (tmp_path / "b" / "ckpt.pt").write_bytes(raw[:1000])
    with pytest.raises(SystemExit, match=f"--resume: {tmp_path / 'b' / 'ckpt.pt'} cannot be read"):
        train.main([*run, "--resume", f"--out_dir={tmp_path / 'b'}"])


def test_every_template_parses_back_to_its_scene():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 4))
        objs = [(int(rng.integers(len(data.SHAPES))), int(rng.integers(8)), int(rng.integers(2))) for _ in range(n)]
        axis = 0 if n == 1 else int(rng.integers(1, 3))
        sid = data.scene_id(axis, objs)
        assert data.decode_scene(sid) == (axis, objs)
        for t, template in enumerate(data.TEMPLATES[n]):
            caption = data.write_caption(axis, objs, t)
            assert data.parse_caption(caption) == sid
            if n == 1:
                continue
            # the template fixes the direction: even ones name from the left or top
            words = data.RELATIONS if n == 2 else data.DIRECTIONS
            assert words[axis, t % 2 == 1] in caption
            # a caption written in the other direction, by hand, parses to the same scene
            for reverse in (False, True):
                order = objs[::-1] if reverse else objs
                phrases = [f"{data.SIZES[z]} {data.COLOUR_NAMES[c]} {data.ALL_SHAPES[s]}" for s, c, z in order]
                by_hand = template.format(*phrases, rel=data.RELATIONS[axis, reverse], dir=data.DIRECTIONS[axis, reverse])
                assert data.parse_caption(by_hand) == sid
        if n > 1 and objs != objs[::-1]:
            # naming the objects in the other order with the same relation word is another scene
            assert data.parse_caption(data.write_caption(axis, objs[::-1], 0)) != sid
    for bad in ["", "a small red", "a small red circle left of", "a tiny red circle", "a small red circle extra"]:
        assert data.parse_caption(bad) is None


def test_recall_at_k_matches_a_direct_count():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(30, 40, generator=g)
    relevant = torch.rand(30, 40, generator=g) < 0.05
    got = evaluation.recall_at_k(sim, relevant, ks=(1, 5, 10))
    for k in (1, 5, 10):
        hits = 0
        for i in range(30):
            top = sorted(range(40), key=lambda j: -sim[i, j].item())[:k]
            hits += any(relevant[i, j] for j in top)
        assert got[k] == pytest.approx(hits / 30)


def test_retrieval_counts_any_caption_of_the_same_scene_as_a_hit():
    # three images, two of them the same scene; one caption each (the scene's)
    scenes = np.array([7, 7, 9])
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # both scene-7 captions point one way
    out = evaluation.retrieval(image, text, scenes, scenes, ks=(1,))
    # image 0 -> caption 0 or 1 (scene 7): hit; image 1 -> caption 2 (scene 9): miss; image 2 -> caption 2: hit
    assert out["retrieval_i2t_r1"] == pytest.approx(2 / 3)
    # caption 0, 1 -> image 0 or 2 by similarity: image 0 (hit); caption 2 -> image 1 (scene 7): miss
    assert out["retrieval_t2i_r1"] == pytest.approx(2 / 3)


def test_zero_shot_prompts_name_one_class_each():
    for kind, names in (("shape", data.SHAPES), ("colour", data.COLOUR_NAMES)):
        prompts = evaluation.class_prompts(kind)
        assert list(prompts) == list(names)
        for name, texts in prompts.items():
            assert len(texts) == len(set(texts)) == (len(data.COLOURS) if kind == "shape" else len(data.SHAPES)) * 2 * 4
            assert all(name in t.split() and data.parse_caption(t) is not None for t in texts)


def test_caption_parse_accuracy_is_exact_match():
    scene = data.scene_id(1, [(0, 0, 0), (1, 1, 1)])
    right = data.write_caption(1, [(0, 0, 0), (1, 1, 1)], 1)
    wrong = data.write_caption(1, [(0, 0, 0), (1, 2, 1)], 1)  # one colour off
    column = data.write_caption(2, [(0, 0, 0), (1, 1, 1)], 0)  # right objects, wrong axis
    out = evaluation.caption_parse_accuracy([right, wrong, "gibberish", column], [scene] * 4, np.array([2, 2, 2, 2]))
    assert out["caption_parse_acc"] == pytest.approx(1 / 4) and out["caption_parse_acc_2obj"] == pytest.approx(1 / 4)
    assert out["caption_objects_acc"] == pytest.approx(2 / 4)  # right and column
    assert out["caption_axis_acc"] == pytest.approx(2 / 4)  # right and wrong (one colour off, same row)


def test_ablation_runner_trains_each_row_and_writes_a_table(tmp_path, world_root, tiny_world):
    table = tmp_path / "ablation.md"
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--ablation", "--config", "tiny", "--rows", "ITC,ITC+LM+ITM",
           "--max_iters=4", "--log_interval=2", f"--ablation_dir={tmp_path / 'runs'}", f"--table={table}", f"--data_dir={world_root}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = table.read_text().splitlines()
    assert "4 steps per row" in lines[0]
    header = next(line for line in lines if line.startswith("| config"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert {"retrieval_i2t_r1", "itm_acc", "wall_time_s", "samples_per_s"} <= set(cols)
    # each config once in the val table and once in the held-out table
    assert [line.split("|")[1].strip() for line in lines if line.startswith("| ITC")] == ["ITC", "ITC+LM+ITM"] * 2
    cells = lambda name: [c.strip() for c in next(li for li in lines if li.startswith(f"| {name} |")).strip("|").split("|")]  # noqa: E731
    # a metric exists only where its objective was trained: '-' for ITM in the ITC row
    assert cells("ITC")[cols.index("itm_acc")] == "-" and cells("ITC")[cols.index("retrieval_i2t_r1")] != "-"
    itm = json.load(open(tmp_path / "runs" / "ITC_LM_ITM" / "eval.json"))
    assert itm["step"] == 4 and float(cells("ITC+LM+ITM")[cols.index("itm_acc")]) == pytest.approx(itm["itm_acc"], abs=5e-4)

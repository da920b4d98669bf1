"""The README's path on real data, in small: a Hugging Face CLIP (random, saved with its
tokenizer files) and a COCO-format folder written here, prepared with that CLIP's tokenizer
and trained from its weights; the prompt and instruct stages on prepared mask and question
sets."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel

import data
import hf
import prepare
import sample
import train
from model import VLM
from test_real_data import CORPUS, train_vocab, write_vocab

S, T = 32, 16  # the CLIP's image size and context length


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIPModel saved by save_pretrained, with a CLIP-style vocab.json and merges.txt;
    its config names <bos> and <eos> 0 and 2, as OpenAI's hub configs do (they are the
    vocabulary's last two)."""
    vocab, merges = train_vocab(CORPUS * 3, 200, clip=True)
    path = write_vocab(tmp_path_factory.mktemp("hf-clip"), vocab, merges)
    V = len(vocab)
    common = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)
    config = CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=T, bos_token_id=0, eos_token_id=2, **common),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=S, patch_size=8, **common), projection_dim=24)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    return path


def write_coco(root, split, n, seed):
    """A COCO captions JSON and its image folder: n images, 5 captions each (one image with 2)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / f"{split}2017")
    images, annotations = [], []
    for i in range(n):
        name = f"{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (S + 8 * (i % 3), S, 3), dtype=np.uint8)).save(root / f"{split}2017" / name)
        images.append({"id": 100 + i, "file_name": name, "height": S, "width": S})
        for j in range(2 if i == 0 else 5):
            annotations.append({"id": len(annotations), "image_id": 100 + i, "caption": CORPUS[(i + j) % len(CORPUS)]})
    os.makedirs(root / "annotations", exist_ok=True)
    with open(root / "annotations" / f"captions_{split}2017.json", "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)


@pytest.fixture(scope="module")
def coco(tmp_path_factory, clip_dir):
    """The COCO folder prepared with the CLIP's tokenizer, train and val."""
    root = tmp_path_factory.mktemp("coco")
    out = str(root / "prepared")
    for split, n in (("train", 24), ("val", 8)):
        write_coco(root, split, n, seed=n)
        prepare.main(["coco", "--captions", str(root / "annotations" / f"captions_{split}2017.json"), "--images",
                      str(root / f"{split}2017"), "--split", split, "--out", out, "--tokenizer", clip_dir,
                      "--image_size", str(S), "--context_length", str(T)])
    return out


def run(out_dir, *flags):
    return train.main(["--config", "tiny", f"--out_dir={out_dir}", "--batch_size=8", "--eval_images=8",
                       "--log_interval=1", "--warmup_iters=1", *flags])


def test_a_coco_folder_trains_from_a_hugging_face_clip(tmp_path, clip_dir, coco):
    """With a learning rate of 0 the run's weights are the CLIP's, tensor for tensor (the
    init path loads them all); with the preset's rate, a few steps train every objective and
    evaluate COCO-style."""
    frozen = str(tmp_path / "frozen")
    run(frozen, f"--data={coco}", f"--init_from={clip_dir}", "--max_iters=2", "--lr=0", "--min_lr=0")
    state = torch.load(os.path.join(frozen, "ckpt.pt"), weights_only=True)["model"]
    reference = hf.from_pretrained(clip_dir).state_dict()
    towers = [k for k in reference if k.startswith(("visual.", "text.")) or k == "logit_scale"]
    V = CLIPConfig.from_pretrained(clip_dir).text_config.vocab_size  # the specials' rows after it start fresh
    for k in towers:
        rows = slice(V) if k.endswith(("token_embedding.weight", "lm_head.weight")) else slice(None)
        assert torch.equal(state[k][rows], reference[k][rows]), k
    trained = str(tmp_path / "trained")
    metrics = run(trained, f"--data={coco}", f"--init_from={clip_dir}", "--max_iters=6")
    with open(os.path.join(trained, "log.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"lr"' in line]
    assert len(steps) == 6
    for k in ("loss", "itc", "itm", "mlm", "moc", "rtd", "r2d", "caption"):
        assert np.isfinite([s[k] for s in steps]).all(), k
    state = torch.load(os.path.join(trained, "ckpt.pt"), weights_only=True)["model"]
    assert not torch.equal(state["visual.conv1.weight"], reference["visual.conv1.weight"])
    for k in ("retrieval_i2t_r1", "retrieval_t2i_r5", "itm_auc", "caption_bleu4", "caption_cider"):
        assert np.isfinite(metrics[k]), k
    assert not any(k.startswith(("heldout_", "zeroshot_", "caption_parse")) for k in metrics)
    # the trained towers exported with their tokenizer start a run on the same data again
    exported = str(tmp_path / "exported")
    sample.main(["--ckpt", os.path.join(trained, "ckpt.pt"), "export", "--out", exported])
    again = str(tmp_path / "again")
    run(again, f"--data={coco}", f"--init_from={exported}", "--max_iters=1", "--lr=0", "--min_lr=0")
    restarted = torch.load(os.path.join(again, "ckpt.pt"), weights_only=True)["model"]
    for k in towers:
        assert torch.equal(restarted[k], state[k]), k


def test_a_hugging_face_start_is_drawn_from_the_seed(clip_dir):
    """The parts a CLIP does not have start from the run's seed: the same seed, the same
    weights (every rank, every rerun); another seed, other fresh parts and the same towers."""
    a, b, c = (hf.hf_init(clip_dir, "", {}, seed)["model"] for seed in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = [k for k in a if not torch.equal(a[k], c[k])]
    assert fresh and all(k.startswith(("converter.", "generator.", "itm_head.", "rtd_head.", "r2d_head.", "momentum.",
                                       "text.token_embedding", "text.lm_head")) for k in fresh), fresh
    V = CLIPConfig.from_pretrained(clip_dir).text_config.vocab_size
    assert torch.equal(a["text.token_embedding.weight"][:V], c["text.token_embedding.weight"][:V])


def test_a_clip_start_on_data_of_another_tokenizer_stops_with_a_message(tmp_path, clip_dir):
    other = write_vocab(tmp_path / "gpt2", *train_vocab(CORPUS * 3, 200, clip=False))
    write_coco(tmp_path, "train", 16, seed=0)
    prepared = str(tmp_path / "prepared")
    prepare.main(["coco", "--captions", str(tmp_path / "annotations" / "captions_train2017.json"), "--images",
                  str(tmp_path / "train2017"), "--out", prepared, "--tokenizer", other, "--image_size", str(S),
                  "--context_length", str(T)])
    with pytest.raises(SystemExit, match="tokenizer of the starting weights"):
        run(str(tmp_path / "run"), f"--data={prepared}", f"--init_from={clip_dir}", "--max_iters=1")
    with pytest.raises(SystemExit, match="--init_text goes with"):
        run(str(tmp_path / "run"), "--init_text=gpt2", "--max_iters=1")


def write_mask_folder(root, n, size):
    """n images with a red square (class 1) and a blue bar (class 2) at random places, their
    PNG class masks and the class list."""
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        os.makedirs(root / folder)
    for i in range(n):
        image, mask = np.full((size, size, 3), 40, np.uint8), np.zeros((size, size), np.uint8)
        for value, colour, (h, w) in ((1, (220, 40, 40), (12, 12)), (2, (50, 90, 240), (6, 20))):
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            image[y:y + h, x:x + w], mask[y:y + h, x:x + w] = colour, value
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    (root / "classes.txt").write_text("background\nred square\nblue bar\n")


def test_the_prompt_and_instruct_stages_run_on_prepared_folders(tmp_path, tiny_run, tiny_world):
    """A pretrained run's tokenizer prepares a mask folder and question sets; the prompt stage
    detects the class list's classes by default, and the instruct stage answers the sets."""
    size, ckpt = tiny_world.image_size, os.path.join(tiny_run, "ckpt.pt")
    common = ["--tokenizer", tiny_world.path, "--image_size", str(size), "--context_length", str(tiny_world.context_length)]
    write_mask_folder(tmp_path, 12, size)
    masks = str(tmp_path / "masks-prepared")
    prepare.main(["masks", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--classes",
                  str(tmp_path / "classes.txt"), "--val_fraction", "0.3", "--out", masks, *common])
    out = str(tmp_path / "prompt")
    metrics = train.main(["--config", "tiny", "--stage", "prompt", f"--init_from={ckpt}", f"--data={masks}",
                          f"--out_dir={out}", "--shots=2", "--shot_seeds=1", "--max_iters=3"])
    assert {"iou_red square", "iou_blue bar", "ap50_red square"} <= set(metrics)
    sets = [{"images": [f"images/{i}.png", f"images/{(i + 1) % 12}.png"][:1 + i % 2],
             "question": "how many images?", "answer": ["one", "two"][i % 2], "type": "count"} for i in range(12)]
    (tmp_path / "sets.json").write_text(json.dumps(sets))
    multi = str(tmp_path / "multi-prepared")
    prepare.main(["multi", "--file", str(tmp_path / "sets.json"), "--val_fraction", "0.3", "--out", multi, *common])
    metrics = train.main(["--config", "tiny", "--stage", "instruct", f"--init_from={ckpt}", f"--data={multi}",
                          f"--out_dir={tmp_path / 'instruct'}", "--max_iters=3", "--batch_size=4"])
    assert 0 <= metrics["instruct_acc"] <= 1 and "instruct_acc_count" in metrics


# -----------------------------------------------------------------------------
# --flip: mirrored images with captions to match


def test_flip_caption_swaps_left_and_right_words_only():
    cases = {"a red circle left of a blue square": "a red circle right of a blue square",
             "from right to left": "from left to right", "Left to RIGHT, leftmost rightwards": "Right to LEFT, rightmost leftwards",
             "leftover bright righteous copyright": "leftover bright righteous copyright", "above the left": "above the right"}
    for text, flipped in cases.items():
        assert data.flip_caption(text) == flipped
        assert data.flip_caption(flipped) == text


def test_a_mirrored_shapes_caption_describes_the_mirrored_scene():
    """Every template: the caption's every 'left' and 'right' is a side (mirror flips it), and
    the swapped caption parses to mirrored_scene of the scene (a row read the other way; a
    column or a single object as it was)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 4))
        objs = [(int(rng.integers(len(data.SHAPES))), int(rng.integers(8)), int(rng.integers(2))) for _ in range(n)]
        axis = 0 if n == 1 else int(rng.integers(1, 3))
        mirrored = data.scene_id(axis, objs[::-1] if axis == 1 else objs)
        assert data.mirrored_scene(data.scene_id(axis, objs)) == mirrored
        for t in range(len(data.TEMPLATES[n])):
            caption = data.write_caption(axis, objs, t)
            assert data.sides_only(caption) and data.parse_caption(data.flip_caption(caption)) == mirrored


def test_mirror_keeps_a_row_whose_swapped_caption_would_not_fit():
    enc = data.make_encoding("left-only", data.train_bpe(["left left left"]))  # 'left' one token, 'right' five
    tokens = data.encode_texts(enc, ["go left", "go left", "stay"], 6)  # <bos> go ␠left <eos>: 'right' needs 9
    tokens[1] = data.encode_texts(enc, ["left"], 6)[0]
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    out, toks, rows = data.mirror(images, tokens, enc, np.array([True, True, True]))
    fits = [data.encode_checked(enc, [data.flip_caption(data.decode_tokens(enc, r))], 6)[1][0] != "too long" for r in tokens]
    assert rows.tolist() == [i for i in range(3) if fits[i]] and not all(fits)
    for i in range(3):
        flipped = i in rows.tolist()
        assert np.array_equal(out[i], images[i, :, ::-1] if flipped else images[i])
        text = data.decode_tokens(enc, tokens[i])
        assert data.decode_tokens(enc, toks[i]) == (data.flip_caption(text) if flipped else text)


# captions of COCO's kind: those mirror flips (every 'left' and 'right' a side, or none), and
# those it keeps as they are (some 'left' or 'right' not a side, or not known to be one)
FLIPPED = [
    "a man on the right side of the road", "turn right at the light", "a dog to the left of a cat",
    "the man in the leftmost chair", "a car turning right", "a woman holding a racket in her right hand",
    "a sign pointing to the right", "a cat sitting on the right in the picture", "a man on the right in a red shirt",
    "two people, one on the left and one on the right", "a dog on the right at the door",
    "a man on the right by the window", "a man on the right of the picture holding an umbrella",
    "Left-handed pitcher throws", "a boat on the right, under a bridge", "the right lane of the highway",
    "a right turn only sign", "a person on the far right", "copyright 2010", "the rightmost giraffe", "leftover food",
    "stand on the RIGHT", "a man riding on the right on a bike", "Right-hand drive vehicle",
    "a woman with her left arm raised", "on the right in a red shirt", "on the right by the window",
    "a rightward arrow by the upright post", "bright lights right of center", "Right Of It", "veer left, keep right",
    "the left one is right of the tree", "from left to right", "a bus bears left into the leftwards lane",
    "a man on the left, all set",
]
KEPT = [
    "It's all right", "a bus right next to a car", "a man standing right behind a fence",
    "the train has left the station", "a plate with food left on it", "a slice of pizza left over",
    "luggage left on the sidewalk", "a kid left alone in a room", "right in front of the building",
    "a batter swinging right now", "a player right up against the net", "A man is right at home",
    "he left right away", "a man's right knee", "food left on a plate", "pizza left over", "a kid left alone",
    "ALL  RIGHT, the left one", "Right Now on the left", "a car parked right\tbehind a bus",
] + [f"a cat right {w} the dog" for w in ["next to", *"now away here there behind beside in on at by up into outside "
                                                   "inside under over below above before after".split()]]


def test_mirror_flips_a_row_only_where_every_left_and_right_is_a_side():
    """A caption whose every 'left' and 'right' is a side, by the word before it or after it,
    is mirrored with its words swapped; one with a 'left' that is a verb or a 'right' that
    is not a side ('all right', 'right now') keeps its image and caption."""
    texts = FLIPPED + KEPT
    enc = data.make_encoding("flip", data.train_bpe(texts + [data.flip_caption(t) for t in texts]))
    tokens = data.encode_texts(enc, texts, 24)
    images = np.random.default_rng(1).integers(0, 256, (len(texts), 4, 4, 3), dtype=np.uint8)
    out, toks, rows = data.mirror(images, tokens, enc, np.ones(len(texts), bool))
    assert [texts[i] for i in rows] == FLIPPED
    for i, text in enumerate(texts):
        flipped = i < len(FLIPPED)
        assert np.array_equal(out[i], images[i, :, ::-1] if flipped else images[i])
        assert data.decode_tokens(enc, toks[i]) == (data.flip_caption(text) if flipped else text)
    assert data.flip_caption("two people, one on the left and one on the Right") == \
        "two people, one on the right and one on the Left"


def test_flip_batches_are_the_plain_ones_mirrored_with_their_codes(tiny_world, world_root):
    """--flip: the rows of flip_draw mirrored, their captions swapped and their visual codes
    those of the mirrored patches; the draw of a step split over 2 ranks of 2 micro-batches is
    one process's draw."""
    cfg = train.apply_overrides(train.PRESETS["tiny"], {"data_dir": world_root, "batch_size": 8})
    cfg.model = train.fit_model_to_data(cfg.model, tiny_world)
    data.prepare_codebook(tiny_world.path, cfg.model.patch_size, cfg.model.n_codes, log=lambda *a: None)
    model = VLM(cfg.model)
    plain = train.pretrain_batches(cfg, tiny_world, model, "cpu", 0, 1)[0](3)
    flipped = train.pretrain_batches(train.apply_overrides(cfg, {"flip": True}), tiny_world, model, "cpu", 0, 1)[0](3)
    draw = data.flip_draw(cfg, 3, 0, 1)
    assert 0 < draw.sum() < len(draw)
    images, tokens, rows = data.mirror(plain["images"], plain["tokens"], tiny_world.tokenizer, draw)
    assert rows.tolist() == np.flatnonzero(draw).tolist()  # the world's captions all fit mirrored
    assert np.array_equal(flipped["images"], images) and np.array_equal(flipped["tokens"], tokens)
    groups = [data.mirrored_scene(g) if d else g for g, d in zip(plain["groups"], draw)]  # a mirrored row: its mirror's scene
    assert flipped["groups"].tolist() == groups and groups != plain["groups"].tolist()
    book = tiny_world.codebook(cfg.model.patch_size, cfg.model.n_codes)
    codes = np.where(draw[:, None], data.visual_codes(images, book, cfg.model.patch_size), plain["codes"])
    assert np.array_equal(flipped["codes"], codes) and not np.array_equal(codes, plain["codes"])
    split = train.apply_overrides(cfg, {"batch_size": 2, "grad_accum": 2})
    whole = train.apply_overrides(cfg, {"batch_size": 8})
    assert np.array_equal(np.concatenate([data.flip_draw(split, 4 + i, r, 2) for r in range(2) for i in range(2)]),
                          data.flip_draw(whole, 2, 0, 1))


def test_webdataset_shards_train_with_flip(tmp_path, tiny_world):
    """Shards streamed into a tiny pretraining run with every objective and --flip (codes of
    streamed images computed on the fly), evaluated on the val split prepared from a shard."""
    import tarfile
    import io
    rng = np.random.default_rng(0)
    size = tiny_world.image_size

    def write_tar(path, keys):
        with tarfile.open(path, "w") as tar:
            for k in keys:
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(buf, "PNG")
                words = f"a {['red', 'blue'][k % 2]} thing {['left', 'right'][k % 3 % 2]} of a circle".encode()
                for ext, content in (("png", buf.getvalue()), ("txt", words)):
                    info = tarfile.TarInfo(f"{k:05d}.{ext}")
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
        return str(path)
    for i in range(2):
        write_tar(tmp_path / f"{i:03d}.tar", range(i * 20, i * 20 + 20))
    val = write_tar(tmp_path / "val.tar", range(100, 112))
    prepared = str(tmp_path / "wds")
    prepare.main(["webdataset", "--train", f"{tmp_path}/{{000..001}}.tar", "--val", val, "--out", prepared,
                  "--tokenizer", tiny_world.path, "--image_size", str(size), "--context_length",
                  str(tiny_world.context_length), "--workers", "1"])
    out = str(tmp_path / "run")
    metrics = run(out, f"--data={prepared}", "--max_iters=3", "--flip", "--n_codes=16")
    with open(os.path.join(out, "log.jsonl")) as f:
        steps = [json.loads(line) for line in f if '"lr"' in line]
    assert len(steps) == 3 and all(np.isfinite([s["loss"], s["moc"], s["r2d"]]).all() for s in steps)
    assert np.isfinite(metrics["retrieval_i2t_r1"]) and "caption_cider" in metrics

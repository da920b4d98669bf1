"""Bad input as a user gives it, per script: each case must stop with a non-zero exit, no traceback, and a
message that names the input. Run in-process (each script's main(argv), catching SystemExit)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import data
import eval as evaluation
import prepare
import sample
import train


@pytest.fixture(scope="module")
def files(tiny_run, tiny_world, tmp_path_factory):
    """A good image, and bad files of several kinds, beside the tiny run's checkpoint."""
    d = tmp_path_factory.mktemp("bad")
    Image.fromarray(tiny_world.array("val", "images")[0]).save(d / "good.png")
    (d / "text.png").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    os.makedirs(d / "folder.png")
    raw = open(os.path.join(tiny_run, "ckpt.pt"), "rb").read()
    (d / "cut.pt").write_bytes(raw[:len(raw) // 3])
    torch.save({"weights": torch.zeros(1)}, d / "foreign.pt")
    os.makedirs(d / "empty_run")
    return {name: str(d / name) for name in ("good.png", "text.png", "empty.png", "folder.png", "cut.pt", "foreign.pt",
                                             "empty_run")} | {"ckpt": os.path.join(tiny_run, "ckpt.pt"), "dir": str(d)}


def stops(capsys, main, argv, *named):
    """main(argv) exits non-zero (SystemExit, so no traceback) with a message holding each of named."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = capsys.readouterr().err + ("" if isinstance(stop.value.code, int) else str(stop.value.code))
    assert stop.value.code not in (0, None), message
    for text in named:
        assert text in message, (argv, message)


SAMPLE_CASES = {  # name: (arguments after --ckpt, what the message names); {x}: a path of the files fixture
    "negative temperature": (["caption", "{good.png}", "--temperature=-1"], ["--temperature", "-1.0"]),
    "top_p above 1": (["caption", "{good.png}", "--top_p=1.5"], ["--top_p", "1.5"]),
    "top_p of 0": (["caption", "{good.png}", "--top_p=0"], ["--top_p"]),
    "top_k of 0": (["caption", "{good.png}", "--top_k=0"], ["--top_k"]),
    "no samples": (["caption", "{good.png}", "--num_samples=0"], ["--num_samples"]),
    "temperature not a number": (["caption", "{good.png}", "--temperature=warm"], ["--temperature", "warm"]),
    "top_k not a whole number": (["caption", "{good.png}", "--top_k=1.5"], ["--top_k", "1.5"]),
    "seed not a number": (["caption", "{good.png}", "--seed=x"], ["--seed", "x"]),
    "missing image": (["caption", "{dir}/nope.png"], ["nope.png"]),
    "text file as an image": (["caption", "{text.png}"], ["text.png"]),
    "empty image file": (["caption", "{empty.png}"], ["empty.png"]),
    "folder as an image": (["caption", "{folder.png}"], ["folder.png"]),
    "a bad image among good ones": (["caption", "{good.png}", "{text.png}"], ["text.png"]),
    "no images": (["caption"], ["images"]),
    "unknown command": (["describe", "{good.png}"], ["describe"]),
    "no command": ([], ["command"]),
    "score without texts": (["score", "{good.png}"], ["--texts"]),
    "score of a missing image": (["score", "{dir}/nope.png", "--texts", "a"], ["nope.png"]),
    "classify without labels": (["classify", "{good.png}"], ["--labels"]),
    "template without a place": (["classify", "{good.png}", "--labels", "a", "--template", "a photo"], ["a photo"]),
    "template with an index": (["classify", "{good.png}", "--labels", "a", "--template", "a {0} {1}"], ["a {0} {1}"]),
    "template with two places": (["classify", "{good.png}", "--labels", "a", "--template", "{} {}"], ["{} {}"]),
    "answer with a pretraining checkpoint": (["answer", "{good.png}", "--question", "how many?"], ["--stage instruct"]),
    "answer without a question": (["answer", "{good.png}"], ["--question"]),
    "detect without classes": (["detect", "{good.png}"], ["--classes"]),
    "detect into a missing folder": (["detect", "{good.png}", "--classes", "star", "--out", "{dir}/no/x.png"],
                                     ["{dir}/no"]),
    "export over an existing path": (["export", "--out", "{dir}"], ["{dir}"]),
    "unknown flag": (["caption", "{good.png}", "--temprature=1"], ["--temprature"]),
}
CKPT_CASES = {  # --ckpt (or --device) values that cannot work, with a good command
    "missing checkpoint": (["--ckpt", "{dir}/none.pt"], ["--ckpt", "none.pt"]),
    "checkpoint cut short": (["--ckpt", "{cut.pt}"], ["--ckpt", "cut.pt", "cannot be read"]),
    "image as a checkpoint": (["--ckpt", "{good.png}"], ["good.png", "cannot be read"]),
    "foreign torch file": (["--ckpt", "{foreign.pt}"], ["foreign.pt", "not a checkpoint written by train.py"]),
    "run directory without a checkpoint": (["--ckpt", "{empty_run}"], ["empty_run"]),
    "device that does not exist": (["--ckpt", "{ckpt}", "--device", "gpu0"], ["--device", "gpu0"]),
    "device this machine lacks": (["--ckpt", "{ckpt}", "--device", "cuda" if not torch.cuda.is_available() else "mps"],
                                  ["--device"]),
}


def filled(args, files):
    """args with each {name} of the files fixture replaced by its path (other braces left as they are)."""
    for name, path in files.items():
        args = [a.replace("{" + name + "}", path) for a in args]
    return args


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sample_py_bad_input(case, files, capsys):
    args, named = SAMPLE_CASES[case]
    stops(capsys, sample.main, ["--ckpt", files["ckpt"], *filled(args, files)], *filled(named, files))


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_sample_py_bad_checkpoint_or_device(case, files, capsys):
    args, named = CKPT_CASES[case]
    stops(capsys, sample.main, [*filled(args, files), "caption", files["good.png"]], *filled(named, files))


def test_sample_py_has_thirty_cases():
    assert len(SAMPLE_CASES) + len(CKPT_CASES) >= 30


def test_a_text_longer_than_the_context_is_truncated_and_said(files, tiny_world, capsys):
    """As CLIP's tokenizers: the first context_length - 2 tokens are read, and a note says so; its score is the
    score of that cut text."""
    enc, T = tiny_world.tokenizer, 24
    long = " ".join(["a small red circle"] * 10)
    rows, cut = data.encode_truncated(enc, ["a circle", long], T)
    assert cut == [1]
    np.testing.assert_array_equal(rows[0], data.encode_texts(enc, ["a circle"], T)[0])
    ids = enc.encode_ordinary(long)[:T - 2]
    np.testing.assert_array_equal(rows[1], [enc.encode_single_token(data.BOS), *ids, enc.encode_single_token(data.EOS)])
    sample.main(["--ckpt", files["ckpt"], "score", files["good.png"], "--texts", long, enc.decode(ids)])
    out = capsys.readouterr()
    assert f"{long!r} is longer than the model's {T - 2} tokens" in out.err
    cosines = [line.split("cos ")[1].split()[0] for line in out.out.strip().splitlines()]
    assert cosines[0] == cosines[1]


EVAL_CASES = {  # eval.py: evaluation and the ablation runner (no run starts: every case stops before)
    "data missing": (["--ckpt", "{ckpt}", "--data", "{dir}/nope"], ["--data", "nope"]),
    "data a file": (["--ckpt", "{ckpt}", "--data", "{good.png}"], ["--data", "good.png"]),
    "data not a dataset": (["--ckpt", "{ckpt}", "--data", "{empty_run}"], ["--data", "empty_run"]),
    "split missing": (["--ckpt", "{ckpt}", "--split", "nope"], ["'nope'"]),
    "split not captioned": (["--ckpt", "{ckpt}", "--split", "multi_val"], ["'multi_val'"]),
    "rerank_k of 0": (["--ckpt", "{ckpt}", "--rerank_k", "0"], ["--rerank_k=0"]),
    "rerank_k negative": (["--ckpt", "{ckpt}", "--rerank_k", "-3"], ["--rerank_k=-3"]),
    "rerank_k not a number": (["--ckpt", "{ckpt}", "--rerank_k", "x"], ["--rerank_k", "'x'"]),
    "out in a missing folder": (["--ckpt", "{ckpt}", "--out", "{dir}/no/m.json"], ["--out", "{dir}/no/m.json"]),
    "out a folder": (["--ckpt", "{ckpt}", "--out", "{dir}"], ["--out", "{dir}"]),
    "unknown flag": (["--ckpt", "{ckpt}", "--nope=1"], ["--nope=1"]),
    "seeds not numbers": (["--ablation", "--seeds=a,b"], ["--seeds=a,b"]),
    "seeds with a gap": (["--ablation", "--seeds=1,,2"], ["--seeds=1,,2"]),
    "unknown row": (["--ablation", "--rows", "XYZ"], ["XYZ"]),
    "unknown stage": (["--ablation", "--stage", "nope"], ["--stage", "nope"]),
    "stage without init_from": (["--ablation", "--stage=instruct"], ["--init_from"]),
    "negative max_iters": (["--ablation", "--rows", "ITC", "--max_iters=-1"], ["--max_iters=-1"]),
    "unknown preset": (["--ablation", "--rows", "ITC", "--config", "huge"], ["'huge'"]),
    "a train flag that does not exist": (["--ablation", "--rows", "ITC", "--lrate=1"], ["--lrate"]),
    "a train value that cannot work": (["--ablation", "--rows", "ITC", "--lr=-1"], ["--lr=-1"]),
    "a train value of another type": (["--ablation", "--rows", "ITC", "--batch_size=big"], ["--batch_size", "big"]),
    "capfilt with a row that is no step": (["--ablation", "--stage=capfilt", "--rows", "ITC"], ["--rows=ITC", "cleaned"]),
    # --seed=S is train.py's flag, not an abbreviation of --seeds: the runner gets as far as the rows
    "capfilt with a seed and a bad step": (["--ablation", "--stage=capfilt", "--seed=3", "--rows=nope"], ["--rows=nope"]),
    "capfilt with seeds": (["--ablation", "--stage=capfilt", "--seeds=1,2"], ["--seeds"]),
    "capfilt with its own out_dir": (["--ablation", "--stage=capfilt", "--out_dir=x"], ["--out_dir"]),
    "ablation_dir a file": (["--ablation", "--rows", "ITC", "--ablation_dir", "{good.png}"], ["--ablation_dir"]),
    "table a folder": (["--ablation", "--rows", "ITC", "--table", "{dir}"], ["--table"]),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_py_bad_input(case, files, capsys, monkeypatch):
    args, named = EVAL_CASES[case]
    monkeypatch.chdir(files["dir"])  # where a row would write, were one to start
    stops(capsys, evaluation.main, filled(args, files), *filled(named, files))
    assert not os.path.exists(os.path.join(files["dir"], "out-ablation"))


@pytest.mark.parametrize("case", list(CKPT_CASES))
def test_eval_py_bad_checkpoint_or_device(case, files, capsys):
    args, named = CKPT_CASES[case]
    stops(capsys, evaluation.main, filled(args, files), *filled(named, files))


def test_eval_py_has_thirty_cases():
    assert len(EVAL_CASES) + len(CKPT_CASES) >= 30


TRAIN_CASES = {  # train.py flags after --config tiny --data_dir=<the tiny world's> --max_iters=1
    "dtype that does not exist": (["--dtype=float64"], ["--dtype", "float64"]),
    "device that does not exist": (["--device=tpu"], ["--device", "tpu"]),
    "device this machine lacks": (["--device=" + ("cuda" if not torch.cuda.is_available() else "mps")], ["--device"]),
    "batch of 0": (["--batch_size=0"], ["--batch_size=0"]),
    "negative learning rate": (["--lr=-1"], ["--lr=-1"]),
    "image size not a multiple of the patch": (["--image_size=50"], ["--image_size=50", "--patch_size"]),
    "width not divisible by the heads": (["--text_width=30", "--text_heads=4"], ["--text_width=30", "--text_heads=4"]),
    "data that does not exist": (["--data={dir}/nope"], ["--data", "nope"]),
    "data a file": (["--data={good.png}"], ["--data", "good.png"]),
    "out_dir a file": (["--out_dir={good.png}"], ["--out_dir", "good.png"]),
    "data_dir a file": (["--data_dir={good.png}"], ["--data_dir", "good.png"]),
    "init_from cut short": (["--init_from={cut.pt}"], ["--init_from", "cut.pt", "cannot be read"]),
    "init_from a foreign file": (["--init_from={foreign.pt}"], ["--init_from", "foreign.pt"]),
    "init_from missing": (["--init_from={dir}/nope.pt"], ["--init_from", "nope.pt"]),
    "init_from a folder of nothing": (["--init_from={empty_run}"], ["--init_from", "empty_run"]),
    "resume with nothing to resume": (["--resume", "--out_dir={empty_run}"], ["--resume", "empty_run"]),
    "unknown preset": (["--config", "huge"], ["'huge'"]),
    "steps not a number": (["--max_iters=x"], ["--max_iters", "'x'"]),
    "unknown stage": (["--stage=nope"], ["--stage", "'nope'"]),
    "stage without a checkpoint": (["--stage=instruct"], ["--init_from"]),
    "misspelt flag": (["--lrate=1"], ["--lrate", "--lr"]),
    "not a flag": (["foo"], ["'foo'"]),
    "flag without its value": (["--batch_size"], ["--batch_size needs a value"]),
    "compile mode that does not exist": (["--compile=maybe"], ["--compile", "'maybe'"]),
    "pass 1 deeper than the model": (["--pass1_layers=99"], ["--pass1_layers=99"]),
    "context too short": (["--context_length=2"], ["--context_length=2"]),
    "image mean of 2 values": (["--image_mean=0.5,0.5"], ["--image_mean"]),
    "image std of 0": (["--image_std=0,0,0"], ["--image_std"]),
    "temperature of 0": (["--itc_temperature=0"], ["--itc_temperature=0.0"]),
    "momentum above 1": (["--momentum=2"], ["--momentum=2.0"]),
    "mask rate of 1": (["--text_mask_rate=1"], ["--text_mask_rate=1.0"]),
    "grid of 2": (["--grid=2"], ["--grid=2"]),
    "world of no images": (["--n_train=0"], ["--n_train=0"]),
    "web noise below 0": (["--web_noise=-0.1"], ["--web_noise=-0.1"]),
    "split that does not exist": (["--train_split=nope"], ["--train_split", "'nope'"]),
    "init_text without init_from": (["--init_text=gpt2"], ["--init_text"]),
    "a class the data lacks": (["--stage=prompt", "--init_from={ckpt}", "--classes=unicorn"], ["'unicorn'"]),
    "a template too long for the context": (["--stage=prompt", "--init_from={ckpt}", "--prompt_init=" + "a " * 40],
                                            ["--prompt_init", "background", "--context_length"]),
    "keep none of the tokens": (["--stage=instruct", "--init_from={ckpt}", "--keep_ratio=0"], ["--keep_ratio=0"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_py_bad_input(case, files, tiny_world, capsys):
    args, named = TRAIN_CASES[case]
    base = ["--config", "tiny", f"--data_dir={os.path.dirname(tiny_world.path)}", "--max_iters=1",
            f"--out_dir={files['dir']}/run"]
    stops(capsys, train.main, [*base, *filled(args, files)], *filled(named, files))


def test_train_py_has_thirty_cases_and_help(capsys):
    assert len(TRAIN_CASES) >= 30
    with pytest.raises(SystemExit) as stop:
        train.main(["--help"])
    assert stop.value.code == 0 and "--batch_size" in capsys.readouterr().out


@pytest.fixture(scope="module")
def sources(files, tiny_world):
    """Source files for prepare.py, good and bad, beside the files fixture's."""
    d = files["dir"]
    with open(f"{d}/coco.json", "w") as f:
        json.dump({"images": [{"id": 1, "file_name": "good.png"}], "annotations": [{"image_id": 1, "caption": "a"}]}, f)
    with open(f"{d}/no_images.json", "w") as f:
        json.dump({"images": [{"id": 1, "file_name": "gone.png"}], "annotations": [{"image_id": 1, "caption": "a"}]}, f)
    with open(f"{d}/list.json", "w") as f:
        json.dump([1, 2], f)
    with open(f"{d}/broken.json", "w") as f:
        f.write("{not json")
    with open(f"{d}/table.csv", "w") as f:
        f.write("path,text\ngood.png,a circle\n")
    with open(f"{d}/classes.txt", "w") as f:
        f.write("background\nstar\n")
    return {**files, "coco": f"{d}/coco.json", "no_images": f"{d}/no_images.json", "list": f"{d}/list.json",
            "broken": f"{d}/broken.json", "table": f"{d}/table.csv", "classes": f"{d}/classes.txt",
            "world": tiny_world.path}


COMMON = ["--out", "{dir}/prepared", "--tokenizer", "{world}", "--image_size", "16", "--context_length", "24"]
COCO = ["coco", "--captions", "{coco}", "--images", "{dir}", "--split", "train"]
PREPARE_CASES = {  # prepare.py: argv (COMMON is added where a source takes it), what the message names
    "tokenizer that does not exist": ([*COCO, *COMMON[:2], "--tokenizer", "{dir}/nope", *COMMON[4:]], ["nope"]),
    "image size of 0": ([*COCO, *COMMON[:4], "--image_size", "0", "--context_length", "24"], ["--image_size"]),
    "context of 2": ([*COCO, *COMMON[:6], "--context_length", "2"], ["--context_length"]),
    "no workers": ([*COCO, *COMMON, "--workers", "0"], ["--workers"]),
    "size not a number": ([*COCO, *COMMON[:4], "--image_size", "big", "--context_length", "24"], ["--image_size"]),
    "unknown source": (["flickr", *COMMON], ["flickr"]),
    "no source": ([], ["SOURCE"]),
    "coco captions missing": (["coco", "--captions", "{dir}/nope.json", "--images", "{dir}", "--split", "train",
                               *COMMON], ["nope.json"]),
    "coco captions not JSON": (["coco", "--captions", "{broken}", "--images", "{dir}", "--split", "train", *COMMON],
                               ["broken.json"]),
    "coco captions not COCO": (["coco", "--captions", "{list}", "--images", "{dir}", "--split", "train", *COMMON],
                               ["list.json", "COCO"]),
    "coco images missing": (["coco", "--captions", "{coco}", "--images", "{dir}/nope", "--split", "train", *COMMON],
                            ["nope"]),
    "coco images a file": (["coco", "--captions", "{coco}", "--images", "{good.png}", "--split", "train", *COMMON],
                           ["good.png"]),
    "coco with every image gone": (["coco", "--captions", "{no_images}", "--images", "{dir}", "--split", "train",
                                    *COMMON], ["no_images.json", "nothing usable"]),
    "no caption slots": ([*COCO, *COMMON, "--captions_per_image", "0"], ["--captions_per_image"]),
    "out a file": ([*COCO, *COMMON[:1], "{good.png}", *COMMON[2:]], ["good.png"]),
    "karpathy file missing": (["karpathy", "--json", "{dir}/nope.json", "--images", "{dir}", *COMMON], ["nope.json"]),
    "karpathy file of another shape": (["karpathy", "--json", "{list}", "--images", "{dir}", *COMMON], ["list.json"]),
    "table missing": (["table", "--file", "{dir}/nope.csv", *COMMON], ["nope.csv"]),
    "table without its columns": (["table", "--file", "{table}", "--image_column", "img", *COMMON], ["img"]),
    "val and val_fraction both": (["table", "--file", "{table}", "--val", "{table}", "--val_fraction", "0.1", *COMMON],
                                  ["--val_fraction"]),
    "val_fraction of 1.5": (["table", "--file", "{table}", "--val_fraction", "1.5", *COMMON], ["--val_fraction"]),
    "masks folder missing": (["masks", "--images", "{dir}", "--masks", "{dir}/nope", "--classes", "{classes}",
                              *COMMON], ["nope"]),
    "classes file missing": (["masks", "--images", "{dir}", "--masks", "{dir}", "--classes", "{dir}/nope.txt",
                              *COMMON], ["nope.txt"]),
    "val images without val masks": (["masks", "--images", "{dir}", "--masks", "{dir}", "--classes", "{classes}",
                                      "--val_images", "{dir}", *COMMON], ["--val_images"]),
    "multi file missing": (["multi", "--file", "{dir}/nope.json", *COMMON], ["nope.json"]),
    "multi file not a list of sets": (["multi", "--file", "{coco}", *COMMON], ["coco.json"]),
    "multi answer of 2 tokens": (["multi", "--file", "{list}", "--answer_length", "2", *COMMON], ["--answer_length"]),
    "questions captions missing": (["questions", "--captions", "{dir}/nope.json", "--images", "{dir}", *COMMON],
                                   ["nope.json"]),
    "questions images missing": (["questions", "--captions", "{coco}", "--images", "{dir}/nope", *COMMON], ["nope"]),
    "questions of one image": (["questions", "--captions", "{coco}", "--images", "{dir}", "--max_images", "1",
                                *COMMON], ["--max_images"]),
    "questions with no val": (["questions", "--captions", "{coco}", "--images", "{dir}", "--val_fraction", "0",
                               *COMMON], ["--val_fraction"]),
    "questions from too few captions": (["questions", "--captions", "{coco}", "--images", "{dir}", *COMMON],
                                        ["multi_train", "question sets"]),
    "webdataset shards that match nothing": (["webdataset", "--train", "{dir}/none-*.tar", "--val", "{dir}/v.tar",
                                              *COMMON], ["none-*.tar"]),
    "export of a missing dataset": (["export", "--data", "{dir}/nope", "--out", "{dir}/e"], ["nope"]),
    "export of a split without captions": (["export", "--data", "{world}", "--split", "novel_train", "--out",
                                            "{dir}/e"], ["novel_train"]),
    "export over a folder": (["export", "--data", "{world}", "--out", "{dir}"], ["{dir}"]),
}


@pytest.mark.parametrize("case", list(PREPARE_CASES))
def test_prepare_py_bad_input(case, sources, capsys):
    args, named = PREPARE_CASES[case]
    stops(capsys, prepare.main, filled(args, sources), *filled(named, sources))


def test_prepare_py_has_thirty_cases():
    assert len(PREPARE_CASES) >= 30


BENCH_CASES = {  # bench.py's own flags, then train.py's flags as bench.py reads them (no data needed)
    "unknown mode": (["--mode=fast"], ["--mode", "'fast'"]),
    "unknown side by side": (["--vs=timm"], ["--vs=", "timm"]),
    "side by side in another mode": (["--vs=hf", "--mode=memory"], ["--vs", "--mode=memory"]),
    "steps not a number": (["--steps=x"], ["--steps", "'x'"]),
    "negative steps": (["--steps=-2"], ["--steps"]),
    "warmup below -1": (["--warmup=-5"], ["--warmup"]),
    "no new tokens": (["--mode=generate", "--new_tokens=0"], ["--new_tokens"]),
    "no images": (["--mode=instruct", "--n_images=0"], ["--n_images"]),
    "more images than slots": (["--mode=instruct", "--n_images=9"], ["--n_images=9", "--image_slots"]),
    "no memory": (["--mode=memory", "--memory_gb=0"], ["--memory_gb"]),
    "negative peak": (["--peak_tflops=-1"], ["--peak_tflops"]),
    "json into a missing folder": (["--json={dir}/no/b.json"], ["--json", "{dir}/no/b.json"]),
    "json a folder": (["--json={dir}"], ["--json", "{dir}"]),
    "a stage": (["--stage=instruct"], ["--stage"]),
    "accumulation": (["--grad_accum=2"], ["--grad_accum"]),
    "bench flag without its value": (["--steps"], ["--steps needs a value"]),
}
BENCH_CASES |= {f"train flag: {name}": case for name, case in TRAIN_CASES.items() if name in (
    "dtype that does not exist", "device that does not exist", "device this machine lacks", "batch of 0",
    "negative learning rate", "image size not a multiple of the patch", "width not divisible by the heads",
    "unknown preset", "misspelt flag", "not a flag", "flag without its value", "compile mode that does not exist",
    "context too short", "image mean of 2 values", "image std of 0", "temperature of 0", "momentum above 1",
    "mask rate of 1")}


@pytest.mark.parametrize("case", list(BENCH_CASES))
def test_bench_py_bad_input(case, files, capsys):
    args, named = BENCH_CASES[case]
    stops(capsys, bench.main, ["--config", "tiny", *filled(args, files)], *filled(named, files))


def test_bench_py_has_thirty_cases():
    assert len(BENCH_CASES) >= 30

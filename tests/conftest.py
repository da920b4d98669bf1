import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import train  # noqa: E402

TINY = train.PRESETS["tiny"]


@pytest.fixture(scope="session")
def world_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("worlds"))


@pytest.fixture(scope="session")
def tiny_world(world_root):
    """The tiny preset's shapes world, generated once for the session."""
    path = data.prepare_world(world_root, TINY.world, TINY.model.image_size, TINY.model.context_length, log=lambda *a: None)
    return data.Dataset(path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, world_root, tiny_world):
    """A finished tiny training run: its out_dir holds ckpt.pt, log.jsonl and eval.json."""
    out = str(tmp_path_factory.mktemp("tiny_run"))
    # the discriminator at weight 10 (the default is 1): 60 tiny steps then show RTD learn
    train.main(["--config", "tiny", f"--out_dir={out}", f"--data_dir={world_root}", "--max_iters=60", "--rtd_weight=10",
                "--r2d_weight=10"])
    return out

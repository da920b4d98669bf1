"""Two ranks streaming a webdataset tar through loader workers, for test_webdataset.py: run as

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/wds_ranks.py SHARDS TOKENIZER S T STEPS OUT

each rank reads its micro-steps 0..STEPS-1 (batches of 2) with 2 loader workers as training
does (data.host_batches over prepare.ShardBatches), and rank 0 writes what every rank read,
[rank][step] -> [[epoch, key]], as JSON to OUT."""

import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import hf  # noqa: E402
import prepare  # noqa: E402


def main(shards, tokenizer, S, T, steps, out):
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    enc = data.get_tokenizer(*hf.hf_tokenizer(tokenizer))
    shards = prepare.expand_shards(shards)
    counts = [len(prepare.tar_samples(shard)[0]) for shard in shards]  # as preparation counts them
    batches = prepare.ShardBatches(shards, counts, rank, world_size, 2, 0, enc, T, S, 2, log=lambda line: None)

    def fetch(s):
        images, tokens = batches.fetch(s)  # decoded in the worker, as in training
        assert images.shape == (2, S, S, 3) and tokens.shape == (2, T)
        return [[x.epoch, x.key] for x in batches.samples(s)]

    loader = data.host_batches(fetch, 0, num_workers=2, pin_memory=False)
    reads = [next(loader) for _ in range(steps)]
    everyone = [None] * world_size
    dist.all_gather_object(everyone, reads)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    shards, tokenizer, S, T, steps, out = sys.argv[1:]
    main(shards, tokenizer, int(S), int(T), int(steps), out)

"""The COCO caption metrics against pycocoevalcap (BLEU, CIDEr-D) and Stanford's PTBTokenizer,
and the evaluation of a real captioned dataset against direct computations."""

import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

import data
import eval as evaluation
from model import VLM, VLMConfig


def pycocoevalcap_scores(refs, cands):
    """(BLEU-1..4, CIDEr-D) from pycocoevalcap on the same tokenised captions."""
    res = {k: [c] for k, c in cands.items()}
    bleu, _ = Bleu(4).compute_score(refs, res, verbose=0)
    cider, _ = Cider().compute_score(refs, res)
    return bleu, float(cider)


def assert_same_as_pycocoevalcap(refs, cands):
    bleu, cider = pycocoevalcap_scores(refs, cands)
    assert evaluation.bleu(refs, cands) == pytest.approx(bleu, rel=1e-12, abs=1e-15)
    assert evaluation.cider_d(refs, cands) == pytest.approx(cider, rel=1e-12, abs=1e-15)


def test_bleu_matches_the_formula_on_a_hand_counted_case():
    refs = {"cat": ["the cat is on the mat", "there is a cat on the mat"], "short": ["a cat sits", "the cat sits here"]}
    cands = {"cat": "the cat sat on the mat", "short": "a cat"}
    # clipped matches per order: cat 5/6, 3/5, 1/4, 0/3; short 2/2, 1/1; lengths 6 + 2 against
    # the closest references 6 + 3, so the brevity penalty is exp(1 - 9/8)
    p = [7 / 8, 4 / 6, 1 / 4, 1e-15 / 3]  # pycocoevalcap smooths a zero count to 1e-15
    bp = math.exp(1 - 9 / 8)
    got = evaluation.bleu(refs, cands)
    assert got == pytest.approx([math.prod(p[:k]) ** (1 / k) * bp for k in (1, 2, 3, 4)], rel=1e-8)
    assert got[2] == pytest.approx(bp * (7 / 48) ** (1 / 3), rel=1e-8) and got[3] < 1e-3
    assert_same_as_pycocoevalcap(refs, cands)


def test_cider_d_is_ten_times_the_cosine_on_exact_copies():
    # disjoint vocabularies, each candidate its only reference: cosine 1 at every order the
    # candidate has (idf log 2 > 0), 0 at the orders it is too short for
    refs = {"long": ["a b c d e"], "pair": ["x y"]}
    cands = {"long": "a b c d e", "pair": "x y"}
    assert evaluation.cider_d(refs, cands) == pytest.approx((10.0 + 10.0 * 2 / 4) / 2, rel=1e-12)
    # one image: every n-gram is in every image's references, idf 0, so CIDEr-D 0
    assert evaluation.cider_d({"one": ["a b c"]}, {"one": "a b c"}) == 0.0
    assert_same_as_pycocoevalcap(refs, cands)


def test_bleu_and_cider_d_equal_pycocoevalcap_on_random_captions():
    rng = random.Random(0)
    vocab = "a dog cat sits on the mat red".split()  # small: repeated n-grams and shared ones

    def sentence(lo, hi):
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))

    refs = {i: [sentence(1, 12) for _ in range(5)] for i in range(300)}
    cands = {i: sentence(0, 3) if i % 5 == 0 else sentence(0, 12) for i in range(300)}  # empty and short ones
    assert sum(c == "" for c in cands.values()) > 5 and sum(0 < len(c.split()) < 4 for c in cands.values()) > 20
    assert_same_as_pycocoevalcap(refs, cands)
    # references of differing number and length, one empty; candidates that copy a reference
    refs = {i: [sentence(0 if j == 0 and i == 3 else 1, 8) for j in range(1 + i % 5)] for i in range(60)}
    cands = {i: refs[i][-1] if i % 4 == 0 else sentence(1, 6) for i in range(60)}
    assert_same_as_pycocoevalcap(refs, cands)
    assert_same_as_pycocoevalcap({"a": ["a b c d"], "b": ["b c"]}, {"a": "a b", "b": "b"})  # shorter than 4


def test_caption_metrics_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="different images"):
        evaluation.bleu({"a": ["x"]}, {"b": "x"})
    with pytest.raises(ValueError, match="no reference caption"):
        evaluation.cider_d({"a": []}, {"a": "x"})


# raw caption -> what pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, -lowerCase, its
# punctuation dropped) makes of it; written down from running it
PTB_CASES = [
    ("A man riding a horse on the beach.", "a man riding a horse on the beach"),
    ("Two dogs, a cat and a bird; all outside!", "two dogs a cat and a bird all outside"),
    ("A dog's bowl and the kids' toys.", "a dog 's bowl and the kids toys"),
    ("They don't know, can't see and won't go.", "they do n't know ca n't see and wo n't go"),
    ("They're here, we've gone, I'm OK, I'll stay, he'd say.", "they 're here we 've gone i 'm ok i 'll stay he 'd say"),
    ("You cannot, gonna, wanna, gotta", "you can not gon na wan na got ta"),
    ('A sign that says "STOP" and \'slow\'.', "a sign that says stop and slow"),
    ("The dog\u2019s \u201cbest\u201d friend \u2014 a cat", "the dog 's best friend a cat"),
    ("A photo (black-and-white) of [a] {cat}.", "a photo -lrb- black-and-white -rrb- of -lsb- a -rsb- -lcb- cat -rcb-"),
    ("It costs $3.50, 50% off & #1 at 12:30 for 1/2 of 1,000 people.",
     "it costs $ 3.50 50 % off & # 1 at 12:30 for 1/2 of 1,000 people"),
    ("A 2.5mm x-ray of a 3-year-old, 10km/h.", "a 2.5 mm x-ray of a 3-year-old 10km/h"),
    ("Mr. Smith and Dr. Who on St. Louis Ave. in the U.S. at 5 a.m., etc.",
     "mr. smith and dr. who on st. louis ave. in the u.s. at 5 a.m. etc."),
    ("Wait... what?! Really?? -- yes - no", "wait what ?! really ?? yes no"),
    ("  A   MAN\tIN a Hat  ", "a man in a hat"),
    ("The 1990's car at o'clock -5 +5 a*b a+b = c", "the 1990 's car at o'clock -5 +5 a * b a + b = c"),
    ("", ""),
]


def test_coco_tokenize_matches_ptb_tokenizer_on_common_cases():
    for raw, ptb in PTB_CASES:
        assert evaluation.coco_tokenize(raw) == ptb, raw


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs Java")
def test_ptb_cases_are_what_ptb_tokenizer_writes():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    out = PTBTokenizer().tokenize({i: [{"caption": raw}] for i, (raw, _) in enumerate(PTB_CASES)})
    assert [out[i][0] for i in range(len(PTB_CASES))] == [ptb for _, ptb in PTB_CASES]


# -----------------------------------------------------------------------------
# evaluate on a real captioned dataset

WORDS = "a an the dog cat man woman red blue small big sits runs on under near grass table street ball".split()


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """A 'captions' dataset in the layout prepare.py writes (val and test, no test.heldout):
    C = 5 slots, image i has n_captions[i] valid captions then repeats of them. Returns the
    Dataset and each val image's valid caption texts."""
    rng = np.random.default_rng(0)
    N, C, T, S = 12, 5, 20, 32
    texts = {split: [] for split in ("val", "test")}
    for split in texts:
        for i in range(N):
            n = 2 if i == 0 else int(rng.integers(1, C + 1))
            texts[split].append([" ".join(rng.choice(WORDS, int(rng.integers(3, 9)))).capitalize() + "." for _ in range(n)])
    ranks = data.train_bpe([t for split in texts.values() for caps in split for t in caps])
    bpe_text = data.bpe_to_text(ranks)
    enc = data.get_tokenizer("bpe", bpe_text)
    path = tmp_path_factory.mktemp("captions")
    for split, caps in texts.items():
        rows = [data.encode_texts(enc, [c[j % len(c)] for j in range(C)], T) for c in caps]
        np.save(path / f"{split}.images.npy", rng.integers(0, 256, (N, S, S, 3), dtype=np.uint8))
        np.save(path / f"{split}.tokens.npy", np.stack(rows))
        np.save(path / f"{split}.n_captions.npy", np.array([len(c) for c in caps], np.int16))
        np.save(path / f"{split}.scene.npy", np.arange(N, dtype=np.int64))
        np.save(path / f"{split}.{data.codebook_name(16, 8)}.npy", rng.integers(0, 8, (N, (S // 16) ** 2), dtype=np.int16))
    (path / "tokenizer.tiktoken").write_text(bpe_text)
    special = {t: enc.encode_single_token(t) for t in data.SPECIAL_TOKENS}
    meta = dict(kind="captions", image_size=S, context_length=T, splits={"val": N, "test": N}, source="test",
                tokenizer=dict(kind="bpe", file="tokenizer.tiktoken", n_vocab=enc.n_vocab, special_tokens=special))
    (path / "meta.json").write_text(json.dumps(meta))
    return data.Dataset(str(path)), texts["val"]


@pytest.fixture(scope="module")
def model(captioned):
    """A tiny random VLM with every objective that evaluate reads (ITC, ITM, ELECTRA, captioning)."""
    ds, _ = captioned
    tok = ds.tokenizer
    ids = {name: tok.encode_single_token(t) for name, t in (("bos_id", data.BOS), ("eos_id", data.EOS),
                                                              ("pad_id", data.PAD), ("mask_id", data.MASK),
                                                              ("glob_id", data.GLOB))}
    torch.manual_seed(0)
    return VLM(VLMConfig(image_size=32, patch_size=16, vit_width=32, vit_layers=2, vit_heads=2, text_width=32,
                         text_layers=2, text_heads=2, embed_dim=32, context_length=20, n_codes=8, momentum_alpha=0.0,
                         vocab_size=tok.n_vocab, **ids)).eval()


@pytest.fixture(scope="module")
def evaluated(captioned, model):
    """evaluate's metrics, ITM re-ranking every candidate (ITM alone orders them)."""
    return evaluation.evaluate(model, captioned[0], "cpu", rerank_k=1000)


def recall(scores, relevant, k):
    """Brute force: the fraction of rows with a relevant column among their k highest scores."""
    return float(np.mean([any(relevant[q][j] for j in sorted(range(len(row)), key=lambda j: -row[j])[:k])
                          for q, row in enumerate(scores)]))


def recalls(prefix, sim, owner):
    """R@1, 5, 10 both ways by brute force; sim (N images, G captions), owner[g] caption g's image."""
    relevant = [[owner[g] == i for g in range(len(owner))] for i in range(len(sim))]
    out = {}
    for k in (1, 5, 10):
        out[f"{prefix}_i2t_r{k}"] = recall(sim, relevant, k)
        out[f"{prefix}_t2i_r{k}"] = recall(sim.T, np.array(relevant).T, k)
    return out


def test_captioned_retrieval_and_itm_count_each_valid_caption_once(captioned, model, evaluated):
    ds, _ = captioned
    out = evaluated
    tokens, n = ds.array("val", "tokens"), ds.array("val", "n_captions")
    N, C, _ = tokens.shape
    assert n[0] == 2 and (tokens[0, 2:] == tokens[0, [0, 1, 0]]).all()  # the fill slots repeat the valid captions
    with torch.no_grad():
        pixels = model.normalize_pixels(ds.array("val", "images"))
        image_tokens = model.image_tokens(model.visual(pixels))
        image_emb = model.encode_image(pixels).numpy()

        def by_brute_force(slots):  # slots: (image, slot) pairs of the gallery
            rows = torch.from_numpy(np.stack([tokens[i, j] for i, j in slots])).long()
            owner = [i for i, _ in slots]
            sim = image_emb @ model.encode_text(rows).numpy().T
            got = recalls("retrieval", sim, owner)
            pairs = [(i, g) for i in range(N) for g in range(len(slots))]
            logits = model.itm_logits(image_tokens[[i for i, _ in pairs]], rows[[g for _, g in pairs]])
            margin = (logits[:, 1] - logits[:, 0]).view(N, len(slots)).numpy()
            got.update(recalls("retrieval_itm", margin, owner))
            # ITM pairs: each image with its first caption, and with the most similar caption of another image
            hard = [max((g for g in range(len(slots)) if owner[g] != i), key=lambda g: sim[i, g]) for i in range(N)]
            first = [owner.index(i) for i in range(N)]
            scores = np.concatenate([margin[range(N), first], margin[range(N), hard]])
            got["itm_acc"] = float(np.mean((scores > 0) == (np.arange(2 * N) < N)))
            got["itm_auc"] = float(np.mean([[(p > q) + 0.5 * (p == q) for q in scores[N:]] for p in scores[:N]]))
            return got

        valid = by_brute_force([(i, j) for i in range(N) for j in range(n[i])])
        every_slot = by_brute_force([(i, j) for i in range(N) for j in range(C)])
    for key, value in valid.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key
    assert any(abs(valid[k] - every_slot[k]) > 1e-6 for k in valid)  # the fill slots would change the numbers
    assert not any(k.startswith("heldout_") for k in out)  # no test.heldout: no held-out part
    assert not any(k.startswith(("zeroshot_", "caption_parse")) for k in out)  # shapes-world only
    assert {"rtd_auc", "r2d_auc"} <= set(out) and all(np.isfinite(out[k]) for k in ("rtd_auc", "r2d_auc"))


def test_captioned_caption_metrics_score_greedy_captions_against_valid_references(captioned, model, evaluated):
    ds, texts = captioned
    out = evaluated
    captions = evaluation.generate_captions(model, ds.tokenizer, ds.array("val", "images"))
    cands = {i: evaluation.coco_tokenize(c) for i, c in enumerate(captions)}
    refs = {i: [evaluation.coco_tokenize(t) for t in caps] for i, caps in enumerate(texts)}  # the texts written
    bleu, cider = pycocoevalcap_scores(refs, cands)
    assert [out[f"caption_bleu{k}"] for k in (1, 2, 3, 4)] == pytest.approx(bleu, rel=1e-12, abs=1e-15)
    assert out["caption_cider"] == pytest.approx(cider, rel=1e-12, abs=1e-15)
    assert out["caption_bleu1"] > 0 and out["caption_cider"] > 0  # some words of the random captions match
    repeated = {i: [r[j % len(r)] for j in range(5)] for i, r in refs.items()}  # with the fill slots
    assert pycocoevalcap_scores(repeated, cands)[1] != pytest.approx(cider, rel=1e-9)


def test_another_split_is_evaluated_alone_and_an_unknown_one_named(captioned, model):
    ds, _ = captioned
    out = evaluation.evaluate(model, ds, "cpu", split="test")
    assert out == evaluation.evaluate_split(model.eval(), ds, "test", "cpu", np.arange(ds.split_size("test")))
    with pytest.raises(ValueError, match="no captioned split 'nope'; it has val, test"):
        evaluation.evaluate(model, ds, "cpu", split="nope")


def test_references_are_the_captions_as_written_where_the_dataset_keeps_them(captioned, model, evaluated, tmp_path):
    """With {split}.captions.json the references are its texts, not the decoded token rows:
    here each image's are the next image's texts, which changes the scores."""
    ds, texts = captioned
    path = str(tmp_path / "with-captions")
    shutil.copytree(ds.path, path)
    written = texts[1:] + texts[:1]
    with open(os.path.join(path, "val.captions.json"), "w") as f:
        json.dump(written, f)
    out = evaluation.evaluate(model, data.Dataset(path), "cpu", rerank_k=1000)
    captions = evaluation.generate_captions(model, ds.tokenizer, ds.array("val", "images"))
    expected = evaluation.caption_scores(captions, written)
    assert {k: out[k] for k in expected} == expected
    assert out["caption_cider"] != evaluated["caption_cider"]

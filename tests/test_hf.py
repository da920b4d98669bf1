"""Hugging Face interop (hf.py): a CLIP or a GPT-2 loaded by from_pretrained gives
transformers' outputs on the same inputs; export_hf_clip writes a CLIP that transformers loads
with our outputs, and that loads back into our exact weights; bad inputs get clear errors.
Small random models, float32 on the CPU."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertConfig, CLIPConfig, CLIPModel, GPT2Config, GPT2LMHeadModel

import data
from hf import export_hf_clip, from_pretrained
from model import VLM, VLMConfig

TOL = dict(rtol=1e-5, atol=1e-5)
V_CLIP, V_GPT2 = 997, 211  # HF vocabulary sizes, not round numbers


def perturb(model, seed):
    """Every tensor of a freshly initialised model made distinct (LayerNorms off 1 and 0,
    biases off 0), so that a tensor loaded into the wrong place shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def clip_config(act, legacy_eos=False, **vision):
    """A small CLIP: towers of different widths, depths and heads, mlp_ratio 3, an odd image
    and patch size, context and projection sizes; <bos> and <eos> the vocabulary's last two
    ids, as OpenAI's, given as such or (legacy_eos) as the old bos 0, eos 2."""
    ids = dict(bos_token_id=0, eos_token_id=2) if legacy_eos else dict(bos_token_id=V_CLIP - 2, eos_token_id=V_CLIP - 1)
    text = dict(vocab_size=V_CLIP, hidden_size=48, intermediate_size=144, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=13, hidden_act=act, layer_norm_eps=1e-6, pad_token_id=1, **ids)
    vision = dict(dict(hidden_size=40, intermediate_size=120, num_hidden_layers=2, num_attention_heads=5, image_size=30,
                       patch_size=6, hidden_act=act, layer_norm_eps=1e-6), **vision)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24, logit_scale_init_value=2.3)


def gpt2_config(**changes):
    """A small GPT-2 whose mlp_ratio (3) and layer_norm_eps match clip_config's."""
    return GPT2Config(**dict(dict(vocab_size=V_GPT2, n_embd=56, n_layer=3, n_head=4, n_positions=17, n_inner=168,
                                  activation_function="gelu_new", layer_norm_epsilon=1e-6, bos_token_id=V_GPT2 - 1,
                                  eos_token_id=V_GPT2 - 1), **changes))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Random HF models written by save_pretrained: {name: (directory, model)}."""
    out = {}
    for seed, (name, model) in enumerate((("quick_gelu", CLIPModel(clip_config("quick_gelu"))),
                                          ("gelu", CLIPModel(clip_config("gelu"))),
                                          ("legacy_eos", CLIPModel(clip_config("quick_gelu", legacy_eos=True))),
                                          ("gpt2", GPT2LMHeadModel(gpt2_config())))):
        path = str(tmp_path_factory.mktemp(name))
        perturb(model, seed).save_pretrained(path)
        out[name] = (path, model)
    return out


def caption_rows(cfg, hf_vocab, B=4, seed=0):
    """(B, context_length) rows <bos> words <eos> <pad>..., one of them filling the context,
    the words below every special id; and HF's input_ids (padding as id 0, which its
    attention_mask hides) with that mask."""
    g = torch.Generator().manual_seed(seed)
    T = cfg.context_length
    tokens = torch.full((B, T), cfg.pad_id)
    words = min(cfg.bos_id, cfg.eos_id, hf_vocab)
    for i, n in enumerate([T - 2, 0, 3, 7][:B]):
        tokens[i, 0], tokens[i, n + 1] = cfg.bos_id, cfg.eos_id
        tokens[i, 1:n + 1] = torch.randint(0, words, (n,), generator=g)
    valid = tokens != cfg.pad_id
    return tokens, tokens.masked_fill(~valid, 0), valid.long()


def features(out):
    """get_image_features / get_text_features: a tensor in transformers 4, an output object
    holding it as pooler_output in 5."""
    return out if torch.is_tensor(out) else out.pooler_output


def assert_same_clip(ours, hf, tokens, input_ids, mask, pixels):
    """Equal normalised image and text embeddings and logits_per_image."""
    with torch.no_grad():
        image, text = ours.encode_image(pixels), ours.encode_text(tokens)
        theirs = hf(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)
        torch.testing.assert_close(image, F.normalize(features(hf.get_image_features(pixel_values=pixels)), dim=-1), **TOL)
        torch.testing.assert_close(text, F.normalize(features(hf.get_text_features(input_ids=input_ids,
                                                                                   attention_mask=mask)), dim=-1), **TOL)
        torch.testing.assert_close(ours.logit_scale.exp() * image @ text.t(), theirs.logits_per_image, **TOL)


def gpt2_logits(model, ids):
    """Our text transformer as GPT-2: causal, through the tied lm_head."""
    with torch.no_grad():
        return model.text.lm_head(model.text(ids, mask="causal"))


@pytest.mark.parametrize("name", ["quick_gelu", "gelu", "legacy_eos"])
def test_clip_loads_with_equal_features_and_logits(saved, name):
    path, hf = saved[name]
    model = from_pretrained(path, itc_weight=0.5)
    c = model.cfg
    assert (c.image_size, c.patch_size, c.vit_width, c.vit_layers, c.vit_heads) == (30, 6, 40, 2, 5)
    assert (c.text_width, c.text_layers, c.text_heads, c.context_length, c.embed_dim) == (48, 3, 4, 13, 24)
    act = hf.config.vision_config.hidden_act
    assert (c.mlp_ratio, c.layer_norm_eps, c.activation, c.text_activation, c.itc_weight) == (3, 1e-6, act, "", 0.5)
    # CLIP's <|startoftext|> and <|endoftext|>, then pad, mask, glob appended
    assert (c.vocab_size, c.bos_id, c.eos_id, c.pad_id, c.mask_id, c.glob_id) == (V_CLIP + 3, V_CLIP - 2, V_CLIP - 1,
                                                                                 V_CLIP, V_CLIP + 1, V_CLIP + 2)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tokens, input_ids, mask = caption_rows(c, V_CLIP)
    pixels = torch.randn(4, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    assert_same_clip(model.eval(), hf, tokens, input_ids, mask, pixels)
    # the momentum copy starts as the loaded towers; the appended rows keep their fresh init
    for k, v in model.momentum.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert model.text.token_embedding.weight[V_CLIP:].abs().max() < 0.2


def test_gpt2_loads_as_the_text_tower_with_equal_next_token_logits(saved):
    path, hf = saved["gpt2"]
    model = from_pretrained(path).eval()
    c = model.cfg
    assert (c.text_width, c.text_layers, c.text_heads, c.context_length, c.mlp_ratio) == (56, 3, 4, 17, 3)
    assert (c.vocab_size, c.eos_id, c.bos_id, c.pad_id, c.mask_id, c.glob_id) == (V_GPT2 + 4, V_GPT2 - 1, V_GPT2,
                                                                                 V_GPT2 + 1, V_GPT2 + 2, V_GPT2 + 3)
    # gelu_new is GELU's tanh form: in the text transformer and the generator, not in the fresh ViT
    assert (c.activation, c.text_activation) == ("gelu", "gelu_tanh")
    assert model.generator.blocks[0].mlp.act.approximate == "tanh" and model.visual.blocks[0].mlp.act.approximate == "none"
    ids = torch.randint(0, V_GPT2, (3, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(gpt2_logits(model, ids)[..., :V_GPT2], theirs, **TOL)
    # a shorter context keeps the first positions
    short = from_pretrained(path, context_length=9).eval()
    assert short.text.positional_embedding.shape == (9, 56)
    torch.testing.assert_close(gpt2_logits(short, ids[:, :9])[..., :V_GPT2], theirs[:, :9], **TOL)


def test_clip_with_a_gpt2_text_tower(saved):
    (clip_path, clip), (gpt2_path, gpt2) = saved["quick_gelu"], saved["gpt2"]
    model = from_pretrained(clip_path, text=gpt2_path).eval()
    c = model.cfg
    assert (c.vit_width, c.text_width, c.context_length, c.vocab_size, c.eos_id, c.embed_dim) == (40, 56, 17, V_GPT2 + 4,
                                                                                                  V_GPT2 - 1, 24)
    assert (c.activation, c.text_activation) == ("quick_gelu", "gelu_tanh")
    pixels = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels),
                                   F.normalize(features(clip.get_image_features(pixel_values=pixels)), dim=-1), **TOL)
        assert torch.equal(model.logit_scale, clip.logit_scale.reshape(1))
        ids = torch.randint(0, V_GPT2, (2, 17), generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(gpt2_logits(model, ids)[..., :V_GPT2], gpt2(input_ids=ids).logits, **TOL)


@pytest.mark.parametrize("activations", [("quick_gelu", ""), ("gelu", "gelu_tanh")])
def test_export_round_trip(tmp_path, activations):
    """Ours -> export_hf_clip -> transformers gives our outputs; -> from_pretrained gives
    back our towers exactly, our vocabulary with its special ids, and our pixel statistics."""
    act, text_act = activations
    cfg = VLMConfig(image_size=24, patch_size=4, vit_width=32, vit_layers=2, vit_heads=4, text_width=40, text_layers=2,
                    text_heads=5, context_length=11, embed_dim=20, mlp_ratio=2, activation=act, text_activation=text_act,
                    layer_norm_eps=1e-6, vocab_size=613, eos_id=3, bos_id=600, pad_id=612, mask_id=5, glob_id=611,
                    image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3), n_codes=8, queue_size=8)
    torch.manual_seed(0)
    model = perturb(VLM(cfg), 5)
    path = str(tmp_path / "export")
    export_hf_clip(model, path)
    hf = CLIPModel.from_pretrained(path).eval()
    assert (hf.config.text_config.hidden_act, hf.config.vision_config.hidden_act) == \
        ({"": act, "gelu_tanh": "gelu_pytorch_tanh"}[text_act], act)
    tokens = caption_rows(cfg, cfg.vocab_size)[0]  # HF's vocabulary is ours: our padding as it is
    pixels = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(6))
    assert_same_clip(model, hf, tokens, tokens, (tokens != cfg.pad_id).long(), pixels)
    back = from_pretrained(path)
    for k in ("vocab_size", "bos_id", "eos_id", "pad_id", "mask_id", "glob_id", "activation", "text_activation",
              "image_mean", "image_std", "mlp_ratio", "layer_norm_eps", "context_length", "embed_dim"):
        assert getattr(back.cfg, k) == pytest.approx(getattr(cfg, k)), k
    ours, theirs = model.state_dict(), back.state_dict()
    towers = [k for k in ours if k.startswith(("visual.", "text.")) or k == "logit_scale"]
    # every tensor of HF's, q, k and v (weights and biases) as one c_attn per block, and our tied lm_head
    assert len(towers) == len(hf.state_dict()) - 4 * (cfg.vit_layers + cfg.text_layers) + 1
    for k in towers:
        assert torch.equal(ours[k], theirs[k]), k
    # written once, atomically: no temporary directory left, an existing path refused
    assert os.listdir(tmp_path) == ["export"]
    with pytest.raises(FileExistsError, match="export"):
        export_hf_clip(model, path)


def test_any_mlp_width_loads_with_parity_and_exports_the_same_tensors(tmp_path):
    """MLP widths that are no multiple of their towers' widths (as LAION's ViT-bigG-14, 8192 at 1664, and SigLIP
    so400m, 4304 at 1152): loaded with outputs equal to transformers', exported back to the same tensors."""
    config = clip_config("gelu", intermediate_size=130)  # vision 130 at 40
    config.text_config.intermediate_size = 100  # text 100 at 48
    path, out = str(tmp_path / "odd"), str(tmp_path / "export")
    hf = perturb(CLIPModel(config), 7).eval()
    hf.save_pretrained(path)
    model = from_pretrained(path).eval()
    c = model.cfg
    assert (c.mlp_ratio, c.vit_mlp_width, c.text_mlp_width) == (2, 130, 100)  # the text tower's nearest ratio
    assert model.visual.blocks[0].mlp.c_fc.out_features == 130 and model.text.blocks[0].mlp.c_fc.out_features == 100
    assert model.generator.blocks[0].mlp.c_fc.out_features == 2 * c.text_width // 4  # new parts: mlp_ratio
    tokens, input_ids, mask = caption_rows(c, V_CLIP)
    pixels = torch.randn(4, 3, 30, 30, generator=torch.Generator().manual_seed(8))
    assert_same_clip(model, hf, tokens, input_ids, mask, pixels)
    export_hf_clip(model, out)
    back = CLIPModel.from_pretrained(out)
    assert (back.config.vision_config.intermediate_size, back.config.text_config.intermediate_size) == (130, 100)
    theirs, exported = hf.state_dict(), back.state_dict()
    for k, v in theirs.items():  # the vocabulary grew by our appended specials: HF's rows come back first
        assert torch.equal(exported[k][:len(v)] if "token_embedding" in k else exported[k], v), k


def test_bad_inputs_get_clear_errors(tmp_path, saved):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(OSError, match="no_such_model.*not a local directory"):
        from_pretrained(missing)
    bert = str(tmp_path / "bert")
    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
               ).save_pretrained(bert)
    with pytest.raises(ValueError, match="BertConfig"):
        from_pretrained(bert)
    clip_path, gpt2_path = saved["gelu"][0], saved["gpt2"][0]
    for overrides, named in ((dict(vit_width=64), "vit_width"), (dict(vocab_size=10), "vocab_size"),
                             (dict(context_length=14), "context_length"), (dict(activation="quick_gelu"), "activation"),
                             (dict(no_such_field=1), "no_such_field")):
        with pytest.raises(ValueError, match=named):
            from_pretrained(clip_path, **overrides)
    with pytest.raises(ValueError, match="text_activation"):
        from_pretrained(gpt2_path, text_activation="gelu")
    with pytest.raises(ValueError, match="text=.*GPT-2"):
        from_pretrained(clip_path, text=clip_path)
    # architectures ours cannot hold, read from the config before any weights
    for name, config, named in (("relu", clip_config("relu"), "'relu'"),
                                ("cross", gpt2_config(add_cross_attention=True), "cross-attention")):
        path = str(tmp_path / name)
        config.save_pretrained(path)
        with pytest.raises(ValueError, match=named):
            from_pretrained(path)
    with pytest.raises(ValueError, match="mlp_ratio=5 contradicts"):
        from_pretrained(clip_path, mlp_ratio=5)
    with pytest.raises(ValueError, match="eos_id 2"):
        export_hf_clip(VLM(VLMConfig(eos_id=2, momentum_alpha=0)), str(tmp_path / "eos2"))
    assert not os.path.exists(tmp_path / "eos2")
    with open(os.path.join(clip_path, "config.json")) as f:
        assert "nanovlp_specials" not in json.load(f)  # a plain HF CLIP: our specials appended, as above


def test_sample_export_of_a_trained_checkpoint(tiny_run, tmp_path, capsys):
    """`sample.py export` writes a trained run's towers as a CLIP that transformers loads with
    the checkpoint's embeddings; an existing directory is an error message, not a stack trace."""
    import sample
    from eval import load_checkpoint
    ckpt = os.path.join(tiny_run, "ckpt.pt")
    path = str(tmp_path / "clip")
    sample.main(["--ckpt", ckpt, "export", "--out", path])
    assert "CLIPModel.from_pretrained" in capsys.readouterr().out
    model, enc, _ = load_checkpoint(ckpt)
    hf = CLIPModel.from_pretrained(path).eval()
    texts = ["a small red circle left of a large blue square", "there is a ring"]  # our rows from its tokenizer
    rows = AutoTokenizer.from_pretrained(path)(texts, padding="max_length", max_length=model.cfg.context_length)
    assert rows["input_ids"] == data.encode_texts(enc, texts, model.cfg.context_length).tolist()
    tokens, input_ids, mask = caption_rows(model.cfg, model.cfg.vocab_size)
    pixels = torch.randn(4, 3, model.cfg.image_size, model.cfg.image_size, generator=torch.Generator().manual_seed(1))
    assert_same_clip(model, hf, tokens, tokens, mask, pixels)
    with pytest.raises(SystemExit, match="error: .*clip"):
        sample.main(["--ckpt", ckpt, "export", "--out", path])

"""
Hugging Face interop: CLIP and GPT-2 weights in (from_pretrained, hf_init) and CLIP out (export_hf_clip), and
their byte-level BPE tokenizers both ways; transformers is imported here only. Details: docs/real-data.md.
"""

import dataclasses
import json
import math
import os

import tiktoken
import torch

from data import (BOS, EOS, PAD, SPECIAL_TOKENS, Dataset, bpe_from_text, bpe_to_text, get_tokenizer, staged_dataset,
                  tokenizer_meta, write_file)
from model import VLM, VLMConfig, mlp_widths, text_activation

# -----------------------------------------------------------------------------
# tokenizers: GPT-2's and CLIP's byte-level BPE as tiktoken ranks (CLIP's word end '</w>' as a trailing space byte)

END_OF_WORD = "</w>"


def bytes_to_unicode():
    """GPT-2's table {byte: printable character} in which Hugging Face byte-level vocabularies are written."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(moved)}}


def hf_bpe_ranks(vocab, merges, end_of_word=""):
    """tiktoken ranks {token bytes: id} of a Hugging Face byte-level BPE: vocab {token: id}, merges [(a, b)]. ValueError
    unless the ids number the bytes, then the merged tokens in merge order (tiktoken's rule is then HF's)."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(token):
        chars = token.removesuffix(end_of_word)
        if not chars or any(c not in byte_of for c in chars):
            raise ValueError(f"token {token!r} is not written in byte characters")
        return bytes(byte_of[c] for c in chars) + b" " * (chars != token)

    base = list(byte_of) + [c + end_of_word for c in byte_of] * bool(end_of_word)
    merged = [a + b for a, b in merges]
    missing = [t for t in base + merged if t not in vocab]
    if missing:
        raise ValueError(f"the vocabulary lacks {len(missing)} of its byte and merged tokens, e.g. {missing[:3]}")
    ranks = {to_bytes(t): vocab[t] for t in base + merged}
    if len(ranks) != len(base) + len(merged) or sorted(vocab[t] for t in base) != list(range(len(base))) \
            or [vocab[t] for t in merged] != list(range(len(base), len(ranks))):
        raise ValueError("the vocabulary does not number its byte tokens 0..n-1 and its merged tokens after them "
                         "in merge order: tiktoken cannot reproduce its merges")
    return ranks


def hf_files(name_or_path, names):
    """Local paths of a Hugging Face model's files: in a directory, or downloaded from the hub."""
    if os.path.isdir(name_or_path):
        paths = [os.path.join(name_or_path, n) for n in names]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"{name_or_path} has no {', '.join(map(os.path.basename, missing))}")
        return paths
    try:
        from huggingface_hub import hf_hub_download
        return [hf_hub_download(name_or_path, n) for n in names]
    except Exception as e:  # offline, unknown repository, no such file: all say the same to the user
        raise ValueError(f"{name_or_path!r} is not a directory, and its {', '.join(names)} could not be had from "
                         f"the Hugging Face hub ({type(e).__name__}: {e})") from None


def hf_bpe(name_or_path):
    """(vocab, merges) of a Hugging Face tokenizer: its vocab.json and merges.txt, or else its tokenizer.json."""
    try:
        files = hf_files(name_or_path, ("vocab.json", "merges.txt"))
    except ValueError as first:
        try:
            files = hf_files(name_or_path, ("tokenizer.json",))
        except ValueError:
            raise ValueError(f"{first}, nor tokenizer.json") from None
    try:
        with open(files[0], encoding="utf-8") as f:
            content = json.load(f)
        if len(files) == 1:  # tokenizer.json
            model = content["model"]
            return model["vocab"], [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        with open(files[1], encoding="utf-8") as f:
            return content, [line.split() for line in f if line.strip() and not line.startswith("#version")]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{name_or_path}: its tokenizer files cannot be read as a BPE "
                         f"({type(e).__name__}: {e})") from None


def hf_tokenizer(name_or_path):
    """(kind, bpe_text) of a Hugging Face tokenizer: 'clip' if its vocabulary has '</w>' word ends, else 'gpt2'."""
    vocab, merges = hf_bpe(name_or_path)
    try:
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()) \
                or not all(isinstance(m, list) and len(m) == 2 for m in merges):
            raise ValueError("the vocabulary is not {token: id} or a merge is not two tokens")
        kind = "clip" if any(t.endswith(END_OF_WORD) for t in vocab) else "gpt2"
        ranks = hf_bpe_ranks(vocab, [tuple(m) for m in merges], END_OF_WORD if kind == "clip" else "")
    except ValueError as e:
        raise ValueError(f"{name_or_path}: not a byte-level BPE tokenizer: {e}") from None
    n, specials = len(ranks), (BOS, EOS) if kind == "clip" else (EOS,)
    extra = {t: i for t, i in vocab.items() if i >= n}
    if extra != {t: n + k for k, t in enumerate(specials)}:
        raise ValueError(f"{name_or_path}: a {kind} vocabulary should end with {', '.join(specials)} at {n}.., "
                         f"not {extra}")
    return kind, bpe_to_text(ranks)


def load_tokenizer(spec):
    """(kind, bpe_text) named on a command line: 'gpt2', a prepared dataset, or a Hugging Face tokenizer dir or name."""
    if spec == "gpt2":
        try:
            return "gpt2", bpe_to_text(tiktoken.get_encoding("gpt2")._mergeable_ranks)
        except Exception as e:  # not cached and no network
            raise ValueError(f"tiktoken's gpt2 file is not cached and could not be downloaded ({type(e).__name__}); "
                             f"give a Hugging Face GPT-2 directory instead") from None
    if os.path.exists(os.path.join(spec, "meta.json")):
        ds = Dataset(spec)
        return ds.meta["tokenizer"]["kind"], ds.bpe_text
    return hf_tokenizer(spec)


def bpe_parts(token, ranks, below):
    """The parts BPE (tiktoken's rule) leaves of token's bytes with only the ranks below `below`."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        joins = [ranks.get(a + b, below) for a, b in zip(parts, parts[1:])]
        best = min(range(len(joins)), key=joins.__getitem__)
        if joins[best] >= below:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


HF_TOKENIZER_CLASSES = {"clip": "CLIPTokenizer", "gpt2": "GPT2Tokenizer", "bpe": "GPT2Tokenizer"}  # by our kind


def hf_tokenizer_files(kind, bpe_text, folder):
    """Write a tokenizer as Hugging Face's vocab.json, merges.txt and tokenizer_config.json in folder, each atomically,
    which AutoTokenizer reads as ours and hf_tokenizer reads back ('bpe' as 'gpt2'). Returns the three paths."""
    if kind not in HF_TOKENIZER_CLASSES:
        raise ValueError(f"unknown tokenizer {kind!r}: expected 'clip', 'gpt2' or 'bpe'")
    clip, char = kind == "clip", bytes_to_unicode()
    ranks = bpe_from_text(bpe_text)

    def name(token):  # as Hugging Face writes a token: byte characters, CLIP's word end as '</w>'
        word_end = clip and len(token) > 1 and token.endswith(b" ")
        return "".join(char[b] for b in token[:len(token) - word_end]) + END_OF_WORD * word_end

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda x: x[1]):
        if not (len(token) == 1 or clip and len(token) == 2 and token.endswith(b" ")):  # not a base token
            parts = bpe_parts(token, ranks, rank)
            if len(parts) != 2:
                raise ValueError(f"{kind} token {token!r} (rank {rank}) is not one join of two lower ranked tokens "
                                 f"(BPE leaves {len(parts)} parts): it has no Hugging Face merge")
            merges.append(f"{name(parts[0])} {name(parts[1])}\n")
    ids = tokenizer_meta(kind, get_tokenizer(kind, bpe_text))["special_tokens"]
    vocab = {**{name(t): r for t, r in ranks.items()}, **{t: ids[t] for t in ((BOS, EOS) if clip else (EOS,))}}
    config = dict(tokenizer_class=HF_TOKENIZER_CLASSES[kind], bos_token=BOS, eos_token=EOS, pad_token=PAD,
                  **({} if clip else dict(add_bos_token=True, add_eos_token=True)),
                  added_tokens_decoder={str(ids[t]): dict(content=t, special=True) for t in SPECIAL_TOKENS})
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, n) for n in ("vocab.json", "merges.txt", "tokenizer_config.json")]
    write_file(paths[0], json.dumps(vocab, ensure_ascii=False))
    write_file(paths[1], "#version: 0.2\n" + "".join(merges))
    write_file(paths[2], json.dumps(config, indent=1))
    return paths


# -----------------------------------------------------------------------------
# weights: CLIP in and out, GPT-2 in

# Hugging Face's hidden_act -> ours (gelu_new, gelu_pytorch_tanh and gelu_fast are one function), and back for export
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh"}
HF_ACTIVATION_NAMES = {**{ours: theirs for theirs, ours in HF_ACTIVATIONS.items()}, "gelu_tanh": "gelu_pytorch_tanh"}

# per tower: (HF's prefix, {ours: HF's} (a LayerNorm name maps its weight and bias), (our projection, HF's))
HF_CLIP_TOWERS = {
    "visual": ("vision_model", {"conv1.weight": "embeddings.patch_embedding.weight",
                                "class_embedding": "embeddings.class_embedding",
                                "positional_embedding": "embeddings.position_embedding.weight",
                                "ln_pre": "pre_layrnorm", "ln_post": "post_layernorm"},
               ("proj.weight", "visual_projection.weight")),
    "text": ("text_model", {"token_embedding.weight": "embeddings.token_embedding.weight",
                            "positional_embedding": "embeddings.position_embedding.weight",
                            "ln_final": "final_layer_norm"},
             ("text_projection.weight", "text_projection.weight")),
}
HF_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.c_proj": "self_attn.out_proj",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
GPT2_BLOCK = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")  # our names are GPT-2's


def hf_clip_keys(cfg, towers=("visual", "text")):
    """(our name, HF CLIP's) of logit_scale and each tensor of the towers named, c_attn's HF's q, k and v. Our ln_post
    (on every token) is HF's post_layernorm (on the class token): the same weights, the same embedding."""
    pairs = [("logit_scale", "logit_scale")]
    for tower in towers:
        prefix, keys, (proj, their_proj) = HF_CLIP_TOWERS[tower]
        pairs.append((f"{tower}.{proj}", their_proj))
        for k, v in keys.items():
            suffixes = (".weight", ".bias") if k.startswith("ln") else ("",)
            pairs += [(f"{tower}.{k}{s}", f"{prefix}.{v}{s}") for s in suffixes]
        for i in range(cfg.vit_layers if tower == "visual" else cfg.text_layers):
            o, h = f"{tower}.blocks.{i}.", f"{prefix}.encoder.layers.{i}."
            for p in ("weight", "bias"):
                pairs += [(f"{o}{k}.{p}", f"{h}{v}.{p}") for k, v in HF_CLIP_BLOCK.items()]
                pairs.append((f"{o}attn.c_attn.{p}", tuple(f"{h}self_attn.{x}_proj.{p}" for x in "qkv")))
    return pairs


def state_from_hf_clip(sd, cfg, towers=("visual", "text")):
    """A transformers CLIPModel's state dict -> ours: logit_scale (as (1,)) and the towers named."""
    out = {mine: torch.cat([sd[t] for t in theirs]) if isinstance(theirs, tuple) else sd[theirs]
           for mine, theirs in hf_clip_keys(cfg, towers)}
    out["logit_scale"] = out["logit_scale"].reshape(1)
    return out


def state_to_hf_clip(sd, cfg):
    """The inverse of state_from_hf_clip: our state dict -> a CLIPModel's (logit_scale a scalar)."""
    out = {}
    for mine, theirs in hf_clip_keys(cfg):
        out.update(zip(theirs, sd[mine].chunk(3)) if isinstance(theirs, tuple) else [(theirs, sd[mine])])
    out["logit_scale"] = out["logit_scale"].reshape(())
    return out


def state_from_hf_gpt2(sd, cfg):
    """A transformers GPT2Model's state dict -> our text transformer (Conv1D weights, stored (in, out), transposed)."""
    out = {"text.token_embedding.weight": sd["wte.weight"], "text.positional_embedding": sd["wpe.weight"],
           "text.ln_final.weight": sd["ln_f.weight"], "text.ln_final.bias": sd["ln_f.bias"]}
    for i in range(cfg.text_layers):
        for k in GPT2_BLOCK:
            for p in ("weight", "bias"):
                v = sd[f"h.{i}.{k}.{p}"]
                out[f"text.blocks.{i}.{k}.{p}"] = v.t() if p == "weight" and not k.startswith("ln") else v
    return out


@torch.no_grad()
def load_into(model, state):
    """Copy state (our names) into model's tensors: a smaller token table into the first rows, the first rows of a
    longer positional embedding; other shapes must match."""
    own = model.state_dict()
    for k, v in state.items():
        dst = own[k]
        if k == "text.token_embedding.weight":
            dst = dst[:v.size(0)]
        elif k == "text.positional_embedding":
            v = v[:dst.size(0)]
        if dst.shape != v.shape:
            raise ValueError(f"{k}: the checkpoint's shape {tuple(v.shape)} does not fit the model's "
                             f"{tuple(dst.shape)}")
        dst.copy_(v)


def hf_config(name):
    """The transformers config of a local directory or a hub name."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        if os.path.isdir(name):
            raise OSError(f"{name}: no Hugging Face model config could be read from this directory: {e}") from e
        raise OSError(f"{name!r} is not a local directory, and loading it as a Hugging Face hub name failed (that "
                      f"needs the network, or the files in the hub's cache): {e}. Give a directory written by "
                      "save_pretrained, or a hub name with the network reachable") from e


def hf_image_stats(name):
    """{'image_mean', 'image_std'} from a preprocessor_config.json; {} without one."""
    try:
        path, = hf_files(name, ("preprocessor_config.json",))
    except ValueError:
        return {}
    with open(path) as f:
        pre = json.load(f)
    out = {k: tuple(float(x) for x in pre[k]) for k in ("image_mean", "image_std") if k in pre}
    if any(len(v) != 3 for v in out.values()):
        raise ValueError(f"{path}: image_mean and image_std must have 3 values (RGB), got {out}")
    return out


def tower_fields(name, tower, mlp_width, act, eps):
    """VLMConfig's MLP width, layer_norm_eps and (text_)activation of a HF tower; an error where ours has no match."""
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{name}: the {tower} tower's activation {act!r} is not one we have "
                         f"(we read {', '.join(HF_ACTIVATIONS)})")
    return {"vit_mlp_width" if tower == "vision" else "text_mlp_width": mlp_width, "layer_norm_eps": eps,
            "activation" if tower == "vision" else "text_activation": HF_ACTIVATIONS[act]}


def mlp_fields(fixed):
    """fixed with mlp_ratio set from its towers' MLP widths: the text tower's ratio where it is whole, else the
    ViT's, else the nearest; a tower keeps a width of its own only where that ratio does not give it."""
    towers = [(k, fixed[k], fixed[w]) for k, w in (("text_mlp_width", "text_width"), ("vit_mlp_width", "vit_width"))
              if k in fixed]
    whole = [m // w for _, m, w in towers if m % w == 0]
    ratio = whole[0] if whole else max(1, round(towers[0][1] / towers[0][2]))
    return {**fixed, "mlp_ratio": ratio, **{k: 0 if m == ratio * w else m for k, m, w in towers}}


def special_ids(name, V, **given):
    """vocab_size and our special ids: the given ones (token ids of the vocabulary of V), the others after it."""
    for k, i in given.items():
        if not isinstance(i, int) or not 0 <= i < V:
            raise ValueError(f"{name}: {k}_token_id {i!r} is not an id of its vocabulary of {V}")
    appended = [k for k in ("bos", "pad", "mask", "glob") if k not in given]
    return dict(vocab_size=V + len(appended), **{f"{k}_id": i for k, i in given.items()},
                **{f"{k}_id": V + n for n, k in enumerate(appended)})


def clip_vision_fields(config, name):
    """VLMConfig fields of a transformers CLIPConfig's vision tower and joint space."""
    v = config.vision_config
    if v.num_channels != 3:
        raise ValueError(f"{name}: the vision tower reads {v.num_channels} channels; ours reads RGB")
    return dict(image_size=v.image_size, patch_size=v.patch_size, vit_width=v.hidden_size,
                vit_layers=v.num_hidden_layers, vit_heads=v.num_attention_heads, embed_dim=config.projection_dim,
                **tower_fields(name, "vision", v.intermediate_size, v.hidden_act, v.layer_norm_eps))


def clip_text_fields(config, name):
    """VLMConfig fields of a CLIPConfig's text tower and vocabulary; one export_hf_clip wrote keeps its special ids."""
    t = config.text_config
    out = dict(text_width=t.hidden_size, text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads,
               context_length=t.max_position_embeddings,
               **tower_fields(name, "text", t.intermediate_size, t.hidden_act, t.layer_norm_eps))
    if getattr(config, "nanovlp_specials", None):
        return dict(out, vocab_size=t.vocab_size, **config.nanovlp_specials)
    V = t.vocab_size  # eos_token_id 2 is HF's legacy marker: <bos> and <eos> are then the last two ids
    bos, eos = (V - 2, V - 1) if t.eos_token_id == 2 else (t.bos_token_id, t.eos_token_id)
    return dict(out, **special_ids(name, V, bos=bos, eos=eos))


def gpt2_fields(config, name):
    """VLMConfig fields of a transformers GPT2Config: the text tower and vocabulary."""
    for has, what in ((config.add_cross_attention, "cross-attention layers"),
                      (not config.scale_attn_weights, "attention without the 1/sqrt(head size) scale"),
                      (config.scale_attn_by_inverse_layer_idx, "attention scaled by the layer index"),
                      (not config.tie_word_embeddings, "an lm_head apart from the token embedding")):
        if has:
            raise ValueError(f"{name}: this GPT-2 has {what}; ours has not")
    return dict(text_width=config.n_embd, text_layers=config.n_layer, text_heads=config.n_head,
                context_length=config.n_positions,
                **tower_fields(name, "text", config.n_inner or 4 * config.n_embd,
                               config.activation_function, config.layer_norm_epsilon),
                **special_ids(name, config.vocab_size, eos=config.eos_token_id))


def checked_config(name, fixed, overrides):
    """VLMConfig(fixed, then overrides); an override may not contradict a fixed field (context_length may be less)."""
    for k in overrides:
        if k not in {f.name for f in dataclasses.fields(VLMConfig)}:
            raise ValueError(f"{k!r} is not a VLMConfig field")
    cfg = VLMConfig(**{**fixed, **overrides})
    for k, want in fixed.items():
        got = getattr(cfg, k)
        if k == "text_activation":  # '' is activation's
            want, got = text_activation(VLMConfig(**fixed)), text_activation(cfg)
        if got != want and not (k == "context_length" and got <= want):
            raise ValueError(f"{k}={got!r} contradicts {name}, whose architecture has {k}={want!r}"
                             + (" (context_length may be less, not more)" if k == "context_length" else ""))
    return cfg


def hf_clip_config(cfg):
    """A transformers CLIPConfig of cfg's towers, vocabulary and special ids (nanovlp_specials, which
    from_pretrained reads back). An eos_id of 2 is refused: HF CLIP would pool at the highest id instead."""
    from transformers import CLIPConfig
    if cfg.eos_id == 2:
        raise ValueError("eos_id 2: Hugging Face CLIP reads eos_token_id 2 as its legacy marker and pools the text at "
                         "the highest token id instead of at <eos>; give <eos> another id")
    common = dict(layer_norm_eps=cfg.layer_norm_eps, projection_dim=cfg.embed_dim)
    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, intermediate_size=mlp_widths(cfg)[1],
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.context_length, hidden_act=HF_ACTIVATION_NAMES[text_activation(cfg)],
                bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id, **common)
    vision = dict(hidden_size=cfg.vit_width, intermediate_size=mlp_widths(cfg)[0],
                  num_hidden_layers=cfg.vit_layers, num_attention_heads=cfg.vit_heads, image_size=cfg.image_size,
                  patch_size=cfg.patch_size, num_channels=3, hidden_act=HF_ACTIVATION_NAMES[cfg.activation], **common)
    specials = {k: getattr(cfg, k) for k in ("bos_id", "eos_id", "pad_id", "mask_id", "glob_id")}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim,
                      logit_scale_init_value=math.log(1 / 0.07), nanovlp_specials=specials)


def export_hf_clip(model, path, write_extra=None):
    """Write model's towers, projections and logit_scale as a new Hugging Face CLIP directory that CLIPModel loads
    with equal outputs; write_extra(directory) writes more files (sample.py export: the tokenizer's)."""
    from transformers import CLIPModel
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists: export_hf_clip writes a new directory")
    cfg = model.cfg
    hf = CLIPModel(hf_clip_config(cfg))
    hf.load_state_dict(state_to_hf_clip(model.state_dict(), cfg), strict=True)
    S = cfg.image_size
    pre = dict(image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": S}, resample=3,
               do_center_crop=True, crop_size={"height": S, "width": S}, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, image_mean=list(cfg.image_mean), image_std=list(cfg.image_std), do_convert_rgb=True)
    with staged_dataset(path) as tmp:  # a directory written whole, or not at all
        hf.save_pretrained(tmp)
        write_file(os.path.join(tmp, "preprocessor_config.json"), json.dumps(pre, indent=2))
        if write_extra is not None:
            write_extra(tmp)


def from_pretrained(name_or_path, text=None, **overrides):
    """A float32 model of a CLIP's towers, a GPT-2's text transformer, or with text= a CLIP's ViT and a GPT-2's text
    transformer; our specials appended. overrides: VLMConfig fields, a ValueError where they contradict the weights."""
    import transformers
    config = hf_config(name_or_path)
    name = name_or_path if text is None else f"{name_or_path} with text={text}"
    if config.model_type == "gpt2":
        if text is not None:
            raise ValueError(f"text={text} goes with a CLIP, but {name_or_path} is a GPT-2")
        text, text_config = name_or_path, config  # the GPT-2 gives the text transformer alone
    elif config.model_type != "clip":
        raise ValueError(f"{name_or_path}: a {type(config).__name__} (model_type {config.model_type!r}); "
                         "from_pretrained reads a CLIP (CLIPConfig) or a GPT-2 (GPT2Config)")
    elif text is not None:
        text_config = hf_config(text)
        if text_config.model_type != "gpt2":
            raise ValueError(f"text={text}: a {type(text_config).__name__} (model_type "
                             f"{text_config.model_type!r}); text= takes a GPT-2")
    clip = config.model_type == "clip"
    fixed = clip_text_fields(config, name_or_path) if text is None else gpt2_fields(text_config, text)
    if clip:  # the towers share layer_norm_eps; text_activation '' when it is the ViT's
        vision = clip_vision_fields(config, name_or_path)
        if vision["layer_norm_eps"] != fixed["layer_norm_eps"]:
            raise ValueError(f"{name}: layer_norm_eps is {vision['layer_norm_eps']} in the vision tower and "
                             f"{fixed['layer_norm_eps']} in the text tower; ours has one layer_norm_eps for both")
        same = fixed["text_activation"] == vision["activation"]
        fixed = {**vision, **fixed, "text_activation": "" if same else fixed["text_activation"]}
    cfg = checked_config(name, mlp_fields(fixed), {**(hf_image_stats(name_or_path) if clip else {}), **overrides})
    model = VLM(cfg).float()
    state = {}
    if clip:
        towers = ("visual", "text") if text is None else ("visual",)
        state = state_from_hf_clip(transformers.CLIPModel.from_pretrained(name_or_path).state_dict(), cfg, towers)
    if text is not None:
        state.update(state_from_hf_gpt2(transformers.GPT2Model.from_pretrained(text).state_dict(), cfg))
    load_into(model, state)
    model.reset_momentum()
    return model


def hf_init(name, text, model_changes, seed):
    """A Hugging Face CLIP or GPT-2 as a starting checkpoint dict: its weights (from_pretrained with the model
    flags given), architecture and tokenizer. The fresh parts are drawn from seed, so every rank starts the same."""
    try:
        with torch.random.fork_rng(devices=[]):  # built on the CPU: no GPU's generator is touched
            torch.manual_seed(seed)
            model = from_pretrained(name, text=text or None, **model_changes)
        kind, bpe = hf_tokenizer(text or name)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--init_from {name}{' --init_text ' + text if text else ''}: {e}") from None
    return {"model": model.state_dict(), "config": {"model": dataclasses.asdict(model.cfg)},
            "tokenizer": {"kind": kind, "bpe": bpe}, "data_path": text or name}

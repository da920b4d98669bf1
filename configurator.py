"""
The command line of train.py: every field of its TrainConfig, of VLMConfig (model.py) and of
WorldConfig (data.py) is a flag, `--key=value` (or `--key value`; a bare `--flag` is true);
`--help` lists them with their defaults and meanings; validate() stops a run whose flags cannot
work before it starts.
"""

import copy
import difflib
import inspect
import os
import re
import typing
from dataclasses import fields

import torch

import prompt
from model import ACTIVATIONS
from parallel import uses_feature_cache

STAGES = ("pretrain", "capfilt", "finetune", "instruct", "prompt")
PRETRAINING = ("pretrain", "finetune")  # the stages whose steps are pretraining steps (every objective)


def config_fields(cfg):
    """{flag: (None, 'model' or 'world': where it lives in a TrainConfig, its type)}; every name is unique."""
    out = {}
    for owner, cls in ((None, type(cfg)), ("model", type(cfg.model)), ("world", type(cfg.world))):
        hints = typing.get_type_hints(cls)
        out.update({f.name: (owner, hints[f.name]) for f in fields(cls) if f.name not in ("model", "world")})
    return out


def parse_value(key, raw, typ):
    """A command-line string as the field's type, or a ValueError saying why not."""
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return raw.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"--{key} takes true or false, got {raw!r}")
    try:
        return tuple(float(x) for x in raw.split(",")) if typ is tuple else typ(raw)
    except ValueError:
        kind = "comma-separated numbers" if typ is tuple else f"a{'n' if typ is int else ''} {typ.__name__}"
        raise ValueError(f"--{key} takes {kind}, got {raw!r}") from None


def flag_lines(obj):
    """'--name=default  meaning' for each field of a config dataclass instance, under its group comments:
    the comment beside each field is its documentation."""
    cls, lines = type(obj), [f"{type(obj).__name__} ({inspect.getsourcefile(type(obj)).rsplit('/', 1)[-1]}):"]
    for line in inspect.getsource(cls).splitlines()[2:]:
        field_line = re.match(r"\s+(\w+): [^=]+=.*?(?:#\s*(.*))?$", line)
        if line.strip().startswith("#"):
            lines.append(f"  {line.strip()[1:].strip()}:")
        elif field_line and field_line.group(1) not in ("model", "world"):
            name, meaning = field_line.group(1), field_line.group(2) or ""
            lines.append(f"    --{name}={getattr(obj, name)!r}".ljust(40) + f" {meaning}")
    return lines


def usage(presets):
    """Every flag, grouped as the configs are, with its default (the small preset's) and its meaning."""
    lines = ["usage: python train.py [--config tiny|small|base] [--key=value ...]", "",
             f"--config  the preset whose values the flags change: {', '.join(presets)} (default small)"]
    defaults = presets["small"]
    for obj in (defaults, defaults.model, defaults.world):
        lines += [""] + flag_lines(obj)
    return "\n".join(lines)


def parse_args(argv, presets):
    """(preset name, {field: value}) from argv; a mistake is a SystemExit naming it, --help prints usage()."""
    known = config_fields(presets["small"])
    preset, overrides, i = "small", {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(usage(presets))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}: flags look like --key=value")
        key, eq, raw = arg[2:].partition("=")
        typ = known[key][1] if key in known else None
        if not eq:  # --key value, or a bare boolean --flag
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if typ is bool and (nxt is None or nxt.startswith("--")):
                raw = "true"
            elif nxt is None:
                raise SystemExit(f"--{key} needs a value")
            else:
                raw, i = nxt, i + 1
        i += 1
        if key == "config":
            if raw not in presets:
                raise SystemExit(f"unknown --config {raw!r}; presets: {', '.join(presets)}")
            preset = raw
        elif key not in known:
            near = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean --{', --'.join(near)}?" if near else ""
            raise SystemExit(f"unknown config key --{key}{hint} (python train.py --help lists every flag)")
        else:
            try:
                overrides[key] = parse_value(key, raw, typ)
            except ValueError as e:
                raise SystemExit(str(e)) from None
    return preset, overrides


def apply_overrides(cfg, overrides):
    cfg = copy.deepcopy(cfg)
    known = config_fields(cfg)
    for key, value in overrides.items():
        owner = known[key][0]
        setattr(cfg if owner is None else getattr(cfg, owner), key, value)
    return cfg


def checked_device(name):
    """name, or an error naming it: not a device name, or a device this machine has not."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type != "cpu" and not (torch.accelerator.is_available() and
                                     torch.accelerator.current_accelerator().type == device.type):
        raise SystemExit(f"--device {name}: this machine has no {device.type} device (--device cpu)")
    return name


def validate(cfg, world_size=None):
    """Stop (SystemExit) on a flag, or a combination of flags, that cannot work, naming the flag, its value
    and what would work, before any work starts. Checks that need the data come when it is read."""
    m, world_size = cfg.model, int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    pretraining, gen_width = cfg.stage in PRETRAINING, m.gen_width or m.text_width // 4

    def one_of(key, value, choices):
        return value in choices, f"--{key} takes {', '.join(map(str, choices[:-1]))} or {choices[-1]}, got {value!r}"

    def at_least(low, owner, keys):
        return [(getattr(owner, k) >= low, f"--{k}={getattr(owner, k)}: must be at least {low}") for k in keys]

    def within(owner, key, low, high, high_open=False):
        v = getattr(owner, key)
        return low <= v and (v < high if high_open else v <= high), \
            f"--{key}={v}: must be in [{low}, {high}{')' if high_open else ']'}"

    w = cfg.world
    checks = [
        (cfg.stage in STAGES, f"unknown --stage {cfg.stage!r}; stages: {', '.join(STAGES)}"),
        one_of("dtype", cfg.dtype, ("auto", "float32", "bfloat16", "float16")),
        one_of("compile", cfg.compile, ("auto", "regional", "true", "false")),
        one_of("converter", m.converter, ("mlp", "resampler")),
        one_of("activation", m.activation, tuple(ACTIVATIONS)),
        one_of("text_activation", m.text_activation, ("", *ACTIVATIONS)),
        one_of("itm_negatives", m.itm_negatives, (0.5, 1, 2)),
        one_of("fused_rows", m.fused_rows, (0.5, 1)),
        one_of("capfilt_tune", cfg.capfilt_tune, ("separate", "shared", "none")),
        *at_least(1, cfg, ("batch_size", "grad_accum", "eval_interval", "eval_images", "log_interval",
                           "ckpt_interval", "shots", "shot_seeds")),
        *at_least(0, cfg, ("max_iters", "warmup_iters", "num_workers", "train_images", "lr", "min_lr",
                           "weight_decay", "grad_clip", "stop_loss", "rerank_k")),
        *at_least(1, m, ("image_size", "patch_size", "vit_width", "vit_layers", "vit_heads", "text_width",
                         "text_layers", "text_heads", "embed_dim", "mlp_ratio", "gen_heads",
                         "n_queries", "n_codes", "queue_size")),
        *at_least(0, m, ("vit_mlp_width", "text_mlp_width")),
        *at_least(1, w, ("n_train", "n_val", "n_test", "n_web", "n_novel_train", "n_novel_val", "n_multi_train",
                         "n_multi_val", "captions_per_image")),
        *at_least(2, w, ("max_images",)), *at_least(3, w, ("grid",)), *at_least(3, m, ("context_length",)),
        within(m, "momentum", 0, 1), within(m, "momentum_alpha", 0, 1), within(m, "text_mask_rate", 0, 1, True),
        within(m, "patch_mask_rate", 0, 1, True), within(w, "web_noise", 0, 1), within(m, "drop_instruction", 0, 1),
        within(m, "drop_images", 0, 1), within(m, "drop_relation", 0, 1),
        (m.itc_temperature > 0, f"--itc_temperature={m.itc_temperature}: must be above 0"),
        (len(m.image_mean) == len(m.image_std) == 3 and min(m.image_std) > 0,
         f"--image_mean and --image_std take 3 numbers each (RGB), the std above 0; got {m.image_mean}, {m.image_std}"),
        (not m.instruct or 3 <= m.answer_length < m.context_length,
         f"--answer_length={m.answer_length}: must be at least 3 and below --context_length={m.context_length}"),
    ]
    checks += [] if not all(ok for ok, _ in checks) else [  # these divide by sizes checked above
        (m.image_size % m.patch_size == 0,
         f"--image_size={m.image_size} is not a multiple of --patch_size={m.patch_size}"),
        (m.vit_width % m.vit_heads == 0 and m.vit_width % 4 == 0,
         f"--vit_width={m.vit_width} must be divisible by --vit_heads={m.vit_heads} and by 4 (its sin-cos positions)"),
        (m.text_width % m.text_heads == 0,
         f"--text_width={m.text_width} is not divisible by --text_heads={m.text_heads}"),
        (0 <= m.gen_width <= m.text_width // 4,
         f"--gen_width={m.gen_width} is more than a quarter of --text_width={m.text_width}"),
        (gen_width % m.gen_heads == 0,
         f"the generator's width {gen_width} is not divisible by --gen_heads={m.gen_heads}"),
    ]
    checks += [
        (m.converter == "mlp" or not (m.image_positions or m.image_axes),
         "--image_positions and --image_axes go with --converter=mlp (the resampler's tokens are its queries)"),
        (m.converter == "mlp" or m.r2d_weight == 0 or not pretraining,
         "--r2d_weight labels each patch, but the resampler's image tokens are its queries: use --converter=mlp "
         "or --r2d_weight=0"),
        (not (m.itm_clean and m.shared_vit_pass),
         "--itm_clean with --shared_vit_pass: the one ViT pass reads the replaced pixels, no clean ones"),
        (m.fused_rows == 1 or not m.shared_vit_pass,
         "--fused_rows=0.5 with --shared_vit_pass: the one ViT pass would read replaced and clean rows"),
        (m.fused_rows == 1 or cfg.batch_size % 2 == 0 or not pretraining,
         f"--fused_rows=0.5 takes every other row: --batch_size must be even, got {cfg.batch_size}"),
        (not m.instruct or 0 < m.keep_ratio <= 1, f"--keep_ratio={m.keep_ratio}: must be in (0, 1]"),
        (0 <= m.pass1_layers <= m.text_layers,
         f"--pass1_layers={m.pass1_layers}: must lie in 0..{m.text_layers} (0: every text block)"),
        (not m.prompt or 0 <= m.text_prompt_depth <= m.text_layers and 0 <= m.image_prompt_depth <= m.vit_layers,
         f"prompt depths {m.text_prompt_depth} (text), {m.image_prompt_depth} (image) must lie in 0..{m.text_layers} "
         f"and 0..{m.vit_layers}, the layers there are"),
        (not m.prompt or not m.couple or m.image_prompt_depth <= m.text_prompt_depth,
         f"coupled image prompts are maps of the text prompts of the same layer: --image_prompt_depth="
         f"{m.image_prompt_depth} is more than --text_prompt_depth={m.text_prompt_depth} (--couple=false frees them)"),
        (0 <= cfg.capfilt_threshold <= 1 and 0 < cfg.capfilt_top_p <= 1 and cfg.capfilt_temperature >= 0,
         "--capfilt_threshold must be in [0, 1], --capfilt_top_p in (0, 1] and --capfilt_temperature >= 0"),
        (not os.path.isfile(cfg.out_dir), f"--out_dir {cfg.out_dir} is a file: give a directory"),
        (cfg.stage == "pretrain" or cfg.init_from or cfg.resume,
         f"--stage {cfg.stage} starts from a pretrained checkpoint: give --init_from PATH"),
        (not cfg.init_text or cfg.init_from, "--init_text goes with --init_from (a Hugging Face CLIP for the ViT)"),
        (not (cfg.train_vit and cfg.stage == "prompt"),
         "--train_vit does not apply to --stage prompt: it trains the prompts on a frozen model"),
        (world_size == 1 or cfg.stage not in ("prompt", "capfilt"), f"--stage {cfg.stage} runs as one process"),
        (world_size == 1 or cfg.stop_loss == 0, "--stop_loss decides on one process's loss: run it as one process"),
        (not (cfg.fsdp and world_size > 1 and cached_steps(cfg)),
         "--fsdp runs the model through its forward pass only; accumulation with cached features (--grad_accum > 1 "
         "with ITC or ITM) calls its parts: use DDP, or --grad_accum=1"),
    ]
    for ok, message in checks:
        if not ok:
            raise SystemExit(message)
    if cfg.device != "auto":
        checked_device(cfg.device)
    if m.prompt:
        try:
            prompt.parse_layers(m.dense_layers, m.vit_layers)
        except ValueError as e:
            raise SystemExit(f"--{e}") from None


def cached_steps(cfg):
    """Whether the run's steps are cached_pretrain_step's (a pretraining stage, uses_feature_cache)."""
    return cfg.stage in PRETRAINING and uses_feature_cache(cfg.model, cfg.grad_accum)

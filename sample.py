"""
Use a trained nanoVLP checkpoint on image files.

    python sample.py caption a.png b.jpg                     # one caption per image (greedy)
    python sample.py caption a.png --temperature=0.8 --top_p=0.9 --num_samples=3
    python sample.py score a.png --texts "a small red circle" "a large blue square"
    python sample.py classify a.png --labels "small red circle" "large blue square" --template "a {}"
    python sample.py --ckpt out-instruct/ckpt.pt answer a.png b.png --question "which image has the most objects?"
    python sample.py --ckpt out-prompt/seed0/ckpt.pt detect a.png --classes star moon --out a.detect.png
    python sample.py export --out clip-hf    # the towers and the tokenizer as a Hugging Face CLIP directory

Every command takes --ckpt (default out/ckpt.pt) and --device. Images of any common mode
(RGB, RGBA, L, P, CMYK, 16-bit) are converted to RGB, resized on the short side and
centre-cropped to the model's image size.
"""

import argparse
import os
import sys

import numpy as np
import torch

import data
from configurator import checked_device
from eval import generate_captions, load_checkpoint
from hf import HF_TOKENIZER_CLASSES, export_hf_clip, hf_tokenizer_files
from prepare import load_image
from prompt import PromptVLM


def load_images(paths, size):
    """uint8 (N, S, S, 3) from image files; an unreadable one stops with its error."""
    try:
        return np.stack([load_image(p, size) for p in paths])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def answer(model, tokenizer, images, question, device):
    """The greedy answer to a question about images (K, H, W, 3), with a checkpoint of the instruct stage."""
    cfg = model.cfg
    if not cfg.instruct:
        raise SystemExit("error: this checkpoint was not trained to answer questions (train.py --stage instruct)")
    if len(images) > cfg.image_slots:
        raise SystemExit(f"error: {len(images)} images, the model takes at most {cfg.image_slots}")
    T = cfg.context_length - cfg.answer_length
    try:
        tokens = data.encode_texts(tokenizer, [question], T)
    except ValueError:
        raise SystemExit(f"error: the question is longer than the model's {T} tokens: {question!r}") from None
    tokens = np.pad(tokens, ((0, 0), (0, cfg.answer_length)), constant_values=cfg.pad_id)
    out = model.answer(model.multi_pixels(images[None]), torch.ones(1, len(images), dtype=torch.bool, device=device),
                       torch.from_numpy(tokens).long().to(device))
    return data.decode_tokens(tokenizer, out[0].tolist())


def detect(model, tokenizer, image, classes, device):
    """The class map (H, W) (0 background, i + 1 classes[i]) and boxes [(name, x0, y0, x1, y1, score)] of image."""
    cfg = model.cfg
    try:
        tokens = data.class_prompt_tokens(tokenizer, classes, cfg.prompt_init, cfg.context_length)
    except ValueError as e:
        raise SystemExit(f"error: a class name is too long for the model's context: {e}") from None
    if not cfg.prompt:  # the prompt stage's detection, with no prompts
        model = PromptVLM.zero_shot(model)
    classmap, _, boxes = model.detect(model.normalize_pixels(image[None]), torch.from_numpy(tokens).long().to(device),
                                      prompted=cfg.prompt)
    return classmap[0].cpu().numpy(), [(classes[c - 1], *rest) for c, *rest in boxes[0]]


# a colour per class (class 1 first); background is left as it is
CLASS_COLOURS = np.array([(255, 60, 60), (60, 220, 60), (70, 120, 255), (255, 220, 0), (255, 0, 255), (0, 230, 230),
                          (255, 140, 0), (160, 90, 255), (255, 255, 255)], np.float64)


def draw_detections(image, classmap, boxes, classes, scale=4):
    """A PIL image: image scaled up, each class's pixels half blended with its colour, boxes with class and score."""
    from PIL import Image, ImageDraw
    fg = (classmap > 0)[..., None]  # class c takes colour c - 1
    out = np.where(fg, 0.5 * image + 0.5 * CLASS_COLOURS.take(classmap.astype(int) - 1, 0, mode="wrap"), image)
    im = Image.fromarray(out.round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1))  # scaled up (nearest)
    draw = ImageDraw.Draw(im)
    for name, x0, y0, x1, y1, s in boxes:
        rgb = tuple(int(v) for v in CLASS_COLOURS.take(classes.index(name), 0, mode="wrap"))
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=rgb, width=2)
        draw.text((x0 * scale + 3, max(0, y0 * scale - 11)), f"{name} {s:.1f}", fill=rgb)
    return im


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="out/ckpt.pt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("caption", help="caption one or more images")
    cap.add_argument("images", nargs="+")
    cap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    cap.add_argument("--top_k", type=int, default=None)
    cap.add_argument("--top_p", type=float, default=None)
    cap.add_argument("--num_samples", type=int, default=1)
    cap.add_argument("--seed", type=int, default=0)
    sc = sub.add_parser("score", help="score an image against texts")
    sc.add_argument("image")
    sc.add_argument("--texts", nargs="+", required=True)
    cl = sub.add_parser("classify", help="zero-shot classify an image among labels")
    cl.add_argument("image")
    cl.add_argument("--labels", nargs="+", required=True)
    cl.add_argument("--template", action="append", default=None,
                    help="prompt with {} for the label; repeat to average several (default 'a {}')")
    ans = sub.add_parser("answer", help="answer a question about several images (an instruct checkpoint)")
    ans.add_argument("images", nargs="+")
    ans.add_argument("--question", required=True)
    det = sub.add_parser("detect", help="detect named classes in an image, write a PNG with the class map and boxes")
    det.add_argument("image")
    det.add_argument("--classes", nargs="+", help="class names (default: the classes the prompts learned)")
    det.add_argument("--out", help="the PNG to write (default: <image>.detect.png)")
    exp = sub.add_parser("export",
                         help="write the ViT, text transformer and projections as a Hugging Face CLIP directory")
    exp.add_argument("--out", required=True,
                     help="the directory to write (transformers.CLIPModel.from_pretrained reads it)")
    args = parser.parse_args(argv)
    if args.command == "caption" and not (args.temperature >= 0 and (args.top_k is None or args.top_k >= 1) and
                                          (args.top_p is None or 0 < args.top_p <= 1) and args.num_samples >= 1):
        cap.error(f"--temperature must be at least 0 (0 is greedy), --top_k at least 1, --top_p in (0, 1] and "
                  f"--num_samples at least 1; got {args.temperature}, {args.top_k}, {args.top_p}, {args.num_samples}")
    for template in (args.template or []) if args.command == "classify" else []:
        rest = template.replace("{}", "", 1)
        if "{}" not in template or "{" in rest or "}" in rest:
            cl.error(f"--template {template!r}: a template holds {{}} once, where the label goes, and no other braces")
    folder = os.path.dirname(os.path.abspath(args.out)) if args.command == "detect" and args.out else ""
    if folder and not os.path.isdir(folder):
        det.error(f"--out {args.out}: the folder {folder} does not exist")

    model, tokenizer, ckpt = load_checkpoint(args.ckpt, checked_device(args.device))
    if args.command == "export":
        tok = ckpt["tokenizer"]
        try:  # with the tokenizer's files: transformers' AutoTokenizer and our --tokenizer and --init_from read them
            export_hf_clip(model, args.out, lambda folder: hf_tokenizer_files(tok["kind"], tok["bpe"], folder))
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: {e}") from None
        print(f"wrote {args.out}: load it with transformers.CLIPModel.from_pretrained({args.out!r}) and "
              f"transformers.AutoTokenizer.from_pretrained({args.out!r}) (a {HF_TOKENIZER_CLASSES[tok['kind']]})")
    elif args.command == "caption":
        images = load_images(args.images, model.cfg.image_size)
        generator = torch.Generator(args.device).manual_seed(args.seed)
        for _ in range(args.num_samples):
            texts = generate_captions(model, tokenizer, images, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, generator=generator)
            for path, text in zip(args.images, texts):
                print(f"{path}: {text}")
    elif args.command == "detect":
        classes = args.classes or [c for c in ckpt["config"].get("classes", "").split(",") if c]
        if not classes:
            raise SystemExit("error: name the classes to detect: --classes NAME [NAME ...]")
        image = load_images([args.image], model.cfg.image_size)[0]
        classmap, boxes = detect(model, tokenizer, image, classes, args.device)
        out = args.out or os.path.splitext(args.image)[0] + ".detect.png"  # beside the image, which was read
        data.write_file(out, lambda f: draw_detections(image, classmap, boxes, classes).save(f, format="PNG"))
        for name, x0, y0, x1, y1, s in boxes:
            print(f"{name:16s} box ({x0}, {y0}, {x1}, {y1})  score {s:.3f}")
        print(f"wrote {out}")
    elif args.command == "answer":
        print(answer(model, tokenizer, load_images(args.images, model.cfg.image_size), args.question, args.device))
    else:  # score, or classify by prompt ensembling: a label's similarity is the mean of its templates'
        names, templates = (args.texts, ["{}"]) if args.command == "score" else (args.labels, args.template or ["a {}"])
        images = load_images([args.image], model.cfg.image_size)
        texts = [t.format(n) for n in names for t in templates]
        tokens, cut = data.encode_truncated(tokenizer, texts, model.cfg.context_length)
        for i in cut:  # as CLIP's tokenizers do, said
            print(f"note: {texts[i]!r} is longer than the model's {model.cfg.context_length - 2} tokens: it reads the "
                  f"first {model.cfg.context_length - 2}", file=sys.stderr)
        text = model.encode_text(torch.from_numpy(tokens).long().to(args.device))
        sim = (model.encode_image(model.normalize_pixels(images)) @ text.t())[0].view(len(names), -1).mean(1)
        prob = (model.logit_scale.exp().clamp(max=100) * sim).softmax(-1)  # at the model's learned temperature
        cos = [f"cos {s:+.3f}  " for s in sim.tolist()] if args.command == "score" else [""] * len(names)
        for i in range(len(names)) if args.command == "score" else prob.argsort(descending=True).tolist():
            print(f"{prob[i].item():7.2%}  {cos[i]}{names[i]}")


if __name__ == "__main__":
    sys.exit(main())

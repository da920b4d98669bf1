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


@torch.no_grad()
def score(model, tokenizer, images, texts, device):
    """(n_images, n_texts) cosine similarities."""
    tokens = torch.from_numpy(data.encode_texts(tokenizer, texts, model.cfg.context_length)).long().to(device)
    return model.encode_image(model.normalize_pixels(images)) @ model.encode_text(tokens).t()


@torch.no_grad()
def answer(model, tokenizer, images, question, device):
    """The greedy answer to a question about images (K, H, W, 3), with a checkpoint of the instruct stage."""
    cfg = model.cfg
    if not cfg.instruct:
        raise SystemExit("error: this checkpoint was not trained to answer questions (train.py --stage instruct)")
    if len(images) > cfg.image_slots:
        raise SystemExit(f"error: {len(images)} images, the model takes at most {cfg.image_slots}")
    try:
        tokens = data.encode_texts(tokenizer, [question], cfg.context_length - cfg.answer_length)
    except ValueError:
        raise SystemExit(f"error: the question is longer than the model's {cfg.context_length - cfg.answer_length} "
                         f"tokens: {question!r}") from None
    tokens = np.pad(tokens, ((0, 0), (0, cfg.answer_length)), constant_values=cfg.pad_id)
    out = model.answer(model.multi_pixels(images[None]), torch.ones(1, len(images), dtype=torch.bool, device=device),
                       torch.from_numpy(tokens).long().to(device))
    return data.decode_tokens(tokenizer, out[0].tolist())


@torch.no_grad()
def detect(model, tokenizer, image, classes, device):
    """The class map (H, W) (0 background, i + 1 classes[i]) and the boxes [(name, x0, y0, x1, y1, score)] in one
    image (H, W, 3); zero-shot unless the checkpoint is of the prompt stage."""
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
    """A PIL image: the image scaled up (nearest), each class's pixels half blended with its colour, and
    each box drawn with its class and score."""
    from PIL import Image, ImageDraw
    out = image.astype(np.float64)
    colour = lambda c: CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]  # noqa: E731
    fg = classmap > 0
    out[fg] = 0.5 * out[fg] + 0.5 * colour(classmap[fg])
    H, W = classmap.shape
    im = Image.fromarray(out.round().astype(np.uint8)).resize((W * scale, H * scale), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    for name, x0, y0, x1, y1, s in boxes:
        rgb = tuple(int(v) for v in colour(classes.index(name) + 1))
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=rgb, width=2)
        draw.text((x0 * scale + 3, max(0, y0 * scale - 11)), f"{name} {s:.1f}", fill=rgb)
    return im


def probabilities(model, sim):
    """Softmax over the last dimension of cosine similarities at the model's learned temperature."""
    return (model.logit_scale.exp().clamp(max=100) * sim).softmax(-1)


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
    det.add_argument("--classes", nargs="+", default=None,
                     help="class names (default: the classes the prompts learned)")
    det.add_argument("--out", default=None, help="the PNG to write (default: <image>.detect.png)")
    exp = sub.add_parser("export",
                         help="write the ViT, text transformer and projections as a Hugging Face CLIP directory")
    exp.add_argument("--out", required=True,
                     help="the directory to write (transformers.CLIPModel.from_pretrained reads it)")
    args = parser.parse_args(argv)

    try:
        model, tokenizer, ckpt = load_checkpoint(args.ckpt, args.device)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    size = model.cfg.image_size
    if args.command == "export":
        tok = ckpt["tokenizer"]
        try:  # with the tokenizer's files: transformers' AutoTokenizer and our --tokenizer and --init_from read them
            export_hf_clip(model, args.out, lambda folder: hf_tokenizer_files(tok["kind"], tok["bpe"], folder))
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: {e}") from None
        print(f"wrote {args.out}: load it with transformers.CLIPModel.from_pretrained({args.out!r}) and "
              f"transformers.AutoTokenizer.from_pretrained({args.out!r}) (a {HF_TOKENIZER_CLASSES[tok['kind']]})")
    elif args.command == "caption":
        images = load_images(args.images, size)
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
        image = load_images([args.image], size)[0]
        classmap, boxes = detect(model, tokenizer, image, classes, args.device)
        out = args.out or os.path.splitext(args.image)[0] + ".detect.png"
        data.write_file(out, lambda f: draw_detections(image, classmap, boxes, classes).save(f, format="PNG"))
        for name, x0, y0, x1, y1, s in boxes:
            print(f"{name:16s} box ({x0}, {y0}, {x1}, {y1})  score {s:.3f}")
        print(f"wrote {out}")
    elif args.command == "answer":
        print(answer(model, tokenizer, load_images(args.images, size), args.question, args.device))
    elif args.command == "score":
        sim = score(model, tokenizer, load_images([args.image], size), args.texts, args.device)[0]
        for text, s, p in zip(args.texts, sim.tolist(), probabilities(model, sim).tolist()):
            print(f"{p:7.2%}  cos {s:+.3f}  {text}")
    else:
        templates = args.template or ["a {}"]
        texts = [t.format(label) for label in args.labels for t in templates]
        sim = score(model, tokenizer, load_images([args.image], size), texts, args.device)[0]
        per_label = sim.view(len(args.labels), len(templates)).mean(1)  # prompt ensembling by mean similarity
        prob = probabilities(model, per_label)
        for i in prob.argsort(descending=True).tolist():
            print(f"{prob[i].item():7.2%}  {args.labels[i]}")


if __name__ == "__main__":
    sys.exit(main())

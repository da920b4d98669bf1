"""
Use a trained nanoVLP checkpoint on image files.

    python sample.py caption a.png b.jpg                     # one caption per image (greedy)
    python sample.py caption a.png --temperature=0.8 --top_p=0.9 --num_samples=3
    python sample.py score a.png --texts "a small red circle" "a large blue square"
    python sample.py classify a.png --labels "small red circle" "large blue square" --template "a {}"
    python sample.py --ckpt out-instruct/ckpt.pt answer a.png b.png --question "which image has the most objects?"

Every command takes --ckpt (default out/ckpt.pt) and --device. Images of any common mode
(RGB, RGBA, L, P, CMYK, 16-bit) are converted to RGB, resized on the short side and
centre-cropped to the model's image size.
"""

import argparse
import sys

import numpy as np
import torch

import data
from eval import generate_captions, load_checkpoint, multi_pixels, to_pixels


def load_images(paths, size):
    try:
        return np.stack([data.load_image(p, size) for p in paths])
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


@torch.no_grad()
def score(model, tokenizer, images, texts, device):
    """(n_images, n_texts) cosine similarities and the softmax over texts at the model's
    temperature, as CLIP scores an image against candidate texts."""
    tokens = data.encode_texts(tokenizer, texts, model.cfg.context_length)
    img = model.encode_image(to_pixels(model, images, device))
    txt = model.encode_text(torch.from_numpy(tokens).long().to(device))
    sim = img @ txt.t()
    return sim, probabilities(model, sim)


@torch.no_grad()
def answer(model, tokenizer, images, question, device):
    """The greedy answer to a question about images (K, H, W, 3), a checkpoint of the instruct stage."""
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
    out = model.answer(multi_pixels(model, images[None], device), torch.ones(1, len(images), dtype=torch.bool, device=device),
                       torch.from_numpy(tokens).long().to(device))
    return data.decode_tokens(tokenizer, out[0].tolist())


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
    args = parser.parse_args(argv)

    try:
        model, tokenizer, _ = load_checkpoint(args.ckpt, args.device)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    size = model.cfg.image_size
    if args.command == "caption":
        images = load_images(args.images, size)
        generator = torch.Generator(args.device).manual_seed(args.seed)
        for _ in range(args.num_samples):
            texts = generate_captions(model, tokenizer, images, args.device, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, generator=generator)
            for path, text in zip(args.images, texts):
                print(f"{path}: {text}")
    elif args.command == "answer":
        print(answer(model, tokenizer, load_images(args.images, size), args.question, args.device))
    elif args.command == "score":
        sim, prob = score(model, tokenizer, load_images([args.image], size), args.texts, args.device)
        for text, s, p in zip(args.texts, sim[0].tolist(), prob[0].tolist()):
            print(f"{p:7.2%}  cos {s:+.3f}  {text}")
    else:
        templates = args.template or ["a {}"]
        texts = [t.format(label) for label in args.labels for t in templates]
        sim, _ = score(model, tokenizer, load_images([args.image], size), texts, args.device)
        per_label = sim[0].view(len(args.labels), len(templates)).mean(1)  # prompt ensembling by mean similarity
        prob = probabilities(model, per_label)
        for i in prob.argsort(descending=True).tolist():
            print(f"{prob[i].item():7.2%}  {args.labels[i]}")


if __name__ == "__main__":
    sys.exit(main())

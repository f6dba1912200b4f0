"""Train the embedded model and its feature classifier (seeded, CPU).

    python -m bench.embedded.train classifier   # ≈1 min on 2 cores
    python -m bench.embedded.train unet         # ≈50 min on 1 core (6,000 steps at batch 128)
    python -m bench.embedded.train dit          # class-conditional DiT, ≈25 min on 1 core

Writes into ``embedded-assets/`` in the current folder (or ``--out``): ``unet/`` and ``dit/``
(diffusers format, EMA weights), ``classifier.safetensors`` and a ``*_train.json`` log with the
settings and the final figures. ``--replace`` writes over the committed assets in
``bench/embedded/assets`` instead, which every committed result was measured with: training is
seeded, but float rounding differs between CPUs and thread counts, so a retrain elsewhere is a
close model, not the same one.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.embedded.data import load_digits_images
from bench.embedded.model import (
    ASSETS,
    DIT_CONFIG,
    NULL_CLASS,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    DigitClassifier,
)


def train_classifier(out: Path, seed: int = 0, epochs: int = 40) -> dict:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    x, y = load_digits_images()
    perm = torch.randperm(len(x))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        for idx in train[torch.randperm(len(train))].split(64):
            # Small shifts make the features robust to the slight offsets of generated digits.
            xb = torch.roll(x[idx], shifts=tuple(torch.randint(-1, 2, (2,)).tolist()), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    save_file(model.state_dict(), str(out / "classifier.safetensors"))
    log = {"seed": seed, "epochs": epochs, "test_accuracy": acc, "n_train": len(train)}
    (out / "classifier_train.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def train_denoiser(
    out: Path,
    what: str = "unet",
    seed: int = 0,
    steps: int = 6000,
    batch: int = 128,
    lr: float = 1e-3,
    ema_decay: float = 0.9995,
    save_every: int = 1000,
    label_drop: float = 0.1,
) -> dict:
    """Train the unconditional UNet (``what="unet"``) or the class-conditional DiT (``"dit"``,
    labels replaced by the null class with probability ``label_drop`` for classifier-free
    guidance) on every digit, with an EMA of the weights."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel

    torch.manual_seed(seed)
    x, y = load_digits_images()
    if what == "dit":
        unet = DiTTransformer2DModel(**DIT_CONFIG)
        # diffusers gives every adaLN block its own label embedder, each drawing its own label
        # dropout; drop labels once per sample here instead, so all blocks agree on the null class.
        for module in unet.modules():
            if hasattr(module, "token_drop"):
                module.dropout_prob = 0.0
    else:
        unet = UNet2DModel(**UNET_CONFIG)
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = 200

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 5 %
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    start, losses = time.time(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(0, len(x), (batch,))
        x0 = x[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        if what == "dit":
            labels = torch.where(torch.rand(batch) < label_drop, NULL_CLASS, y[idx])
            pred = unet(sched.add_noise(x0, noise, t), t, labels).sample
        else:
            pred = unet(sched.add_noise(x0, noise, t), t).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(
                f"step {step + 1} loss {sum(losses[-100:]) / 100:.4f} {time.time() - start:.0f}s", flush=True
            )
        if (step + 1) % save_every == 0 or step + 1 == steps:
            ema.save_pretrained(out / what)
            log = {
                "model": what,
                "seed": seed,
                "steps": step + 1,
                "batch": batch,
                "lr": lr,
                "ema_decay": ema_decay,
                "final_loss_100": sum(losses[-100:]) / 100,
                "train_seconds": round(time.time() - start),
                "torch": torch.__version__,
                "scheduler": SCHEDULER_CONFIG,
                **({"label_drop": label_drop} if what == "dit" else {}),
            }
            (out / f"{what}_train.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["classifier", "unet", "dit"])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=Path("embedded-assets"), help="default: %(default)s")
    where.add_argument("--replace", action="store_true", help=f"write over the committed assets in {ASSETS}")
    parser.add_argument("--steps", type=int, default=6000, help="denoiser steps (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=40, help="classifier epochs (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = ASSETS if args.replace else args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "classifier":
        print(train_classifier(out, epochs=args.epochs))
    else:
        print(train_denoiser(out, args.what, steps=args.steps))
    print(f"wrote {out}" + ("" if args.replace else "; --replace writes over the committed assets"))


if __name__ == "__main__":
    main()

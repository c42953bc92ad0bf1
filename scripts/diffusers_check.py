#!/usr/bin/env python3
"""Checks that a diffusers-layout model folder draws the same images in diffusers'
StableDiffusionPipeline as in `sdserve generate`, from the same initial latents.

Needs torch, diffusers, transformers and safetensors (not part of the test suite):
    python3 scripts/diffusers_check.py --model models/default
"""
import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

PROMPTS = ["two red circles and one blue square", "one yellow triangle", "three green squares"]


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--bin", default="target/release/sdserve")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--min-psnr", type=float, default=40.0)
    args = ap.parse_args()

    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (1, pipe.unet.config.in_channels, args.size // factor, args.size // factor)
    worst = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for i, prompt in enumerate(PROMPTS):
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(i))
            noise = Path(tmp) / f"latents{i}.safetensors"
            save_file({"latents": latents.contiguous()}, str(noise))
            ours_png = Path(tmp) / f"ours{i}.png"
            subprocess.run(
                [args.bin, "generate", "--model", args.model, "--prompt", prompt, "--steps", str(args.steps),
                 "--guidance", str(args.guidance), "--width", str(args.size), "--height", str(args.size),
                 "--scheduler", "ddim", "--latents", str(noise), "-o", str(ours_png)],
                check=True, capture_output=True,
            )
            ours = np.asarray(Image.open(ours_png).convert("RGB"))
            theirs = pipe(prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
                          guidance_scale=args.guidance, latents=latents, output_type="pil").images[0]
            theirs = np.asarray(theirs.convert("RGB"))
            p = psnr(ours, theirs)
            worst = min(worst, p)
            diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
            print(f"{prompt!r}: PSNR {p:.1f} dB, max pixel difference {diff}")
    print(f"{type(pipe.scheduler).__name__}, {args.steps} steps, guidance {args.guidance}: worst PSNR {worst:.1f} dB")
    if worst < args.min_psnr:
        raise SystemExit(f"images differ: worst PSNR {worst:.1f} dB < {args.min_psnr}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Checks that a diffusers-layout model folder (SD 1.x / 2.x or SDXL) draws the same images in
diffusers (StableDiffusionPipeline / StableDiffusionXLPipeline) as in `sdserve generate`, from
the same initial latents, optionally with LoRA adapters loaded by diffusers'
`load_lora_weights` on one side and `--lora` on the other.

Needs torch, diffusers, transformers, peft and safetensors (not part of the test suite):
    python3 scripts/diffusers_check.py --model models/default
    python3 scripts/diffusers_check.py --model tests/fixtures/tiny-sdxl --scheduler euler \\
        --lora tests/fixtures/tiny-sdxl/loras/probe_diffusers.safetensors:0.8
"""
import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, EulerDiscreteScheduler
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

PROMPTS = ["two red circles and one blue square", "one yellow triangle", "three green squares"]
SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def scheduler(name, config):
    """The scheduler as sdserve reads the folder's config: a config written by another class
    (SDXL's Euler) records no DDIM fields, and sdserve then takes the Stable Diffusion
    releases' clip_sample / set_alpha_to_one (false), as SDXL's own config states them."""
    extra = {}
    if name == "ddim" and "set_alpha_to_one" not in config:
        extra = {"clip_sample": False, "set_alpha_to_one": False}
    return SCHEDULERS[name].from_config(config, **extra)


def load_loras(pipe, loras):
    """Loads each FILE:SCALE with diffusers and checks that every module of the file was
    attached (load_lora_weights skips keys it does not recognise)."""
    names, scales = [], []
    for i, (path, scale) in enumerate(loras):
        with safe_open(path, "pt") as f:
            modules = {k.rsplit(".lora", 1)[0] for k in f.keys() if ".lora" in k}
        name = f"l{i}"
        pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name, adapter_name=name)
        attached = sum(
            1 for part in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, part, None) is not None
            for _, m in getattr(pipe, part).named_modules() if hasattr(m, "lora_A") and name in m.lora_A)
        print(f"{path}: {len(modules)} modules in the file, {attached} attached by diffusers")
        if attached != len(modules):
            raise SystemExit(f"diffusers attached {attached} of the {len(modules)} modules of {path}")
        names.append(name)
        scales.append(scale)
    if names:
        pipe.set_adapters(names, adapter_weights=scales)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--bin", default="target/release/sdserve")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    ap.add_argument("--negative-prompt", default=None, help="left out: none (zeros for SDXL)")
    ap.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]")
    ap.add_argument("--min-psnr", type=float, default=40.0)
    args = ap.parse_args()

    torch.set_num_threads(2)
    pipe = DiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler(args.scheduler, pipe.scheduler.config)
    loras = [(f, float(s)) for f, _, s in (l.rpartition(":") if ":" in l else (l, "", "1") for l in args.lora)]
    load_loras(pipe, loras)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (1, pipe.unet.config.in_channels, args.size // factor, args.size // factor)
    worst = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for i, prompt in enumerate(PROMPTS):
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(i))
            noise = Path(tmp) / f"latents{i}.safetensors"
            save_file({"latents": latents.contiguous()}, str(noise))
            ours_png = Path(tmp) / f"ours{i}.png"
            cmd = [args.bin, "generate", "--model", args.model, "--prompt", prompt, "--steps", str(args.steps),
                   "--guidance", str(args.guidance), "--width", str(args.size), "--height", str(args.size),
                   "--scheduler", args.scheduler, "--latents", str(noise), "-o", str(ours_png)]
            if args.negative_prompt is not None:
                cmd += ["--negative-prompt", args.negative_prompt]
            for path, scale in loras:
                cmd += ["--lora", f"{path}:{scale}"]
            subprocess.run(cmd, check=True, capture_output=True)
            ours = np.asarray(Image.open(ours_png).convert("RGB"))
            theirs = pipe(prompt, negative_prompt=args.negative_prompt, height=args.size, width=args.size,
                          num_inference_steps=args.steps, guidance_scale=args.guidance, latents=latents,
                          output_type="pil").images[0]
            theirs = np.asarray(theirs.convert("RGB"))
            p = psnr(ours, theirs)
            worst = min(worst, p)
            diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
            effect = ""
            if loras:
                # How far the adapters move diffusers' own image: the check must not pass by
                # an adapter that does nothing.
                pipe.disable_lora()
                plain = pipe(prompt, negative_prompt=args.negative_prompt, height=args.size, width=args.size,
                             num_inference_steps=args.steps, guidance_scale=args.guidance, latents=latents,
                             output_type="pil").images[0]
                pipe.enable_lora()
                effect = f" (diffusers with vs without the adapters: {psnr(theirs, np.asarray(plain.convert('RGB'))):.1f} dB)"
            print(f"{prompt!r}: PSNR {p:.1f} dB, max pixel difference {diff}{effect}")
    print(f"{type(pipe).__name__}, {type(pipe.scheduler).__name__}, {args.steps} steps, guidance {args.guidance}, "
          f"{len(loras)} LoRA: worst PSNR {worst:.1f} dB")
    if worst < args.min_psnr:
        raise SystemExit(f"images differ: worst PSNR {worst:.1f} dB < {args.min_psnr}")


if __name__ == "__main__":
    main()

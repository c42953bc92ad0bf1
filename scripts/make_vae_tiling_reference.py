#!/usr/bin/env python3
"""Writes tests/fixtures/tiny-sd1/reference/vae_tiled.safetensors: diffusers' tiled VAE decode
(`AutoencoderKL.enable_tiling()`) of the fixture VAE on a latent larger than one tile, and the
untiled decode of the same latent, for tests/vae.rs.

Needs torch, diffusers and safetensors (not part of the test suite):
    python3 scripts/make_vae_tiling_reference.py
"""
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

FIXTURE = Path(__file__).resolve().parent.parent / "tests/fixtures/tiny-sd1"


def main():
    torch.set_num_threads(2)
    vae = AutoencoderKL.from_pretrained(FIXTURE / "vae").eval()
    # The fixture's tiles are 16 latent cells (sample_size 64, 4x down-scaling): 24x40 makes
    # two rows of four tiles, the last ones cut short.
    latents = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = vae.decode(latents).sample
        vae.enable_tiling()
        tiled = vae.decode(latents).sample
    out = FIXTURE / "reference/vae_tiled.safetensors"
    save_file({"latents": latents, "tiled": tiled.contiguous(), "full": full.contiguous()}, str(out))
    print(f"wrote {out}; tiled vs full max abs diff {(tiled - full).abs().max().item():.4f}")


if __name__ == "__main__":
    main()

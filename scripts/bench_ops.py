#!/usr/bin/env python3
"""PyTorch companion of `benches/ops.rs`: runs the same SD 1.5-shaped cases in PyTorch
(2 threads, f32, random weights), interleaved case by case with the Rust benchmark, and
prints the sdserve / PyTorch ratio of wall and CPU seconds per case.

Usage (from the repository root, with torch and diffusers installed; not run by CI; it
builds the benchmark first if needed):

    python3 scripts/bench_ops.py [CASE ...]

Cases: attention, attention_bwd, groupnorm_silu_320, groupnorm_silu_320_bwd,
groupnorm_silu_128, conv3x3_320, conv3x3_320_bwd, unet_256, unet_512, vae_decode_256,
vae_decode_512 (all when none are given).
"""

import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)

ALL = [
    "attention", "attention_bwd", "groupnorm_silu_320", "groupnorm_silu_320_bwd",
    "groupnorm_silu_128", "conv3x3_320", "conv3x3_320_bwd", "unet_256", "vae_decode_256",
    "unet_512", "vae_decode_512",
]

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(case, reps, f):
    f()
    t, c = time.perf_counter(), cpu_seconds()
    for _ in range(reps):
        f()
    return {"case": case, "secs": (time.perf_counter() - t) / reps, "cpu": (cpu_seconds() - c) / reps}


def backward_through(out, r):
    (out * r).sum().backward()


def torch_case(case):
    g = torch.Generator().manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=g)
    if case.startswith("attention"):
        q, k, v = (randn(2, 8, 4096, 40) for _ in range(3))
        if case == "attention":
            with torch.no_grad():
                return timed(case, 3, lambda: F.scaled_dot_product_attention(q, k, v))
        for t in (q, k, v):
            t.requires_grad_(True)
        r = randn(2, 8, 4096, 40)
        return timed(case, 2, lambda: backward_through(F.scaled_dot_product_attention(q, k, v), r))
    if case.startswith("groupnorm_silu"):
        shape = (1, 128, 512, 512) if "128" in case else (2, 320, 64, 64)
        x, w, b = randn(*shape), torch.ones(shape[1]), torch.zeros(shape[1])
        f = lambda: F.silu(F.group_norm(x, 32, w, b, 1e-6))
        if case.endswith("bwd"):
            x.requires_grad_(True)
            r = randn(*shape)
            return timed(case, 5, lambda: backward_through(f(), r))
        with torch.no_grad():
            return timed(case, 5, f)
    if case.startswith("conv3x3_320"):
        x, w, b = randn(2, 320, 64, 64), randn(320, 320, 3, 3) / 54, torch.zeros(320)
        f = lambda: F.conv2d(x, w, b, padding=1)
        if case.endswith("bwd"):
            x.requires_grad_(True)
            r = randn(2, 320, 64, 64)
            return timed(case, 3, lambda: backward_through(f(), r))
        with torch.no_grad():
            return timed(case, 5, f)
    if case.startswith("unet"):
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False)
        side = 64 if case == "unet_512" else 32
        x, ctx = randn(2, 4, side, side), randn(2, 77, 768)
        with torch.no_grad():
            return timed(case, 1, lambda: unet(x, 500, encoder_hidden_states=ctx))
    if case.startswith("vae_decode"):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL(**SD15_VAE).eval().requires_grad_(False)
        side = 64 if case == "vae_decode_512" else 32
        z = randn(1, 4, side, side)
        with torch.no_grad():
            return timed(case, 1, lambda: vae.decode(z))
    raise SystemExit(f"unknown case {case}")


def rust_binary():
    """Builds `benches/ops.rs` (if needed) and returns its executable."""
    out = subprocess.run(
        ["cargo", "bench", "--bench", "ops", "--no-run", "--message-format=json"],
        check=True, capture_output=True, text=True,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "ops" and msg.get("executable"):
            return msg["executable"]
    raise SystemExit("benches/ops.rs was not built")


def rust_case(binary, case):
    out = subprocess.run([binary, case], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    cases = sys.argv[1:] or ALL
    binary = rust_binary()
    print(f"{'case':<24} {'sdserve s':>10} {'torch s':>10} {'ratio':>7} {'cpu ratio':>10}")
    for case in cases:
        r, t = rust_case(binary, case), torch_case(case)
        print(f"{case:<24} {r['secs']:>10.3f} {t['secs']:>10.3f} {r['secs'] / t['secs']:>7.2f} "
              f"{r['cpu'] / max(t['cpu'], 1e-9):>10.2f}", flush=True)


if __name__ == "__main__":
    main()

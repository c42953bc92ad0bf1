#!/usr/bin/env python3
"""Runs the rows of `cargo bench --bench scale` in sdserve and in diffusers / PyTorch, on the
same weights and the same initial latents, interleaved in one run, and prints the ratios.

Each row runs in a fresh process on each side, so its peak RSS (weights included) is its own.
AlignProp rows follow the AlignProp reference: peft LoRA (r = 4, alpha = 4, gaussian init) on
to_q / to_k / to_v / to_out.0, the steps before the gradient window without grad, every UNet
call in the window under torch.utils.checkpoint, the VAE decode and the reward differentiated,
gradient-norm clipping and AdamW.

Needs torch, diffusers, transformers, peft and safetensors (not part of the test suite):
    python3 scripts/bench_scale.py --model bench-models/sd15-random
    python3 scripts/bench_scale.py --model models/default --rows align@64/k1/s10,align@64/k2/s10,align@64/k10/s10/b2,generate@64/s20 --reps 5
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photo of an astronaut riding a horse on the moon"
GUIDANCE = 7.5
UNET_T = 501
DEFAULT_ROWS = "text,unet@256,unet@512,vae@256,vae@512,generate@512/s4,align@256/k1/s4,align@256/k2/s4"


def parse_row(row):
    if row == "text":
        return {"kind": "text"}
    kind, rest = row.split("@")
    parts = rest.split("/")
    spec = {"kind": kind, "size": int(parts[0]), "batch": 1}
    names = {"k": "k", "s": "steps", "b": "batch"}
    for p in parts[1:]:
        spec[names[p[0]]] = int(p[1:])
    return spec


def vae_scale(model):
    cfg = json.loads((Path(model) / "vae" / "config.json").read_text())
    return 2 ** (len(cfg["block_out_channels"]) - 1)


# ---------------------------------------------------------------- the PyTorch side (child)

def torch_row(args):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    spec = parse_row(args.child)
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - t0
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, te):
        m.requires_grad_(False)
        m.eval()
    sf = vae.config.scaling_factor
    inputs = load_file(args.inputs)

    def latents(size, batch=1):
        f = vae_scale(args.model)
        x = inputs[f"latents_{size // f}x{size // f}"]
        return torch.cat([x] * batch)

    def encode():
        ids = tok(["", PROMPT], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return te(ids)[0]

    def guided(x, t, ctx):
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
        uncond, cond = out.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    def decode(x):
        return (vae.decode(x / sf).sample / 2 + 0.5).clamp(0, 1)

    with torch.no_grad():
        ctx = encode()
    kind = spec["kind"]
    if kind == "text":
        def work():
            with torch.no_grad():
                return encode().abs().mean().item()
    elif kind == "unet":
        x = latents(spec["size"])

        def work():
            with torch.no_grad():
                return guided(x, UNET_T, ctx).abs().mean().item()
    elif kind == "vae":
        x = latents(spec["size"])

        def work():
            with torch.no_grad():
                return decode(x).mean().item()
    elif kind == "generate":
        x = latents(spec["size"])

        def work():
            img = pipe(PROMPT, height=spec["size"], width=spec["size"], num_inference_steps=spec["steps"],
                       guidance_scale=GUIDANCE, latents=x, output_type="np").images
            return float(img.mean())
    elif kind == "align":
        from peft import LoraConfig
        from torch.utils.checkpoint import checkpoint

        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(spec["steps"])
        x_t = latents(spec["size"], spec["batch"])
        batch_ctx = torch.cat([ctx[:1].repeat(spec["batch"], 1, 1), ctx[1:].repeat(spec["batch"], 1, 1)])
        first = len(sched.timesteps) - spec["k"]

        def work():
            latent = x_t
            for i, t in enumerate(sched.timesteps):
                if i < first:
                    with torch.no_grad():
                        eps = guided(latent, t, batch_ctx)
                else:
                    eps = checkpoint(guided, latent, t, batch_ctx, use_reentrant=False)
                latent = sched.step(eps, t, latent).prev_sample
            loss = -decode(latent).flatten(1).mean(1).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
    else:
        raise SystemExit(f"unknown row {args.child}")

    times, check = [], None
    for i in range(args.reps):
        t0 = time.perf_counter()
        value = work()
        times.append(time.perf_counter() - t0)
        if i == 0:
            check = value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"row": args.child, "seconds": min(times), "times": times, "check": check, "peak_rss": peak,
                      "threads": torch.get_num_threads(), "load_seconds": load_seconds}))


# ---------------------------------------------------------------- the driver

def bench_executable():
    out = subprocess.run(["cargo", "bench", "--locked", "--bench", "scale", "--no-run", "--message-format=json"],
                         check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "scale" and msg.get("executable"):
            return msg["executable"]
    raise SystemExit("cargo did not report the scale bench executable")


def run_json(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    ap.add_argument("--reps", type=int, default=1, help="runs per row and side in one process (fastest kept)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds per row (fastest kept)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return torch_row(args)

    import torch
    from safetensors.torch import save_file

    exe = bench_executable()
    rows = args.rows.split(",")
    f = vae_scale(args.model)
    sizes = {parse_row(r)["size"] for r in rows if "size" in parse_row(r)} or {8 * f}
    gen = torch.Generator().manual_seed(0)
    latents = {f"latents_{s // f}x{s // f}": torch.randn((1, 4, s // f, s // f), generator=gen) for s in sorted(sizes)}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "inputs.safetensors")
        save_file(latents, inputs)
        ours_cmd = [exe, "--model", args.model, "--in-process", "--reps", str(args.reps), "--inputs", inputs]
        theirs_cmd = [sys.executable, __file__, "--model", args.model, "--reps", str(args.reps), "--inputs", inputs,
                      "--threads", str(args.threads)]
        print(f"{args.model}; torch {torch.__version__} on {args.threads} threads; interleaved, {args.rounds} round(s) "
              f"x {args.reps} rep(s), fastest kept")
        print(f"| row | sdserve s | PyTorch s | time ratio | sdserve peak RSS GB | PyTorch peak RSS GB | RSS ratio "
              f"| check sdserve / PyTorch |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in rows:
            ours, theirs = [], []
            for r in range(args.rounds):
                pair = [(ours, ours_cmd + ["--rows", row]), (theirs, theirs_cmd + ["--child", row])]
                for sink, cmd in (pair if r % 2 == 0 else pair[::-1]):
                    out = run_json(cmd)
                    if out:
                        sink.append(out)
            if not ours or not theirs:
                print(f"| {row} | {'failed' if not ours else ''} | {'failed' if not theirs else ''} | | | | | |")
                continue
            a = min(o["seconds"] for o in ours)
            b = min(t["seconds"] for t in theirs)
            ra = max(o["peak_rss"] for o in ours) / 1e9
            rb = max(t["peak_rss"] for t in theirs) / 1e9
            print(f"| {row} | {a:.3f} | {b:.3f} | {a / b:.2f} | {ra:.2f} | {rb:.2f} | {ra / rb:.2f} "
                  f"| {ours[0]['check']:.6g} / {theirs[0]['check']:.6g} |", flush=True)


if __name__ == "__main__":
    main()

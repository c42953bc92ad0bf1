#!/usr/bin/env python3
"""Writes a diffusers/peft LoRA file in kohya naming: `lora_unet_…`, `lora_te_…` (SD 1.x/2.x)
or `lora_te1_…` / `lora_te2_…` (SDXL), text-encoder names with transformers' `text_model_`
prefix, every module with alpha = rank / 2 and its up weight doubled, so that it applies the
same update as the input. Made the test fixtures' kohya files (not part of the test suite).

usage: python3 scripts/kohya_from_diffusers.py IN.safetensors OUT.safetensors [--sdxl]
"""
import argparse

import torch
from safetensors.torch import load_file, save_file

SUFFIXES = {
    ".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
    ".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",
    ".lora_linear_layer.down.weight": "lora_down.weight", ".lora_linear_layer.up.weight": "lora_up.weight",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--sdxl", action="store_true", help="name the text encoders te1 / te2")
    args = ap.parse_args()
    te = ("lora_te1_", "lora_te2_") if args.sdxl else ("lora_te_", None)
    prefixes = {"unet.": "lora_unet_", "text_encoder.": te[0], "text_encoder_2.": te[1]}
    out = {}
    for key, value in load_file(args.input).items():
        pre = next(p for p in prefixes if key.startswith(p))
        if prefixes[pre] is None:
            raise SystemExit(f"{key}: a second text encoder needs --sdxl")
        body = key[len(pre):]
        suffix = next(s for s in SUFFIXES if body.endswith(s))
        module = body[: -len(suffix)]
        if pre != "unet." and not module.startswith("text_model."):
            module = "text_model." + module
        name = prefixes[pre] + module.replace(".", "_")
        role = SUFFIXES[suffix]
        out[f"{name}.{role}"] = value * 2.0 if role == "lora_up.weight" else value
        if role == "lora_down.weight":
            out[f"{name}.alpha"] = torch.tensor(value.shape[0] / 2.0)
    save_file(out, args.output)
    print(f"{len(out)} tensors -> {args.output}")


if __name__ == "__main__":
    main()

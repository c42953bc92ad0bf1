#!/usr/bin/env python3
"""Adds reference cases to the test fixtures (tests/fixtures/tiny-sd1, tiny-sdxl) that the
shared fixtures do not have, drawn by diffusers from the fixtures' own stored initial latents:

- tiny-sd1: the Euler discrete scheduler, and a LoRA on the UNet attention and the text
  encoder (`loras/te_probe_diffusers.safetensors` as `save_lora_weights` writes it with
  transformers 5, and `te_probe_kohya.safetensors`, the same weights in kohya naming).
- tiny-sdxl: no negative prompt (zero embeddings by `force_zeros_for_empty_prompt`), the Euler
  scheduler with trailing / linspace timestep spacing and with Karras sigmas, the whole
  pipeline in float16 (VAE upcast to float32 by `force_upcast`), and a kohya LoRA in the
  original Stability UNet naming sd-scripts writes for SDXL (`lora_unet_input_blocks_…`) on
  every linear and convolution of the UNet (`loras/locon_sgm_kohya.safetensors`).

Writes reference/<case>.safetensors (`image`, HxWx3 in [0, 1]) and .png, and
reference/extra_manifest.json, whose cases may carry `scheduler_config` overrides and a
`dtype`. Needs torch, diffusers, transformers, peft (not part of the test suite):
    python3 scripts/make_extra_references.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline)
from PIL import Image
from safetensors.torch import load_file, save_file

torch.set_num_threads(2)
torch.set_grad_enabled(False)
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
PROMPT = "two red circles and a blue square"


def draw(pipe, dir, cases, name, steps, guidance, scheduler, neg="", sched_cfg=None, loras=None, dtype="f32"):
    overrides = dict(sched_cfg or {})
    # Always from the folder's own scheduler config, not the previous case's.
    base = pipe.__dict__.setdefault("_folder_scheduler_config", pipe.scheduler.config)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(base, clip_sample=False, set_alpha_to_one=False)
    else:
        pipe.scheduler = EulerDiscreteScheduler.from_config(base, **overrides)
    latents = load_file(dir / "reference" / "components.safetensors")["vae_latents"].to(pipe.unet.dtype)
    img = pipe(PROMPT, negative_prompt=neg, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
               latents=latents, output_type="np").images[0]
    img = np.asarray(img, dtype=np.float32)
    Image.fromarray((img * 255).round().astype(np.uint8)).save(dir / "reference" / f"{name}.png")
    save_file({"image": torch.from_numpy(img.copy()).contiguous()}, str(dir / "reference" / f"{name}.safetensors"))
    cases.append({"name": name, "scheduler": scheduler, "eta": 0.0, "steps": steps, "guidance_scale": guidance,
                  "prompt": PROMPT, "negative_prompt": neg, "height": 64, "width": 64, "loras": loras or [],
                  "scheduler_config": overrides, "dtype": dtype})
    print(name, "done", flush=True)


def write_manifest(dir, cases):
    import diffusers
    manifest = {"made_with": {"diffusers": diffusers.__version__, "torch": torch.__version__},
                "script": "scripts/make_extra_references.py", "cases": cases}
    (dir / "reference" / "extra_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def text_encoder_lora(pipe, dir):
    """A rank-4 LoRA on the UNet attention and the text encoder's q/k/v/out, as diffusers saves it."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    torch.manual_seed(11)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]), adapter_name="te_probe")
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                            pipe.text_encoder, adapter_name="te_probe")
    for m in (pipe.unet, pipe.text_encoder):
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    u = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name="te_probe"))
    t = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder, adapter_name="te_probe"))
    StableDiffusionPipeline.save_lora_weights(dir / "loras", unet_lora_layers=u, text_encoder_lora_layers=t,
                                              weight_name="te_probe_diffusers.safetensors", safe_serialization=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "kohya_from_diffusers.py"),
                    str(dir / "loras" / "te_probe_diffusers.safetensors"),
                    str(dir / "loras" / "te_probe_kohya.safetensors")], check=True)


def sgm_name(path, layers_per_block):
    """The original (sgm) UNet module name of a diffusers UNet module path."""
    per = layers_per_block + 1
    outside = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2"}
    if path in outside:
        return outside[path]
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    p = path.split(".")
    if p[0] == "mid_block":
        seq = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
        inner = ".".join(p[3:])
        return f"middle_block.{seq}." + (resnet.get(inner, inner) if p[1] == "resnets" else inner)
    block, kind, layer, inner = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
    if p[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * per}.0.op"
        return f"input_blocks.{1 + block * per + layer}.{['resnets', 'attentions'].index(kind)}." + (
            resnet.get(inner, inner) if kind == "resnets" else inner)
    if kind == "upsamplers":
        return f"output_blocks.{block * per + layers_per_block}.2.{inner}"
    return f"output_blocks.{block * per + layer}.{['resnets', 'attentions'].index(kind)}." + (
        resnet.get(inner, inner) if kind == "resnets" else inner)


def sgm_kohya_lora(pipe, dir):
    """A rank-4 kohya LoRA (alpha 2) on every linear and convolution of the UNet, named as
    sd-scripts names SDXL modules; diffusers must attach every module of it."""
    gen = torch.Generator().manual_seed(13)
    out = {}
    lpb = pipe.unet.config.layers_per_block
    for name, m in pipe.unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = m.weight
        down = torch.randn((4,) + tuple(w.shape[1:]), generator=gen) * 0.3
        up = torch.randn((w.shape[0], 4) + ((1, 1) if w.dim() == 4 else ()), generator=gen) * 0.3
        key = "lora_unet_" + sgm_name(name, lpb).replace(".", "_")
        out.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)})
    save_file(out, str(dir / "loras" / "locon_sgm_kohya.safetensors"))
    return len(out) // 3


def sd1():
    dir = FIXTURES / "tiny-sd1"
    load = lambda: StableDiffusionPipeline.from_pretrained(dir, safety_checker=None, requires_safety_checker=False)
    pipe = load()
    pipe.set_progress_bar_config(disable=True)
    cases = []
    draw(pipe, dir, cases, "euler10_cfg7.5", 10, 7.5, "euler")
    text_encoder_lora(pipe, dir)
    pipe = load()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(dir / "loras", weight_name="te_probe_diffusers.safetensors", adapter_name="te_probe")
    assert any("lora" in n for n, _ in pipe.text_encoder.named_parameters()), "text encoder LoRA not loaded"
    pipe.set_adapters(["te_probe"], adapter_weights=[0.8])
    draw(pipe, dir, cases, "ddim10_cfg7.5_te_probe_diffusers_0.8", 10, 7.5, "ddim",
         loras=[{"file": "loras/te_probe_diffusers.safetensors", "scale": 0.8}])
    write_manifest(dir, cases)


def sdxl():
    dir = FIXTURES / "tiny-sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(dir)
    pipe.set_progress_bar_config(disable=True)
    cases = []
    draw(pipe, dir, cases, "ddim10_cfg5_noneg", 10, 5.0, "ddim", neg=None)
    draw(pipe, dir, cases, "euler8_cfg5_trailing", 8, 5.0, "euler", sched_cfg={"timestep_spacing": "trailing"})
    draw(pipe, dir, cases, "euler8_cfg5_linspace", 8, 5.0, "euler", sched_cfg={"timestep_spacing": "linspace"})
    draw(pipe, dir, cases, "euler8_cfg5_karras", 8, 5.0, "euler", sched_cfg={"use_karras_sigmas": True})
    modules = sgm_kohya_lora(pipe, dir)
    pipe.load_lora_weights(dir / "loras", weight_name="locon_sgm_kohya.safetensors", adapter_name="sgm")
    attached = sum(1 for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "sgm" in m.lora_A)
    assert attached == modules, f"diffusers attached {attached} of {modules} modules"
    pipe.set_adapters(["sgm"], adapter_weights=[0.8])
    draw(pipe, dir, cases, "euler8_cfg5_locon_sgm_kohya_0.8", 8, 5.0, "euler",
         loras=[{"file": "loras/locon_sgm_kohya.safetensors", "scale": 0.8}])
    pipe = StableDiffusionXLPipeline.from_pretrained(dir, dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    draw(pipe, dir, cases, "euler8_cfg5_noneg_f16", 8, 5.0, "euler", neg=None, dtype="f16")
    write_manifest(dir, cases)


if __name__ == "__main__":
    sd1()
    sdxl()

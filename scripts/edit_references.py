"""Reference images for image edits (image-to-image and inpainting) on the tiny-sd1 and
tiny-sdxl test fixtures, made with diffusers' StableDiffusionImg2ImgPipeline /
StableDiffusionInpaintPipeline and their SDXL counterparts (4-channel UNet: the mask-blending
path). Not run by CI (it needs torch); the outputs are committed and tests/edits.rs checks
sdserve against them.

usage: python3 scripts/edit_references.py [FIXTURES_DIR]
       (FIXTURES_DIR defaults to tests/fixtures)

Writes FIXTURES_DIR/tiny-sd1/reference/edits/ and FIXTURES_DIR/tiny-sdxl/reference/edits/:
- init.png: the input image (64x64 shapes on a light background); mask.png: the inpainting mask
  (grayscale, white = repaint, with a soft edge that diffusers binarises at 0.5).
- <case>.safetensors: `image` (HxWx3 in [0, 1]) and the two Gaussian draws the pipeline made,
  `posterior_noise` (the VAE encoder's sample) and `noise` (added to the image latents), so
  that another implementation can replay them; manifest.json lists the cases.
"""
import json
import os
import sys

import numpy as np
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline)
from PIL import Image, ImageDraw
from safetensors.torch import save_file

torch.set_num_threads(2)
torch.set_grad_enabled(False)

FIXTURES = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
PROMPT = "two red circles and a blue square"

# ---- inputs
init = Image.new("RGB", (64, 64), (235, 228, 210))
draw = ImageDraw.Draw(init)
draw.ellipse((6, 8, 26, 28), fill=(200, 30, 30))
draw.ellipse((36, 30, 58, 52), fill=(190, 40, 35))
draw.rectangle((8, 38, 28, 58), fill=(30, 50, 190))

mask = Image.new("L", (64, 64), 0)
ImageDraw.Draw(mask).rectangle((30, 4, 60, 34), fill=255)
ImageDraw.Draw(mask).rectangle((26, 4, 29, 34), fill=120)  # below 0.5: kept
ImageDraw.Draw(mask).rectangle((30, 35, 60, 37), fill=140)  # above 0.5: repainted


# ---- record every Gaussian draw diffusers makes (encoder sample, then the noise)
import diffusers.models.autoencoders.vae as vae_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as xl_img2img_module
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as xl_inpaint_module

draws = []
original_randn = vae_module.randn_tensor


def recording_randn(*args, **kwargs):
    t = original_randn(*args, **kwargs)
    draws.append(t.clone())
    return t


for module in (vae_module, img2img_module, inpaint_module, xl_img2img_module, xl_inpaint_module):
    module.randn_tensor = recording_randn


def scheduler(kind, config):
    if kind == "ddim":
        # SDXL's Euler config records no DDIM fields; sdserve then takes the SD releases'
        # clip_sample / set_alpha_to_one (false), as scripts/diffusers_check.py does
        extra = {} if "set_alpha_to_one" in config else {"clip_sample": False, "set_alpha_to_one": False}
        return DDIMScheduler.from_config(config, **extra)
    if kind == "euler":
        return EulerDiscreteScheduler.from_config(config)
    return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=kind == "dpmpp_2m_karras")


FIXTURE, OUT, SDXL = None, None, False
cases = []


def start(name, sdxl):
    """Writes the following cases for fixture `name`."""
    global FIXTURE, OUT, SDXL
    FIXTURE, SDXL = os.path.join(FIXTURES, name), sdxl
    OUT = os.path.join(FIXTURE, "reference", "edits")
    os.makedirs(OUT, exist_ok=True)
    init.save(os.path.join(OUT, "init.png"))
    mask.save(os.path.join(OUT, "mask.png"))
    cases.clear()


def finish():
    json.dump({"made_with": {"diffusers": __import__("diffusers").__version__, "torch": torch.__version__},
               "image": "init.png", "cases": cases}, open(os.path.join(OUT, "manifest.json"), "w"), indent=1)
    print("ok", OUT)


def run(name, inpaint, kind, steps, strength, guidance, lora=None, negative=""):
    if SDXL:
        cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLImg2ImgPipeline
        pipe = cls.from_pretrained(FIXTURE)
    else:
        cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionImg2ImgPipeline
        pipe = cls.from_pretrained(FIXTURE, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler(kind, pipe.scheduler.config)
    if lora:
        pipe.load_lora_weights(os.path.join(FIXTURE, "loras"), weight_name=lora[0], adapter_name="a")
        pipe.set_adapters(["a"], adapter_weights=[lora[1]])
    draws.clear()
    kwargs = dict(mask_image=mask, height=64, width=64) if inpaint else {}
    out = pipe(PROMPT, negative_prompt=negative, image=init, strength=strength, num_inference_steps=steps,
               guidance_scale=guidance, generator=torch.Generator().manual_seed(7), output_type="np", **kwargs).images[0]
    # img2img draws [encoder sample, noise]; inpaint also samples the masked image last (unused
    # by a 4-channel UNet)
    assert len(draws) == (3 if inpaint else 2), [d.shape for d in draws]
    save_file({"image": torch.from_numpy(out.copy()).contiguous(), "posterior_noise": draws[0].contiguous(),
               "noise": draws[1].contiguous()}, os.path.join(OUT, name + ".safetensors"))
    Image.fromarray((out * 255).round().astype(np.uint8)).save(os.path.join(OUT, name + ".png"))
    cases.append({"name": name, "mask": "mask.png" if inpaint else None, "scheduler": kind, "steps": steps,
                  "strength": strength, "guidance_scale": guidance, "prompt": PROMPT, "negative_prompt": negative,
                  "lora": {"file": "loras/" + lora[0], "scale": lora[1]} if lora else None})
    print(name, "ok")


start("tiny-sd1", sdxl=False)
run("img2img_ddim_s0.6", False, "ddim", 10, 0.6, 7.5)
run("img2img_ddim_s1_cfg1", False, "ddim", 4, 1.0, 1.0)
run("img2img_dpmpp_2m_karras_s0.75_probe", False, "dpmpp_2m_karras", 12, 0.75, 5.0,
    lora=("probe_diffusers.safetensors", 0.8))
run("inpaint_ddim_s0.8", True, "ddim", 10, 0.8, 7.5)
run("inpaint_ddim_s1", True, "ddim", 10, 1.0, 7.5)
run("inpaint_dpmpp_2m_s0.7_cfg1", True, "dpmpp_2m", 10, 0.7, 1.0)
finish()

# SDXL (Euler, its default; no negative prompt: zero embeddings, as force_zeros_for_empty_prompt)
start("tiny-sdxl", sdxl=True)
run("sdxl_img2img_euler_s0.6", False, "euler", 10, 0.6, 5.0, negative=None)
run("sdxl_inpaint_euler_s0.8", True, "euler", 10, 0.8, 5.0, negative="a green triangle")
run("sdxl_inpaint_ddim_s1_cfg1", True, "ddim", 6, 1.0, 1.0, negative=None)
finish()

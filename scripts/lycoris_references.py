"""Reference adapter files and images for LyCORIS (LoHa, LoKr, LoCon with `lora_mid`) and DoRA
on the tiny-sd1 test fixture, made with peft / diffusers. Not run by CI (it needs torch); the
outputs are committed and tests/lycoris.rs checks sdserve against them.

usage: python3 scripts/lycoris_references.py [FIXTURE_DIR]
       (FIXTURE_DIR defaults to tests/fixtures/tiny-sd1)

Writes, under FIXTURE_DIR:
- loras/loha_kohya.safetensors: LoHa (`hada_w1_a` ...) in LyCORIS/kohya naming on the UNet
  attention projections, the resnet `conv1` kernels as Tucker (`hada_t1`/`hada_t2`), the 1x1
  `proj_in` and the text encoder's q/v projections; alpha = rank / 2. Reference: peft's LoHa
  layers injected into the pipeline.
- loras/lokr_kohya.safetensors: LoKr with every factor form (full / low-rank `w1`, full /
  low-rank / Tucker `w2`); LyCORIS's scale (alpha / rank when a factor is low-rank, else 1).
  Reference: peft's LoKr layers.
- loras/locon_mid_kohya.safetensors: LoCon (`lora_down` / `lora_mid` / `lora_up`, Tucker) on
  the resnet convs plus plain LoRA on linears. Reference: the delta that A1111 builds from
  `lora_mid` (`einsum('n m k l, i n, m j -> i j k l', mid, up, down)`), merged into the weights.
- loras/dora_diffusers.safetensors: a DoRA adapter (`lora_magnitude_vector`) on linears and
  convs, as diffusers' `save_lora_weights` writes peft's state dict (alpha in the metadata).
  Reference: diffusers' `load_lora_weights`.
- loras/dora_kohya.safetensors: the same adapter in kohya naming with `dora_scale` in
  LyCORIS's shapes (`[out, 1]`, `[out, 1, 1, 1]`); it must give the `dora_diffusers` image.
- loras/dora_in_kohya.safetensors: DoRA decomposed along the input axis (LyCORIS with
  `wd_on_out=False`, what A1111 implements: `dora_scale` of shape `[1, in, ...]`). Reference:
  the weight `(W + s·ΔW) · m / ||W + s·ΔW||` (norm per input channel), merged.
- reference/lycoris/<case>.safetensors (`image`, HxWx3 in [0, 1]) and manifest.json.
"""
import json
import os
import sys

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.lycoris_utils import LycorisLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

torch.set_num_threads(2)
torch.set_grad_enabled(False)

FIXTURE = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/tiny-sd1"
LORAS = os.path.join(FIXTURE, "loras")
REF = os.path.join(FIXTURE, "reference", "lycoris")
os.makedirs(REF, exist_ok=True)
LATENTS = load_file(os.path.join(FIXTURE, "reference", "components.safetensors"))["vae_latents"]
PROMPT, NEG, STEPS, GUIDANCE = "two red circles and a blue square", "", 10, 7.5
cases = []


def fresh():
    pipe = StableDiffusionPipeline.from_pretrained(FIXTURE, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe):
    return pipe(PROMPT, negative_prompt=NEG, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64,
                width=64, latents=LATENTS.clone(), output_type="np").images[0]


def psnr(a, b):
    return 10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-20))


BASE = run(fresh())


def record(name, image, loras):
    """Stores a case; `loras` is [(file, weight)]."""
    save_file({"image": torch.from_numpy(image.copy()).contiguous()}, os.path.join(REF, name + ".safetensors"))
    cases.append({"name": name, "scheduler": "ddim", "eta": 0.0, "steps": STEPS, "guidance_scale": GUIDANCE,
                  "prompt": PROMPT, "negative_prompt": NEG, "height": 64, "width": 64,
                  "image": name, "loras": [{"file": "loras/" + f, "scale": w} for f, w in loras]})
    print(f"{name}: PSNR vs no adapter {psnr(image, BASE):.1f} dB")


def kohya(component, path):
    return ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")


def lycoris_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LycorisLayer)]


def randomise(model, adapter, std):
    gen = torch.Generator().manual_seed(sum(map(ord, adapter)))
    for n, p in model.named_parameters():
        if f".{adapter}" in n or n.endswith(adapter):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def set_scale(models, adapter, weight):
    for model in models:
        for _, m in lycoris_layers(model):
            m.set_scale(adapter, weight)


def te_path(name):
    """transformers 5 names the text encoder's modules without `text_model.`."""
    return name if name.startswith("text_model.") else "text_model." + name


# ---------------------------------------------------------------------------------------------
# LoHa
pipe = fresh()
loha = LoHaConfig(r=4, alpha=2.0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"],
                  use_effective_conv2d=True, init_weights=False)
inject_adapter_in_model(loha, pipe.unet, "loha")
inject_adapter_in_model(LoHaConfig(r=4, alpha=2.0, target_modules=["q_proj", "v_proj"], init_weights=False),
                        pipe.text_encoder, "loha")
randomise(pipe.unet, "loha", 0.35)
randomise(pipe.text_encoder, "loha", 0.35)
tensors = {}
for component, model in (("unet", pipe.unet), ("te", pipe.text_encoder)):
    for n, m in lycoris_layers(model):
        path = n if component == "unet" else te_path(n)
        for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"):
            if "loha" in getattr(m, k):
                tensors[f"{kohya(component, path)}.{k}"] = getattr(m, k)["loha"].detach().clone().contiguous()
        tensors[f"{kohya(component, path)}.alpha"] = torch.tensor(2.0)
save_file(tensors, os.path.join(LORAS, "loha_kohya.safetensors"))
set_scale([pipe.unet, pipe.text_encoder], "loha", 0.8)
record("loha_0.8", run(pipe), [("loha_kohya.safetensors", 0.8)])
LOHA_UNET, LOHA_TE = pipe.unet, pipe.text_encoder

# ---------------------------------------------------------------------------------------------
# LoKr: every factor form. peft scales by alpha / r; LyCORIS by alpha / rank when a factor is
# low-rank and by 1 when both are full, so each layer's peft alpha is set to give LyCORIS's scale.
pipe = fresh()
lokr = LoKrConfig(r=2, alpha=1.0, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in", "ff.net.2"],
                  use_effective_conv2d=True, decompose_both=True, init_weights=False)
inject_adapter_in_model(lokr, pipe.unet, "lokr")
randomise(pipe.unet, "lokr", 0.4)
gen = torch.Generator().manual_seed(11)
tensors = {}


def full(m, which):
    """Replaces a low-rank LoKr factor by a full one."""
    a, b = getattr(m, f"lokr_{which}_a"), getattr(m, f"lokr_{which}_b")
    if "lokr" in a:
        w = a["lokr"] @ b["lokr"]
        del a["lokr"], b["lokr"]
        getattr(m, f"lokr_{which}")["lokr"] = torch.nn.Parameter(w + torch.randn(w.shape, generator=gen) * 0.1)


for n, m in lycoris_layers(pipe.unet):
    file_alpha = 1.0
    if n.endswith("attn1.to_v"):
        # both factors full: LyCORIS ignores alpha (scale 1); the file's alpha says 7 to prove it
        full(m, "w1")
        full(m, "w2")
        m.alpha["lokr"], m.r["lokr"], file_alpha = 1.0, 1, 7.0
    elif n.endswith("attn2.to_v"):
        full(m, "w2")  # a low-rank w1 (in the mid block) with a full w2
        if "lokr" in m.lokr_w1:
            m.alpha["lokr"], m.r["lokr"], file_alpha = 1.0, 1, 7.0
    for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"):
        if "lokr" in getattr(m, k):
            tensors[f"{kohya('unet', n)}.{k}"] = getattr(m, k)["lokr"].detach().clone().contiguous()
    tensors[f"{kohya('unet', n)}.alpha"] = torch.tensor(file_alpha)
forms = {tuple(sorted(k.split(".")[-1] for k in tensors if k.startswith(kohya("unet", n) + ".")))
         for n, _ in lycoris_layers(pipe.unet)}
print("LoKr factor forms:", sorted(forms))
save_file(tensors, os.path.join(LORAS, "lokr_kohya.safetensors"))
set_scale([pipe.unet], "lokr", -0.6)
record("lokr_-0.6", run(pipe), [("lokr_kohya.safetensors", -0.6)])
LOKR_UNET = pipe.unet


# ---------------------------------------------------------------------------------------------
# Helpers for the references made by merging deltas into the base weights.
def tucker(t, wa, wb):
    """einsum('i j k l, i p, j r -> p r k l'): the LyCORIS / A1111 Tucker rebuild."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb)


def merged_pipe(deltas):
    """A fresh pipeline whose UNet weights carry `deltas` ({path: dW}) added."""
    pipe = fresh()
    modules = dict(pipe.unet.named_modules())
    for path, dw in deltas.items():
        w = modules[path].weight
        w.add_(dw.reshape(w.shape))
    return pipe


BASE_UNET = {n: m.weight.detach().clone() for n, m in fresh().unet.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}

# ---------------------------------------------------------------------------------------------
# LoCon with lora_mid (Tucker) on the resnet convs, plain LoRA on attention linears.
gen = torch.Generator().manual_seed(21)
tensors, deltas, rank, alpha, weight = {}, {}, 3, 1.5, 0.9
for path, w in BASE_UNET.items():
    name = kohya("unet", path)
    if path.endswith(("conv1", "conv2")) and "resnets" in path:
        out_c, in_c, kh, kw = w.shape
        down = torch.randn(rank, in_c, 1, 1, generator=gen) * 0.3
        mid = torch.randn(rank, rank, kh, kw, generator=gen) * 0.3
        up = torch.randn(out_c, rank, 1, 1, generator=gen) * 0.3
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid,
                        f"{name}.lora_up.weight": up})
        dw = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.flatten(1), down.flatten(1))
    elif path.endswith(("to_k", "to_out.0")):
        out_f, in_f = w.shape
        down = torch.randn(rank, in_f, generator=gen) * 0.4
        up = torch.randn(out_f, rank, generator=gen) * 0.4
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
        dw = up @ down
    else:
        continue
    tensors[f"{name}.alpha"] = torch.tensor(alpha)
    deltas[path] = dw * (alpha / rank) * weight
save_file(tensors, os.path.join(LORAS, "locon_mid_kohya.safetensors"))
record("locon_mid_0.9", run(merged_pipe(deltas)), [("locon_mid_kohya.safetensors", 0.9)])
LOCON_DELTAS = {p: d / weight for p, d in deltas.items()}

# ---------------------------------------------------------------------------------------------
# DoRA, peft / diffusers: written by save_lora_weights, applied by load_lora_weights.
pipe = fresh()
pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_v", "to_out.0", "conv2", "proj_out"]),
                      adapter_name="dora")
gen = torch.Generator().manual_seed(31)
for n, p in pipe.unet.named_parameters():
    if "lora_B" in n:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    elif "lora_magnitude_vector" in n:
        p.mul_(1 + torch.randn(p.shape, generator=gen) * 0.3)
# peft key names (`lora_A` / `lora_B`): diffusers' own `convert_state_dict_to_diffusers` renames
# only the attention projections, and `load_lora_weights` then drops those (missing keys).
sd = get_peft_model_state_dict(pipe.unet, adapter_name="dora")
StableDiffusionPipeline.save_lora_weights(LORAS, unet_lora_layers=sd, weight_name="dora_diffusers.safetensors",
                                          unet_lora_adapter_metadata=pipe.unet.peft_config["dora"].to_dict(),
                                          safe_serialization=True)
pipe = fresh()
pipe.load_lora_weights(LORAS, weight_name="dora_diffusers.safetensors", adapter_name="dora",
                       low_cpu_mem_usage=False)  # the default leaves DoRA magnitudes on the meta device
pipe.set_adapters(["dora"], adapter_weights=[0.8])
record("dora_0.8", run(pipe), [("dora_diffusers.safetensors", 0.8)])
# kohya naming, LyCORIS shapes for dora_scale ([out, 1] / [out, 1, 1, 1]), up doubled and alpha
# halved: the very same adapter.
dsd = load_file(os.path.join(LORAS, "dora_diffusers.safetensors"))
tensors = {}
for k, v in dsd.items():
    body = k[len("unet."):]
    for suffix, new in ((".lora.down.weight", "lora_down.weight"), (".lora.up.weight", "lora_up.weight"),
                        (".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
                        (".lora_magnitude_vector", "dora_scale")):
        if body.endswith(suffix):
            path = body[: -len(suffix)]
            if new == "dora_scale":
                v = v.reshape(-1, *[1] * (BASE_UNET[path].dim() - 1))
            tensors[f"{kohya('unet', path)}.{new}"] = v * (2.0 if new == "lora_up.weight" else 1.0)
            tensors[f"{kohya('unet', path)}.alpha"] = torch.tensor(4.0)
            break
    else:
        raise SystemExit(f"unexpected DoRA key {k}")
save_file(tensors, os.path.join(LORAS, "dora_kohya.safetensors"))
cases.append(dict(cases[-1], name="dora_kohya_0.8", image="dora_0.8",
                  loras=[{"file": "loras/dora_kohya.safetensors", "scale": 0.8}]))


def dora_delta(w, dw, magnitude, out_axis):
    """(W + dW) * m / ||W + dW|| - W, the norm per output row or per input channel."""
    merged = w + dw.reshape(w.shape)
    if out_axis:
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
    return merged * (magnitude.reshape(norm.shape) / norm) - w


# ---------------------------------------------------------------------------------------------
# DoRA along the input axis (LyCORIS wd_on_out=False), LoCon factors, merged by formula.
gen = torch.Generator().manual_seed(41)
tensors, deltas, rank, alpha, weight = {}, {}, 2, 2.0, 0.7
for path, w in BASE_UNET.items():
    if not (path.endswith(("to_q", "ff.net.2")) or (path.endswith("conv1") and "resnets" in path)):
        continue
    name = kohya("unet", path)
    down = torch.randn(rank, *w.shape[1:], generator=gen) * 0.3
    up = torch.randn(w.shape[0], rank, *[1] * (w.dim() - 2), generator=gen) * 0.3
    column = w.transpose(0, 1).flatten(1).norm(dim=1)
    magnitude = (column * (1 + torch.randn(column.shape, generator=gen) * 0.3)).reshape(1, -1, *[1] * (w.dim() - 2))
    tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.dora_scale": magnitude, f"{name}.alpha": torch.tensor(alpha)})
    dw = (up.flatten(1) @ down.flatten(1)) * (alpha / rank) * weight
    deltas[path] = dora_delta(w, dw, magnitude, out_axis=False)
save_file(tensors, os.path.join(LORAS, "dora_in_kohya.safetensors"))
record("dora_in_0.7", run(merged_pipe(deltas)), [("dora_in_kohya.safetensors", 0.7)])

# ---------------------------------------------------------------------------------------------
# All together with a plain LoRA: each adapter's delta is taken against the base weights (as
# peft applies adapters side by side), summed and merged.
weights = {"loha": 0.5, "lokr": 0.7, "locon": -0.4, "dora": 0.6, "probe": 0.5}
deltas = {}


def add(path, dw):
    deltas[path] = deltas.get(path, 0) + dw.reshape(BASE_UNET[path].shape)


for model, adapter in ((LOHA_UNET, "loha"), (LOKR_UNET, "lokr")):
    set_scale([model], adapter, weights[adapter])
    for n, m in lycoris_layers(model):
        add(n, m.get_delta_weight(adapter))
for path, dw in LOCON_DELTAS.items():
    add(path, dw * weights["locon"])
probe = load_file(os.path.join(LORAS, "probe_diffusers.safetensors"))
for k, down in probe.items():
    if k.endswith(".lora.down.weight"):
        path = k[len("unet."):-len(".lora.down.weight")]
        add(path, probe[k.replace(".down.", ".up.")] @ down * weights["probe"])
dsd = load_file(os.path.join(LORAS, "dora_diffusers.safetensors"))


def dora_deltas(weight):
    out = {}
    for k, mag in dsd.items():
        if k.endswith(".lora_magnitude_vector"):
            path = k[len("unet."):-len(".lora_magnitude_vector")]
            down, up = dsd[f"unet.{path}.lora_A.weight"], dsd[f"unet.{path}.lora_B.weight"]
            dw = (up.flatten(1) @ down.flatten(1)) * (8 / 4) * weight
            out[path] = dora_delta(BASE_UNET[path], dw, mag, out_axis=True)
    return out


for path, dw in dora_deltas(weights["dora"]).items():
    add(path, dw)
# the LoHa adapter also adapts the text encoder: keep it on the LoHa pipeline's text encoder
pipe = merged_pipe(deltas)
set_scale([LOHA_TE], "loha", weights["loha"])
pipe.text_encoder = LOHA_TE
record("combined", run(pipe), [("loha_kohya.safetensors", weights["loha"]), ("lokr_kohya.safetensors", weights["lokr"]),
                               ("locon_mid_kohya.safetensors", weights["locon"]),
                               ("dora_diffusers.safetensors", weights["dora"]),
                               ("probe_diffusers.safetensors", weights["probe"])])

# Cross-check: the merged LoHa alone equals peft's side-by-side forward.
set_scale([LOHA_UNET], "loha", 0.8)
check = merged_pipe({n: m.get_delta_weight("loha") for n, m in lycoris_layers(LOHA_UNET)})
check.text_encoder = LOHA_TE
set_scale([LOHA_TE], "loha", 0.8)
p = psnr(run(check), load_file(os.path.join(REF, "loha_0.8.safetensors"))["image"].numpy())
print(f"merged LoHa vs peft forward: {p:.1f} dB")
assert p > 60, p
p = psnr(run(merged_pipe(dora_deltas(0.8))), load_file(os.path.join(REF, "dora_0.8.safetensors"))["image"].numpy())
print(f"merged DoRA vs diffusers: {p:.1f} dB")
assert p > 60, p

json.dump({"made_with": {"diffusers": __import__("diffusers").__version__, "peft": __import__("peft").__version__,
                         "torch": torch.__version__},
           "initial_latents": "reference/components.safetensors#vae_latents", "cases": cases},
          open(os.path.join(REF, "manifest.json"), "w"), indent=1)
print("ok", REF)

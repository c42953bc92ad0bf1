"""The official `openai` Python package against a running sdserve.

Usage: python3 tests/openai_client.py BASE_URL API_KEY
Run by tests/server_openai.rs; exits non-zero on any failure, including a missing package
(install it with `python3 -m pip install openai`).
"""

import base64
import json
import pathlib
import struct
import sys

try:
    import openai
except ImportError as e:  # must fail, not skip
    print(f"FAIL: cannot import openai ({e}); install it with `python3 -m pip install openai`", file=sys.stderr)
    sys.exit(2)


def png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def extra(obj, key):
    """An extension field of a response object (pydantic keeps unknown fields)."""
    value = getattr(obj, key, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(key)
    return value


def main():
    base_url, api_key = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=300)

    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["tiny-sd1"], ids

    # Plain OpenAI call plus extension fields through extra_body.
    resp = client.images.generate(
        model="tiny-sd1",
        prompt="two red circles and a blue square",
        size="64x64",
        n=2,
        quality="high",
        style="vivid",
        user="openai-client-test",
        response_format="b64_json",
        extra_body={"steps": 2, "seed": 1234, "guidance_scale": 5.0, "negative_prompt": "blurry",
                    "loras": [{"name": "probe_diffusers", "weight": 0.8}]},
    )
    assert resp.created > 0
    assert len(resp.data) == 2, resp
    for i, image in enumerate(resp.data):
        assert png_size(base64.b64decode(image.b64_json)) == (64, 64)
        assert extra(image, "seed") == 1234 + i, extra(image, "seed")
    params = extra(resp, "parameters")
    assert params["steps"] == 2 and params["seed"] == 1234, params
    assert params["loras"][0]["name"] == "probe_diffusers", params
    assert resp.output_format == "png"

    # Defaults and a random seed, returned.
    resp = client.images.generate(prompt="a square", size="32x32", extra_body={"steps": 1})
    seed = extra(resp.data[0], "seed")
    assert isinstance(seed, int), seed
    again = client.images.generate(prompt="a square", size="32x32", extra_body={"steps": 1, "seed": seed})
    assert again.data[0].b64_json == resp.data[0].b64_json, "a returned seed reproduces the image"

    # JPEG output.
    resp = client.images.generate(prompt="x", size="32x32", output_format="jpeg", output_compression=80,
                                  extra_body={"steps": 1, "seed": 1})
    assert base64.b64decode(resp.data[0].b64_json)[:2] == b"\xff\xd8"

    # Image edits, as client.images.edit sends them (multipart): image-to-image, then inpainting.
    edits = pathlib.Path(__file__).parent / "fixtures" / "tiny-sd1" / "reference" / "edits"
    with open(edits / "init.png", "rb") as image:
        resp = client.images.edit(
            model="tiny-sd1", image=image, prompt="two red circles and a blue square", n=2, size="64x64",
            response_format="b64_json",
            extra_body={"steps": 4, "seed": 21, "strength": 0.6, "guidance_scale": 5.0, "scheduler": "ddim",
                        "negative_prompt": "blurry", "loras": [{"name": "probe_diffusers", "weight": 0.8}]},
        )
    assert len(resp.data) == 2, resp
    assert [extra(d, "seed") for d in resp.data] == [21, 22]
    for image in resp.data:
        assert png_size(base64.b64decode(image.b64_json)) == (64, 64)
    params = extra(resp, "parameters")
    assert params["edit"]["mode"] == "image_to_image" and params["edit"]["strength"] == 0.6, params
    assert params["loras"] == [{"name": "probe_diffusers", "weight": 0.8, "sha256": params["loras"][0]["sha256"]}], params
    with open(edits / "init.png", "rb") as image, open(edits / "mask.png", "rb") as mask:
        resp = client.images.edit(
            image=[image], mask=mask, prompt="a blue square", size="32x32",
            extra_body={"steps": 3, "seed": 4, "loras": json.dumps([{"name": "other_diffusers", "weight": -0.5}])},
        )
    params = extra(resp, "parameters")
    assert params["edit"]["mode"] == "inpaint" and params["edit"]["strength"] == 1.0, params
    assert params["loras"][0]["name"] == "other_diffusers", params
    assert png_size(base64.b64decode(resp.data[0].b64_json)) == (32, 32)
    try:
        with open(edits / "init.png", "rb") as image:
            client.images.edit(image=image, prompt="x", extra_body={"steps": 2, "strength": 0.2})
        raise AssertionError("a strength that runs no step accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "strength", e.body

    # Errors map onto the SDK's exception classes, with the error body.
    try:
        client.images.generate(prompt="x", size="7x7", extra_body={"steps": 1})
        raise AssertionError("size 7x7 accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.body["param"] == "size", e.body
    try:
        client.images.generate(prompt="x", size="32x32", response_format="url")
        raise AssertionError("response_format=url accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "response_format", e.body
    try:
        client.images.generate(prompt="x", size="32x32", extra_body={"loras": [{"name": "nope"}]})
        raise AssertionError("unknown adapter accepted")
    except openai.NotFoundError as e:
        assert e.body["code"] == "adapter_not_found", e.body
    try:
        openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0).models.list()
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401

    print("openai client: all checks passed")


if __name__ == "__main__":
    main()

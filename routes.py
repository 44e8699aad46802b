"""The pack's server routes, for its web extension.

POST /attnseg/tokenize {"prompt": str, "classes": str (optional), "node_id": str (optional),
"client_id": str (optional)}
-> {"words": [{"text", "positions"}], "missing": [class], "token_count", "tokenizer"}:
the prompt as the model reads it, with the tokenizer of the CLIP that node last
ran with for that client, else ComfyUI's SD1 tokenizer. A bad body gets a 400 with the reason,
an oversized one a 413.

GET /attnseg/demo-image?image=...&seed=...&width=...&height=... -> PNG: what the
AttnSeg Demo Image node with those widgets outputs (the seed editor shows it
before the graph has run). Bad parameters get a 400 with the reason.

The body is read up to a bound, every field is bounded, and tokenizing and
drawing run in a worker thread with a time bound, so no request can hold up the
event loop."""

import asyncio
import io
import json

from aiohttp import web
from server import PromptServer

from .demo.images import demo_image
from .hosts.comfyui.text import prompt_words, sd1_tokenizer, seen_tokenizer

MAX_PROMPT_CHARS = 20_000
MAX_CLASSES_CHARS = 4_000
MAX_CLASSES = 64
MAX_BODY_BYTES = 64 * 1024
TOKENIZE_SECONDS = 10.0
DRAW_SECONDS = 10.0


def bad_request(reason: str):
    return web.json_response({"error": reason}, status=400)


@PromptServer.instance.routes.post("/attnseg/tokenize")
async def tokenize(request):
    if (request.content_length or 0) > MAX_BODY_BYTES:
        return web.json_response({"error": f"the body is larger than {MAX_BODY_BYTES} bytes"}, status=413)
    raw = await request.content.read(MAX_BODY_BYTES + 1)  # chunked bodies carry no length: read a bound
    if len(raw) > MAX_BODY_BYTES:
        return web.json_response({"error": f"the body is larger than {MAX_BODY_BYTES} bytes"}, status=413)
    try:
        body = json.loads(raw)
    except ValueError:
        return bad_request("the body must be JSON: {\"prompt\": \"...\", \"classes\": \"a, b\"}")
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        return bad_request("prompt: a string is required")
    prompt, classes = body["prompt"], body.get("classes", "")
    if not isinstance(classes, str):
        return bad_request("classes: a comma-separated string is expected")
    if len(prompt) > MAX_PROMPT_CHARS:
        return bad_request(f"prompt: longer than {MAX_PROMPT_CHARS} characters")
    if len(classes) > MAX_CLASSES_CHARS:
        return bad_request(f"classes: longer than {MAX_CLASSES_CHARS} characters")
    names = [part.strip() for part in classes.replace("\n", ",").split(",") if part.strip()]
    if len(names) > MAX_CLASSES:
        return bad_request(f"classes: more than {MAX_CLASSES} classes")
    connected = seen_tokenizer(body.get("client_id"), body.get("node_id"))
    tokenizer = connected or sd1_tokenizer()
    work = asyncio.get_running_loop().run_in_executor(None, prompt_words, tokenizer, prompt, names)
    try:
        result = await asyncio.wait_for(work, TOKENIZE_SECONDS)
    except asyncio.TimeoutError:
        return web.json_response({"error": f"tokenizing took longer than {TOKENIZE_SECONDS:g} s"}, status=503)
    return web.json_response({**result, "tokenizer": "connected" if connected else "sd1"})


def demo_png(choice: str, seed: int, width: int, height: int) -> bytes:
    from PIL import Image
    pixels, _, _ = demo_image(choice, seed, width, height)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@PromptServer.instance.routes.get("/attnseg/demo-image")
async def demo_image_route(request):
    query = request.rel_url.query
    try:
        seed, width, height = (int(query.get(name, default)) for name, default in
                               (("seed", 0), ("width", 192), ("height", 128)))
    except ValueError:
        return bad_request("seed, width and height must be integers")
    if not 0 <= seed < 2 ** 32:
        return bad_request("seed: 0 .. 2^32-1")
    work = asyncio.get_running_loop().run_in_executor(None, demo_png, query.get("image", ""), seed, width, height)
    try:
        png = await asyncio.wait_for(work, DRAW_SECONDS)
    except ValueError as error:
        return bad_request(str(error))
    except asyncio.TimeoutError:
        return web.json_response({"error": f"drawing took longer than {DRAW_SECONDS:g} s"}, status=503)
    return web.Response(body=png, content_type="image/png")

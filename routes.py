"""The pack's server routes, for its web extension.

POST /attnseg/tokenize {"prompt": str, "classes": str (optional), "node_id": str (optional),
"client_id": str (optional)}
-> {"words": [{"text", "positions"}], "missing": [class], "token_count", "tokenizer"}:
the prompt as the model reads it, with the tokenizer of the CLIP that node last
ran with for that client, else ComfyUI's SD1 tokenizer. A bad body gets a 400 with the reason."""

from aiohttp import web
from server import PromptServer

from .hosts.comfyui.text import prompt_words, sd1_tokenizer, seen_tokenizer

MAX_PROMPT_CHARS = 20_000


def bad_request(reason: str):
    return web.json_response({"error": reason}, status=400)


@PromptServer.instance.routes.post("/attnseg/tokenize")
async def tokenize(request):
    try:
        body = await request.json()
    except ValueError:
        return bad_request("the body must be JSON: {\"prompt\": \"...\", \"classes\": \"a, b\"}")
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        return bad_request("prompt: a string is required")
    prompt, classes = body["prompt"], body.get("classes", "")
    if not isinstance(classes, str):
        return bad_request("classes: a comma-separated string is expected")
    if len(prompt) > MAX_PROMPT_CHARS:
        return bad_request(f"prompt: longer than {MAX_PROMPT_CHARS} characters")
    names = [part.strip() for part in classes.replace("\n", ",").split(",") if part.strip()]
    connected = seen_tokenizer(body.get("client_id"), body.get("node_id"))
    result = prompt_words(connected or sd1_tokenizer(), prompt, names)
    return web.json_response({**result, "tokenizer": "connected" if connected else "sd1"})

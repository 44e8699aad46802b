// AttnSeg web extension: a seed editor on the seeds node and a class picker on
// the segmentation text encoder. Both write into the nodes' own text widgets,
// so API-format workflows keep working without the UI.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SEED_NODE = "AttnSegSeeds";
const TEXT_NODE = "AttnSegTextEncode";
const DEMO_IMAGE_NODE = "AttnSegDemoImage";
const SEED_COLOURS = ["#ff4d4d", "#4da6ff", "#4dff88", "#ffd24d", "#c44dff", "#ff9a4d"];

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function setWidget(node, name, value) {
  const target = widget(node, name);
  if (!target) return;
  target.value = value;
  target.callback?.(value);
  node.setDirtyCanvas?.(true, true);
}

// The node feeding an input, through the graph API (an input's own `link` field is deprecated).
function upstream(node, inputName) {
  const slot = node.inputs?.findIndex((i) => i.name === inputName) ?? -1;
  if (slot < 0 || !node.isInputConnected(slot)) return null;
  const link = node.getInputLink(slot);
  return link ? node.graph.getNodeById(link.origin_id) : null;
}

// The image a seeds node segments: attention <- capture node <- its image input <- Load Image
// (the file it shows) or AttnSeg Demo Image (the picture the pack's route draws from its widgets).
function sourceImageUrl(node) {
  const seen = new Set();
  let frontier = [upstream(node, "attention")];
  while (frontier.length) {
    const next = [];
    for (const current of frontier) {
      if (!current || seen.has(current.id)) continue;
      seen.add(current.id);
      const file = widget(current, "image")?.value;
      if (current.type === "LoadImage" && typeof file === "string" && file) {
        const clean = file.replace(/ \[(input|output|temp)\]$/, "");
        const parts = clean.split("/");
        const filename = parts.pop();
        const params = new URLSearchParams({ filename, type: "input", subfolder: parts.join("/") });
        return api.apiURL(`/view?${params}`);
      }
      if (current.type === DEMO_IMAGE_NODE) {
        const params = new URLSearchParams(Object.fromEntries(
          ["image", "seed", "width", "height"].map((name) => [name, String(widget(current, name)?.value ?? "")])));
        return api.apiURL(`/attnseg/demo-image?${params}`);
      }
      current.inputs?.forEach((input) => next.push(upstream(current, input.name)));
    }
    frontier = next;
  }
  return null;
}

function parseSeeds(text) {
  try {
    const seeds = JSON.parse(text);
    return Array.isArray(seeds) ? seeds : [];
  } catch {
    return [];
  }
}

function seedEditor(node) {
  const box = document.createElement("div");
  box.dataset.attnseg = "seed-editor";
  box.style.cssText = "display:flex;flex-direction:column;gap:4px;height:100%;box-sizing:border-box;" +
    "font:12px sans-serif;color:#ddd";
  const bar = document.createElement("div");
  bar.style.cssText = "display:flex;gap:4px;align-items:center";
  const mode = document.createElement("select");
  mode.dataset.attnseg = "seed-mode";
  for (const kind of ["point", "box", "line"]) mode.append(new Option(kind, kind));
  const undo = Object.assign(document.createElement("button"), { textContent: "Undo" });
  const clear = Object.assign(document.createElement("button"), { textContent: "Clear" });
  undo.dataset.attnseg = "seed-undo";
  clear.dataset.attnseg = "seed-clear";
  bar.append("Draw:", mode, undo, clear);
  const canvas = document.createElement("canvas");
  canvas.dataset.attnseg = "seed-canvas";
  // The canvas is as wide as the node and as tall as the image's aspect asks
  // (Nodes 2.0 sizes the widget from its content); a node kept shorter by hand
  // shrinks it and the image is letterboxed inside.
  canvas.style.cssText = "width:100%;flex:0 1 auto;min-height:60px;aspect-ratio:3/2;background:#222;" +
    "cursor:crosshair;touch-action:none";
  const status = document.createElement("div");
  status.dataset.attnseg = "seed-status";
  box.append(bar, canvas, status);

  const image = new Image();
  let url = null;
  let drag = null;
  let failed = false;

  const seeds = () => parseSeeds(widget(node, "seeds")?.value ?? "[]");
  const write = (list) => { setWidget(node, "seeds", JSON.stringify(list)); draw(); };

  // Image pixels <-> canvas pixels: the image is fitted inside the canvas.
  function fit() {
    const scale = Math.min(canvas.width / image.naturalWidth, canvas.height / image.naturalHeight);
    const x0 = (canvas.width - image.naturalWidth * scale) / 2;
    const y0 = (canvas.height - image.naturalHeight * scale) / 2;
    return { scale, x0, y0 };
  }
  function toImage(event) {
    const rect = canvas.getBoundingClientRect();
    const cx = ((event.clientX - rect.left) / rect.width) * canvas.width;
    const cy = ((event.clientY - rect.top) / rect.height) * canvas.height;
    const { scale, x0, y0 } = fit();
    const x = Math.round((cx - x0) / scale);
    const y = Math.round((cy - y0) / scale);
    return [Math.min(Math.max(x, 0), image.naturalWidth), Math.min(Math.max(y, 0), image.naturalHeight)];
  }
  function onImage(event) {
    const rect = canvas.getBoundingClientRect();
    const cx = ((event.clientX - rect.left) / rect.width) * canvas.width;
    const cy = ((event.clientY - rect.top) / rect.height) * canvas.height;
    const { scale, x0, y0 } = fit();
    return cx >= x0 && cy >= y0 && cx <= x0 + image.naturalWidth * scale && cy <= y0 + image.naturalHeight * scale;
  }
  // A new image or a new node width: the canvas takes the image's aspect, and a
  // classic-canvas node grows to show it whole (once per image and width, so a
  // node the user then makes shorter stays so).
  let fitted = null;
  let growths = 0;
  function matchAspect() {
    if (!image.naturalWidth) return;
    canvas.style.aspectRatio = `${image.naturalWidth} / ${image.naturalHeight}`;
    const rect = canvas.getBoundingClientRect();
    const scale = app.canvas?.ds?.scale || 1;
    if (!rect.width) return;  // not laid out yet: the next tick tries again
    const key = `${url} ${Math.round(rect.width / scale)}`;
    if (fitted === key) return;
    const wanted = (rect.width * image.naturalHeight) / image.naturalWidth;
    const missing = (wanted - rect.height) / scale;
    // The node shares new height among its widgets (the seeds text takes some):
    // grow a few times, each after the layout settled, then leave it be.
    if (missing > 1 && node.setSize && growths < 6) {
      growths += 1;
      node.setSize([node.size[0], node.size[1] + missing]);
      node.setDirtyCanvas?.(true, true);
      setTimeout(matchAspect, 100);
      return;
    }
    fitted = key;
    growths = 0;
  }

  function draw() {
    const rect = canvas.getBoundingClientRect();
    if (rect.width > 0) {
      canvas.width = Math.round(rect.width);
      canvas.height = Math.round(rect.height);
    }
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!url || !image.complete || !image.naturalWidth) return;
    const { scale, x0, y0 } = fit();
    ctx.drawImage(image, x0, y0, image.naturalWidth * scale, image.naturalHeight * scale);
    const at = ([x, y]) => [x0 + x * scale, y0 + y * scale];
    const list = drag ? [...seeds(), drag.seed] : seeds();
    list.forEach((seed, i) => {
      ctx.strokeStyle = ctx.fillStyle = SEED_COLOURS[i % SEED_COLOURS.length];
      ctx.lineWidth = 2;
      if (seed.point) {
        const [x, y] = at(seed.point);
        ctx.beginPath();
        ctx.arc(x, y, 5, 0, 2 * Math.PI);
        ctx.fill();
      } else if (seed.box) {
        const [a, b] = at(seed.box.slice(0, 2));
        const [c, d] = at(seed.box.slice(2));
        ctx.strokeRect(a, b, c - a, d - b);
      } else if (seed.line) {
        ctx.beginPath();
        seed.line.map(at).forEach(([x, y], k) => (k ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
        ctx.stroke();
      }
    });
  }

  function refresh() {
    const next = sourceImageUrl(node);
    if (!next) {
      url = null;
      status.textContent = "Connect 'attention' to a capture node fed by a Load Image or AttnSeg Demo Image node " +
        "to place seeds on its image.";
      status.style.color = "#f88";
      draw();
      return;
    }
    if (next !== url) {
      url = next;
      failed = false;
      image.src = next;
    }
    if (failed) return;  // keep the load error in view until the image changes
    status.style.color = "#aaa";
    status.textContent = image.naturalWidth
      ? `${image.naturalWidth}x${image.naturalHeight} px. ${seeds().length} seed(s). Click: point; drag: box or line.`
      : "Loading the image…";
  }
  image.onload = () => { matchAspect(); refresh(); draw(); };
  image.onerror = () => {
    failed = true;
    status.textContent = "The connected image could not be loaded; run the Load Image node's upload first.";
    status.style.color = "#f88";
  };

  canvas.addEventListener("pointerdown", (event) => {
    event.stopPropagation();
    if (event.button !== 0) return;  // only the primary button places seeds
    if (!url || !image.naturalWidth) { refresh(); return; }
    draw();  // the element may have been resized since the last draw: map against its size now
    if (!onImage(event)) return;  // the letterbox around the image is not part of it
    const start = toImage(event);
    const kind = mode.value;
    drag = { start, seed: kind === "point" ? { point: start } : kind === "box" ? { box: [...start, ...start] } : { line: [start, start] } };
    canvas.setPointerCapture(event.pointerId);
    draw();
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drag) return;
    event.stopPropagation();
    const [x, y] = toImage(event);
    const [sx, sy] = drag.start;
    if (drag.seed.box) drag.seed.box = [Math.min(sx, x), Math.min(sy, y), Math.max(sx, x), Math.max(sy, y)];
    if (drag.seed.line) drag.seed.line = [drag.start, [x, y]];
    if (drag.seed.point) drag.seed.point = [x, y];
    draw();
  });
  canvas.addEventListener("pointerup", (event) => {
    if (!drag) return;
    event.stopPropagation();
    const { seed } = drag;
    drag = null;
    const tiny = seed.box ? seed.box[2] - seed.box[0] < 2 || seed.box[3] - seed.box[1] < 2
      : seed.line ? Math.hypot(seed.line[1][0] - seed.line[0][0], seed.line[1][1] - seed.line[0][1]) < 2 : false;
    if (!tiny) write([...seeds(), seed]);
    refresh();
  });
  canvas.addEventListener("pointercancel", () => { drag = null; draw(); });
  undo.onclick = () => { write(seeds().slice(0, -1)); refresh(); };
  clear.onclick = () => { write([]); refresh(); };

  const timer = setInterval(() => { if (box.isConnected) { matchAspect(); refresh(); draw(); } }, 1000);
  const removed = node.onRemoved;
  node.onRemoved = function () { clearInterval(timer); return removed?.apply(this, arguments); };
  setTimeout(() => { refresh(); draw(); }, 0);
  return box;
}

function classList(text) {
  return (text ?? "").split(/[,\n]/).map((c) => c.trim()).filter(Boolean);
}

function classPicker(node) {
  const box = document.createElement("div");
  box.dataset.attnseg = "class-picker";
  box.style.cssText = "display:flex;flex-direction:column;gap:4px;font:12px sans-serif;color:#ddd;overflow:auto";
  const words = document.createElement("div");
  words.style.cssText = "display:flex;flex-wrap:wrap;gap:3px";
  const status = document.createElement("div");
  status.dataset.attnseg = "class-status";
  box.append(words, status);
  let asked = null;
  let pending = null;
  let latest = 0;  // replies to older requests are dropped

  function toggle(word) {
    const classes = classList(widget(node, "classes")?.value);
    const lower = word.toLowerCase();
    const holding = classes.find((c) => c.toLowerCase().split(/\s+/).includes(lower));
    const next = holding ? classes.filter((c) => c !== holding) : [...classes, word];
    setWidget(node, "classes", next.join(", "));
    ask(true);
  }

  function show(result) {
    const classes = classList(widget(node, "classes")?.value).map((c) => c.toLowerCase());
    const chosen = new Set(classes.flatMap((c) => c.split(/\s+/)));
    words.replaceChildren(...result.words.map((w) => {
      const chip = document.createElement("span");
      chip.textContent = w.text;
      chip.dataset.attnsegWord = w.text;
      const on = chosen.has(w.text.toLowerCase());
      chip.dataset.selected = on ? "true" : "false";
      chip.title = `tokens ${w.positions.join(", ")}`;
      chip.style.cssText = `padding:1px 5px;border-radius:4px;cursor:pointer;user-select:none;` +
        `background:${on ? "#2a6" : "#444"};color:${on ? "#fff" : "#ccc"}`;
      chip.addEventListener("pointerdown", (event) => { event.stopPropagation(); toggle(w.text); });
      return chip;
    }));
    const prompt = widget(node, "prompt")?.value ?? "";
    if (result.missing.length) {
      status.textContent = `Not in the prompt: ${result.missing.join(", ")}. Add them to the prompt as written.`;
      status.style.color = "#f66";
      status.dataset.missing = result.missing.join(",");
    } else if (!result.words.length) {
      status.textContent = prompt.trim()
        ? "The prompt has no words the tokenizer can read."
        : "Empty prompt: the node will use 'a photograph of {classes}'.";
      status.style.color = "#fc6";
      status.dataset.missing = "";
    } else {
      status.textContent = `Click words to toggle classes (${result.tokenizer === "connected" ? "the connected CLIP's" : "SD1"} tokenizer).`;
      status.style.color = "#aaa";
      status.dataset.missing = "";
    }
  }

  async function ask(force = false) {
    const prompt = widget(node, "prompt")?.value ?? "";
    const classes = widget(node, "classes")?.value ?? "";
    const key = JSON.stringify([prompt, classes]);
    if (!force && key === asked) return;
    const ticket = ++latest;
    try {
      const response = await api.fetchApi("/attnseg/tokenize", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt, classes, node_id: String(node.id), client_id: api.clientId }),
      });
      const result = await response.json();
      if (ticket !== latest) return;
      if (!response.ok) throw new Error(result.error ?? response.statusText);
      asked = key;  // only a success stops the next poll from asking again
      show(result);
    } catch (error) {
      if (ticket !== latest) return;
      status.textContent = `Could not read the prompt: ${error.message}`;
      status.style.color = "#f66";
    }
  }

  const timer = setInterval(() => {
    if (!box.isConnected) return;
    clearTimeout(pending);
    pending = setTimeout(() => ask(), 150);
  }, 500);
  // After a run the node's own CLIP tokenizer is known to the server: ask again.
  const rerun = () => ask(true);
  api.addEventListener("execution_success", rerun);
  const removed = node.onRemoved;
  node.onRemoved = function () {
    clearInterval(timer);
    api.removeEventListener("execution_success", rerun);
    return removed?.apply(this, arguments);
  };
  setTimeout(() => ask(true), 0);
  return box;
}

function addPanel(node, name, element, height) {
  const panel = node.addDOMWidget(name, "attnseg-panel", element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => height,
  });
  panel.serialize = false;
  return panel;
}

app.registerExtension({
  name: "AttnSeg.Editors",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== SEED_NODE && nodeData.name !== TEXT_NODE) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      if (nodeData.name === SEED_NODE) {
        addPanel(this, "seed_editor", seedEditor(this), 220);
        this.setSize?.([Math.max(this.size[0], 320), Math.max(this.size[1], 420)]);
      } else {
        addPanel(this, "class_picker", classPicker(this), 70);
      }
      return result;
    };
  },
});

// Workflows saved before the pack's socket types were prefixed carry the old
// names on their links and slots; renamed on load, so they connect and run as saved.
const RENAMED_TYPES = { ATTN_STORE: "ATTNSEG_STORE", ATTN_SCORES: "ATTNSEG_SCORES" };

function renameTypes(graph) {
  if (!graph || typeof graph !== "object") return;
  const renamed = (type) => RENAMED_TYPES[type] ?? type;
  for (const link of graph.links ?? []) {
    if (Array.isArray(link)) link[5] = renamed(link[5]);  // [id, origin, slot, target, slot, type]
    else if (link) link.type = renamed(link.type);
  }
  for (const node of graph.nodes ?? []) {
    for (const slot of [...(node.inputs ?? []), ...(node.outputs ?? [])]) slot.type = renamed(slot.type);
  }
  for (const subgraph of graph.definitions?.subgraphs ?? []) renameTypes(subgraph);
}

app.registerExtension({
  name: "AttnSeg.RenamedTypes",
  beforeConfigureGraph(graph) {
    renameTypes(graph);
  },
});

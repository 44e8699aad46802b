"""API-format workflows <-> the frontend's UI format, from a server's /object_info.

    python scripts/workflow_ui.py OBJECT_INFO.json workflows/api/X.json > workflows/X.json

The UI files in workflows/ are written from the API files here; the end-to-end
tests convert them back against the live server and compare, so a node whose
inputs change cannot leave a stale workflow behind."""

from __future__ import annotations

import json
import sys

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Node sizes are estimated generously from what a node shows, so the frontend
# never has to grow a node into its neighbour (the browser tests check no two
# nodes intersect after load, in both canvases).
WIDTH, GAP_X, GAP_Y = 340, 80, 50
TITLE, ROW, WIDGET, MULTILINE = 40, 24, 30, 110
TITLE_CHAR, TITLE_PADDING = 8, 70  # a node is at least as wide as its title
# Room for what the pack's web extension and the image nodes draw inside a node.
PANELS = {"AttnSegSeeds": 520, "AttnSegTextEncode": 100}
IMAGE_NODES = {"SaveImage", "PreviewImage", "AttnSegMasks", "AttnSegSegment"}
IMAGE_AREA = 300


def _inputs(spec: dict) -> list[tuple[str, list]]:
    order = spec.get("input_order") or {g: list(spec["input"].get(g, {})) for g in ("required", "optional")}
    return [(name, spec["input"][group][name]) for group in ("required", "optional") for name in order.get(group, [])]


def _is_widget(definition: list) -> bool:
    kind = definition[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control(definition: list) -> bool:
    options = definition[1] if len(definition) > 1 else {}
    return definition[0] == "INT" and bool(options.get("control_after_generate"))


def node_size(class_type: str, title: str, spec: dict, sockets: int) -> list[int]:
    """[width, height] that holds the node's title, slots, widgets and pictures."""
    height = TITLE + ROW * max(sockets, len(spec["output"]))
    for _, definition in _inputs(spec):
        if _is_widget(definition):
            options = definition[1] if len(definition) > 1 else {}
            height += MULTILINE if options.get("multiline") else WIDGET
            if _has_control(definition):
                height += WIDGET
    height += PANELS.get(class_type, 0) + (IMAGE_AREA if class_type in IMAGE_NODES else 0)
    return [max(WIDTH, TITLE_PADDING + TITLE_CHAR * len(title)), height]


def api_to_ui(api: dict, info: dict) -> dict:
    nodes, links = [], []
    ids = {key: int(key) for key in api}
    depth = {}

    def level(key):
        if key not in depth:
            parents = [v[0] for v in api[key]["inputs"].values() if isinstance(v, list)]
            depth[key] = 1 + max((level(p) for p in parents), default=-1)
        return depth[key]

    outputs = {key: [[] for _ in info[node["class_type"]]["output"]] for key, node in api.items()}
    column_height: dict[int, int] = {}
    column_width: dict[int, int] = {}
    for key in sorted(api, key=lambda k: (level(k), ids[k])):
        node, spec = api[key], info[api[key]["class_type"]]
        inputs, widgets = [], []
        for name, definition in _inputs(spec):
            value = node["inputs"].get(name)
            if _is_widget(definition) and not isinstance(value, list):
                if value is not None:
                    widgets.append(value)
                    if _has_control(definition):
                        widgets.append("fixed")
                continue
            link_id = None
            if isinstance(value, list):
                link_id = len(links) + 1
                source, slot = value
                kind = info[api[source]["class_type"]]["output"][slot]
                links.append([link_id, ids[source], slot, ids[key], len(inputs), kind])
                outputs[source][slot].append(link_id)
            kind = definition[0] if not isinstance(definition[0], list) else "COMBO"
            inputs.append({"name": name, "type": kind, "link": link_id})
        column, title = level(key), node.get("_meta", {}).get("title", node["class_type"])
        size = node_size(node["class_type"], title, spec, len(inputs))
        top = column_height.get(column, 40)
        column_height[column] = top + size[1] + GAP_Y
        column_width[column] = max(column_width.get(column, 0), size[0])
        nodes.append({"id": ids[key], "type": node["class_type"], "pos": [column, top],
                      "size": size, "flags": {}, "order": len(nodes), "mode": 0, "title": title,
                      "inputs": inputs, "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets, "_key": key})
    lefts = [40]
    for column in range(max(column_width)):
        lefts.append(lefts[-1] + column_width[column] + GAP_X)
    for ui_node in nodes:
        ui_node["pos"][0] = lefts[ui_node["pos"][0]]
    for ui_node in nodes:
        spec, key = info[ui_node["type"]], ui_node.pop("_key")
        ui_node["outputs"] = [{"name": name, "type": kind, "links": outputs[key][slot], "slot_index": slot}
                              for slot, (name, kind) in enumerate(zip(spec["output_name"], spec["output"]))]
    return {"last_node_id": max(ids.values()), "last_link_id": len(links), "nodes": nodes, "links": links,
            # Laid out for the classic canvas: Nodes 2.0 scales the layout as a whole on load.
            "groups": [], "config": {}, "extra": {"workflowRendererVersion": "LG"}, "version": 0.4}


def ui_to_api(ui: dict, info: dict) -> dict:
    """What the frontend queues for a UI workflow (for nodes whose widgets are all literal)."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        values = iter(node.get("widgets_values", []))
        inputs = {}
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, definition in _inputs(info[node["type"]]):
            if name in linked:
                link = links[linked[name]]
                inputs[name] = [str(link[1]), link[2]]
            elif _is_widget(definition):
                value = next(values, None)
                if value is not None:
                    inputs[name] = value
                if _has_control(definition):
                    next(values, None)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


if __name__ == "__main__":
    info = json.load(open(sys.argv[1]))
    json.dump(api_to_ui(json.load(open(sys.argv[2])), info), sys.stdout, indent=1)
    print()

"""The pack in the real ComfyUI frontend, in headless Debian Chromium (Selenium
with Debian's chromedriver, no browser download), on the frontend ComfyUI pins
and on the newest one (scripts/host.sh), each in the classic canvas and in
Nodes 2.0: every template opens from the template browser on a fresh server and
runs as opened (those that load the user's own Flux/SD3 files are opened and
laid out but not queued), no two nodes overlap, the seed editor and the class
picker write their widgets, a queued workflow shows its mask preview on the node."""

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

from comfy_env import REPO
from comfy_server import ComfyServer, PACK_FOLDER

WORKFLOWS = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
ARTIFACTS = REPO / "tests" / "artifacts"
# Console lines that are not about this pack, each matched whole: a missing
# favicon and user stylesheet, the template index of the frontend's own template
# packages, Comfy Registry, release and model-hub lookups (out of reach
# offline), and what the newest frontend asks of a backend older than it (its
# jobs API, workflow and subgraph folders this fresh user does not have).
IGNORED_CONSOLE = [re.compile(pattern) for pattern in (
    r"\S+/favicon\.ico - Failed to load resource: .*",
    r"\S+/(api/userdata/)?user\.css - Failed to load resource: the server responded with a status of 404 \(Not Found\)",
    r"\S+/templates/index(_logo)?\.json - Failed to load resource: .*",
    r"\S+/workflow_templates/index\.json - Failed to load resource: .*",
    r"https://(api\.comfy\.org|huggingface\.co)/\S+ - Failed to load resource: net::ERR_NAME_NOT_RESOLVED",
    r"\S+/api/jobs\?\S+ - Failed to load resource: the server responded with a status of 404 \(Not Found\)",
    r'\S+\.js \d+:\d+ "(\[Jobs API\] Error fetching jobs:|Failed to fetch queue:)" JobsApiError: '
    r"Failed to fetch jobs: 404(\n.*)*",
    r"\S+/api/userdata(\?dir=(workflows|subgraphs)&\S+|/comfy\.templates\.json) - Failed to load resource: "
    r"the server responded with a status of 404 \(Not Found\)",
)]
FRONTENDS = ("pinned", "newest")
CANVASES = ("classic", "nodes-2.0")
# Stock loaders of the user's own model files: templates with one (Flux, SD3) cannot run
# on a fresh server, so they are opened and laid out like every template but not queued
# (tests/test_e2e_dit.py runs them on tiny models).
USER_MODEL_LOADERS = {"UNETLoader", "DualCLIPLoader", "TripleCLIPLoader", "CheckpointLoaderSimple", "VAELoader"}


def chromium_paths():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.fail("Debian's chromium and chromium-driver are needed (scripts/test.sh installs them).")
    return browser, driver


def frontend_args(frontend: str) -> list[str]:
    if frontend == "pinned":
        return []
    folder = Path(subprocess.run(["bash", str(REPO / "scripts" / "host.sh"), "frontend"], check=True,
                                 capture_output=True, text=True).stdout.strip())
    if not (folder / "index.html").is_file():
        pytest.fail(f"the newest frontend is not in {folder}: run 'bash scripts/host.sh setup'.")
    return ["--front-end-root", str(folder)]


@pytest.fixture(scope="module", params=FRONTENDS)
def server(request, tmp_path_factory):
    """A fresh server: nothing in its input/ folder, no user settings."""
    with ComfyServer(tmp_path_factory.mktemp(f"comfy-browser-{request.param}"),
                     extra_args=frontend_args(request.param)) as running:
        running.frontend = request.param
        yield running


def set_user_setting(server, key: str, value) -> None:
    request = urllib.request.Request(server.url + f"/settings/{key}", data=json.dumps(value).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()


@pytest.fixture(scope="module", params=CANVASES)
def browser(request, server):
    binary, driver_path = chromium_paths()
    # A new user gets the template browser on top of the graph; a returning one does not.
    set_user_setting(server, "Comfy.TutorialCompleted", True)
    set_user_setting(server, "Comfy.VueNodes.Enabled", request.param == "nodes-2.0")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--window-size=1600,1400"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_script_timeout(60)
    driver.get(server.url)
    wait_for(driver, "return !!(window.app && window.app.graph && window.LiteGraph"
                     " && LiteGraph.registered_node_types['AttnSegSeeds'])", 120)
    driver.canvas_kind = request.param
    time.sleep(1.0)
    driver.get_log("browser")  # start the error log after the frontend has booted
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float = 30, *args):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {script}")


def severe_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and not any(noise.fullmatch(entry["message"]) for noise in IGNORED_CONSOLE)]


def load(driver, name: str) -> None:
    graph = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    driver.execute_async_script("const done = arguments[1]; app.loadGraphData(arguments[0]).then(() => done(true));",
                                graph)
    time.sleep(0.5)


def node_id(driver, node_type: str) -> int:
    return driver.execute_script("return app.graph._nodes.find(n => n.type === arguments[0]).id", node_type)


def widget_value(driver, node: int, name: str):
    return driver.execute_script(
        "return app.graph.getNodeById(arguments[0]).widgets.find(w => w.name === arguments[1]).value", node, name)


def test_templates_are_listed_with_thumbnails(server):
    listed = server.get("/workflow_templates")[PACK_FOLDER]
    assert sorted(listed) == WORKFLOWS
    for name in WORKFLOWS:
        assert (REPO / "workflows" / f"{name}.jpg").is_file(), f"{name} has no thumbnail"
        with Image.open(REPO / "workflows" / f"{name}.jpg") as thumbnail:
            assert thumbnail.width >= 128


def needs_user_models(name: str) -> bool:
    workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    return any(node["type"] in USER_MODEL_LOADERS for node in workflow["nodes"])


def open_template(driver, name: str) -> None:
    """Opens a template the way a user does: the template browser, the pack's
    entry, the template's card."""
    driver.execute_script("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    entry = wait_for(driver, "return [...document.querySelectorAll('nav *, aside *, [role=dialog] *')].find(e =>"
                             " e.textContent.trim() === arguments[0]"
                             " && ![...e.children].some(c => c.textContent.trim() === arguments[0]))", 30, PACK_FOLDER)
    driver.execute_script("arguments[0].click()", entry)
    card = wait_for(driver, "return document.querySelector(`[data-testid='template-workflow-${arguments[0]}']`)",
                    30, name)
    driver.execute_script("arguments[0].click()", card)
    workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    expected = json.dumps(sorted(n["type"] for n in workflow["nodes"]), separators=(",", ":"))
    wait_for(driver, "return !document.querySelector('[data-testid=template-workflows-content]')"
                     " && JSON.stringify(app.graph._nodes.map(n => n.type).sort()) === arguments[0]", 30, expected)
    time.sleep(1.0)  # DOM widgets and Nodes 2.0 settle their sizes


def node_boxes(driver) -> list[tuple[str, list[float]]]:
    """(title, [x, y, width, height]) of every node, title bar included, in graph units."""
    return driver.execute_script(
        "return app.graph._nodes.map(n => [n.title, Array.from(n.getBounding())])")


def overlaps(boxes) -> list[tuple[str, str]]:
    found = []
    for i, (a, (ax, ay, aw, ah)) in enumerate(boxes):
        for b, (bx, by, bw, bh) in boxes[i + 1:]:
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                found.append((a, b))
    return found


def queue_and_wait(driver, server, timeout: float = 300) -> dict:
    """Clicks the frontend's Run button; the history entry of the run it queued."""
    before = set(server.get("/history"))
    # 1.32 wraps the button in a split-button; 1.58 tags the button itself.
    driver.execute_script("const run = document.querySelector('[data-testid=queue-button]');"
                          "(run.tagName === 'BUTTON' ? run : run.querySelector('button')).click()")
    began = time.time()
    while time.time() < began + timeout:
        history = server.get("/history")
        new = [key for key in history if key not in before]
        if new:
            status = history[new[0]].get("status", {})
            if status.get("status_str") == "error":
                pytest.fail(f"the run failed: {json.dumps(status.get('messages'), indent=1)[:3000]}")
            if status.get("completed"):
                return history[new[0]]
        # The frontend builds and POSTs the prompt itself: on a loaded 2-core machine that alone
        # has taken over 30 s, so only a long silence means the click queued nothing.
        elif time.time() > began + 120 and not any(server.get("/queue").values()):
            pytest.fail("the Run button queued nothing")
        assert severe_errors(driver) == [], "the frontend did not queue the template"
        time.sleep(0.5)
    raise AssertionError(f"the run did not finish in {timeout} s:\n{server.log()}")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_template_opens_from_the_template_browser_and_runs_as_opened(browser, server, name):
    open_template(browser, name)
    boxes = node_boxes(browser)
    # 1.32's Nodes 2.0 (a beta then) rescales the positions of a template opened
    # after another one by a varying factor while its nodes keep their size; the
    # newest frontend scales positions and sizes together.
    if (server.frontend, browser.canvas_kind) != ("pinned", "nodes-2.0"):
        assert overlaps(boxes) == [], f"{name}: nodes overlap in the {browser.canvas_kind} canvas: {boxes}"
    if needs_user_models(name):
        assert severe_errors(browser) == []
        return
    entry = queue_and_wait(browser, server)
    assert entry["outputs"], f"{name} ran but saved nothing"
    assert severe_errors(browser) == []


def test_a_workflow_saved_with_the_old_socket_type_names_loads_and_runs(browser, server):
    saved = (REPO / "workflows" / "diffsegmenter-segment.json").read_text()
    graph = json.loads(saved.replace("ATTNSEG_STORE", "ATTN_STORE").replace("ATTNSEG_SCORES", "ATTN_SCORES"))
    assert {"ATTN_STORE", "ATTN_SCORES"} <= {link[5] for link in graph["links"]}
    browser.execute_async_script("const done = arguments[1]; app.loadGraphData(arguments[0]).then(() => done(true));",
                                 graph)
    types = browser.execute_script("const links = app.graph.links;"
                                   "return [...(links instanceof Map ? links.values() : Object.values(links))]"
                                   ".map(l => l.type)")
    assert {"ATTNSEG_STORE", "ATTNSEG_SCORES"} <= set(types) and not {"ATTN_STORE", "ATTN_SCORES"} & set(types)
    assert queue_and_wait(browser, server)["outputs"]
    assert severe_errors(browser) == []


@pytest.mark.parametrize("name", WORKFLOWS)
def test_every_workflow_loads_without_frontend_errors(browser, name):
    load(browser, name)
    types = browser.execute_script("return app.graph._nodes.map(n => n.type)")
    workflow = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    assert sorted(types) == sorted(n["type"] for n in workflow["nodes"])
    missing = browser.execute_script("return app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type])"
                                     ".map(n => n.type)")
    assert missing == []
    assert severe_errors(browser) == []


def focus(driver, node: int, scale: float = 1.0) -> None:
    """Scroll and zoom the graph so the node sits near the top left, whole."""
    driver.execute_script("const n = app.graph.getNodeById(arguments[0]); app.canvas.selectNode(n);"
                          "app.canvas.ds.scale = arguments[1];"
                          "app.canvas.ds.offset = [120 / arguments[1] - n.pos[0], 180 / arguments[1] - n.pos[1]];"
                          "app.graph.setDirtyCanvas(true, true);", node, scale)
    time.sleep(1.0)


def node_screenshot(driver, node: int, path: Path) -> None:
    """A screenshot of the window cropped to the node (title bar included)."""
    ARTIFACTS.mkdir(exist_ok=True)
    left, top, width, height = driver.execute_script(
        "const n = app.graph.getNodeById(arguments[0]); const ds = app.canvas.ds;"
        "const box = app.canvas.canvas.getBoundingClientRect(); const title = LiteGraph.NODE_TITLE_HEIGHT;"
        "return [box.left + (n.pos[0] + ds.offset[0]) * ds.scale, box.top + (n.pos[1] - title + ds.offset[1]) * ds.scale,"
        " n.size[0] * ds.scale, (n.size[1] + title) * ds.scale].map(v => v * devicePixelRatio)", node)
    driver.save_screenshot(str(path))
    with Image.open(path) as window:
        box = (max(0, int(left) - 6), max(0, int(top) - 6), int(left + width) + 6, int(top + height) + 6)
        window.crop(box).save(path)


def canvas_of(driver, node: int):
    return wait_for(driver, "const n = app.graph.getNodeById(arguments[0]);"
                            "const w = n.widgets.find(w => w.name === 'seed_editor');"
                            "return w && w.element.querySelector('[data-attnseg=seed-canvas]');", 30, node)


def test_seed_editor_places_a_point_and_draws_a_box(browser):
    load(browser, "iseg-seeds")
    seeds = node_id(browser, "AttnSegSeeds")
    focus(browser, seeds, 1.0)
    canvas = canvas_of(browser, seeds)
    wait_for(browser, "return arguments[0].closest('[data-attnseg=seed-editor]')"
                      ".querySelector('[data-attnseg=seed-status]').textContent.includes('192x128')", 30, canvas)
    editor = browser.execute_script("return arguments[0].closest('[data-attnseg=seed-editor]')", canvas)
    editor.find_element(By.CSS_SELECTOR, "[data-attnseg=seed-clear]").click()
    assert json.loads(widget_value(browser, seeds, "seeds")) == []
    size = canvas.size
    ActionChains(browser).move_to_element_with_offset(canvas, -size["width"] // 6, 0).click().perform()
    editor.find_element(By.CSS_SELECTOR, "[data-attnseg=seed-mode] option[value=box]").click()
    (ActionChains(browser).move_to_element_with_offset(canvas, size["width"] // 8, -size["height"] // 6)
     .click_and_hold().move_by_offset(size["width"] // 8, size["height"] // 4).release().perform())
    placed = json.loads(widget_value(browser, seeds, "seeds"))
    assert [list(s) for s in placed] == [["point"], ["box"]]
    (x, y), box = placed[0]["point"], placed[1]["box"]
    assert 0 <= x < 96 and 0 < y < 128  # left of the middle of the 192 x 128 image
    assert 96 <= box[0] < box[2] <= 192 and 0 <= box[1] < box[3] <= 128
    node_screenshot(browser, seeds, ARTIFACTS / "seed-editor.png")
    editor.find_element(By.CSS_SELECTOR, "[data-attnseg=seed-undo]").click()
    assert len(json.loads(widget_value(browser, seeds, "seeds"))) == 1
    assert severe_errors(browser) == []


def canvas_aspect(driver, canvas) -> float:
    return driver.execute_script("const r = arguments[0].getBoundingClientRect(); return r.width / r.height", canvas)


def test_seed_editor_takes_the_image_aspect_and_ignores_clicks_beside_it(browser):
    load(browser, "iseg-seeds")
    seeds = node_id(browser, "AttnSegSeeds")
    focus(browser, seeds, 0.7)  # the whole node in the window: clicks land where aimed
    canvas = canvas_of(browser, seeds)
    wait_for(browser, "return arguments[0].closest('[data-attnseg=seed-editor]')"
                      ".querySelector('[data-attnseg=seed-status]').textContent.includes('192x128')", 30, canvas)
    time.sleep(2.0)
    assert canvas_aspect(browser, canvas) == pytest.approx(192 / 128, rel=0.05)
    editor = browser.execute_script("return arguments[0].closest('[data-attnseg=seed-editor]')", canvas)
    editor.find_element(By.CSS_SELECTOR, "[data-attnseg=seed-clear]").click()
    if browser.canvas_kind == "classic":
        # A node kept shorter than the image asks: the image is letterboxed, its sides are not the image.
        browser.execute_script("const n = app.graph.getNodeById(arguments[0]); n.setSize([n.size[0], n.size[1] - 250]);"
                               "app.graph.setDirtyCanvas(true, true);", seeds)
        time.sleep(1.5)
        assert canvas_aspect(browser, canvas) > 192 / 128 * 1.2
        ActionChains(browser).move_to_element_with_offset(canvas, -canvas.size["width"] // 2 + 3, 0).click().perform()
        assert json.loads(widget_value(browser, seeds, "seeds")) == []
    ActionChains(browser).move_to_element_with_offset(canvas, 0, 0).click().perform()
    (point,) = json.loads(widget_value(browser, seeds, "seeds"))
    assert point["point"] == [pytest.approx(96, abs=3), pytest.approx(64, abs=3)]
    assert severe_errors(browser) == []


def test_seed_editor_says_when_no_image_is_connected(browser):
    browser.execute_script("app.graph.clear();"
                           "const n = LiteGraph.createNode('AttnSegSeeds'); n.pos = [200, 200]; app.graph.add(n);")
    status = wait_for(browser, "const n = app.graph._nodes.find(n => n.type === 'AttnSegSeeds');"
                               "const s = n.widgets.find(w => w.name === 'seed_editor').element"
                               ".querySelector('[data-attnseg=seed-status]');"
                               "return s.textContent.includes('Connect') && s.textContent;", 10)
    assert "Load Image" in status


def picker_state(driver, node: int):
    return driver.execute_script(
        "const e = app.graph.getNodeById(arguments[0]).widgets.find(w => w.name === 'class_picker').element;"
        "return {words: [...e.querySelectorAll('[data-attnseg-word]')].map(c => [c.dataset.attnsegWord,"
        " c.dataset.selected]), status: e.querySelector('[data-attnseg=class-status]').textContent,"
        " missing: e.querySelector('[data-attnseg=class-status]').dataset.missing}", node)


def test_class_picker_toggles_words_and_flags_missing_classes(browser):
    load(browser, "diffsegmenter-segment")
    text = node_id(browser, "AttnSegTextEncode")
    state = wait_for(browser, "const e = app.graph.getNodeById(arguments[0]).widgets"
                              ".find(w => w.name === 'class_picker').element;"
                              "return e.querySelectorAll('[data-attnseg-word]').length >= 7;", 30, text)
    assert state
    words = dict(picker_state(browser, text)["words"])
    assert words["red"] == "true" and words["circle"] == "true" and words["and"] == "false"
    browser.execute_script(
        "const e = app.graph.getNodeById(arguments[0]).widgets.find(w => w.name === 'class_picker').element;"
        "e.querySelector('[data-attnseg-word=blue]').dispatchEvent(new PointerEvent('pointerdown', {bubbles: true}))",
        text)
    assert widget_value(browser, text, "classes") == "red circle"
    browser.execute_script(
        "const e = app.graph.getNodeById(arguments[0]).widgets.find(w => w.name === 'class_picker').element;"
        "e.querySelector('[data-attnseg-word=square]').dispatchEvent(new PointerEvent('pointerdown', {bubbles: true}))",
        text)
    assert widget_value(browser, text, "classes") == "red circle, square"
    browser.execute_script("const n = app.graph.getNodeById(arguments[0]);"
                           "n.widgets.find(w => w.name === 'classes').value = 'red circle, green star';", text)
    wait_for(browser, "const e = app.graph.getNodeById(arguments[0]).widgets.find(w => w.name === 'class_picker')"
                      ".element; return e.querySelector('[data-attnseg=class-status]').dataset.missing === 'green star'",
             10, text)
    assert "Not in the prompt: green star" in picker_state(browser, text)["status"]
    browser.execute_script("const n = app.graph.getNodeById(arguments[0]);"
                           "n.widgets.find(w => w.name === 'prompt').value = ' , ; ';", text)
    wait_for(browser, "const e = app.graph.getNodeById(arguments[0]).widgets.find(w => w.name === 'class_picker')"
                      ".element; return e.querySelector('[data-attnseg=class-status]').textContent"
                      ".includes('Not in the prompt: red circle, green star')", 10, text)
    browser.execute_script("const n = app.graph.getNodeById(arguments[0]);"
                           "n.widgets.find(w => w.name === 'prompt').value = '   ';"
                           "n.widgets.find(w => w.name === 'classes').value = '';", text)
    wait_for(browser, "const e = app.graph.getNodeById(arguments[0]).widgets.find(w => w.name === 'class_picker')"
                      ".element; return e.querySelector('[data-attnseg=class-status]').textContent"
                      ".startsWith('Empty prompt')", 10, text)
    assert picker_state(browser, text)["words"] == []


def test_tokenize_route_explains_a_bad_body(server):
    import urllib.error
    import urllib.request
    for body, reason in ((b"not json", "the body must be JSON"), (b'{"prompt": 3}', "prompt: a string is required"),
                         (b'{"prompt": "a cat", "classes": [1]}', "classes: a comma-separated string")):
        request = urllib.request.Request(server.url + "/attnseg/tokenize", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=30)
        assert error.value.code == 400 and reason in json.loads(error.value.read())["error"]
    found = server.post("/attnseg/tokenize", {"prompt": "a red circle", "classes": "circle, star"})
    assert [w["text"] for w in found["words"]] == ["a", "red", "circle"] and found["missing"] == ["star"]


def test_queued_workflow_shows_the_mask_preview(browser):
    load(browser, "diffsegmenter-segment")
    masks = node_id(browser, "AttnSegMasks")
    browser.execute_script("app.queuePrompt(0, 1)")
    if browser.canvas_kind == "classic":
        count = wait_for(browser, "const n = app.graph.getNodeById(arguments[0]);"
                                  "return n.imgs && n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth)"
                                  " && n.imgs.length", 180, masks)
        assert count == 2  # the labels over the image and the heat map, each with its legend
        sizes = browser.execute_script("return app.graph.getNodeById(arguments[0]).imgs"
                                       ".map(i => [i.naturalWidth, i.naturalHeight])", masks)
    else:  # Nodes 2.0 shows a node's output images as <img> elements inside the node
        sizes = wait_for(browser, "const e = document.querySelector(`[data-node-id='${arguments[0]}']`);"
                                  "const imgs = e ? [...e.querySelectorAll('img')] : [];"
                                  "return imgs.length && imgs.every(i => i.complete && i.naturalWidth)"
                                  " && imgs.map(i => [i.naturalWidth, i.naturalHeight])", 180, masks)
        assert 1 <= len(sizes) <= 2  # 1.32 shows one image at a time, 1.58 both
    assert sizes == [[192, 128 + 14 * 3]] * len(sizes)
    focus(browser, masks, 1.3)
    node_screenshot(browser, masks, ARTIFACTS / "mask-preview.png")
    assert severe_errors(browser) == []

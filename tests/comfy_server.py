"""Runs the real ComfyUI server on 127.0.0.1 with this pack installed, in a base
directory of its own (custom_nodes/, models/, input/, output/), and runs API
workflows against it. Used by the end-to-end tests and the demo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from comfy_env import REPO, comfyui_path

# The folder a Registry install uses (the node id in pyproject.toml).
PACK_FOLDER = "attnseg"
# The test-only node package (tests/e2e_nodes), installed with test_nodes=True.
TEST_NODES = REPO / "tests" / "e2e_nodes" / "attnseg_test_nodes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkflowError(RuntimeError):
    """A workflow that ComfyUI rejected or that failed while running."""


class ComfyServer:
    def __init__(self, base: Path, checkpoints: list[Path] = (), log: Path | None = None,
                 extra_args: list[str] = (), test_nodes: bool = False, models: dict[str, list[Path]] | None = None):
        """``extra_args`` go to main.py after the pack's own (e.g. --lowvram, --front-end-root DIR).
        ``test_nodes`` also installs tests/e2e_nodes' package; ``models`` links files into
        models/<subfolder>/ ({"diffusion_models": [...], "vae": [...], "text_encoders": [...]})."""
        self.base = Path(base)
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log or self.base / "server.log"
        for sub in ("custom_nodes", "models/checkpoints", "input", "output"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_FOLDER
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        test_link = self.base / "custom_nodes" / TEST_NODES.name
        if test_nodes and not test_link.exists():
            test_link.symlink_to(TEST_NODES, target_is_directory=True)
        for subfolder, files in [("checkpoints", checkpoints), *(models or {}).items()]:
            (self.base / "models" / subfolder).mkdir(parents=True, exist_ok=True)
            for file in files:
                target = self.base / "models" / subfolder / Path(file).name
                if not target.exists():
                    target.symlink_to(Path(file).resolve())
        self.process: subprocess.Popen | None = None

    def __enter__(self):
        comfy = comfyui_path()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
             *self.extra_args],
            cwd=comfy, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not start in 180 s:\n{self.log()}")

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server's own process group, nothing else
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-6000:]

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return json.loads(response.read())

    def post(self, route: str, body: dict):
        request = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise WorkflowError(f"{route} answered {error.code}: {error.read().decode(errors='replace')}")

    def run(self, prompt: dict, timeout: float = 900, client_id: str | None = None) -> dict:
        """POST an API-format workflow, wait for it, return its history entry."""
        prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    messages = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise WorkflowError(json.dumps(messages[0][1] if messages else status, indent=1))
                if status.get("completed", True):
                    return entry
            time.sleep(0.5)
        raise WorkflowError(f"workflow did not finish in {timeout} s:\n{self.log()}")

    def output_files(self, entry: dict) -> dict[str, list[Path]]:
        """{node id: [files]} of the images a finished workflow saved."""
        found = {}
        for node_id, output in entry.get("outputs", {}).items():
            files = []
            for image in output.get("images", []):
                root = self.base / image.get("type", "output")
                files.append(root / image.get("subfolder", "") / image["filename"])
            found[node_id] = files
        return found

    def add_input(self, path: Path) -> str:
        shutil.copy(path, self.base / "input" / Path(path).name)
        return Path(path).name

"""The pack is publishable as it stands: pyproject.toml in the form the Comfy
Registry reads, a publish workflow, and a README that claims no listing the
pack does not have."""

import re
import tomllib

from comfy_env import REPO, comfyui_path

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
GITHUB = "https://github.com/attnseg/comfyui-attnseg"
RAW = "https://raw.githubusercontent.com/attnseg/comfyui-attnseg/main/"


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_node_id_follows_the_registry_rules():
    node_id = PYPROJECT["project"]["name"]
    assert re.fullmatch(r"[a-z][a-z0-9]*([-_.][a-z0-9]+)*", node_id) and len(node_id) < 100
    assert "comfyui" not in node_id.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", PYPROJECT["project"]["version"])


def test_the_urls_are_the_ones_the_registry_and_comfyui_read():
    urls = PYPROJECT["project"]["urls"]
    assert set(urls) == {"Homepage", "Documentation", "Repository", "Issues"}
    assert all(url.startswith(GITHUB) for url in urls.values())
    assert urls["Issues"] == GITHUB + "/issues"


def test_the_icon_is_a_file_the_repository_ships():
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    assert icon.startswith(RAW)
    assert (REPO / icon[len(RAW):]).is_file()


def test_requires_comfyui_admits_the_comfyui_the_tests_run_on():
    required = PYPROJECT["tool"]["comfy"]["requires-comfyui"]
    oldest = re.fullmatch(r">=(\d+\.\d+\.\d+)", required).group(1)
    namespace = {}
    exec((comfyui_path() / "comfyui_version.py").read_text(), namespace)
    assert version_tuple(namespace["__version__"]) >= version_tuple(oldest)


def test_a_version_bump_publishes_with_the_token_kept_as_a_secret():
    workflow = (REPO / ".github" / "workflows" / "publish.yml").read_text()
    assert "Comfy-Org/publish-node-action@" in workflow
    assert "personal_access_token: ${{ secrets.REGISTRY_ACCESS_TOKEN }}" in workflow
    assert re.search(r"paths: \[pyproject\.toml\]", workflow)


def test_the_readme_installs_as_today_and_names_the_node_id():
    install = (REPO / "README.md").read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "search for" not in install.lower()  # not listed in the Registry or the Manager yet
    assert f"custom_nodes/{PYPROJECT['project']['name']}" in install
    assert "Install via Git URL" in install

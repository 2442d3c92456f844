"""Hardening case 9: a router's expert references cannot escape the router's home.

A router from the Hub may list hf:// and builtin: references and folders inside its own
snapshot, nothing else (no absolute paths, no ``..`` out of the snapshot). A built-in router's
folders stay inside the package. A local router is the user's own folder: its relative paths
resolve from the router's folder (not the working directory), wherever they lead.
The Hub cases run offline against a hand-built huggingface_hub cache (as tests/test_hub.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dualrs_route.experts.errors import ModelFormatError
from dualrs_route.experts.folders import PACKAGE_ROOT, check_listed_reference, load_folder
from dualrs_route.router.dual import load_router_set
from hostile import invoke, one_error_line
from rs_oracle import write_linear_folder

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def expert(path: Path) -> Path:
    return write_linear_folder(path, weight=np.eye(2, 4), bias=np.zeros(2), sigma=0.5)


def router(path: Path, experts) -> Path:
    return write_linear_folder(path, weight=np.eye(len(experts), 4), bias=np.zeros(len(experts)), sigma=0.5,
                               kind="router", experts=experts)


def hub_router(tmp_path: Path, experts) -> tuple[Path, Path]:
    """A cache holding hf://org/router (with an expert folder ``inner`` in its snapshot) and hf://org/expert."""
    cache = tmp_path / "cache"
    for repo_id, build in (("org/router", lambda p: (router(p, experts), expert(p / "inner"))),
                           ("org/expert", expert)):
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        build(tmp_path / "src" / repo_id)
        shutil.copytree(tmp_path / "src" / repo_id, repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    return cache, repo


@pytest.fixture
def offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))


def test_hub_router_may_list_its_own_folders_and_hub_references(tmp_path, offline):
    hub_router(tmp_path, ["inner", "./inner/../inner", "hf://org/expert"])
    folder, experts = load_router_set("hf://org/router")
    snapshot = folder.path
    assert experts[0].path == (snapshot / "inner").resolve() == experts[1].path
    assert experts[2].reference == "hf://org/expert" and experts[2].revision == COMMIT


@pytest.mark.parametrize("listed", ["../../../../outside", "inner/../../escape", "ABSOLUTE"])
def test_hub_router_listing_paths_outside_its_snapshot_is_refused(tmp_path, offline, listed):
    outside = expert(tmp_path / "outside")  # a real expert: refused by the check, not for being missing
    listed = str(outside) if listed == "ABSOLUTE" else listed
    _, repo = hub_router(tmp_path, ["inner", listed])
    if not listed.startswith("inner"):
        assert (repo.parent / "models--org--router" / "snapshots" / COMMIT / listed / "config.json").is_file()
    with pytest.raises(ModelFormatError, match="points outside its Hub snapshot"):
        load_router_set("hf://org/router")
    result = invoke("certify", "--router", "hf://org/router", "--quiet", "--out", tmp_path / "r.tsv")
    one_error_line(result, mentions="points outside its Hub snapshot")
    assert not (tmp_path / "r.tsv").exists()


def test_hub_router_cannot_reach_another_cached_repository(tmp_path, offline):
    """Another cached repository's snapshot, reached with ../: refused."""
    _, repo = hub_router(tmp_path, ["inner", "inner"])
    snapshot = repo.parent / "models--org--router" / "snapshots" / COMMIT
    escape = Path("..") / ".." / ".." / "models--org--expert" / "snapshots" / COMMIT
    assert (snapshot / escape / "config.json").is_file()
    config = json.loads((snapshot / "config.json").read_text())
    config["experts"] = ["inner", str(escape)]
    (snapshot / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="outside"):
        load_router_set("hf://org/router")


def test_local_router_resolves_relative_paths_from_its_own_folder(tmp_path, monkeypatch):
    expert(tmp_path / "zoo" / "a")
    expert(tmp_path / "zoo" / "b")
    router(tmp_path / "zoo" / "routers" / "r", ["../../a", str(tmp_path / "zoo" / "b")])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _, experts = load_router_set(str(tmp_path / "zoo" / "routers" / "r"))
    assert [e.path for e in experts] == [(tmp_path / "zoo" / "a").resolve(), (tmp_path / "zoo" / "b").resolve()]


def test_builtin_router_stays_inside_the_package():
    folder = load_folder("builtin:digits-router")
    for ref in folder.config.experts:
        check_listed_reference(folder, ref)  # the bundled router's own ../../../experts/zoo paths
    with pytest.raises(ModelFormatError, match="outside the package"):
        check_listed_reference(folder, "../../../../elsewhere")
    with pytest.raises(ModelFormatError, match="outside the package"):
        check_listed_reference(folder, str(PACKAGE_ROOT / "experts" / "zoo" / "digits-sigma0.25"))

"""hf://org/repo[@rev] resolution offline against a hand-built Hub cache, and local references.

huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE at import time; experts.folders reads
HF_HUB_OFFLINE at call time and passes ``local_files_only``, and the cache is given with
``cache_dir`` (or, for the CLI, by patching ``huggingface_hub.constants.HF_HUB_CACHE``, the
default that ``snapshot_download`` looks up at call time).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dualrs_route.experts.errors import ModelFormatError, ModelNotFoundError
from dualrs_route.experts.folders import load_folder, parse_hub_reference, resolve_reference, sha256_file
from rs_oracle import write_linear_folder

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def build_cache(cache: Path, repo_id: str, source: Path, commit: str, refs=("main",)) -> Path:
    """Lay out ``models--org--name/snapshots/<commit>/`` (+ refs/<ref>) as huggingface_hub does."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = write_linear_folder(tmp_path / "src", weight=np.eye(2, 4), bias=np.zeros(2), sigma=0.5)
    other = write_linear_folder(tmp_path / "src_old", weight=2 * np.eye(2, 4), bias=np.zeros(2), sigma=0.25)
    cache = tmp_path / "cache"
    build_cache(cache, "org/expert", source, COMMIT)
    build_cache(cache, "org/expert", other, OLD_COMMIT, refs=())
    return cache, source, other


def test_parse_hub_reference():
    assert parse_hub_reference("hf://org/repo") == ("org/repo", None)
    assert parse_hub_reference("hf://org/repo@v1.0") == ("org/repo", "v1.0")
    for bad in ("hf://repo", "hf://org/", "hf://a/b/c", "hf:///x"):
        with pytest.raises(ModelNotFoundError, match="hf://org/repo"):
            parse_hub_reference(bad)


def test_offline_resolution_records_commit_and_hashes(hub):
    cache, source, _ = hub
    folder = load_folder("hf://org/expert", cache_dir=str(cache))
    assert folder.revision == COMMIT
    assert folder.files == {"model.safetensors": sha256_file(source / "model.safetensors")}
    assert folder.config.sigma == 0.5 and folder.name == "expert"
    prov = folder.provenance()
    assert prov["revision"] == COMMIT and prov["reference"] == "hf://org/expert"
    assert len(prov["sha256"]["model.safetensors"]) == 64
    model = folder.load_torch_model()  # the cached weights load strictly
    assert model is not None


def test_offline_resolution_by_ref_and_by_commit(hub):
    cache, _, other = hub
    assert load_folder("hf://org/expert@main", cache_dir=str(cache)).revision == COMMIT
    old = load_folder(f"hf://org/expert@{OLD_COMMIT}", cache_dir=str(cache))
    assert old.revision == OLD_COMMIT and old.config.sigma == 0.25
    assert old.files["model.safetensors"] == sha256_file(other / "model.safetensors")


def test_offline_missing_repo_or_revision_is_model_not_found(hub):
    cache, _, _ = hub
    with pytest.raises(ModelNotFoundError) as info:
        load_folder("hf://org/missing", cache_dir=str(cache))
    message = str(info.value)
    assert "hf://org/missing" in message and "HF_HUB_OFFLINE" in message and "local folder" in message
    with pytest.raises(ModelNotFoundError, match="hf://org/expert@v9"):
        load_folder("hf://org/expert@v9", cache_dir=str(cache))


def test_offline_flag_is_read_at_call_time(hub, monkeypatch):
    # huggingface_hub was imported long ago (HF_HUB_OFFLINE unset or set then); flipping the variable
    # now must still keep us off the network: the cache is used and a miss fails fast.
    import time

    cache, _, _ = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError):
        load_folder("hf://org/nothing-here", cache_dir=str(cache))
    assert time.monotonic() - start < 10


def test_cli_uses_default_cache_offline(hub, monkeypatch, tmp_path):
    import json

    import huggingface_hub.constants
    from click.testing import CliRunner

    from dualrs_route.cli import main

    cache, _, _ = hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    x = np.random.default_rng(0).uniform(size=(3, 1, 1, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(3, np.int64))
    out = tmp_path / "hub.tsv"
    result = CliRunner().invoke(main, ["certify", "--expert", "hf://org/expert", "--dataset", f"npz:{tmp_path / 'd.npz'}",
                                       "--N0", "10", "--N", "50", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (model,) = json.loads(Path(str(out) + ".json").read_text())["models"]
    assert model["revision"] == COMMIT and model["reference"] == "hf://org/expert"


def test_local_references(tmp_path):
    folder = write_linear_folder(tmp_path / "models" / "e", weight=np.eye(2, 4), bias=np.zeros(2), sigma=0.5)
    path, revision = resolve_reference(str(folder))
    assert path == folder.resolve() and revision == "local"
    path, _ = resolve_reference("e", base_dir=tmp_path / "models")  # relative to a router's folder
    assert path == folder.resolve()
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_reference("nope", base_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_reference(str(folder / "config.json"))
    with pytest.raises(ModelNotFoundError):
        resolve_reference("")
    with pytest.raises(ModelNotFoundError, match="built-in"):
        resolve_reference("builtin:no-such-model")
    with pytest.raises(ModelFormatError, match="expected a router"):
        load_folder(str(folder), expected_kind="router")


def test_download_patterns_fetch_experts_in_subfolders(monkeypatch, tmp_path):
    """A router repository listing experts as folders inside it: snapshot_download must fetch their files too."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    seen = {}

    def fake_snapshot_download(**kwargs):
        seen.update(kwargs)
        return str(tmp_path / "snapshots" / COMMIT)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolve_reference("hf://org/router")
    repo_files = ["config.json", "model.safetensors", "experts/e0/config.json", "experts/e0/model.safetensors",
                  "experts/e1/model.onnx", "train.log", "experts/e0/checkpoint.pt", "data/images.npz"]
    kept = list(filter_repo_objects(repo_files, allow_patterns=seen["allow_patterns"]))
    assert kept == ["config.json", "model.safetensors", "experts/e0/config.json", "experts/e0/model.safetensors",
                    "experts/e1/model.onnx"]

"""Which files in the models folder are models, and that no request reaches a file outside it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from conftest import LiveServer
from gguf_factory import write_llama_model, write_not_gguf

from discovery import discover


def test_finds_models_in_sub_folders_by_file_name(tmp_path):
    write_not_gguf(tmp_path / "top.gguf")
    (tmp_path / "a" / "b").mkdir(parents=True)
    write_not_gguf(tmp_path / "a" / "b" / "deep.gguf")
    write_not_gguf(tmp_path / "a" / "notes.txt")
    models = discover(tmp_path)
    assert sorted(models) == ["deep", "top"]
    assert models["deep"].path == tmp_path / "a" / "b" / "deep.gguf"
    assert models["top"].size == (tmp_path / "top.gguf").stat().st_size


def test_split_model_is_one_model_loaded_from_its_first_part(tmp_path):
    sizes = []
    for part, text in ((1, "a"), (2, "bb"), (3, "ccc")):
        path = tmp_path / f"big-{part:05d}-of-00003.gguf"
        path.write_text(text * 100, encoding="utf-8")
        sizes.append(path.stat().st_size)
    models = discover(tmp_path)
    assert list(models) == ["big"]
    assert models["big"].path == tmp_path / "big-00001-of-00003.gguf"
    assert models["big"].size == sum(sizes)


def test_vision_projector_is_not_a_model(tmp_path):
    write_not_gguf(tmp_path / "mmproj-x.gguf")
    write_not_gguf(tmp_path / "llava.gguf")
    assert list(discover(tmp_path)) == ["llava"]


def test_same_name_in_two_sub_folders_uses_relative_paths_and_warns(tmp_path, caplog):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_not_gguf(tmp_path / folder / "m.gguf")
    with caplog.at_level(logging.WARNING, logger="discovery"):
        models = discover(tmp_path)
    assert sorted(models) == ["a/m", "b/m"]
    assert models["b/m"].path == tmp_path / "b" / "m.gguf"
    assert any("a/m" in r.getMessage() and "b/m" in r.getMessage() for r in caplog.records)


def test_symlinks_leading_outside_are_skipped(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_not_gguf(outside / "secret.gguf")
    root = tmp_path / "models"
    root.mkdir()
    write_not_gguf(root / "inside.gguf")
    (root / "link.gguf").symlink_to(outside / "secret.gguf")
    (root / "linked-folder").symlink_to(outside, target_is_directory=True)
    models = discover(root)
    assert list(models) == ["inside"]


def test_missing_folder_has_no_models(tmp_path):
    assert discover(tmp_path / "nowhere") == {}


# ------------------------------------------------------------------ over HTTP


def assert_openai_error(response, statuses=(400, 404)):
    assert response.status_code in statuses, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]


@pytest.fixture
def canary(tmp_path: Path, models_dir: Path) -> Path:
    """A real model outside the models folder, also symlinked into it as a file and as a folder."""
    path = write_llama_model(tmp_path / "canary.gguf", seed=9)
    (models_dir / "canary-link.gguf").symlink_to(path)
    (models_dir / "outside").symlink_to(tmp_path, target_is_directory=True)
    return path


def test_names_outside_the_models_folder_are_never_loaded(make_server, canary):
    server: LiveServer = make_server()
    names = ["../canary", "../canary.gguf", "..%2Fcanary", "..\\canary", str(canary), str(canary.with_suffix("")),
             "canary", "canary-link", "outside/canary", "tiny\x00../canary", "x" * 2000]
    for name in names:
        body = {"model": name, "prompt": "Hi", "max_tokens": 1}
        assert_openai_error(server.post("/v1/completions", body))
        assert_openai_error(server.post("/admin/load", {"model": name}))
    paths = ["../canary", "..%2Fcanary", "%2E%2E%2Fcanary", canary.as_posix(), canary.as_posix().lstrip("/"),
             "tiny%00", "x" * 2000]
    for path in paths:
        assert_openai_error(server.get("/v1/models/" + path))
    assert server.loader.loads == []
    assert sorted(m["id"] for m in server.get("/v1/models").json()["data"]) == ["tiny", "tiny-chat"]


def test_model_dropped_in_after_startup_is_found_without_reload(make_server, models_dir):
    server: LiveServer = make_server()
    write_llama_model(models_dir / "late.gguf", seed=3)
    time.sleep(1.1)  # unknown names trigger a rescan at most once a second
    reply = server.post("/v1/completions", {"model": "late", "prompt": "Hi", "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert server.loader.loads == ["late"]

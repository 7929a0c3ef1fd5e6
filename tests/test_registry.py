"""The registry alone (``registry.Registry``): names, aliases and rescans over a temp folder,
with no server and no worker."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from gguf_factory import write_not_gguf
from helpers import FakeClock

from config import ManagerSettings, ModelSettings
from discovery import ModelFile
from errors import InvalidRequest, ModelNotFound
from registry import REDISCOVER_INTERVAL, Registry


def make_registry(folder: Path, models: dict[str, ModelSettings] | None = None, *, clock: FakeClock | None = None,
                  **settings) -> Registry:
    registry = Registry(ManagerSettings(models_directory=folder, **settings), models, clock=clock or FakeClock())
    registry.rediscover()
    return registry


def test_ids_file_names_and_aliases_resolve_to_the_model_id(tmp_path):
    write_not_gguf(tmp_path / "alpha.gguf")
    registry = make_registry(tmp_path, {"alpha": ModelSettings(aliases=["gpt-4o-mini"])})
    assert registry.resolve("alpha") == "alpha"
    assert registry.resolve("alpha.gguf") == "alpha"
    assert registry.resolve("gpt-4o-mini") == "alpha"
    assert registry.model_file("alpha").path == tmp_path / "alpha.gguf"


def test_no_name_takes_the_default_model_or_asks_for_one(tmp_path):
    write_not_gguf(tmp_path / "alpha.gguf")
    models = {"alpha": ModelSettings(aliases=["fast"])}
    assert make_registry(tmp_path, models, default_model="fast").resolve(None) == "alpha"
    with pytest.raises(InvalidRequest) as caught:
        make_registry(tmp_path, models).resolve(None)
    assert caught.value.code == "missing_model"


@pytest.mark.parametrize("name", ["", "x" * 513, "alpha\x00"])
def test_names_no_file_could_have_are_not_found(tmp_path, name):
    write_not_gguf(tmp_path / "alpha.gguf")
    with pytest.raises(ModelNotFound):
        make_registry(tmp_path).resolve(name)


def test_an_unknown_name_is_told_what_there_is(tmp_path):
    for name in "abcdefg":
        write_not_gguf(tmp_path / f"{name}.gguf")
    with pytest.raises(ModelNotFound) as caught:
        make_registry(tmp_path).resolve("zeta")
    assert "available: a, b, c, d, e and 2 more" in caught.value.message
    with pytest.raises(ModelNotFound) as caught:
        make_registry(tmp_path / "empty").resolve("zeta")
    assert "no models are installed" in caught.value.message


def test_a_file_dropped_in_is_found_once_the_last_scan_is_a_second_old(tmp_path):
    clock = FakeClock()
    registry = make_registry(tmp_path, clock=clock)
    write_not_gguf(tmp_path / "late.gguf")
    with pytest.raises(ModelNotFound):
        registry.resolve("late")  # scanned just now: no rescan per unknown name
    clock.advance(REDISCOVER_INTERVAL + 0.1)
    assert registry.resolve("late") == "late"


def test_a_stale_lookup_rescans_through_the_owner(tmp_path):
    rescans: list[str] = []
    registry = Registry(ManagerSettings(models_directory=tmp_path), rescan=lambda: rescans.append("owner"))
    with pytest.raises(ModelNotFound):
        registry.resolve("anything")
    assert rescans == ["owner"]


def test_rediscover_reports_changes_and_syncs_the_owner_under_the_lock(tmp_path):
    write_not_gguf(tmp_path / "a.gguf")
    write_not_gguf(tmp_path / "b.gguf")
    lock = threading.Lock()
    registry = Registry(ManagerSettings(models_directory=tmp_path), lock=lock)
    seen: list[tuple[list[str], bool]] = []

    def sync(found: dict[str, ModelFile]) -> None:
        seen.append((sorted(found), lock.locked()))

    assert registry.rediscover(sync=sync) == (["a", "b"], [])
    (tmp_path / "a.gguf").unlink()
    write_not_gguf(tmp_path / "c.gguf")
    assert registry.rediscover(sync=sync) == (["c"], ["a"])
    assert seen == [(["a", "b"], True), (["b", "c"], True)]
    with pytest.raises(ModelNotFound):
        registry.model_file("a")


def test_new_settings_replace_the_aliases(tmp_path):
    write_not_gguf(tmp_path / "alpha.gguf")
    registry = make_registry(tmp_path, {"alpha": ModelSettings(aliases=["old"])})
    registry.configure(ManagerSettings(models_directory=tmp_path),
                       {"alpha": ModelSettings(aliases=["new"], pinned=True)})
    assert registry.resolve("new") == "alpha"
    assert registry.model_settings("alpha").pinned
    with pytest.raises(ModelNotFound):
        registry.resolve("old")

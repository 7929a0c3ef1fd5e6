"""``config.load_settings``: the file, the environment and flags, and the errors they give."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from config import ConfigError, Settings, load_settings


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def config_error(path: Path, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={}, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_absent_file_gives_defaults(tmp_path):
    assert load_settings(tmp_path / "config.json", environ={}) == Settings()


def test_required_file_that_is_missing_is_an_error(tmp_path):
    message = config_error(tmp_path / "mine.json", required=True)
    assert str(tmp_path / "mine.json") in message
    assert "not found" in message


def test_invalid_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "server": {\n    "port": 8080,\n  }\n}\n', encoding="utf-8")
    message = config_error(path)
    assert message.startswith(f"{path}: invalid JSON")
    assert "line 4 column 3" in message


def test_top_level_must_be_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]", encoding="utf-8")
    assert "JSON object" in config_error(path)


@pytest.mark.parametrize(("data", "key"), [
    ({"bogus": 1}, "bogus"),
    ({"server": {"prot": 8080}}, "server.prot"),
    ({"model_manager": {"idle_timout": 5}}, "model_manager.idle_timout"),
])
def test_unknown_key_is_named_with_its_dotted_path(tmp_path, data, key):
    path = write_config(tmp_path / "config.json", data)
    message = config_error(path)
    assert message.startswith(str(path))
    assert f"{key}: unknown key" in message


@pytest.mark.parametrize(("data", "key"), [
    ({"server": {"port": "abc"}}, "server.port"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"server": {"log_level": "LOUD"}}, "server.log_level"),
    ({"model_manager": {"idle_timeout": "x"}}, "model_manager.idle_timeout"),
    ({"model_manager": {"n_threads": 0}}, "model_manager.n_threads"),
])
def test_wrong_type_names_file_and_key(tmp_path, data, key):
    path = write_config(tmp_path / "config.json", data)
    message = config_error(path)
    assert message.startswith(f"{path}: {key}: ")


def test_relative_models_directory_resolves_against_file_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write_config(folder / "config.json", {"model_manager": {"models_directory": "gguf/here"}})
    settings = load_settings(path, environ={})
    assert settings.model_manager.models_directory == folder / "gguf" / "here"


def test_relative_models_directory_from_environment_resolves_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path / "sub.json", {})
    settings = load_settings(path, environ={"LLAMA_SERVER_MODELS_DIRECTORY": "from-env"})
    assert settings.model_manager.models_directory == tmp_path.resolve() / "from-env"


def test_precedence_flag_over_environment_over_file_over_default(tmp_path):
    path = write_config(tmp_path / "config.json", {"server": {"port": 1111}, "model_manager": {"n_ctx": 100}})
    environ = {"LLAMA_SERVER_PORT": "2222"}
    flags = {"server": {"port": 3333}}
    assert load_settings(path, flags, environ).server.port == 3333
    assert load_settings(path, None, environ).server.port == 2222
    assert load_settings(path, None, {}).server.port == 1111
    assert load_settings(tmp_path / "absent.json", None, {}).server.port == 8080
    # a key no layer above sets keeps the file's value
    assert load_settings(path, flags, environ).model_manager.n_ctx == 100


def test_environment_values_are_parsed_per_key(tmp_path):
    path = write_config(tmp_path / "config.json", {"model_manager": {"n_threads": 4, "models_directory": "x"}})
    environ = {
        "LLAMA_SERVER_PORT": "9000",
        "LLAMA_SERVER_MODELS_DIRECTORY": str(tmp_path / "env-models"),
        "LLAMA_SERVER_CORS_ORIGINS": "http://a.example, http://b.example:81,",
        "LLAMA_SERVER_N_THREADS": "null",
        "LLAMA_SERVER_IDLE_TIMEOUT": "2.5",
    }
    settings = load_settings(path, environ=environ)
    assert settings.server.port == 9000
    assert settings.server.cors_origins == ["http://a.example", "http://b.example:81"]
    assert settings.model_manager.models_directory == tmp_path / "env-models"
    assert settings.model_manager.n_threads is None
    assert settings.model_manager.idle_timeout == 2.5


def test_bad_environment_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_settings(tmp_path / "absent.json", environ={"LLAMA_SERVER_PORT": "abc"})


def test_numeric_default_model_name_from_environment_stays_a_string(tmp_path):
    settings = load_settings(tmp_path / "absent.json", environ={"LLAMA_SERVER_DEFAULT_MODEL": "2024"})
    assert settings.model_manager.default_model == "2024"


def test_shipped_config_has_the_documented_defaults():
    settings = load_settings(ROOT / "config.json", environ={}, required=True)
    server, manager = settings.server, settings.model_manager
    assert (server.host, server.port, server.cors_origins, server.log_level) == (
        "127.0.0.1", 8080, ["http://localhost:5000"], "INFO")
    assert manager.models_directory.resolve() == ROOT / "models"
    assert (manager.idle_timeout, manager.check_interval, manager.n_ctx, manager.n_gpu_layers) == (300, 60, 8192, -1)
    assert manager.n_threads is None
    assert manager.default_model is None


def test_data_directory_resolves_like_models_directory_and_the_store_bounds_come_from_the_environment(
        tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    path = write_config(folder / "config.json", {"server": {"data_directory": "state"}})
    assert load_settings(path, environ={}).server.data_directory == folder / "state"
    environ = {"LLAMA_SERVER_DATA_DIRECTORY": "from-env", "LLAMA_SERVER_RESPONSES_MAX_COUNT": "5",
               "LLAMA_SERVER_RESPONSES_MAX_AGE": "3600"}
    server = load_settings(path, environ=environ).server
    assert (server.data_directory, server.responses_max_count, server.responses_max_age) == (
        tmp_path.resolve() / "from-env", 5, 3600)
    assert "responses_max_age" in config_error(write_config(folder / "bad.json", {"server": {"responses_max_age": 0}}))

"""settings.py: config.yaml read, checked and overridden from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from errors import ConfigError
from settings import ChatSettings, GenerationDefaults, ManagerSettings, ServerSettings, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def unanchored(settings: Settings) -> Settings:
    """The settings with the folders that load_settings anchors at the config file put back as written."""
    image = settings.image.model_copy(update={"outputs_dir": Path("outputs")})
    audit = settings.audit.model_copy(update={"path": Path("logs/audit.jsonl")})
    folders = {"models_dir": Path("models"), "data_dir": Path("data")}
    return settings.model_copy(update={**folders, "image": image, "audit": audit})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    return str(caught.value)


# ----------------------------------------------------------------------------
# Defaults and the repo's own config.yaml
# ----------------------------------------------------------------------------


def test_defaults_when_no_path() -> None:
    settings = load_settings(None)
    assert settings == Settings()
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 7860
    assert settings.models_dir == Path("models")
    assert settings.manager.policy == "one_at_a_time"
    assert settings.manager.gpu_memory_budget_gb == 24.0
    assert settings.manager.keep_alive_s == 300.0
    assert settings.manager.wait_timeout_s == 600.0
    assert settings.chat.context_size == 4096
    assert settings.chat.gpu_layers == "auto"
    assert settings.chat.threads == "auto"
    assert settings.chat.defaults.temperature == 0.7
    assert settings.chat.defaults.top_p == 0.95
    assert settings.chat.defaults.max_tokens == 512
    assert settings.chat.defaults.seed == -1


def test_defaults_ignore_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCLAVE_PORT", "9999")
    assert load_settings(None).server.port == 7860


def test_the_repos_config_yaml_equals_the_defaults_except_models_dir() -> None:
    path = ROOT / "config.yaml"
    settings = load_settings(path, {})
    assert settings.models_dir.name == "models"
    assert settings.models_dir.is_absolute()
    assert settings.models_dir.parent == ROOT
    assert settings.models_dir.is_relative_to(ROOT)
    assert unanchored(settings) == Settings()


def test_relative_models_dir_is_relative_to_the_config_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "models_dir: weights/gguf\n")
    monkeypatch.chdir(ROOT)
    assert load_settings(path).models_dir == tmp_path / "weights" / "gguf"


def test_absolute_models_dir_is_kept(tmp_path: Path) -> None:
    path = write(tmp_path, "models_dir: /srv/models\n")
    assert load_settings(path).models_dir == Path("/srv/models")


@pytest.mark.parametrize("text", ["", "# only a comment\n"], ids=["empty", "comment-only"])
def test_an_empty_file_gives_the_defaults(tmp_path: Path, text: str) -> None:
    settings = load_settings(write(tmp_path, text))
    assert unanchored(settings) == Settings()
    assert settings.models_dir == tmp_path / "models"


def test_values_from_the_file_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
server: {host: 0.0.0.0, port: 8080, api_key: k3y-of-sixteen-chars}
manager: {policy: vram_budget, gpu_memory_budget_gb: 11.5, keep_alive_s: -1, wait_timeout_s: 5}
chat:
  model: tiny.gguf
  context_size: 2048
  gpu_layers: 20
  threads: 4
  defaults: {temperature: 0, top_p: 1, max_tokens: 64, seed: 7}
""",
    )
    settings = load_settings(path)
    assert settings.server == ServerSettings(host="0.0.0.0", port=8080, api_key="k3y-of-sixteen-chars")
    assert settings.manager == ManagerSettings(
        policy="vram_budget", gpu_memory_budget_gb=11.5, keep_alive_s=-1, wait_timeout_s=5
    )
    assert settings.chat.model == "tiny.gguf"
    assert settings.chat.context_size == 2048
    assert settings.chat.gpu_layers == 20
    assert settings.chat.threads == 4
    assert settings.chat.defaults == GenerationDefaults(temperature=0, top_p=1, max_tokens=64, seed=7)


def test_settings_are_frozen() -> None:
    settings = load_settings(None)
    with pytest.raises(ValueError):
        settings.server.port = 1  # type: ignore[misc]


# ----------------------------------------------------------------------------
# Unknown keys
# ----------------------------------------------------------------------------


def test_an_unknown_top_level_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    message = config_error(tmp_path, "model_dir: models\n")
    assert "unknown key 'model_dir'" in message
    assert "did you mean 'models_dir'?" in message
    assert str(tmp_path / "config.yaml") in message


def test_an_unknown_nested_key_is_named_by_its_path_with_a_suggestion(tmp_path: Path) -> None:
    message = config_error(tmp_path, "chat:\n  contxt_size: 10\n")
    assert "'chat.contxt_size'" in message
    assert "did you mean 'context_size'?" in message
    assert "known keys here:" in message
    assert "max_message_chars" in message  # lists the keys of the chat section


def test_an_unknown_key_two_levels_down_is_named(tmp_path: Path) -> None:
    message = config_error(tmp_path, "chat:\n  defaults:\n    temprature: 0.1\n")
    assert "'chat.defaults.temprature'" in message
    assert "did you mean 'temperature'?" in message


def test_an_unknown_key_with_no_close_match_lists_the_known_keys(tmp_path: Path) -> None:
    message = config_error(tmp_path, "server:\n  zzz: 1\n")
    assert "'server.zzz'" in message
    assert "did you mean" not in message
    assert "known keys here: host, port" in message


def test_every_problem_is_reported(tmp_path: Path) -> None:
    message = config_error(tmp_path, "server: {port: abc}\nchat: {contxt_size: 10}\n")
    assert "2 problem(s)" in message
    assert "server.port" in message
    assert "chat.contxt_size" in message


# ----------------------------------------------------------------------------
# Bad values
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("server:\n  port: abc\n", "server.port", id="port-not-a-number"),
        pytest.param("server:\n  port: 70000\n", "server.port", id="port-too-large"),
        pytest.param("server:\n  port: 0\n", "server.port", id="port-zero"),
        pytest.param("manager:\n  policy: lru\n", "manager.policy", id="unknown-policy"),
        pytest.param("manager:\n  gpu_memory_budget_gb: 0\n", "manager.gpu_memory_budget_gb", id="budget-zero"),
        pytest.param("manager:\n  wait_timeout_s: -1\n", "manager.wait_timeout_s", id="negative-wait"),
        pytest.param("chat:\n  threads: 0\n", "chat.threads", id="threads-zero"),
        pytest.param("chat:\n  context_size: 10\n", "chat.context_size", id="context-too-small"),
        pytest.param("chat:\n  defaults:\n    temperature: 5\n", "chat.defaults.temperature", id="temperature-5"),
        pytest.param("chat:\n  defaults:\n    top_p: 0\n", "chat.defaults.top_p", id="top-p-zero"),
        pytest.param("chat:\n  defaults:\n    max_tokens: 0\n", "chat.defaults.max_tokens", id="max-tokens-zero"),
        pytest.param("chat: 3\n", "chat", id="section-not-a-mapping"),
    ],
)
def test_a_bad_value_is_named(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(tmp_path, text)
    assert f"'{key}'" in message
    assert "1 problem(s)" in message
    assert "got " in message  # shows the value that was given


def test_a_bad_value_message_shows_the_value(tmp_path: Path) -> None:
    message = config_error(tmp_path, "server:\n  port: abc\n")
    assert "'server.port'" in message
    assert "'abc'" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("chat:\n  threads: many\n", "chat.threads", id="threads-word"),
        pytest.param("chat:\n  gpu_layers: all\n", "chat.gpu_layers", id="gpu-layers-word"),
        pytest.param("chat:\n  gpu_layers: 2.5\n", "chat.gpu_layers", id="gpu-layers-fraction"),
    ],
)
def test_a_bad_value_for_an_auto_or_number_key_is_named(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(tmp_path, text)
    assert f"'{key}" in message
    assert "'auto'" in message


def test_threads_auto_and_positive_numbers_are_accepted() -> None:
    assert ChatSettings(threads="auto").threads == "auto"
    assert ChatSettings(threads=1).threads == 1


# ----------------------------------------------------------------------------
# Unreadable files
# ----------------------------------------------------------------------------


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    message = config_error(tmp_path, "server: [unclosed\n")
    assert "not valid YAML" in message
    assert str(tmp_path / "config.yaml") in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"], ids=["list", "string", "number"])
def test_a_top_level_that_is_not_a_mapping_is_a_config_error(tmp_path: Path, text: str) -> None:
    message = config_error(tmp_path, text)
    assert "mapping" in message


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "config.yaml"
    with pytest.raises(ConfigError) as caught:
        load_settings(missing)
    assert str(missing) in str(caught.value)
    assert "not found" in str(caught.value)


# ----------------------------------------------------------------------------
# Environment overrides
# ----------------------------------------------------------------------------


def test_environment_overrides_host_port_and_models_dir(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  host: 127.0.0.1\n  port: 7860\nmodels_dir: models\n")
    environ = {
        "ENCLAVE_HOST": "0.0.0.0",
        "ENCLAVE_PORT": "9000",
        "ENCLAVE_MODELS_DIR": "/data/models",
        "ENCLAVE_API_KEY": "a-key-long-enough-for-a-public-bind",
    }
    settings = load_settings(path, environ)
    assert settings.server.api_key == "a-key-long-enough-for-a-public-bind"
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 9000
    assert settings.models_dir == Path("/data/models")


def test_environment_overrides_apply_without_a_config_file() -> None:
    settings = load_settings(None, {"ENCLAVE_HOST": "::1", "ENCLAVE_PORT": "8001", "ENCLAVE_MODELS_DIR": "/m"})
    assert settings.server == ServerSettings(host="::1", port=8001)
    assert settings.models_dir == Path("/m")


def test_environment_overrides_create_missing_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "chat:\n  context_size: 2048\n")
    settings = load_settings(path, {"ENCLAVE_PORT": "8123"})
    assert settings.server.port == 8123
    assert settings.server.host == "127.0.0.1"
    assert settings.chat.context_size == 2048


def test_unrelated_environment_variables_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 7000\n")
    settings = load_settings(path, {"ENCLAVE_PROT": "1", "PORT": "2", "HOST": "x"})
    assert settings.server.port == 7000
    assert settings.server.host == "127.0.0.1"


def test_a_bad_environment_port_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, ""), {"ENCLAVE_PORT": "eighty"})
    assert "'server.port'" in str(caught.value)
    assert "'eighty'" in str(caught.value)


def test_a_relative_environment_models_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_settings(path, {"ENCLAVE_MODELS_DIR": "other"}).models_dir == tmp_path / "other"


def test_an_environment_override_on_a_non_mapping_section_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "server: 5\n"), {"ENCLAVE_PORT": "8000"})
    assert "ENCLAVE_PORT" in str(caught.value)
    assert "'server'" in str(caught.value)


# ----------------------------------------------------------------------------
# Settings.model_path
# ----------------------------------------------------------------------------


def test_model_path_puts_a_relative_name_under_models_dir() -> None:
    settings = Settings(models_dir=Path("/srv/models"))
    assert settings.model_path("mistral.gguf") == Path("/srv/models/mistral.gguf")
    assert settings.model_path("sub/dir/m.gguf") == Path("/srv/models/sub/dir/m.gguf")


def test_model_path_keeps_an_absolute_name() -> None:
    settings = Settings(models_dir=Path("/srv/models"))
    assert settings.model_path("/opt/weights/m.gguf") == Path("/opt/weights/m.gguf")


def test_model_path_expands_the_home_folder() -> None:
    settings = Settings(models_dir=Path("/srv/models"))
    assert settings.model_path("~/m.gguf") == Path.home() / "m.gguf"


def test_model_path_from_a_loaded_config_is_under_the_config_folder(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "models_dir: models\nchat:\n  model: tiny.gguf\n"))
    assert settings.model_path(settings.chat.model) == tmp_path / "models" / "tiny.gguf"


# ----------------------------------------------------------------------------
# Messages for "number or 'auto'" keys, and a models_dir under the home folder
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["threads", "gpu_layers"])
def test_a_bad_union_value_is_one_problem_named_by_its_key(tmp_path: Path, key: str) -> None:
    message = config_error(tmp_path, f"chat:\n  {key}: many\n")
    assert "1 problem(s)" in message
    assert f"'chat.{key}'" in message
    assert "literal[" not in message


def test_models_dir_with_a_tilde_is_the_home_folder(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "models_dir: ~/models\n"))
    assert settings.models_dir == Path.home() / "models"


def test_outputs_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "image:\n  outputs_dir: pictures\n"))
    assert settings.image.outputs_dir == tmp_path / "pictures"


def test_listening_beyond_loopback_without_a_key_stops_start_up(tmp_path: Path) -> None:
    message = config_error(tmp_path, "server:\n  host: 0.0.0.0\n")
    assert "server.api_key" in message and "allow_unauthenticated_remote" in message
    allowed = load_settings(write(tmp_path, "server:\n  host: 0.0.0.0\n  allow_unauthenticated_remote: true\n"))
    assert allowed.server.host == "0.0.0.0"
    with_key = load_settings(write(tmp_path, "server:\n  host: 192.168.1.5\n  api_key: abcdefghijklmnop\n"))
    assert with_key.server.api_key == "abcdefghijklmnop"


def test_a_short_key_for_a_public_bind_stops_start_up(tmp_path: Path) -> None:
    message = config_error(tmp_path, "server:\n  host: 0.0.0.0\n  api_key: abc\n")
    assert "3 characters" in message and "at least 16" in message
    assert load_settings(write(tmp_path, "server:\n  api_key: abc\n")).server.api_key == "abc"  # loopback: any key


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("127.attacker.example", False),
        ("127.0.0.1.nip.io", False),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("localhost.attacker.example", False),
    ],
)
def test_loopback_is_decided_by_parsing_the_address(host: str, loopback: bool) -> None:
    assert ServerSettings(host=host).is_loopback is loopback


@pytest.mark.parametrize(
    "text, problem",
    [
        ("image:\n  defaults: {width: 500}\n", "defaults.width is 500"),
        ("image:\n  max_size: 512\n  defaults: {height: 1024}\n", "defaults.height is 1024"),
        ("image:\n  max_steps: 10\n", "defaults.steps (25) is more than max_steps (10)"),
        ("image:\n  min_size: 1024\n  max_size: 512\n", "min_size (1024) is larger than max_size (512)"),
    ],
)
def test_image_defaults_that_every_request_would_fail_on_stop_start_up(tmp_path: Path, text: str, problem: str) -> None:
    message = config_error(tmp_path, text)
    assert "'image'" in message and problem in message


@pytest.mark.parametrize(
    "text, named",
    [
        ("speech:\n  language: English\n", "speech.language"),
        ("speech:\n  speaking_rate: 9\n", "speech.speaking_rate"),
        ("speech:\n  device: tpu\n", "speech.device"),
        ("speech:\n  voise: x\n", "voise"),
    ],
)
def test_a_bad_speech_setting_names_its_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(write(tmp_path, text))

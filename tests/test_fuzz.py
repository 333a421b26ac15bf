"""Fuzzing the API from its own OpenAPI document (schemathesis, on hypothesis): every generated
request, valid or not, gets an answer below 500, and every error is in OpenAI's shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import TINY_SECTIONS, RunningApp, start_app, stop_app, write_config
from tests.openai_schema import validate

EXAMPLES = 25  # per operation: enough to find the classes of bad input, few enough for CI


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[RunningApp]:
    """The real app with small limits, so that a valid generated request is also a quick one."""
    folder = tmp_path_factory.mktemp("fuzzed")
    image = {**TINY_SECTIONS["image"], "max_size": 128, "max_steps": 3, "max_images": 2}
    config = write_config(folder, tiny_models, chat={"context_size": 256}, vision=TINY_SECTIONS["vision"], image=image)
    app = start_app(config, folder / "app.log")
    yield app
    stop_app(app)


@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions", "/v1/images/generations", "/api/status"])
def test_no_request_gets_a_server_error(fuzzed_app: RunningApp, path: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed_app.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations() if result.ok().path == path]
    assert operations, f"{path} is not in the app's OpenAPI document"
    seen: list[int] = []

    @given(case=operations[0].as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def call(case: schemathesis.Case) -> None:
        response = case.call(base_url=fuzzed_app.url, timeout=120)
        seen.append(response.status_code)
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
        if response.status_code >= 400 and path.startswith("/v1/"):
            validate(response.json(), "ErrorResponse")

    call()
    print(f"\n{path}: {len(seen)} generated requests, statuses {sorted(set(seen))}")

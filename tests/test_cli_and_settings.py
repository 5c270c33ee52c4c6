"""`tickwave schema` writes valid JSON Schema; bad settings stop start-up naming the variable."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator

from agents.settings import IngestSettings
from schemas.export import ALL_MODELS
from streams.settings import CommonSettings, ConfigError, load
from tests.test_schemas import SAMPLES
from tickwave.cli import main


def test_schema_command_writes_a_valid_schema_per_model(tmp_path):
    result = CliRunner().invoke(main, ["schema", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    files = sorted(tmp_path.glob("*.schema.json"))
    assert {f.name.removesuffix(".schema.json") for f in files} == {m.__name__ for m in ALL_MODELS}
    by_name = {f.name.removesuffix(".schema.json"): json.loads(f.read_text()) for f in files}
    for schema in by_name.values():
        Draft202012Validator.check_schema(schema)
    # and every sample instance validates against its own schema
    for sample in SAMPLES:
        Draft202012Validator(by_name[type(sample).__name__]).validate(json.loads(sample.model_dump_json()))


def test_bad_value_names_the_environment_variable(monkeypatch):
    monkeypatch.setenv("TICKWAVE_TICK_PARTITIONS", "zero")
    with pytest.raises(ConfigError, match="TICKWAVE_TICK_PARTITIONS"):
        load(CommonSettings)


def test_bad_redis_url_names_the_variable(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "http://localhost")
    with pytest.raises(ConfigError, match="REDIS_URL"):
        load(IngestSettings)


def test_usual_url_variables_are_read(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://example:6379/0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/db")
    s = load(CommonSettings)
    assert (s.redis_url, s.database_url) == ("redis://example:6379/0", "postgresql://u@h/db")


def test_the_cli_refuses_to_start_on_a_bad_setting():
    env = {"PATH": "/usr/bin:/bin", "TICKWAVE_LOG_LEVEL": "LOUD"}
    proc = subprocess.run([sys.executable, "-m", "tickwave", "schema", "--out", "/tmp/x"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert "TICKWAVE_LOG_LEVEL" in proc.stderr
    assert "Traceback" not in proc.stderr

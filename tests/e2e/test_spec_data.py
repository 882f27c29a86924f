"""The trimmed copy of OpenAI's spec the e2e tests load, and the script that cuts it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.e2e import spec
from tests.e2e.spec_data import trim_spec

SOURCE: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "T", "version": "9.9.9", "license": {"name": "MIT"}, "contact": {}},
    "paths": {"/x": {}},
    "components": {
        "schemas": {
            "Unused": {"type": "string"},
            "Root": {"type": "object", "properties": {"a": {"$ref": "#/components/schemas/A"}}},
            "A": {"anyOf": [{"$ref": "#/components/schemas/B/properties/c"}, {"type": "null"}]},
            "B": {"properties": {"c": {"$ref": "#/components/schemas/A"}}},
            "Other": {"items": {"$ref": "#/components/schemas/Unused"}},
        },
        "responses": {"Big": {}},
    },
}


def test_trim_keeps_exactly_the_ref_closure_in_source_order() -> None:
    out = trim_spec.trim(SOURCE, ["Root"], "abc")
    assert list(out["components"]["schemas"]) == ["Root", "A", "B"]
    assert out["components"]["schemas"]["A"] == SOURCE["components"]["schemas"]["A"]
    assert out["info"] == {"title": "T", "version": "9.9.9", "license": {"name": "MIT"}}
    assert out["x-ostiary-trimmed"]["source_sha256"] == "abc"
    assert out["x-ostiary-trimmed"]["roots"] == ["Root"]
    assert "paths" not in out and "responses" not in out["components"]


@pytest.mark.parametrize(
    ("schemas", "words"),
    [
        ({"Root": {"$ref": "#/components/schemas/Gone"}}, "no schema 'Gone'"),
        ({"Root": {"$ref": "#/components/responses/Big"}}, "outside #/components/schemas"),
        ({}, "no schema 'Root'"),
    ],
)
def test_trim_refuses_what_it_cannot_close(schemas: dict[str, Any], words: str) -> None:
    document = {"info": {"version": "1"}, "components": {"schemas": schemas}}
    with pytest.raises(trim_spec.TrimError, match=words):
        trim_spec.trim(document, ["Root"], "")
    with pytest.raises(trim_spec.TrimError, match="not an OpenAPI document"):
        trim_spec.trim({"info": {}, "components": {"schemas": schemas}}, ["Root"], "")


def test_trim_script_reads_a_source_path_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = dict(SOURCE)
    source["components"] = {"schemas": {n: {"type": "object"} for n in spec.SCHEMA_NAMES}}
    source_path = tmp_path / "full.yaml"
    source_path.write_text(yaml.safe_dump(source, sort_keys=False), encoding="utf-8")
    out_path = tmp_path / "trimmed.json"
    assert trim_spec.main([str(source_path), "--output", str(out_path)]) == 0
    written = orjson.loads(out_path.read_bytes())
    assert list(written["components"]["schemas"]) == list(spec.SCHEMA_NAMES)
    assert len(written["x-ostiary-trimmed"]["source_sha256"]) == 64
    assert "7 schemas of spec version 9.9.9" in capsys.readouterr().out
    source_path.write_text("info: [", encoding="utf-8")
    assert trim_spec.main([str(source_path), "--output", str(out_path)]) == 1
    assert "trim_spec: " in capsys.readouterr().err


def test_committed_copy_is_closed_minimal_and_current() -> None:
    """Re-trimming the committed copy changes nothing: every root is there, every
    ``$ref`` resolves inside it, and nothing beyond the roots' closure was kept. The
    roots it was cut for are the ones the tests validate against today."""
    committed = orjson.loads(spec.TRIMMED_SPEC.read_bytes())
    note = committed["x-ostiary-trimmed"]
    assert note["roots"] == list(spec.SCHEMA_NAMES)
    again = trim_spec.trim(committed, spec.SCHEMA_NAMES, note["source_sha256"])
    assert again["components"] == committed["components"]
    assert again["info"] == committed["info"]
    assert committed["info"]["license"]["identifier"] == "MIT"


def test_spec_data_names_its_source_and_licence() -> None:
    folder = spec.TRIMMED_SPEC.parent
    committed = orjson.loads(spec.TRIMMED_SPEC.read_bytes())
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert committed["info"]["version"] in readme
    assert committed["x-ostiary-trimmed"]["source_sha256"] in readme
    assert "MIT License" in (folder / "LICENSE").read_text(encoding="utf-8")

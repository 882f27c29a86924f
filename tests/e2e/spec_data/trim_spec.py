"""Trim OpenAI's OpenAPI spec to the component schemas the e2e tests validate
against, closed over ``$ref``, and write them as compact JSON.

The full spec is about 3 MB of YAML; the tests need a few dozen schemas of it. The
output keeps those schemas exactly as the source has them (``nullable`` and all:
:mod:`tests.e2e.spec` converts on load), the source's ``openapi`` and ``info``
(title, version, licence), and a note of where it came from. Regenerate with::

    .venv/bin/python -m tests.e2e.spec_data.trim_spec path/to/openai-openapi.yaml

(``--output FILE`` writes elsewhere; the default is the copy the tests load.)
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson
import yaml

from tests.e2e.spec import SCHEMA_NAMES, TRIMMED_SPEC

__all__ = ["SCHEMA_PREFIX", "TrimError", "main", "referenced", "trim", "trim_schemas"]

SCHEMA_PREFIX = "#/components/schemas/"
SOURCE = "openapi.yaml of OpenAI's openai-openapi repository (MIT)"
REGENERATE = "python -m tests.e2e.spec_data.trim_spec <openai-openapi.yaml>"

JsonObject = dict[str, Any]


class TrimError(ValueError):
    """The source is not an OpenAPI document whose schemas the trim can close."""


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def referenced(node: Any) -> set[str]:
    """The names of the component schemas that ``node`` refers to with ``$ref``
    (directly, or through a pointer into one, such as ``.../X/properties/y``)."""
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str):
                if not ref.startswith(SCHEMA_PREFIX):
                    raise TrimError(f"$ref {ref!r} points outside #/components/schemas")
                found.add(_unescape(ref[len(SCHEMA_PREFIX) :].split("/", 1)[0]))
            stack.extend(item.values())
    return found


def trim_schemas(schemas: JsonObject, roots: Iterable[str]) -> JsonObject:
    """``roots`` and every schema they reach through ``$ref``, in the source's order."""
    keep: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        if name not in schemas:
            raise TrimError(f"the spec has no schema {name!r}")
        keep.add(name)
        todo.extend(referenced(schemas[name]) - keep)
    return {name: schema for name, schema in schemas.items() if name in keep}


def trim(document: JsonObject, roots: Sequence[str], source_sha256: str) -> JsonObject:
    """The trimmed document: ``openapi``, ``info`` (title, version, licence), a note
    of the source and ``components.schemas`` cut down to ``roots``' closure."""
    try:
        schemas = document["components"]["schemas"]
        info = document["info"]
    except (KeyError, TypeError):
        schemas = info = None
    if not isinstance(schemas, dict) or not isinstance(info, dict) or "version" not in info:
        raise TrimError("not an OpenAPI document with info.version and component schemas")
    kept = {key: info[key] for key in ("title", "version", "license") if key in info}
    return {
        "openapi": document.get("openapi"),
        "info": kept,
        "x-ostiary-trimmed": {
            "source": SOURCE,
            "source_sha256": source_sha256,
            "roots": list(roots),
            "regenerate": REGENERATE,
        },
        "components": {"schemas": trim_schemas(schemas, roots)},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="OpenAI's full spec (YAML or JSON)")
    parser.add_argument("--output", type=Path, default=TRIMMED_SPEC)
    args = parser.parse_args(argv)
    raw = args.source.read_bytes()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        document = yaml.load(raw, Loader=loader)
        trimmed = trim(document, SCHEMA_NAMES, hashlib.sha256(raw).hexdigest())
    except (yaml.YAMLError, TrimError) as exc:
        print(f"trim_spec: {args.source}: {exc}", file=sys.stderr)
        return 1
    args.output.write_bytes(orjson.dumps(trimmed, option=orjson.OPT_INDENT_2) + b"\n")
    count = len(trimmed["components"]["schemas"])
    print(f"{args.output}: {count} schemas of spec version {trimmed['info']['version']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

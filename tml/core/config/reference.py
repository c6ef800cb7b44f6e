"""Render a config class as a Markdown reference (fields, types, defaults, descriptions).

    python -m tml.core.config.reference projects.twhin.config:TwhinConfig \
        --out docs/projects/twhin/configuration.md

(`make config-docs` writes every project's page; without `--out` the page is printed.) The
docs are generated from the pydantic models themselves, so they cannot drift from the
code; a test per project compares the committed page with a fresh rendering. Each project
has its own page (docs/projects/<project>/configuration.md): the shared sections
(`training`, `runtime`) appear in each, as that project's config holds them.
"""

from __future__ import annotations

import argparse
import enum
import importlib
import os
import types
import typing

from pydantic_core import PydanticUndefined

from tml.common.atomic_file import write_text_atomic
from tml.core.config.base_config import BaseConfig


def _config_types(annotation: object) -> list[type[BaseConfig]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseConfig):
        return [annotation]
    found: list[type[BaseConfig]] = []
    for arg in typing.get_args(annotation):
        found += _config_types(arg)
    return found


def _type_name(annotation: object) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return " \\| ".join(str(m.value) for m in annotation)
        return annotation.__name__
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args if a is not type(None)) + " (optional)"
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is typing.Annotated:
        return _type_name(args[0])
    return str(annotation).replace("typing.", "")


def _default(info) -> str:  # noqa: ANN001
    if info.default_factory is not None:
        return "(section defaults)"
    if info.default is PydanticUndefined:
        return "**required**"
    value = info.default
    if isinstance(value, enum.Enum):
        value = value.value
    return "`null`" if value is None else f"`{value}`"


def render(config_type: type[BaseConfig], title: str | None = None) -> str:
    """Markdown for `config_type` and every config class reachable from it."""
    lines = [f"# {title or config_type.__name__} reference", "",
             "Generated from the code by `python -m tml.core.config.reference "
             f"{config_type.__module__}:{config_type.__name__}`. Unknown fields are errors. "
             "Fields marked *one of* form a group of which exactly one must be set; "
             "*at most one of*, at most one. Fields *accepted for compatibility with "
             "the-algorithm-ml* do nothing; setting one logs a warning naming it.", ""]
    seen: set[type] = set()
    queue = [config_type]
    while queue:
        cls = queue.pop(0)
        if cls in seen:
            continue
        seen.add(cls)
        lines += [f"## {cls.__name__}", ""]
        doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        if doc and not doc.startswith("!!!") and cls.__doc__ is not BaseConfig.__doc__:
            lines += [doc, ""]
        lines += ["| field | type | default | description |", "|---|---|---|---|"]
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            group = ""
            if "one_of" in extra:
                group = f" *one of* `{extra['one_of']}`."
            if "at_most_one_of" in extra:
                group = f" *at most one of* `{extra['at_most_one_of']}`."
            description = (info.description or "").replace("\n", " ") + group
            lines.append(f"| `{name}` | {_type_name(info.annotation)} | {_default(info)} | "
                         f"{description.strip()} |")
            queue += [t for t in _config_types(info.annotation) if t not in seen]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`python -m tml.core.config.reference package.module:ConfigClass [--out FILE]`."""
    parser = argparse.ArgumentParser(prog="python -m tml.core.config.reference",
                                     description="Render a config class as Markdown.")
    parser.add_argument("config", metavar="package.module:ConfigClass")
    parser.add_argument("--out", default=None, help="Write the page here (atomically) "
                        "instead of printing it.")
    args = parser.parse_args(argv)
    if args.config.count(":") != 1:
        parser.error("expected package.module:ConfigClass")
    module_name, class_name = args.config.split(":")
    text = render(getattr(importlib.import_module(module_name), class_name))
    if args.out is None:
        print(text, end="")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()

"""Fields accepted only so that the original the-algorithm-ml YAML loads unchanged.

Some fields of the original schema have no counterpart in tml (`runtime.enable_amp`:
TwHIN's fused tables choose their precision by `data_type`; `training.eval_timeout_in_s`:
evaluation runs in-line, there is nothing to wait for). They are declared with
`compat_field`, which says so in the field's description (and so in the generated
configuration reference), and a config that sets one to anything but its default gets a
warning naming the field: a setting that does nothing is never silent. A field whose
setting would be wrong to ignore is refused instead (a validator raising, as
`pretrained`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pydantic

from tml.core.config.base_config import Field

logger = logging.getLogger(__name__)

NO_EFFECT = "Accepted for compatibility with the-algorithm-ml; has no effect"
_MARK = "no_effect"


def compat_field(default: Any, why: str = "", **kwargs: Any) -> Any:
    """A field of the original schema that tml accepts and ignores (see the module doc).

    `why`: what tml does instead, appended to the description.
    """
    description = NO_EFFECT + (f" ({why})." if why else ".")
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra[_MARK] = True
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def has_no_effect(info: Any) -> bool:
    """Whether a pydantic FieldInfo was declared with `compat_field`."""
    extra = getattr(info, "json_schema_extra", None)
    return isinstance(extra, dict) and bool(extra.get(_MARK))


def no_effect_settings(config: pydantic.BaseModel, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted field, value) of every `compat_field` that `config` sets to a non-default
    value, in sections and lists of sections too (`model.embeddings.tables.0.vocab`)."""
    found: list[tuple[str, Any]] = []
    for name, info in type(config).model_fields.items():
        value = getattr(config, name)
        path = f"{prefix}{name}"
        if has_no_effect(info):
            if name in config.model_fields_set and value != info.get_default(
                    call_default_factory=True):
                found.append((path, value))
            continue
        found.extend(_walk(value, path))
    return found


def _walk(value: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(value, pydantic.BaseModel):
        return no_effect_settings(value, f"{path}.")
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in _walk(v, f"{path}.{i}")]
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _walk(v, f"{path}.{k}")]
    return []


def warn_no_effect(config: pydantic.BaseModel, source: str) -> list[str]:
    """Log one warning per `compat_field` that `config` sets (see `no_effect_settings`);
    the warnings, also returned. Only where RANK is unset or 0: the launcher and one
    worker say it, not every worker."""
    lines = [f"{source}: {path} is set ({value!r}) but has no effect: it is accepted for "
             "compatibility with the-algorithm-ml" for path, value in no_effect_settings(config)]
    if os.environ.get("RANK", "0") == "0":
        for line in lines:
            logger.warning("%s", line)
    return lines

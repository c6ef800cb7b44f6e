"""`BaseConfig`: the base of every tml configuration class.

* Extra fields are forbidden, so a typo in a YAML key is an error, not a silent default.
* Field groups: `one_of="group"` means exactly one field of the group must be set;
  `at_most_one_of="group"` means at most one. Declare them as in the original tml:

      class LearningRate(BaseConfig):
          constant: float | None = Field(None, one_of="lr")
          piecewise_constant: PiecewiseConstant | None = Field(None, one_of="lr")

  `tml.core.config.Field` stores the group in `json_schema_extra`; a plain
  `pydantic.Field(None, one_of=...)` (pydantic v1 style) lands there too.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import pydantic
import yaml

_GROUP_KINDS = ("one_of", "at_most_one_of")


def Field(default: Any = ..., *, one_of: str | None = None, at_most_one_of: str | None = None,
          **kwargs: Any) -> Any:
    """`pydantic.Field` that also accepts the `one_of` / `at_most_one_of` group markers."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    if one_of is not None:
        extra["one_of"] = one_of
    if at_most_one_of is not None:
        extra["at_most_one_of"] = at_most_one_of
    return pydantic.Field(default, json_schema_extra=extra or None, **kwargs)


class BaseConfig(pydantic.BaseModel):
    """Base class for configs: forbids extra fields, checks `one_of` groups."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_default=False)

    @classmethod
    @functools.cache
    def _field_groups(cls, kind: str) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = collections.defaultdict(list)
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and kind in extra:
                groups[str(extra[kind])].append(name)
        return dict(groups)

    @pydantic.model_validator(mode="after")
    def _check_field_groups(self) -> BaseConfig:
        for names in self._field_groups("one_of").values():
            set_names = [n for n in names if getattr(self, n) is not None]
            if len(set_names) != 1:
                found = f" (found {', '.join(set_names)})" if set_names else ""
                raise ValueError(f"exactly one of {', '.join(names)} must be set{found}")
        for names in self._field_groups("at_most_one_of").values():
            set_names = [n for n in names if getattr(self, n) is not None]
            if len(set_names) > 1:
                raise ValueError(f"at most one of {', '.join(names)} can be set "
                                 f"(found {', '.join(set_names)})")
        return self

    def pretty_print(self) -> str:
        """A YAML rendering of the config, for logs."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)

"""Small validators shared by the recap config models.

The recap schema keeps every field of the original `the-algorithm-ml` config so that its
YAML loads unchanged; options tml does not implement are accepted only when left unset
(`null` or their default) and otherwise refused, naming the field, instead of being
silently ignored.
"""

from __future__ import annotations

from typing import Any

import pydantic


def refuse_when_set(*names: str, why: str = "not supported by tml's recap") -> Any:
    """A pydantic field validator refusing a non-null value for each of `names`."""

    def check(cls: type, value: Any, info: pydantic.ValidationInfo) -> Any:
        if value is not None:
            raise ValueError(f"{info.field_name} is {why} (leave it null)")
        return value

    return pydantic.field_validator(*names)(classmethod(check))  # type: ignore[arg-type]

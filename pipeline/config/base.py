"""The base of every section's config (``Section``: unknown keys rejected, frozen) and the
validation that turns pydantic's errors into a ConfigError naming each offending key
(``section.key: problem (got value)``)."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import ConfigError

T = TypeVar("T", bound=BaseModel)

Device = Literal["auto", "cpu", "cuda"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_section(params: dict[str, Any], section: str, model: type[T]) -> T:
    """Validate ``params[section]`` into ``model``; ConfigError lists every bad key as
    ``section.key: problem (got value)``."""
    if section not in params:
        raise ConfigError(f"params.yaml has no '{section}' section")
    return validate(params[section] if params[section] is not None else {}, model, section)


def validate(data: Any, model: type[T], prefix: str) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, model, prefix)) from None


def _format(err: ValidationError, model: type[BaseModel], prefix: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            owner = _owner(model, e["loc"][:-1])
            msg = f"unknown key; allowed: {', '.join(owner.model_fields)}" if owner else msg
        lines.append(f"  {loc}: {msg} (got {e.get('input')!r})")
    return "invalid params.yaml:\n" + "\n".join(lines)


def _owner(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model

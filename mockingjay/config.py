"""Typed config sections, validated at the edge.

`params.yaml` is plain YAML; every stage turns its section into a frozen dataclass with
`from_section`, which rejects unknown keys and wrong types with a `ParamError` that names the
parameter (`prepare.on_error`, `featurize.hop_ms`, ...) before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ParamError(ValueError):
    """A parameter in params.yaml (or on the command line) is invalid; the message names it."""


class FieldError(ValueError):
    """An invalid value of one field of a config dataclass, raised by its `validate()`.

    It carries the field's name apart from the problem, so that each caller names the field its
    own way (`named`): params.yaml as `pretrain.model.num_heads`, an imported s3prl config as
    `config.yaml.transformer.num_attention_heads`. Its own message names the dataclass's field
    (`ModelConfig.num_heads: ...`), for code that builds the dataclass directly.
    """

    def __init__(self, owner: str, field: str, problem: str):
        # problem follows the field's name: " must be >= 1, got 0" or ": 3 does not divide ..."
        self.owner, self.field, self.problem = owner, field, problem
        super().__init__(self.named(owner))

    def named(self, prefix: str, field: str | None = None) -> str:
        """The message with the field called `prefix.field` (`field`: another name for it)."""
        return f"{prefix}.{field or self.field}{self.problem}"


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(params, dict):
        raise ParamError(f"{path}: expected a mapping of sections at the top level")
    return params


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ParamError as err:
                errors.append(str(err))
        raise ParamError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ParamError(f"{name}: must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamError(f"{name}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return from_section(annotation, value, name)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ParamError(f"{name}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{name}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ParamError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def unknown_fields(cls: type, values: Any) -> tuple[list[str], list[str]]:
    """(the keys of mapping `values` that are not fields of dataclass `cls`, sorted; its fields, in
    order): the one unknown-key check, which each caller words for its audience."""
    fields = [f.name for f in dataclasses.fields(cls)]
    return sorted(set(values) - set(fields)), fields


def from_section(cls: type[T], section: Any, name: str) -> T:
    """Build dataclass `cls` from a params mapping; unknown keys and bad types name the parameter.

    The dataclass may define `validate()`; its errors are re-raised as ParamError naming
    `name.<field>`: a FieldError by its field, a ValueError whose message starts with a field's
    name (`field: ...`, `field ...`, or `Class.field ...`) by that field, any other under `name`.
    """
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ParamError(f"{name}: expected a mapping, got {section!r}")
    unknown, fields = unknown_fields(cls, section)
    if unknown:
        raise ParamError(
            f"{name}: unknown parameter(s) {', '.join(unknown)}; valid: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(value, hints[key], f"{name}.{key}") for key, value in section.items()}
    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if validate is not None:
            validate()
    except TypeError as err:
        raise ParamError(f"{name}: {err}") from err
    except ParamError:
        raise
    except FieldError as err:
        raise ParamError(err.named(name)) from err
    except ValueError as err:  # from validate() or a __post_init__ that runs it
        raise ParamError(_field_named(str(err), cls.__name__, fields, name)) from err
    return obj


def _field_named(message: str, owner: str, fields: list[str], name: str) -> str:
    """A plain ValueError's message with the field it starts with named `name.<field>`; a
    validate() that names its field as `Class.field` (TrainConfig's) is read the same way."""
    for field in fields:
        for named in (field, f"{owner}.{field}"):
            if message.startswith((f"{named}:", f"{named} ")):
                return f"{name}.{field}{message[len(named) :]}"
    return f"{name}: {message}"


def to_flat_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a (nested) dataclass or mapping into dotted keys, for tracking."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    flat: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            flat.update(to_flat_dict(value, f"{prefix}{key}."))
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(v, dict) for v in obj):
        for i, value in enumerate(obj):
            flat.update(to_flat_dict(value, f"{prefix}{i}."))
    else:  # a tuple-typed setting is logged as the list it was written as in params.yaml
        flat[prefix.rstrip(".")] = list(obj) if isinstance(obj, tuple) else obj
    return flat

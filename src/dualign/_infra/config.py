"""Dataclass configs mirrored one-to-one by YAML keys and CLI flags.

A field ``num_samples`` of a stage config is the YAML key ``num_samples`` and the flag
``--num-samples``; a nested dataclass field ``train`` of the run config gives the YAML section
``train:`` and flags ``--train.num-samples``. A nested field marked ``metadata={"flat": True}``
is held, not inherited: a baseline's config holds the trainer's :class:`~dualign.train.TrainConfig`
as ``train``, and its keys and flags sit beside the baseline's own, unprefixed (the baseline's own
field wins a shared name such as ``method``). Flags override the file. Unknown keys and missing
required values raise :class:`ConfigError` (one line; the CLI exits with code 2).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dualign._infra.errors import ConfigError, InputError, first_line

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007
    return tp, False


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one value to its field type; raise ConfigError naming the key."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}': null is not allowed")
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return build_config(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = value if isinstance(value, list | tuple) else [value]
        return [_coerce(v, item_tp, key) for v in items]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise ConfigError(f"config key '{key}': {value!r} is not one of {choices}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    return value


def flat_section(cls: type) -> dataclasses.Field | None:
    """The field of ``cls`` whose config's keys sit at ``cls``'s own level (``metadata={"flat": True}``)."""
    return next((f for f in dataclasses.fields(cls) if f.metadata.get("flat")), None)


def build_config(cls: type[T], values: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and missing required ones fail.

    The keys of a flat section (:func:`flat_section`) are those not among ``cls``'s own fields."""
    values = dict(values or {})
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    flat = flat_section(cls)
    known = set(fields)
    if flat is not None:
        del fields[flat.name]
        known = set(fields) | {f.name for f in dataclasses.fields(hints[flat.name])}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known keys: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    missing = []
    if flat is not None:
        kwargs[flat.name] = build_config(hints[flat.name], {k: v for k, v in values.items() if k not in fields},
                                         prefix)
    for name, f in fields.items():
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if _is_dataclass_type(_unwrap_optional(hints[name])[0]):
                kwargs[name] = build_config(hints[name], {}, prefix=f"{prefix}{name}.")
            else:
                missing.append(f"{prefix}{name}")
    if missing:
        raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except InputError as e:  # already names what is wrong
        raise ConfigError(f"{prefix.rstrip('.')}: {e}" if prefix else str(e)) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a date-like value that is no date
        raise ConfigError(f"{path}: not valid YAML ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return data


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                         skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field (``--field-name``; nested: ``--section.field-name``, in a
    group of the help per section).

    Defaults are suppressed so that only flags actually given override the YAML file.
    """
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        if f.metadata.get("flat"):  # its flags beside the config's own, which win a shared name
            add_config_arguments(parser, tp, prefix, skip=(*skip, *(g.name for g in dataclasses.fields(cls))))
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = prefix + f.name
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help
        if _is_dataclass_type(tp):
            group = parser.add_argument_group(f"section '{dest}' of the run config", f.metadata.get("help")) \
                if isinstance(parser, argparse.ArgumentParser) else parser
            add_config_arguments(group, tp, prefix=f"{dest}.")
        elif tp is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_)
        elif typing.get_origin(tp) in (list, tuple):
            parser.add_argument(flag, dest=dest, action="append", default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=(help_ + " (repeatable)").strip())
        elif typing.get_origin(tp) is typing.Literal:
            parser.add_argument(flag, dest=dest, choices=list(typing.get_args(tp)),
                                default=argparse.SUPPRESS, help=help_)
        elif typing.get_origin(tp) is dict or tp is dict:
            continue  # mappings are YAML-only
        else:
            parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_)


def overrides_from_args(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Turn parsed flags (dests possibly dotted) into a nested dict of overrides."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest in exclude or dest.startswith("_"):
            continue
        node = out
        *parents, leaf = dest.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``override`` wins; nested mappings are merged key by key."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config(cls: type[T], yaml_path: str | Path | None, args: argparse.Namespace | None,
                   exclude: tuple[str, ...] = ()) -> T:
    """YAML file (optional) overridden by the flags given on the command line."""
    base = load_yaml(yaml_path) if yaml_path else {}
    over = overrides_from_args(args, exclude) if args is not None else {}
    return build_config(cls, merge(base, over))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as its YAML keys: nested sections as mappings, a flat section's keys after the
    config's own (which win a shared name), so that the dict builds the same config again."""
    own: dict[str, Any] = {}
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("flat"):
            flat = config_to_dict(value)
        else:
            own[f.name] = config_to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return {**own, **{k: v for k, v in flat.items() if k not in own}}


def dump_yaml(cfg: Any) -> str:
    data = cfg if isinstance(cfg, dict) else config_to_dict(cfg)
    return yaml.safe_dump(data, sort_keys=False)

"""Typed configuration: dataclass schemas, YAML values, `key=value` overrides, validation that names the key.

A schema is a dataclass whose fields all have defaults; a field whose type is another dataclass is a nested
section (a YAML mapping, dotted keys `optim.lr=...` on the command line). Supported field types: `bool`, `int`,
`float`, `str`, `list[X]` of those, `X | None`, and sections.

Field metadata (declare with `cfg_field`, `path_field`, `choice_field`, or `dataclasses.field(metadata=...)`):
- `path=True`: a relative value resolves against the YAML file's folder (a value given as a command-line
  override resolves against the current working directory). This is the only way to mark a path field.
- `choices=(...)`: the value must be one of these.
- `ge`, `gt`, `le`, `lt`, `multiple_of`: range checks (element-wise for lists); `length`: exact list length.
- `check=callable(value) -> str | None`: returns a problem description, or None when the value is fine.
A section may define `_cross_check(self) -> Iterable[tuple[str, str]]` yielding (field name, problem) pairs
for checks that involve several fields.

YAML is read with PyYAML's safe loader (duplicate keys are an error; anchors, aliases and `<<` merge keys work, but
a document whose aliases expand to more than MAX_YAML_VALUES values, an alias bomb, is refused before it is built).
A float field also takes a number PyYAML leaves as a string, such as `1e-3` (YAML 1.1 wants `1.0e-3`), and must be
finite; no config value needs quoting otherwise (the precision names are bf16 | fp16 | fp32, none of them a YAML
1.1 boolean). Messages show at most a short excerpt of a value.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import sys
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar, Union

import yaml

from common.core.files import write_text_atomic
from common.core.logger import get_logger

T = TypeVar("T")

logger = get_logger(__name__)

_NONE_STRINGS = ("none", "None", "NONE")


class ConfigError(ValueError):
    """An invalid configuration. `problems` lists one line per problem, each starting with the key."""

    def __init__(self, problems: str | Sequence[str], keys: Sequence[str | None] = ()) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.keys = list(keys)
        self.key = self.keys[0] if self.keys else None
        if len(self.problems) == 1:
            message = f"invalid config: {self.problems[0]}"
        else:
            message = "invalid config:\n  " + "\n  ".join(self.problems)
        super().__init__(message)

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.problems, self.keys))


# ----------------------------------------------------------------------------------------------- field helpers
def cfg_field(
    default: Any,
    *,
    path: bool = False,
    choices: Sequence[Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    multiple_of: int | None = None,
    length: int | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A dataclass field with validation metadata; list/dict defaults are copied per instance."""
    metadata: dict[str, Any] = {}
    if path:
        metadata["path"] = True
    if choices is not None:
        metadata["choices"] = tuple(choices)
    for name, bound in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("multiple_of", multiple_of),
                        ("length", length), ("check", check)):
        if bound is not None:
            metadata[name] = bound
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def path_field(default: str | None, **checks: Any) -> Any:
    """A path field: relative values resolve against the YAML file's folder (CWD for command-line overrides)."""
    return cfg_field(default, path=True, **checks)


def choice_field(default: Any, choices: Sequence[Any]) -> Any:
    """A field whose value must be one of `choices`."""
    return cfg_field(default, choices=choices)


def section(cls: type[T], **defaults: Any) -> Any:
    """A nested-section field of type `cls` with some defaults changed: `section(DataSection, size_zyx=[192] * 3)`."""
    return field(default_factory=lambda: cls(**copy.deepcopy(defaults)))


# ------------------------------------------------------------------------------------------------- YAML
MAX_YAML_VALUES = 100_000  # a stage's config holds about a hundred values: far more can only come from aliases
_MERGE_TAG = "tag:yaml.org,2002:merge"


class AliasBombError(yaml.YAMLError):
    """A YAML document whose aliases expand to more than MAX_YAML_VALUES values (or into themselves)."""


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with an error on duplicate mapping keys (a `<<` merge key's keys may be overridden)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                        key_node.start_mark)
                if isinstance(key, str):
                    seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` stands for once every alias is expanded (an alias is the anchored node itself, so
    each node is counted once and reused); AliasBombError beyond MAX_YAML_VALUES or for a node inside itself."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise AliasBombError("an alias refers to the value that contains it (a recursive structure)")
    open_nodes.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_nodes)
        if total > MAX_YAML_VALUES:
            raise AliasBombError(f"its aliases expand to more than {MAX_YAML_VALUES} values (an alias bomb?); "
                                 "refused without reading on. Write the values out")
    open_nodes.discard(key)
    sizes[key] = total
    return total


def _yaml_load(text: str) -> Any:
    """The YAML document of `text`, composed and size-checked (`_expanded_size`) before it is built."""
    loader = _YamlLoader(text)  # noqa: S506 -- a SafeLoader subclass
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _excerpt(value: Any, limit: int = 120) -> str:
    """repr of `value`, cut to `limit` characters: a message never prints a huge value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class _YamlDumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists of scalars (`size_zyx: [160, 160, 160]`)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(item, (list, dict)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_YamlDumper.add_representer(list, _represent_list)


# ------------------------------------------------------------------------------------------------- type helpers
@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _strip(tp: Any) -> tuple[Any, bool]:
    """(base type, optional) of a field annotation."""
    optional = False
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"unsupported config field type {tp!r}")
        tp = args[0]
    return tp, optional


def _type_name(tp: Any) -> str:
    base, optional = _strip(tp)
    if typing.get_origin(base) is list:
        (elem,) = typing.get_args(base)
        name = f"list[{_type_name(elem)}]"
    elif dataclasses.is_dataclass(base):
        name = "a mapping (section)"
    else:
        name = getattr(base, "__name__", str(base))
    return f"{name} or null" if optional else name


def _got(value: Any) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {_excerpt(value)}"


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(_strip(tp)[0])


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_path_field(cls: type, f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("path"))


def _all_keys(schema: type, prefix: str = "") -> list[tuple[str, Any]]:
    """Every dotted key of `schema` (sections and leaves) with its annotation."""
    keys: list[tuple[str, Any]] = []
    for f in _init_fields(schema):
        tp = _hints(schema)[f.name]
        keys.append((prefix + f.name, tp))
        if _is_section(tp):
            keys.extend(_all_keys(_strip(tp)[0], prefix + f.name + "."))
    return keys


def _suggest(name: str, candidates: Iterable[str], schema: type | None = None) -> str:
    candidates = list(candidates)
    if schema is not None:  # a leaf that lives in a section, e.g. top-level `lr` -> `optim.lr`
        leaf = name.rsplit(".", 1)[-1]
        elsewhere = [k for k, _ in _all_keys(schema) if k.rsplit(".", 1)[-1] == leaf and k != name]
        if elsewhere:
            return f"; did you mean '{elsewhere[0]}'?" if len(elsewhere) == 1 else \
                f"; did you mean one of {', '.join(repr(k) for k in elsewhere)}?"
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f" (valid keys: {', '.join(candidates)})" if candidates else ""


# ------------------------------------------------------------------------------------------------- building
class _Builder:
    """Turns a raw nested dict into a validated schema instance, collecting every problem."""

    def __init__(self, schema: type, base_dir: Path | None, source: str, override_text: dict[str, str]) -> None:
        self.schema = schema
        self.base_dir = base_dir
        self.source = source
        self.override_text = override_text  # dotted key -> "key=value" as typed
        self.problems: list[str] = []
        self.keys: list[str | None] = []

    def _from_override(self, key: str) -> str | None:
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            text = self.override_text.get(".".join(parts[:i]))
            if text is not None:
                return text
        return None

    def error(self, key: str, problem: str) -> None:
        base_key = re.sub(r"\[\d+\]$", "", key)
        override = self._from_override(base_key)
        where = f"(command-line override '{override}')" if override is not None else f"({self.source})"
        self.problems.append(f"{key}: {problem} {where}")
        self.keys.append(key)

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems, self.keys)

    def build(self, cls: type, raw: Any, base: Any, prefix: str) -> Any:
        fields = _init_fields(cls)
        names = [f.name for f in fields]
        if not isinstance(raw, Mapping):
            where = prefix.rstrip(".") or "<top level>"
            self.error(where, f"is a section: expected a mapping of its keys ({', '.join(names)}), got {_got(raw)}; "
                              f"on the command line write e.g. {prefix}{names[0]}=VALUE")
            return copy.deepcopy(base)
        for key in raw:
            if key not in names:
                full = f"{prefix}{key}"
                candidates = [prefix + n for n in names]
                self.error(full, "unknown key" + _suggest(full, candidates, self.schema))
        values: dict[str, Any] = {}
        for f in fields:
            key = prefix + f.name
            tp = _hints(cls)[f.name]
            default = getattr(base, f.name)
            if _is_section(tp):
                sub_cls = _strip(tp)[0]
                values[f.name] = self.build(sub_cls, raw.get(f.name, {}), default, key + ".")
                continue
            if f.name in raw:
                value = self.convert(raw[f.name], tp, key)
            else:
                value = copy.deepcopy(default)
            if value is _INVALID:
                values[f.name] = copy.deepcopy(default)
                continue
            if _is_path_field(cls, f) and isinstance(value, str):
                value = self.resolve_path(value, key)
            self.check_metadata(f, value, key)
            values[f.name] = value
        instance = cls(**values)
        cross = getattr(instance, "_cross_check", None)
        if cross is not None:
            for name, problem in cross():
                self.error(prefix + name, problem)
        return instance

    def resolve_path(self, value: str, key: str) -> str:
        value = os.path.expanduser(value)
        if os.path.isabs(value) or value == "":
            return value
        if self._from_override(key) is not None:
            return os.path.normpath(os.path.join(os.getcwd(), value))
        if self.base_dir is not None:
            return os.path.normpath(os.path.join(self.base_dir, value))
        return value

    def convert(self, value: Any, tp: Any, key: str) -> Any:
        base, optional = _strip(tp)
        if value is None:
            if optional:
                return None
            self.error(key, f"expected {_type_name(tp)}, got null")
            return _INVALID
        if isinstance(value, str) and value.strip() in _NONE_STRINGS:
            if optional:
                self.error(key, f"got the string {value!r}; write null (YAML's no-value), not None")
            else:
                self.error(key, f"got the string {value!r}; expected {_type_name(tp)} (YAML's no-value is written "
                                "null, not None, and this key does not accept it)")
            return _INVALID
        if typing.get_origin(base) is list:
            if not isinstance(value, (list, tuple)):
                self.error(key, f"expected {_type_name(tp)}, got {_got(value)}")
                return _INVALID
            (elem_tp,) = typing.get_args(base)
            out = [self.convert(item, elem_tp, f"{key}[{i}]") for i, item in enumerate(value)]
            return _INVALID if any(item is _INVALID for item in out) else out
        ok = False
        if base is bool:
            ok = isinstance(value, bool)
        elif base is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif base is float:
            if isinstance(value, str):  # `1e-3`: a float in YAML 1.2, a string to PyYAML's YAML 1.1
                try:
                    value = float(value)
                except ValueError:
                    pass
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                value = float(value)
                if not math.isfinite(value):
                    self.error(key, f"must be a finite number, got {value!r}")
                    return _INVALID
        elif base is str:
            ok = isinstance(value, str)
        else:
            raise TypeError(f"unsupported config field type {tp!r} for {key}")
        if not ok:
            self.error(key, f"expected {_type_name(tp)}, got {_got(value)}")
            return _INVALID
        return value

    def check_metadata(self, f: dataclasses.Field, value: Any, key: str) -> None:
        meta = f.metadata
        if value is None:
            return
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            self.error(key, f"got {value!r}; expected one of {', '.join(repr(c) for c in choices)}")
        length = meta.get("length")
        if length is not None and isinstance(value, list) and len(value) != length:
            self.error(key, f"expected a list of {length} values, got {len(value)}")
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            item_key = f"{key}[{i}]" if isinstance(value, list) else key
            for name, test, words in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                                      ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
                bound = meta.get(name)
                if bound is not None and isinstance(item, (int, float)) and not test(item, bound):
                    self.error(item_key, f"must be {words} {bound}, got {item!r}")
            multiple = meta.get("multiple_of")
            if multiple is not None and isinstance(item, int) and item % multiple != 0:
                self.error(item_key, f"must be a multiple of {multiple}, got {item!r}")
        check = meta.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                self.error(key, problem)


_INVALID = object()


def _resolve_override_key(schema: type, key: str) -> tuple[str | None, Any, str | None]:
    """(full dotted key, annotation, problem) for an override key. Keys are always written in full (`optim.lr`,
    as in the YAML file): a bare leaf name is an unknown key whose message names the full key(s)."""
    all_keys = _all_keys(schema)
    by_key = dict(all_keys)
    if key in by_key:
        return key, by_key[key], None
    return None, None, "unknown key" + _suggest(key, [k for k, _ in all_keys], schema)


def _apply_overrides(schema: type, raw: dict, overrides: Sequence[str]) -> dict[str, str]:
    """Merge `key=value` overrides into `raw` (in place); returns dotted key -> override text."""
    problems: list[str] = []
    keys: list[str | None] = []
    texts: dict[str, str] = {}
    for text in overrides:
        if "=" not in text:
            problems.append(f"{text!r}: malformed override; write key=value (dotted keys for sections, "
                            "e.g. optim.lr=1.0e-3)")
            keys.append(text)
            continue
        key, value_text = (part.strip() for part in text.split("=", 1))
        if not key:
            problems.append(f"{text!r}: malformed override; the key before '=' is empty")
            keys.append(text)
            continue
        full, tp, problem = _resolve_override_key(schema, key)
        if problem is not None:
            problems.append(f"{key}: {problem} (command-line override '{text}')")
            keys.append(key)
            continue
        assert full is not None
        try:
            value = _yaml_load(value_text) if value_text else None
        except yaml.YAMLError as exc:
            problems.append(f"{full}: cannot parse value {_excerpt(value_text)} as YAML: "
                            f"{_excerpt(str(exc).splitlines()[0] if str(exc) else exc, 200)} (command-line override)")
            keys.append(full)
            continue
        base, _ = _strip(tp)
        # Quoting is awkward on a shell: `output_dir=2024` means the string for a str field.
        if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = value_text
        node = raw
        parts = full.split(".")
        blocked = False
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"{'.'.join(parts[:i + 1])}: expected a mapping of keys, got {_got(child)} "
                                "(config file)")
                keys.append(".".join(parts[:i + 1]))
                blocked = True
                break
            node = child
        if blocked:
            continue
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            _deep_merge(node[leaf], value)
        else:
            node[leaf] = value
        texts[full] = text
    if problems:
        raise ConfigError(problems, keys)
    return texts


def _deep_merge(target: dict, update: Mapping) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _build(schema: type[T], raw: Any, base_dir: Path | None, source: str, override_text: dict[str, str]) -> T:
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"{schema!r} is not a dataclass schema")
    builder = _Builder(schema, base_dir, source, override_text)
    cfg = builder.build(schema, raw, schema(), "")
    builder.raise_if_any()
    return cfg


# ------------------------------------------------------------------------------------------------- public API
def load_config(schema: type[T], yaml_path: str | os.PathLike, overrides: Sequence[str] = ()) -> T:
    """Read `yaml_path`, apply `key=value` overrides, validate against `schema` and resolve path fields.

    Relative path fields from the file (and defaults) resolve against the file's folder; relative paths given
    in `overrides` resolve against the current working directory. Raises ConfigError naming every bad key.
    """
    path = Path(yaml_path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file; give the YAML file (config={path}/config.yaml)")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = _yaml_load(path.read_text(encoding="utf-8"))
    except AliasBombError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if raw is None:
        logger.warning("%s is empty: every key takes its default (see the stage's config.yaml)", path)
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {_got(raw)}")
    override_text = _apply_overrides(schema, raw, overrides)
    base_dir = Path(os.path.abspath(path)).parent
    return _build(schema, raw, base_dir, str(path), override_text)


def config_from_dict(schema: type[T], d: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> T:
    """Build and validate a config from a plain dict (e.g. a checkpoint's saved config).

    Relative path fields resolve against `base_dir` when given, otherwise they stay as they are.
    """
    return _build(schema, dict(d), Path(base_dir) if base_dir is not None else None, "config dict", {})


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (YAML- and JSON-safe); `config_from_dict` accepts it back."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    """The config as YAML text (the format `save_config` writes)."""
    return yaml.dump(config_to_dict(cfg), Dumper=_YamlDumper, sort_keys=False, default_flow_style=False)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the config as YAML, atomically; `load_config(type(cfg), path)` reads it back equal."""
    write_text_atomic(path, config_to_yaml(cfg))


class HelpRequested(Exception):
    """`-h`/`--help` on a stage's command line; `text` is the usage with every key and its default, which the entry
    point prints before it exits with 0."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def parse_cli(schema: type[T], default_yaml: str | os.PathLike, argv: Sequence[str] | None = None) -> T:
    """Config for a stage's command line: `config=PATH` picks another YAML file, other items are overrides.

    `-h`/`--help` raises HelpRequested with the keys and their default values.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        raise HelpRequested("usage: [config=PATH.yaml] [key=value ...]   (dotted keys for sections, e.g. "
                            f"optim.lr=1.0e-3)\ndefault config file: {default_yaml}\nkeys and schema defaults:\n"
                            + config_to_yaml(schema()))
    yaml_path: str | os.PathLike = default_yaml
    overrides: list[str] = []
    for arg in argv:
        key = arg.split("=", 1)[0].strip()
        if "=" in arg and key == "config":
            yaml_path = os.path.abspath(os.path.expanduser(arg.split("=", 1)[1].strip()))
        else:
            overrides.append(arg)
    return load_config(schema, yaml_path, overrides)

"""The configuration loader both stages share: sections registered by their owners, one strict loader.

A section is a frozen dataclass (or a mapping of names to one) that the package owning it registers with
`register_section`: extract/ registers the stage-1 sections (dataset, synthetic, frames, encoders, saliency,
dictionaries, vlm, video), train/ its own (train, heads, grounding, ablations, recipes), the contract's
locate.py the `cache` section both read. The packages that register sections are named in the project's metadata (entry
points `causal_ltar.config`), and `load_sections` imports them, so any process that reads a configuration (a
command, a spawned worker unpickling one) has every section without this module importing either stage.

Every key is checked before any work starts: unknown keys (with a did-you-mean), wrong types, out-of-range
numbers and values outside a fixed set fail with the full key path. `--config` may be given several times:
later files are merged over earlier ones, key by key (override files such as a benchmark world). A section
holding named entries (`ablations`, `recipes`) may be given as a folder: one `<name>.yaml` per entry, the path
relative to the file naming it. `--set a.b=c` overrides go through the same checks.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

ENTRY_POINTS = "causal_ltar.config"  # the project's packages that register config sections (pyproject.toml)


class ConfigError(ValueError):
    """A configuration problem a user fixes by editing the YAML or a `--set` override."""


def _range(lo: float | None = None, hi: float | None = None, *, doc: str = "") -> dict:
    return {"range": (lo, hi), "doc": doc}


bounds = _range  # field(metadata=bounds(0, 1)): accepted range of a number


def predating(value: Any) -> dict:
    """field(default=new, metadata=predating(old)): an option added with a default that changes what runs compute;
    a saved run from before the option existed was computed as `old`, and is read back as that
    (train.ablate's reuse check), not as today's default."""
    return {"predates": value}


# ---------------------------------------------------------------------------------------------
# Sections, registered by the packages that own them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    name: str  # the top-level key
    type: Any  # a frozen dataclass, or dict[str, <dataclass or Any>] for named entries
    default: Any  # the default value (a mapping's default is copied per config)
    order: int  # position in `ltar config show` and the resolved YAML files
    stage: str  # who owns it: "contract", "extract" or "train" (stage-1 sections key the store pointer)


_SECTIONS: dict[str, Section] = {}
_ROOT: list[type] = []  # the resolved Config dataclass, rebuilt when a section is registered
_LOADED: list[bool] = []


def register_section(name: str, tp: Any, *, order: int, stage: str, default: Any = None) -> None:
    """Declare the top-level section `name` of type `tp` (its default: `tp()`, or `default`)."""
    if default is None:
        default = {} if typing.get_origin(tp) is dict else tp()
    _SECTIONS[name] = Section(name, tp, default, order, stage)
    _ROOT.clear()


def load_sections() -> None:
    """Import every package that registers sections (entry points `causal_ltar.config`), once per process."""
    if _LOADED:
        return
    _LOADED.append(True)
    import importlib
    from importlib.metadata import entry_points

    providers = sorted(entry_points(group=ENTRY_POINTS), key=lambda e: e.name)
    if not providers:
        _LOADED.clear()
        raise ConfigError(
            f"no package registers configuration sections (entry points {ENTRY_POINTS!r}): causal-ltar is not "
            "installed in this Python; run `make setup` (or `pip install -e .`) in the repository"
        )
    for ep in providers:
        importlib.import_module(ep.value)


def sections(stage: str | None = None) -> list[Section]:
    """The registered sections in order (only `stage`'s, when given)."""
    load_sections()
    return sorted((s for s in _SECTIONS.values() if stage in (None, s.stage)), key=lambda s: (s.order, s.name))


class Config:
    """The resolved configuration: one attribute per registered section (a frozen dataclass built from the
    registry; `Config(**sections)` builds one, `dataclasses.replace` works on it, it pickles by its sections)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Config:
        return object.__new__(root_type() if cls is Config else cls)

    def __reduce__(self) -> tuple:
        return _rebuild, ({f.name: getattr(self, f.name) for f in dataclasses.fields(self)},)


def _rebuild(values: dict[str, Any]) -> Config:
    return root_type()(**values)


def root_type() -> type:
    """The Config dataclass of the sections registered now (every section has its default)."""
    load_sections()
    if not _ROOT:
        fields = [
            (s.name, s.type, dataclasses.field(default_factory=lambda d=s.default: copy.deepcopy(d)))
            for s in sections()
        ]
        _ROOT.append(dataclasses.make_dataclass("Config", fields, bases=(Config,), frozen=True))
    return _ROOT[0]


# Whole-config checks registered by the packages that own part of the config; each returns messages.
_VALIDATORS: list[typing.Callable[[Config], list[str]]] = []
# Rewrites of the raw mapping before it is checked (train: a named recipe's keys over the file's).
_TRANSFORMS: list[typing.Callable[[dict], dict]] = []


def register_validator(fn: typing.Callable[[Config], list[str]]) -> None:
    """`fn(cfg)` returns error messages (with full key paths); they fail the load like any other."""
    if fn not in _VALIDATORS:
        _VALIDATORS.append(fn)


def register_transform(fn: typing.Callable[[dict], dict]) -> None:
    """`fn(raw)` returns the raw mapping rewritten (a copy), before any key is checked."""
    if fn not in _TRANSFORMS:
        _TRANSFORMS.append(fn)


# How a section whose raw mapping leaves defaults to code is printed resolved (`ltar config show`, the resolved
# YAML written beside every output): name -> fn(cfg) -> plain data that loads back to the same options.
_DISPLAYS: dict[str, typing.Callable[[Config], Any]] = {}


def register_display(name: str, fn: typing.Callable[[Config], Any]) -> None:
    _DISPLAYS[name] = fn


# Keys whose accepted values come from a registry rather than a fixed Literal.
_REGISTRY_KEYS: dict[str, typing.Callable[[], list[str]]] = {}


def register_choices(key_path: str, names: typing.Callable[[], list[str]]) -> None:
    """Declare that `key_path` (e.g. `dataset.name`) must be one of `names()` (a registry)."""
    _REGISTRY_KEYS[key_path] = names


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------


def _suggest(word: str, options: typing.Iterable[str]) -> str:
    """`; did you mean 'x'?` for a near miss (a typo, or a known key with something appended)."""
    options = [str(o) for o in options]
    close = [o for o in options if word.startswith(o) or o.startswith(word)]
    close = close or difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any, path: str, meta: dict | None = None) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path, meta)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = _suggest(str(value), allowed)
            raise ConfigError(f"{path}: {value!r} is not accepted{hint} Choose from {list(allowed)}.")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(item, v, f"{path}[{i}]", meta) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
    elif tp is Any:
        return value
    else:  # pragma: no cover - a section declared a type the loader does not know
        raise TypeError(f"config field {path} has unsupported type {tp!r}")
    lo, hi = (meta or {}).get("range", (None, None))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{path}: {value!r} is out of range; accepted values lie in {bounds}")
    if path in _REGISTRY_KEYS:
        names = _REGISTRY_KEYS[path]()
        if value not in names:
            hint = _suggest(str(value), names)
            raise ConfigError(f"{path}: unknown name {value!r}{hint} Choose from {names}.")
    return value


def build_section(cls: type, data: Any, path: str) -> Any:
    """Validate a mapping into dataclass `cls` (for sections typed by other packages, e.g. heads)."""
    return _build(cls, data, path)


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping (section), got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            hint = _suggest(str(key), fields)
            raise ConfigError(f"{key_path}: unknown key{hint} Accepted keys: {sorted(fields)}.")
        kwargs[key] = _convert(hints[key], value, key_path, dict(fields[key].metadata))
    # Defaults are checked too (a registry key's default must name a registered entry).
    for name, f in fields.items():
        if name not in kwargs and f"{path}.{name}".lstrip(".") in _REGISTRY_KEYS:
            _convert(hints[name], getattr(cls(), name), f"{path}.{name}".lstrip("."), dict(f.metadata))
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a', 'b', 'c'], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be a dotted path such as train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({e.problem})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Return a copy of the raw mapping with each `KEY=VALUE` override applied."""
    data = copy.deepcopy(data)
    names = {s.name for s in sections()}
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        key = ".".join(parts)
        if (isinstance(node.get(parts[-1]), dict) or key in names) and not isinstance(value, dict | None):
            raise ConfigError(
                f"--set {text!r}: {key} is a section (a mapping of keys), not a value; set one of its keys, "
                f"e.g. --set {key}.<key>=<value> (`ltar config show` lists them)"
            )
        node[parts[-1]] = value
    return data


def merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`, key by key: mappings merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def from_dict(data: dict) -> Config:
    """Validate a raw mapping into a `Config` (raises ConfigError with the full key path)."""
    root = root_type()
    for transform in _TRANSFORMS:
        data = transform(data)
    cfg = _build(root, data, "")
    errors: list[str] = []
    for validate in _VALIDATORS:
        errors += validate(cfg)
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg


def _read_yaml(path: Path, what: str) -> Any:
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist; pass --config PATH or run from the repository root")
    if path.is_dir():
        raise ConfigError(f"--config {path} is a directory; give the pipeline YAML file, e.g. --config pipeline.yaml")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path} cannot be read ({e}); give a readable YAML file") from None


def read_file(path: str | Path) -> dict:
    """One config file as a raw mapping, each section given as a folder read in (one `<name>.yaml` per entry)."""
    path = Path(path)
    raw = _read_yaml(path, "config file") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    named = {s.name for s in sections() if typing.get_origin(s.type) is dict}
    for key, value in list(raw.items()):
        if not isinstance(value, str):
            continue
        if key not in named:
            raise ConfigError(
                f"{path}: {key}: expected a mapping (section), got {value!r}; only sections of named entries "
                f"({', '.join(sorted(named))}) may name a folder"
            )
        folder = (path.parent / value).resolve() if not Path(value).is_absolute() else Path(value)
        if not folder.is_dir():
            raise ConfigError(f"{path}: {key}: the folder {folder} does not exist; give a folder of <name>.yaml files")
        entries = {}
        for file in sorted(folder.glob("*.yaml")):
            entry = _read_yaml(file, "file")
            if entry is not None and not isinstance(entry, dict):
                raise ConfigError(f"{file}: expected a mapping (the {key} entry {file.stem!r}), got {entry!r}")
            entries[file.stem] = entry or {}
        raw[key] = entries
    return raw


def load_config(path: str | Path | typing.Sequence[str | Path] = "pipeline.yaml", overrides=()) -> Config:
    """Read the file(s) (later ones merged over earlier ones), apply `--set` overrides, validate. An
    explicitly named file must exist."""
    paths = [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
    overrides = list(overrides)
    raw: dict = {}
    for p in paths:
        raw = merge(raw, read_file(p))
    merged = apply_overrides(raw, overrides)  # --set errors name --set, not the file
    try:
        return from_dict(merged)
    except ConfigError as e:
        where = " + ".join(map(str, paths))
        where = f"{where} with --set {' --set '.join(overrides)}" if overrides else where
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Plain YAML-ready data (tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any) -> str:
    """YAML of a section, or of a whole Config as resolved: a section with a registered display (`heads`: every
    registered head with its defaults from code and all its variants) is printed resolved."""
    data = to_dict(cfg)
    if isinstance(cfg, Config):
        data.update({name: show(cfg) for name, show in _DISPLAYS.items() if name in data})
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def write_resolved(cfg: Config, out_dir: str | Path, name: str = "config.resolved.yaml") -> Path:
    """Write the resolved config beside an output, so every result says how it was made."""
    out = Path(out_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_yaml(cfg))
    return out

"""Load an experiment YAML plus dotted overrides into an ExperimentConfig, reporting every error at once.

Each error names the field's full dotted path, what was expected and what was found, and where it came
from: `FILE:LINE` for the YAML, or the override text for a command-line `key=value`.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raytune_ft.config.checks import consistency_errors, embedded_ray_errors, lora_target_errors
from raytune_ft.config.schema import ExperimentConfig, nested_models
from raytune_ft.model_source import PACKAGE_PREFIX, ModelSourceError, check_model_source, resolve_model_source


@dataclass(frozen=True)
class ConfigIssue:
    path: str
    message: str
    origin: str  # "file.yaml:12", "override 'train.lr=-1'" or "file.yaml"

    def __str__(self) -> str:
        return f"{self.origin}: {self.path or '<top level>'}: {self.message}"


class ConfigError(Exception):
    """All problems found in one experiment file and its overrides."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        super().__init__(f"{len(issues)} error(s) in the experiment config:\n{lines}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 3e-5 as a float (YAML 1.1 wants 3.0e-5) and refuses duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str, origin: str) -> tuple[Any, yaml.Node | None]:
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}" if mark else origin
        raise ConfigError([ConfigIssue("", f"invalid YAML: {getattr(exc, 'problem', exc)}", where)]) from exc
    if node is None:
        return None, None
    duplicates = list(_duplicate_keys(node, ""))
    if duplicates:
        raise ConfigError([ConfigIssue(p, "duplicate key", f"{origin}:{line}") for p, line in duplicates])
    return yaml.load(text, Loader=_Loader), node


def _duplicate_keys(node: yaml.Node, prefix: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            path = f"{prefix}.{key.value}" if prefix else str(key.value)
            if key.value in seen:
                yield path, key.start_mark.line + 1
            seen.add(key.value)
            yield from _duplicate_keys(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{prefix}[{i}]")


def _node_line(root: yaml.Node | None, parts: list[Any]) -> int | None:
    """Line of the deepest node along `parts` that exists in the YAML (a dotted key such as search_space's
    'train.lr' is one key of its mapping)."""
    node, line = root, (root.start_mark.line + 1 if root else None)
    parts = list(parts)
    while parts:
        part = parts.pop(0)
        if isinstance(node, yaml.MappingNode):
            keys: dict[str, tuple[yaml.Node, yaml.Node]] = {}
            for key, value in node.value:
                keys.setdefault(str(key.value), (key, value))
            match = keys.get(str(part))
            for n in range(1, len(parts) + 1):
                if match is not None:
                    break
                joined = ".".join(map(str, [part, *parts[:n]]))
                if joined in keys:
                    match, parts = keys[joined], parts[n:]
            if match is None:
                return line
            node, line = match[1], match[1].start_mark.line + 1
            if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
                line = match[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node, line = node.value[part], node.value[part].start_mark.line + 1
        else:
            return line
    return line


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, path: str, issues: list[tuple[str, str]]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), issues) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]", issues) for i, v in enumerate(value)]
    if isinstance(value, str) and "${" in value:

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            issues.append((path, f"environment variable {name} is not set and has no default (${{{name}:-...}})"))
            return match.group(0)

        return _ENV.sub(substitute, value)
    return value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> list[str]:
    """Set `a.b.c` in nested dicts; dotted keys that exist as one key (search_space.'train.lr') win."""
    parts, node, walked = key.split("."), data, []
    while len(parts) > 1:
        for n in range(len(parts) - 1, 0, -1):
            joined = ".".join(parts[:n])
            if n == 1 or joined in node:
                break
        child = node.get(joined)
        if child is None:
            child = node[joined] = {}
        if not isinstance(child, dict):
            raise ValueError(f"'{'.'.join([*walked, joined])}' is a value, not a section")
        node, walked, parts = child, [*walked, joined], parts[n:]
    last = ".".join(parts)
    node[last] = value
    return [*walked, last]


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key.strip() or any(not part for part in key.strip().split(".")):
        raise ValueError(f"override '{text}' has an empty key")
    value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    return key.strip(), value


def _describe(err: dict[str, Any]) -> str:
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    shown = repr(got) if isinstance(got, str) else got
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit:g}, got {shown}"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {shown}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer, got {shown}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {shown}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {shown}"
    if kind == "string_type":
        return f"expected a string, got {shown}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"expected a mapping of keys, got {shown}"
    if kind == "list_type":
        return f"expected a list, got {shown}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}, got {shown}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "union_tag_invalid":
        return f"type must be one of {ctx.get('expected_tags')}, got {ctx.get('tag')!r}"
    if kind == "union_tag_not_found":
        return f"needs a '{ctx.get('discriminator', 'type').strip(chr(39))}' key"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return f"{err['msg']}, got {shown}"


def _clean_loc(raw: Any, loc: tuple[Any, ...]) -> list[Any]:
    """Drop the union member names pydantic puts in a location, keeping the keys the user wrote."""
    out, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and node.get("type") == part:
            continue
        elif isinstance(part, str) and not re.fullmatch(r"[A-Za-z_][\w-]*", part):
            continue  # e.g. 'list[str]' or "literal['auto']"
        else:
            out.append(part)
            node = None
    return out


def _dotted(parts: list[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _model_at(parts: list[Any]) -> type[BaseModel] | None:
    """The schema model found by walking field names; dict keys and union tags are stepped over."""
    model: type[BaseModel] = ExperimentConfig
    for part in parts:
        field = model.model_fields.get(str(part))
        if field is None:
            continue  # a user key inside dict[str, Model], e.g. search_space.'train.lr'
        sub = nested_models(field.annotation)
        if not sub:
            return None
        model = sub[0]
    return model


def _unknown_key_hint(parts: list[Any]) -> str:
    model = _model_at(parts[:-1])
    if model is None:
        return "unknown key"
    known = sorted(model.model_fields)
    close = difflib.get_close_matches(str(parts[-1]), known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key (expected one of: {', '.join(known)}){hint}"


def load_config(
    path: str | Path, overrides: list[str] | None = None, *, check_resources: bool = True
) -> ExperimentConfig:
    """Read, override, validate and resolve an experiment file; raise ConfigError listing every problem.

    An experiment file is loaded to be run, so `check_resources` also refuses workers that the embedded Ray
    (no cluster.address) could never place on this machine; see `validate_raw`."""
    path = Path(path)
    origin = str(path)
    if not path.is_file():
        raise ConfigError([ConfigIssue("", "file not found", origin)])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"not UTF-8 text ({exc.reason} at byte {exc.start})", origin)]) from exc
    raw, root = _parse_yaml(text, origin)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("", "the file must be a mapping of sections (model:, data:, ...)", origin)])
    return validate_raw(
        raw, root, origin, overrides or [], base_dir=path.resolve().parent, check_resources=check_resources
    )


def validate_raw(
    raw: dict[str, Any],
    root: yaml.Node | None,
    origin: str,
    overrides: list[str],
    base_dir: Path,
    *,
    check_resources: bool = False,
) -> ExperimentConfig:
    """Validate a raw experiment mapping. `check_resources` adds the check that the workers fit the embedded Ray of
    this machine when no cluster.address is set: on for files loaded to run here (`load_config`), off for a
    recorded experiment read back (an export being served, which starts no training workers)."""
    issues: list[ConfigIssue] = []
    overridden: dict[str, str] = {}
    for text in overrides:
        try:
            key, value = parse_override(text)
            overridden[_dotted(_set_dotted(raw, key, value))] = text
        except ValueError as exc:
            issues.append(ConfigIssue(text.split("=", 1)[0], str(exc), f"override '{text}'"))

    def where(parts: list[Any]) -> str:
        dotted = _dotted(parts)
        for key, text in overridden.items():
            if dotted == key or dotted.startswith(key + ".") or dotted.startswith(key + "["):
                return f"override '{text}'"
        line = _node_line(root, parts)
        return f"{origin}:{line}" if line else origin

    env_problems: list[tuple[str, str]] = []
    raw = _expand_env(raw, "", env_problems)
    issues += [ConfigIssue(p, m, where(_path_parts(p))) for p, m in env_problems]

    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            parts = _clean_loc(raw, err["loc"])
            message = _unknown_key_hint(parts) if err["type"] == "extra_forbidden" else _describe(err)
            issues.append(ConfigIssue(_dotted(parts), message, where(parts)))
        raise ConfigError(_ordered(issues)) from None
    issues += [ConfigIssue(p, m, where(_path_parts(p))) for p, m in consistency_errors(cfg)]
    if check_resources:
        issues += [ConfigIssue(p, m, where(_path_parts(p))) for p, m in embedded_ray_errors(cfg)]
    cfg = _resolve_paths(cfg, base_dir, issues, where)
    if not any(issue.path == "model.name_or_path" for issue in issues):
        model_dir = _local_model_dir(cfg.model.name_or_path)
        issues += [ConfigIssue(p, m, where(_path_parts(p))) for p, m in lora_target_errors(cfg, model_dir)]
    if issues:
        raise ConfigError(_ordered(issues))
    return cfg


def _ordered(issues: list[ConfigIssue]) -> list[ConfigIssue]:
    """File errors by line, then override errors, so the list reads top to bottom."""

    def key(issue: ConfigIssue) -> tuple[int, int]:
        line = issue.origin.rsplit(":", 1)[-1]
        return (0, int(line)) if line.isdigit() else (1, 0)

    return sorted(issues, key=key)


def _path_parts(path: str) -> list[Any]:
    """'tasks[0].data.path' -> ['tasks', 0, 'data', 'path'], as the YAML locator walks it."""
    return [int(part) if part.isdigit() else part for part in re.split(r"[.\[\]]+", path) if part]


def _resolve_paths(cfg: ExperimentConfig, base_dir: Path, issues: list[ConfigIssue], where: Any) -> ExperimentConfig:
    """Input paths are relative to the config file, so a job directory can move as a unit."""
    data_path = Path(cfg.data.path).expanduser()
    if not data_path.is_absolute():
        data_path = base_dir / data_path
    model_ref = cfg.model.name_or_path
    if model_ref.startswith((".", "~")) or (base_dir / model_ref).is_dir():
        model_ref = str((base_dir / Path(model_ref).expanduser()).resolve())
    try:
        check_model_source(model_ref)
    except ModelSourceError as exc:
        issues.append(ConfigIssue("model.name_or_path", str(exc), where(["model", "name_or_path"])))
    evaluation = cfg.eval
    if evaluation is not None:

        def near(path: str | None) -> str | None:
            return None if path is None else str((base_dir / Path(path).expanduser()).resolve())

        evaluation = evaluation.model_copy(
            update={
                "data": [near(p) for p in evaluation.data],
                "edge_cases": near(evaluation.edge_cases),
                "retain": near(evaluation.retain),
            }
        )
    tasks = []
    for task in cfg.tasks:
        task_path = Path(task.data.path).expanduser()
        task_path = task_path if task_path.is_absolute() else base_dir / task_path
        tasks.append(task.model_copy(update={"data": task.data.model_copy(update={"path": str(task_path.resolve())})}))
    train = cfg.train
    if train.retain_path is not None:
        train = train.model_copy(
            update={"retain_path": str((base_dir / Path(train.retain_path).expanduser()).resolve())}
        )
    return cfg.model_copy(
        update={
            "train": train,
            "tasks": tasks,
            "eval": evaluation,
            "data": cfg.data.model_copy(update={"path": str(data_path.resolve())}),
            "model": cfg.model.model_copy(update={"name_or_path": model_ref}),
            # `~/...` as in a shell (a submitted job writes to ~/raytune_ft/... on the head node)
            "output_dir": str(Path(cfg.output_dir).expanduser()),
        }
    )


def _local_model_dir(ref: str) -> str | None:
    """The directory of a resolved local or `package:` model reference; None for a hub id."""
    if not (ref.startswith(PACKAGE_PREFIX) or Path(ref).is_absolute()):
        return None
    try:
        return resolve_model_source(ref, convert=False)  # a GGUF not converted yet: its LoRA targets wait for it
    except ModelSourceError:
        return None


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)

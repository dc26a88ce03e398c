"""Run configurations: one YAML file whose keys are exactly `train()`'s arguments.

A config file may also hold a `slurm:` section with the job-level settings of `HardwareSpec`
(time, mem, partition, ...), read by the Slurm renderer and ignored by `train()`. Unknown keys are
errors that suggest the closest valid key, because a typo silently falling back to a default would
only show up hours into a job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml

from zoobot_hpc.errors import InputError
from zoobot_hpc.hardware import HardwareSpec

Function = TypeVar("Function", bound=Callable[..., Any])
SLURM_SECTION = "slurm"
HARDWARE_TRAIN_KEYS = ("nodes", "gpus", "num_workers", "mixed_precision", "accelerator")
SLURM_KEYS = (*(f.name for f in dataclasses.fields(HardwareSpec) if f.name not in HARDWARE_TRAIN_KEYS), "env")
NUMBER_RANGES = {  # float settings: what the optimizer and the head accept
    "learning_rate": (lambda v: v > 0, "> 0, e.g. 0.001"),
    "weight_decay": (lambda v: v >= 0, ">= 0, e.g. 0.05"),
    "dropout_rate": (lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.2"),
    "hang_report_after": (lambda v: v >= 0, ">= 0 seconds (0: never)"),
}
EXAMPLES = {"save_dir": "outputs/run1", "schema": "gz_decals_dr5"}  # for the required keys
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class ConfigError(InputError):
    """A configuration file or override is invalid; the message names the key."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 and leading-zero octal numbers (YAML 1.2 has
    neither): `time: 20:00:00` stays Slurm's 20 hours, where YAML 1.1 reads the integer 72000, which
    Slurm takes as 72000 minutes; `account: 0123` stays text, not 83."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0b[01_]+)$"), list("-+0123456789")
)
_ConfigLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?
        |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


def train_arguments() -> dict[str, inspect.Parameter]:
    """`train()`'s parameters by name: the vocabulary of config files."""
    from zoobot_hpc.training import train

    return dict(inspect.signature(train).parameters)


def check_keys(keys: Iterable[str], valid: Iterable[str], where: str) -> None:
    valid = list(valid)
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {key!r} in {where}.{hint} Valid keys: {', '.join(sorted(valid))}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`key=value` or `slurm.key=value`; the value is parsed as YAML (numbers, lists, null, ...)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set epochs=10")
    key, _, raw = text.partition("=")
    try:
        value = _read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({err})") from err
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a YAML config, apply `key=value` overrides, and check every key.

    Relative paths inside the file are relative to the working directory, as on the command line.
    """
    config: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = _read_yaml(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping of train() arguments")
        config = dict(loaded)
    for text in overrides:
        _apply_override(config, text)
    validate_config(config, where=str(path) if path else "--set overrides")
    return _read_floats(config)


def _apply_override(config: dict[str, Any], text: str) -> None:
    """Set one `--set` value; a section left empty in the file (`slurm:` alone) is an empty section."""
    keys, value = parse_override(text)
    target = config
    for part in keys[:-1]:
        if target.get(part) is None:
            target[part] = {}
        target = target[part]
        if not isinstance(target, dict):
            raise ConfigError(f"--set {text!r}: {part!r} is {target!r}, not a section of settings")
    target[keys[-1]] = value


def _read_floats(config: dict[str, Any]) -> dict[str, Any]:
    """Float settings written as `1e-4`: YAML 1.1 (PyYAML) reads them as strings, YAML 1.2 as numbers."""
    defaults = train_arguments()
    for key, value in config.items():
        default = defaults[key].default if key in defaults else None
        if isinstance(default, float) and isinstance(value, str):
            with contextlib.suppress(ValueError):  # else left as is: check_argument_types names it
                config[key] = float(value)
    return config


def check_argument_types(arguments: Mapping[str, Any]) -> None:
    """Each setting whose default is a bool, int or float must be one (YAML quotes make strings).

    `color: "no"` would otherwise train in colour (a non-empty string is true) and
    `learning_rate: "1e-4x"` would fail only once the optimizer is built.
    """
    defaults = train_arguments()
    for key, value in arguments.items():
        default = defaults[key].default if key in defaults else None
        if isinstance(default, bool):
            _expect(isinstance(value, bool), key, value, "true or false", default)
        elif isinstance(default, int):
            _expect(_is_int(value), key, value, "a whole number", default)
        elif isinstance(default, float):
            _expect(_is_number(value), key, value, "a number", default)
            rule, wanted = NUMBER_RANGES.get(key, (lambda v: True, ""))
            if not rule(value):
                raise ConfigError(f"{key}={value!r}: must be {wanted}")


def _expect(ok: bool, key: str, value: Any, wanted: str, default: Any) -> None:
    if not ok:
        example = str(default).lower() if isinstance(default, bool) else default
        raise ConfigError(
            f"{key}={value!r} ({type(value).__name__}): must be {wanted}, e.g. {key}: {example} in YAML "
            "(no quotes)"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_config(config: Mapping[str, Any], where: str) -> None:
    train_keys = [k for k in train_arguments() if k != "kwargs"]
    check_keys(config.keys(), [*train_keys, SLURM_SECTION], where)
    slurm = config.get(SLURM_SECTION) or {}
    if not isinstance(slurm, Mapping):
        raise ConfigError(f"'{SLURM_SECTION}' in {where} must be a mapping of job settings")
    check_keys(slurm.keys(), SLURM_KEYS, f"the {SLURM_SECTION} section of {where}")


def train_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config that `train()` takes; its required keys must be there."""
    required = [k for k, p in train_arguments().items() if p.default is inspect.Parameter.empty]
    absent = [k for k in required if config.get(k) is None]
    if absent:
        raise ConfigError(
            f"the config has no {' or '.join(absent)}: set {'them' if len(absent) > 1 else 'it'} in the "
            f"file or with --set, e.g. --set {absent[0]}={EXAMPLES.get(absent[0], '...')}"
        )
    return {k: v for k, v in config.items() if k != SLURM_SECTION}


def hardware_spec(config: Mapping[str, Any]) -> HardwareSpec:
    """The `HardwareSpec` of a config: train()'s hardware arguments plus its slurm section."""
    defaults = train_arguments()
    values = {key: config.get(key, defaults[key].default) for key in HARDWARE_TRAIN_KEYS if key in defaults}
    slurm = dict(config.get(SLURM_SECTION) or {})
    slurm.pop("env", None)
    if "extra_sbatch" in slurm:
        slurm["extra_sbatch"] = tuple(slurm["extra_sbatch"] or ())
    return HardwareSpec(**values, **slurm)


def dump_yaml(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(_plain(data), sort_keys=False, default_flow_style=None)


def _plain(value: Any) -> Any:
    """Tuples, paths and numpy or torch values as plain YAML types."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return python_value(value)


def python_value(value: Any) -> Any:
    """A numpy (or torch) scalar or array, also inside a list or tuple, as the Python number or list
    it holds: type checks, Lightning's samplers and YAML know only those."""
    if type(value) in (list, tuple):
        return type(value)(python_value(v) for v in value)
    if callable(getattr(value, "tolist", None)):
        return value.tolist()
    return value


def python_arguments(function: Function) -> Function:
    """Call `function` with `python_value` of each argument: `batch_size=np.int64(32)` is checked,
    used and recorded in the config as the 32 it is."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        return function(*map(python_value, args), **{k: python_value(v) for k, v in kwargs.items()})

    return cast(Function, call)

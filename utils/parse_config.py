"""pytorch-template's ConfigParser: JSON config + CLI flags, run directory, object factory."""
from __future__ import annotations

import argparse
import logging
import os
from collections import OrderedDict
from datetime import datetime
from functools import partial, reduce
from operator import getitem
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

from utils.util import ConfigError, read_json, write_json


class CustomArgs(NamedTuple):
    """A CLI flag that overrides a nested config key; ``target`` is ``"a;b;c"``."""

    flags: list
    type: Callable
    target: str
    help: str = ""


class ConfigParser:
    """Holds the resolved config, the run directory and factories for configured objects.

    ``config``: the parsed JSON; ``resume``: checkpoint path or None; ``modification``:
    ``{"a;b": value}`` overrides (values of None are skipped); ``run_id``: run folder name
    (default: a timestamp); ``run_dir``: an explicit run directory (overrides the default
    ``<trainer.save_dir>/<name>/<run_id>``); ``create_dirs``: make the run dir and write
    ``config.json`` into it.
    """

    def __init__(self, config: dict, resume: str | Path | None = None, modification: dict | None = None,
                 run_id: str | None = None, run_dir: str | Path | None = None, create_dirs: bool = True,
                 config_path: str | Path | None = None):
        self._config = _update_config(config, modification or {})
        self.resume = Path(resume) if resume is not None else None
        self.config_path = Path(config_path) if config_path is not None else None
        if run_dir is None:
            save_dir = Path(self._config.get("trainer", {}).get("save_dir", "saved"))
            if run_id is None:
                run_id = datetime.now().strftime(r"%Y%m%d_%H%M%S_%f")
            run_dir = save_dir / str(self._config.get("name", "run")) / run_id
        self._run_dir = Path(run_dir)
        if create_dirs:
            self._run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self._config, self._run_dir / "config.json")

    @classmethod
    def from_args(cls, args: argparse.ArgumentParser, options: Iterable[CustomArgs] = (),
                  argv: list[str] | None = None, load_resume_config: Callable | None = None,
                  **kwargs) -> "ConfigParser":
        """Parse ``-c/--config``, ``-r/--resume``, ``-d/--device`` and the custom overrides.

        The config comes from ``-c``; without it, from ``load_resume_config(resume_path)``
        when given, else from ``config.json`` beside the checkpoint.
        """
        options = list(options)
        for opt in options:
            args.add_argument(*opt.flags, default=None, type=opt.type, help=opt.help)
        if not isinstance(args, tuple):
            args = args.parse_args(argv)
        if getattr(args, "device", None) is not None:
            kwargs.setdefault("device", args.device)
        resume = Path(args.resume) if getattr(args, "resume", None) else None
        if args.config is not None:
            config_path = Path(args.config)
            config = read_json(config_path)
        elif resume is not None:
            if load_resume_config is not None:
                config, config_path = load_resume_config(resume), resume
            else:
                config_path = resume.parent / "config.json"
                config = read_json(config_path)
        else:
            raise ConfigError("no config given: add -c config.json (or -r checkpoint.pth to resume)")
        modification = {opt.target: getattr(args, _dest(opt.flags)) for opt in options}
        device = kwargs.pop("device", None)
        parser = cls(config, resume, modification, config_path=config_path, **kwargs)
        parser.device = device
        parser.args = args
        return parser

    def init_obj(self, name: str, module: Any, *args, **kwargs) -> Any:
        """Build ``config[name]['type']`` from ``module`` with ``config[name]['args']`` (+ kwargs).

        ``module`` may be a module or a dict ``{name: class}``. An unknown type is a ConfigError
        listing the valid names.
        """
        spec = self[name]
        factory = lookup_type(module, spec, name)
        module_args = dict(spec.get("args", {}))
        overlap = set(kwargs) & set(module_args)
        if overlap:
            raise ConfigError(f"config key {name}.args: {sorted(overlap)} may not be set here (set by the program)")
        module_args.update(kwargs)
        return call_with_config_args(factory, name, *args, **module_args)

    def init_ftn(self, name: str, module: Any, *args, **kwargs) -> Callable:
        """Like :meth:`init_obj`, but returns a ``functools.partial`` instead of calling it."""
        spec = self[name]
        factory = lookup_type(module, spec, name)
        module_args = dict(spec.get("args", {}))
        module_args.update(kwargs)
        return partial(factory, *args, **module_args)

    def __getitem__(self, name: str) -> Any:
        try:
            return self._config[name]
        except KeyError:
            raise ConfigError(f"config: missing key {name!r}") from None

    def get(self, name: str, default: Any = None) -> Any:
        return self._config.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self._config

    def get_logger(self, name: str, verbosity: int = 2) -> logging.Logger:
        levels = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
        if verbosity not in levels:
            raise ConfigError(f"verbosity {verbosity} is invalid; valid options are {list(levels)}")
        logger = logging.getLogger(name)
        logger.setLevel(levels[verbosity])
        return logger

    @property
    def config(self) -> OrderedDict:
        return self._config

    @property
    def run_dir(self) -> Path:
        return self._run_dir

    # pytorch-template names: checkpoints and logs live in the one run directory.
    save_dir = run_dir
    log_dir = run_dir


def _dest(flags: list) -> str:
    for flag in flags:
        if flag.startswith("--"):
            return flag[2:].replace("-", "_")
    return flags[0].lstrip("-").replace("-", "_")


def call_with_config_args(factory: Callable, name: str, *args, **kwargs) -> Any:
    """Call ``factory``; an unknown keyword becomes a ConfigError naming ``name.args``."""
    try:
        return factory(*args, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            bad = str(err).split("unexpected keyword argument", 1)[1].strip()
            raise ConfigError(f"config key {name}.args: unexpected argument {bad} for {factory.__name__}") from None
        raise


def lookup_type(module: Any, spec: Any, name: str) -> Callable:
    """The class named by ``spec['type']`` in ``module`` (a module or a dict of classes)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"config key {name!r} must be an object with a 'type' (and optional 'args')")
    type_name = spec["type"]
    if isinstance(module, dict):
        valid = dict(module)
    else:
        exported = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        valid = {n: getattr(module, n) for n in exported if callable(getattr(module, n, None))}
    if type_name not in valid:
        raise ConfigError(f"config key {name}.type: unknown {type_name!r}; valid: {', '.join(sorted(valid))}")
    return valid[type_name]


def _update_config(config: dict, modification: dict) -> dict:
    """Apply ``{"a;b;c": value}`` overrides (None values are skipped)."""
    for key, value in modification.items():
        if value is not None:
            _set_by_path(config, key, value)
    return config


def _set_by_path(tree: dict, keys: str, value: Any) -> None:
    path = keys.split(";")
    try:
        parent = reduce(getitem, path[:-1], tree)
    except (KeyError, TypeError):
        raise ConfigError(f"config: cannot override {'.'.join(path)}: missing key on the way") from None
    parent[path[-1]] = value


def get_by_path(tree: dict, keys: str, default: Any = None) -> Any:
    """Read ``"a;b;c"`` from a nested dict, or ``default`` when any key is missing."""
    try:
        return reduce(getitem, keys.split(";"), tree)
    except (KeyError, TypeError):
        return default


def default_run_root() -> Path:
    """Where runs go when the config has no ``trainer.save_dir``."""
    return Path(os.environ.get("JOEM_SAVE_DIR", "saved"))

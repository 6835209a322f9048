"""OmegaConf configs: a YAML file plus ``key=value`` overrides, saved next to every output."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from .atomic import atomic_path
from .errors import InputError


def load_config(path: str | Path | None, overrides: Sequence[str] = (), defaults: dict | None = None) -> DictConfig:
    """Merge ``defaults`` < YAML file < dot-list overrides, and resolve interpolations."""
    cfg = OmegaConf.create(defaults or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(path, None, "an existing YAML config file", "no such file")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except Exception as exc:  # omegaconf raises several types for malformed YAML
            raise InputError(path, None, "valid YAML", f"{type(exc).__name__}: {exc}") from exc
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise InputError(None, "command line", "overrides of the form key=value", " ".join(bad))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    OmegaConf.resolve(cfg)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    return path

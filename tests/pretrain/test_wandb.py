"""Optional W&B logging (log.wandb): the same scalars as TensorBoard, one run id across resumes.

A stand-in ``wandb`` module records the calls (the real package is not a dependency); with the
package missing, enabling it is one clear error.
"""

from __future__ import annotations

import sys
import types

import pytest

from common.config import load_config
from common.errors import InputError
from pretrain.config import PretrainConfig
from pretrain.tb_logging import ScalarWriter, start_wandb


class _Run:
    def __init__(self, calls, kwargs):
        self.calls, self.kwargs = calls, kwargs

    def log(self, scalars, step):
        self.calls.append(("log", dict(scalars), step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    module = types.ModuleType("wandb")
    module.util = types.SimpleNamespace(generate_id=lambda: f"id{len(calls)}")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _Run(calls, kwargs)

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_scalars_reach_wandb_and_a_resumed_run_keeps_its_id(fake_wandb, tmp_path):
    settings = {"enabled": True, "project": "p", "mode": "offline", "run_name": None}
    run = start_wandb(settings, tmp_path / "run", {"train": {"lr": 1e-3}})
    writer = ScalarWriter(tmp_path / "run" / "tensorboard", enabled=True, wandb_run=run)
    writer.write(7, {"train/loss": 2.5})
    writer.close()
    init = fake_wandb[0][1]
    assert init["mode"] == "offline" and init["name"] == "run" and init["resume"] == "allow"
    assert init["config"] == {"train": {"lr": 1e-3}} and init["dir"] == str(tmp_path / "run")
    assert ("log", {"train/loss": 2.5}, 7) in fake_wandb and fake_wandb[-1] == ("finish",)
    start_wandb(settings, tmp_path / "run", {})  # a resumed job: the same W&B run id
    assert [c[1]["id"] for c in fake_wandb if c[0] == "init"] == [init["id"], init["id"]]
    assert start_wandb({"enabled": False}, tmp_path / "other", {}) is None
    with pytest.raises(InputError, match="log.wandb.mode"):
        start_wandb({**settings, "mode": "sometimes"}, tmp_path / "run", {})


def test_enabling_wandb_without_the_package_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(InputError, match="wandb package"):
        start_wandb({"enabled": True}, tmp_path, {})
    cfg = load_config(None, ["log.wandb.enabled=true", "log.wandb.mode=online"], schema=PretrainConfig)
    assert cfg.log.wandb.enabled and cfg.log.wandb.mode == "online"

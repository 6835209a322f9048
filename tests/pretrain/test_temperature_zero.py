"""τ stays within [min, max] when DeepSpeed owns the optimizer (ZeRO 1, 2, 3; fp32 and bf16).

Under ZeRO the optimizer steps its own master copy of every parameter, so a clamp of the
module's copy after the step (the previous design) never reached the master: once the master
passed a bound τ stuck there with zero gradient. τ = min + (max − min)·sigmoid(raw + raw_init)
has no out-of-range value, whatever the master holds. One CPU rank with gloo.
"""

from __future__ import annotations

import math
import socket

import pytest
import torch
from torch import nn

from pretrain.loss import LearnableTemperature, similarity_adjusted_loss
from pretrain.training_module import PASTTrainingModule
from tests.support import end_process_group

TAU_MIN, TAU_INIT, TAU_MAX = 0.01, 0.07, 0.0702  # init 0.3 % below max: the first step reaches the bound


def _within(taus: list[float]) -> bool:
    """Every τ in [min, max], up to float32 rounding of the bounds (float32(0.01) < 0.01)."""
    return all(TAU_MIN * (1 - 1e-6) <= t <= TAU_MAX * (1 + 1e-6) for t in taus)


class _Towers(nn.Module):
    """Two linear 'encoders'; enough parameters for ZeRO to partition."""

    def __init__(self):
        super().__init__()
        self.img = nn.Linear(8, 4)
        self.cell = nn.Linear(8, 4)

    def forward(self, batch):
        return {
            "img_emb": nn.functional.normalize(self.img(batch["x"]), dim=-1),
            "cell_emb": nn.functional.normalize(self.cell(batch["y"]), dim=-1),
        }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def deepspeed_cpu():
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as mp:
        env = {
            "DS_ACCELERATOR": "cpu",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
        }
        for key, value in env.items():
            mp.setenv(key, value)
        import deepspeed

        started_here = not dist.is_initialized()
        if started_here:
            deepspeed.init_distributed(dist_backend="gloo")
        try:
            yield deepspeed
        finally:
            if started_here:
                end_process_group()


def _engine(deepspeed, stage: int, bf16: bool):
    torch.manual_seed(0)
    module = PASTTrainingModule(_Towers(), LearnableTemperature(TAU_INIT, TAU_MIN, TAU_MAX))
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    config = {
        "train_micro_batch_size_per_gpu": 6,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def _drive(engine, sign: float, steps: int, bf16: bool) -> list[float]:
    """``steps`` optimizer steps on sign·1e3·τ + the loss (Adam, lr 0.2: raw moves up to 0.2 per step); τ after each."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    g = torch.Generator().manual_seed(1)
    seen = []
    for _ in range(steps):
        batch = {"x": torch.randn(6, 8, generator=g).to(dtype), "y": torch.randn(6, 8, generator=g).to(dtype)}
        out = engine(batch)
        tau = out["temperature"]
        assert tau.dtype == torch.float32 and tau.ndim == 0  # τ in float32 even when the weights are bf16
        loss = similarity_adjusted_loss(out["img_emb"], out["cell_emb"], tau) + sign * 1e3 * tau
        engine.backward(loss)
        engine.step()
        with torch.no_grad():
            seen.append(float(engine({"x": batch["x"], "y": batch["y"]})["temperature"]))
    return seen


@pytest.mark.parametrize(
    "stage,bf16", [(1, False), (2, False), (3, False), (1, True), (2, True), (3, True)], ids=lambda v: str(v)
)
def test_temperature_stays_within_bounds_under_zero(deepspeed_cpu, stage, bf16):
    engine = _engine(deepspeed_cpu, stage, bf16)
    # Down (−τ minimised → τ up to max), far past where a clamped log(1/τ) master would have escaped ...
    up = _drive(engine, -1.0, 15, bf16)
    assert _within(up), up
    assert up[-1] == pytest.approx(TAU_MAX, abs=3e-5)
    # ... and it comes back: the gradient was never cut off, τ then goes down to the lower bound.
    down = _drive(engine, +1.0, 100, bf16)
    assert _within(down), down
    assert down[-1] < TAU_MIN + 2e-3


def test_clamp_after_step_control_escapes_under_zero(deepspeed_cpu):
    """Control: the old design (clamp of log(1/τ) in forward, clamp_ of the module copy after the step)
    lets DeepSpeed's master drift past the bound, after which τ gets no gradient and stays pinned."""

    class ClampedTemperature(nn.Module):
        def __init__(self):
            super().__init__()
            self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / TAU_INIT)]))

        def forward(self):
            return torch.exp(-self.logit_scale.float().clamp(math.log(1 / TAU_MAX), math.log(1 / TAU_MIN))).reshape(())

    torch.manual_seed(0)
    module = PASTTrainingModule(_Towers(), ClampedTemperature())
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    config = {"train_micro_batch_size_per_gpu": 6, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9}
    engine, *_ = deepspeed_cpu.initialize(model=module, optimizer=optimizer, config=config, dist_init_required=False)
    _drive(engine, -1.0, 15, False)
    with torch.no_grad():
        engine.module.temperature.logit_scale.clamp_(math.log(1 / TAU_MAX), math.log(1 / TAU_MIN))
    down = _drive(engine, +1.0, 20, False)
    assert down[-1] == pytest.approx(TAU_MAX, abs=1e-6)  # stuck at max: the master stayed out of range


def test_bounded_parametrisation_gradient_and_legacy_checkpoints():
    temperature = LearnableTemperature(0.07, 0.01, 1.0)
    assert temperature.temperature == pytest.approx(0.07)
    assert temperature.raw.shape == (1,) and temperature.raw.item() == 0.0
    with torch.no_grad():
        for raw, bound in ((1e4, 1.0), (-1e4, 0.01)):
            temperature.raw.fill_(raw)
            assert temperature().item() == pytest.approx(bound)
    temperature = LearnableTemperature(0.07, 0.01, 1.0)
    temperature().backward()
    u = (0.07 - 0.01) / 0.99
    assert temperature.raw.grad.item() == pytest.approx(0.99 * u * (1 - u))  # dτ/draw = span·s(1 − s)
    # A checkpoint of the log(1/τ) parametrisation loads as the same τ.
    legacy = LearnableTemperature(0.07, 0.01, 1.0)
    legacy.load_state_dict({"logit_scale": torch.tensor([math.log(1 / 0.2)])})
    assert legacy.temperature == pytest.approx(0.2, rel=1e-6)
    with pytest.raises(Exception, match="init"):
        LearnableTemperature(1.0, 0.01, 1.0)  # init on a bound: the sigmoid never reaches it


def test_bf16_copy_of_raw_quantises_tau_finer_than_a_bf16_log_scale():
    """Under DeepSpeed bf16 the forward sees a bf16 copy of raw. Within |raw| ≤ 1 of its initial value, one bf16
    step of raw moves τ by < 0.7 %; one bf16 step of the old log(1/τ) parameter moved τ = 0.07 by 1.6 %."""
    temperature = LearnableTemperature(0.07, 0.01, 1.0)

    def tau_at(raw: torch.Tensor) -> float:
        with torch.no_grad():
            temperature.raw.copy_(raw.float().reshape(1))
            return temperature().item()

    worst = 0.0
    for raw in torch.linspace(-1, 1, 201).to(torch.bfloat16):
        upper = torch.nextafter(raw, torch.tensor(2.0, dtype=torch.bfloat16))
        worst = max(worst, abs(tau_at(upper) / tau_at(raw) - 1))
    assert 0.0 < worst < 0.007
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.bfloat16)
    next_scale = torch.nextafter(log_scale, torch.tensor(10.0, dtype=torch.bfloat16))
    old_step = abs(math.exp(float(log_scale) - float(next_scale)) - 1)
    assert old_step > 0.015 and worst < old_step / 2

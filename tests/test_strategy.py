"""The Strategy protocol and the one place that unscales, clips and steps.

The strategies are checked against the protocol they promise; `MixedPrecision.unscale_clip_step`
is checked on a real optimizer for each outcome the trainer's policy tells apart (applied, not
finite, fp16 overflow); and a trainer driven through a strategy that only implements the
protocol trains the same bits as with the built-in one.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from pipeline.config.loader import load_config
from pipeline.distributed.data_parallel import DataParallel, SingleDevice
from pipeline.distributed.strategy import STRATEGIES, StepResult, Strategy
from pipeline.training.precision import MixedPrecision
from pipeline.training.trainer import Trainer


def _linear(seed: int = 0) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 3)
    return layer, torch.optim.SGD(layer.parameters(), lr=0.1)


def _backward(layer: torch.nn.Linear, precision: MixedPrecision, poison: float | None) -> None:
    loss = layer(torch.ones(2, 4)).pow(2).sum()
    precision.scale(loss).backward()
    if poison is not None:
        layer.weight.grad[0, 0] = poison


def test_a_finite_step_is_applied_and_clipped_to_the_limit() -> None:
    layer, optimizer = _linear()
    before = layer.weight.detach().clone()
    precision = MixedPrecision.create("fp32", torch.device("cpu"))
    _backward(layer, precision, None)
    unclipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in layer.parameters()))
    result = precision.unscale_clip_step(optimizer, max_norm=1e-3)
    assert result == StepResult(pytest.approx(unclipped), applied=True, overflow=False)
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in layer.parameters()))
    assert clipped == pytest.approx(1e-3, rel=1e-4), "gradients clipped to max_norm in place"
    assert not torch.equal(before, layer.weight)


@pytest.mark.parametrize("poison", [math.inf, math.nan])
def test_a_non_finite_norm_is_reported_not_applied_and_left_to_the_caller(poison: float) -> None:
    layer, optimizer = _linear()
    before = layer.weight.detach().clone()
    precision = MixedPrecision.create("bf16", torch.device("cpu"))  # no scaler, as fp32
    _backward(layer, precision, poison)
    result = precision.unscale_clip_step(optimizer, max_norm=None)
    assert not result.applied and not result.overflow and not math.isfinite(result.grad_norm)
    assert torch.equal(before, layer.weight), "no update"


def test_an_fp16_overflow_is_the_scalers_skip_not_a_non_finite_step() -> None:
    layer, optimizer = _linear()
    before = layer.weight.detach().clone()
    precision = MixedPrecision.create("fp16", torch.device("cpu"))
    scale = precision.loss_scale()
    _backward(layer, precision, math.inf)
    result = precision.unscale_clip_step(optimizer, max_norm=1.0)
    assert (result.applied, result.overflow) == (False, True)
    assert precision.loss_scale() == scale / 2
    assert torch.equal(before, layer.weight)
    optimizer.zero_grad()
    _backward(layer, precision, None)  # the next, finite step is applied by the scaler
    assert precision.unscale_clip_step(optimizer, max_norm=1.0).applied


def test_every_registered_strategy_implements_the_protocol_without_the_trainer() -> None:
    """Methods by name, and no method takes a trainer (the loop is never handed over)."""
    assert set(STRATEGIES) >= {"single", "ddp", "deepspeed"}
    for cls in (SingleDevice, DataParallel):
        wanted = [name for name in dir(Strategy) if not name.startswith("_")]
        missing = [name for name in wanted if not hasattr(cls, name)]
        assert not missing, f"{cls.__name__} lacks {missing}"
        for name in wanted:
            member = getattr(cls, name)
            if callable(member):
                assert "trainer" not in inspect.signature(member).parameters, (cls, name)


class ProtocolOnly:
    """A strategy written from the protocol alone, delegating to torch directly (no base
    class): what a new parallelism starts from. The trainer must need nothing more."""

    name = "protocol-only"
    rank, world_size, is_main = 0, 1, True

    def __init__(self, config) -> None:
        self.inner = SingleDevice(config=config)
        self.calls: list[str] = []

    def __getattr__(self, attribute: str):
        self.calls.append(attribute)
        return getattr(self.inner, attribute)


def test_the_trainer_uses_only_the_protocol(prepared_dir: Path, tmp_path: Path) -> None:
    def config(run: str):
        return load_config(overrides=tiny_overrides(prepared_dir, tmp_path / run, {
            "training.max_steps": 2, "training.checkpoint_interval": 2}))  # fmt: skip

    reference = Trainer(config("reference"))
    want = [float(reference.train_step()["train/loss"]) for _ in range(2)]
    strategy = ProtocolOnly(config("protocol"))
    assert isinstance(strategy, Strategy)
    strategy.calls.clear()  # isinstance looked every member up
    trainer = Trainer(config("protocol"), strategy=strategy)  # type: ignore[arg-type]
    assert [float(trainer.train_step()["train/loss"]) for _ in range(2)] == want
    trainer.save_checkpoint()
    trainer.resume("latest")
    protocol = {name for name in dir(Strategy) if not name.startswith("_")}
    assert set(strategy.calls) <= protocol, set(strategy.calls) - protocol
    assert {"wrap", "backward", "step", "reduce_mean", "save", "load"} <= set(strategy.calls)


def test_ddp_lets_go_of_its_reducer_before_the_process_group_is_destroyed(
    tmp_path: Path,
) -> None:
    """A rank once hung at exit: the Reducer, freed with the GIL held after the group was
    destroyed, released the group's last reference and gloo's destructor waited for a thread
    that needed the GIL. `close()` (run before the group is destroyed) frees the wrapper."""
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.distributed.comm import Collective
    from pipeline.model import GPT

    store = f"file://{tmp_path / 'rendezvous'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        config = load_config(overrides=tiny_overrides(tmp_path, tmp_path / "run"))
        strategy = DataParallel(Collective(), config=config)
        model = GPT(config.model, 64)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        wrapped = strategy.wrap(model, optimizer, MixedPrecision("fp32", "cpu", None))
        ids = torch.randint(0, 64, (2, 8))
        strategy.backward(wrapped.forward(ids, ids)[1])
        strategy.step()
        del wrapped
        strategy.close()
        alive = [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)]
        assert alive == []
    finally:
        dist.destroy_process_group()

"""Building on the meta device and materializing gives today's weights bitwise (issue 19, item 8).

The multi-rank cases (each rank's shards equal to the slices of today's full weights, FSDP, TP
and both) are checked in test_fsdp.py, inside the spawned runs.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from pipeline.config.schema import ModelConfig
from pipeline.distributed.meta_init import build_on_meta, materialize
from pipeline.model import GPT

TINY = ModelConfig(name="t", n_layer=2, d_model=64, n_head=4, d_head=16, d_ff=128, n_ctx=32)

TODAY_SEED0 = "5668cdca55aaf108e1047f7068c62222211c558227ceda7ae6492b306c0060b0"
"""sha256 over (key, bytes) of GPT(TINY, 500)'s state dict after torch.manual_seed(0), taken
from the model before `init_module` existed: today's init must keep its bits."""


def digest(model: GPT) -> str:
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().numpy().tobytes())
    return h.hexdigest()


def test_todays_init_keeps_its_bits() -> None:
    torch.manual_seed(0)
    assert digest(GPT(TINY, 500)) == TODAY_SEED0


def test_building_on_meta_allocates_and_draws_nothing() -> None:
    before = torch.get_rng_state()
    model = build_on_meta(TINY, 500)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("seed", [0, 7])
def test_materialized_weights_and_generator_equal_todays_build(seed: int) -> None:
    torch.manual_seed(seed)
    today = GPT(TINY, 500)
    after_today = torch.get_rng_state()

    torch.manual_seed(seed)
    model = build_on_meta(TINY, 500)
    materialize(model, torch.device("cpu"))

    want = today.state_dict()
    got = model.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert model.lm_head.weight is model.wte.weight  # the tie survives to_empty
    # The generator is left where today's build leaves it: later draws (dropout) match too.
    assert torch.equal(torch.get_rng_state(), after_today)


def test_a_different_seed_gives_different_weights() -> None:
    torch.manual_seed(1)
    model = build_on_meta(TINY, 500)
    materialize(model, torch.device("cpu"))
    assert digest(model) != TODAY_SEED0

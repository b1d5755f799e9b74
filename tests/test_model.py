"""The GPT model and generation, on real tensors with tiny shapes (CPU, a few seconds)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config.schema import ModelConfig
from pipeline.generation import filter_logits, generate, sample_token
from pipeline.model import (
    GPT,
    KVCache,
    count_parameters,
    flops_per_token,
    padded_vocab_size,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = sorted((ROOT / "configs" / "model_configs").glob("*.yaml"))
VOCAB = 100  # padded to 128: 28 padding rows
GPT2_VOCAB = 50257


def tiny_config(**overrides: object) -> ModelConfig:
    values: dict[str, object] = {"n_layer": 2, "d_model": 64, "n_head": 4, "n_ctx": 32}
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides), VOCAB)


def lively_model(seed: int = 0) -> GPT:
    """Random weights far from init, so greedy decoding does not repeat one token forever."""
    model = tiny_model(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def batch(seed: int = 0, b: int = 2, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (b, t + 1), generator=g)
    return data[:, :-1], data[:, 1:]


# --- structure ---------------------------------------------------------------------------


def test_model_imports_nothing_distributed() -> None:
    tree = ast.parse((ROOT / "pipeline" / "model.py").read_text(encoding="utf-8"))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
            names += [f"{node.module}.{a.name}" for a in node.names]
    banned = ("torch.distributed", "deepspeed", "mlflow")
    assert not [n for n in names if any(n == b or n.startswith(b + ".") for b in banned)]


def test_tied_weights_share_storage_and_stay_tied_after_a_step() -> None:
    model = tiny_model()
    assert model.lm_head.weight is model.wte.weight
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    x, y = batch()
    before = model.wte.weight.detach().clone()
    model(x, y)[1].backward()
    opt.step()
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    assert not torch.equal(before, model.wte.weight)
    # A state-dict round trip into a fresh model keeps the tie and plain keys.
    state = model.state_dict()
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in state)
    fresh = tiny_model(seed=1)
    fresh.load_state_dict(state)
    assert fresh.lm_head.weight is fresh.wte.weight
    assert torch.equal(fresh.wte.weight, model.wte.weight)


def test_meta_device_build_then_init_keeps_the_tie() -> None:
    with torch.device("meta"):
        model = GPT(tiny_config(), VOCAB)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.wte.weight
    assert sum(p.numel() for p in model.parameters()) == model.num_parameters(count_padding=True)
    assert torch.count_nonzero(model.wte.weight[VOCAB:]) == 0
    assert model.wte.weight[:VOCAB].std().item() == pytest.approx(0.02, rel=0.2)


def test_padded_vocab_is_never_predicted_and_gets_no_gradient() -> None:
    model = tiny_model()
    assert padded_vocab_size(VOCAB) == 128 and model.wte.weight.shape[0] == 128
    assert padded_vocab_size(128) == 128
    assert torch.count_nonzero(model.wte.weight[VOCAB:]) == 0
    x, y = batch()
    logits, loss = model(x, y)
    assert logits.shape == (*x.shape, VOCAB)
    assert loss is not None
    loss.backward()
    grad = model.wte.weight.grad
    assert grad is not None
    assert torch.count_nonzero(grad[VOCAB:]) == 0
    assert torch.count_nonzero(grad[:VOCAB]) > 0
    # Sampling at high temperature from a flat distribution stays inside the true vocabulary.
    sampled = generate(lively_model(), [1, 2], 40, temperature=5.0, seed=0)
    assert all(0 <= t < VOCAB for t in sampled)


def test_vocab_size_must_be_known_and_consistent() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(tiny_config())
    with pytest.raises(ValueError, match="disagrees"):
        GPT(tiny_config(vocab_size=50), VOCAB)
    assert GPT(tiny_config(vocab_size=VOCAB)).config.vocab_size == VOCAB


def test_init_statistics() -> None:
    torch.manual_seed(0)
    n_layer = 8
    model = GPT(ModelConfig(n_layer=n_layer, d_model=256, n_head=4, n_ctx=64), 512)
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(residual_std, rel=0.05), name
        elif name.startswith("ln") or ".ln_" in name:
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(p == expected), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        elif name == "wte.weight":
            assert p[:512].std().item() == pytest.approx(0.02, rel=0.05)
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 2e-3, name


# --- counting ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_parameter_count_matches_the_paper(path: Path) -> None:
    config = ModelConfig(**yaml.safe_load(path.read_text(encoding="utf-8"))["model"])
    if config.paper_params is None:
        pytest.skip(f"{path.name} states no paper figure")
    counted = count_parameters(config, GPT2_VOCAB)
    assert abs(counted - config.paper_params) / config.paper_params < 0.03, counted


def test_count_parameters_matches_the_module() -> None:
    # Unusual shapes: d_ff not 4 * d_model, a vocabulary far from a multiple of 64.
    config = ModelConfig(n_layer=3, d_model=96, n_head=3, d_ff=200, n_ctx=50)
    model = GPT(config, 1001)
    allocated = sum(p.numel() for p in model.parameters())
    assert allocated == count_parameters(config, 1001, count_padding=True)
    assert model.num_parameters(count_padding=True) == allocated
    assert model.num_parameters() == count_parameters(config, 1001)
    assert model.num_parameters() == allocated - (1024 - 1001) * 96
    no_pos = model.num_parameters(include_position_embedding=False)
    assert no_pos == count_parameters(config, 1001, include_position_embedding=False)
    assert no_pos == model.num_parameters() - 50 * 96


def test_flops_per_token() -> None:
    config = tiny_config()
    n = count_parameters(config, VOCAB, include_position_embedding=False)
    assert flops_per_token(config, VOCAB, 32) == 6 * n + 12 * 2 * 64 * 32


def test_param_groups_decay_matrices_only_each_parameter_once() -> None:
    model = tiny_model()
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "wte.weight" in decayed and "wpe.weight" in decayed
    assert "h.0.attn.c_attn.weight" in decayed and "h.1.mlp.c_proj.weight" in decayed
    assert not any(n.endswith("bias") or ".ln_" in n or n.startswith("ln_f") for n in decayed)
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


# --- training behaviour ------------------------------------------------------------------


def _loss_grads_and_saved(
    enabled: bool, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, gradients and the elements autograd kept for backward, checkpointing on or off."""
    model = tiny_model(seed=3, dropout=0.1).train()
    model.set_gradient_checkpointing(enabled)
    torch.manual_seed(7)  # the same dropout masks; non-reentrant checkpoint replays them
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    assert loss is not None
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved)


def test_gradient_checkpointing_gives_the_same_loss_and_grads() -> None:
    x, y = batch(t=32)
    loss_a, grads_a, saved_a = _loss_grads_and_saved(False, x, y)
    loss_b, grads_b, saved_b = _loss_grads_and_saved(True, x, y)
    assert saved_b < saved_a / 2  # checkpointing really kept the blocks' activations out
    assert torch.allclose(loss_a, loss_b, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(tiny_model().parameters()))
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], rtol=1e-5, atol=1e-7), name


def test_loss_ignores_minus_one_targets_and_is_fp32_under_autocast() -> None:
    model = tiny_model().eval()
    x, y = batch()
    masked = y.clone()
    masked[:, ::2] = -1
    logits, loss = model(x, masked)
    assert loss is not None
    keep = masked != -1
    expected = torch.nn.functional.cross_entropy(logits[keep], y[keep])
    assert torch.allclose(loss, expected, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits16, loss16 = model(x, y)
    assert logits16.dtype == torch.bfloat16
    assert loss16 is not None and loss16.dtype == torch.float32


def test_initial_loss_is_near_uniform_and_overfitting_one_batch_lowers_it() -> None:
    model = tiny_model().train()
    x, y = batch(t=32)
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    losses = []
    for _ in range(40):
        _, loss = model(x, y)
        assert loss is not None
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert losses[0] == pytest.approx(math.log(VOCAB), rel=0.05)
    assert losses[-1] < 0.5 * losses[0]


def test_forward_rejects_positions_beyond_the_context() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="n_ctx"):
        model(torch.zeros(1, 33, dtype=torch.long))


# --- KV cache ----------------------------------------------------------------------------


def test_cached_forward_matches_the_full_forward() -> None:
    model = lively_model()
    x, _ = batch(b=2, t=20)
    full, _ = model(x)
    cache = model.new_kv_cache(batch_size=2)
    assert isinstance(cache, KVCache) and cache.max_len == 32
    # Prefill 12 tokens at once (causal mask), then a chunk of 5 at start_pos 12 (mask aligned
    # to the bottom right), then one token at a time (no mask).
    prefill, _ = model(x[:, :12], kv_cache=cache, start_pos=0)
    assert torch.allclose(prefill, full[:, :12], atol=1e-5)
    chunk, _ = model(x[:, 12:17], kv_cache=cache, start_pos=12)
    assert torch.allclose(chunk, full[:, 12:17], atol=1e-5)
    for pos in range(17, 20):
        step, _ = model(x[:, pos : pos + 1], kv_cache=cache, start_pos=pos)
        assert torch.allclose(step[:, 0], full[:, pos], atol=1e-5)
    last, _ = model(x, last_only=True)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-6)


@pytest.mark.parametrize("new_tokens", [10, 45], ids=["within_ctx", "past_ctx"])
def test_cached_and_uncached_greedy_generation_agree(new_tokens: int) -> None:
    model = lively_model()
    prompt = [5, 17, 42, 8]
    cached = generate(model, prompt, new_tokens, temperature=0.0)
    uncached = generate(model, prompt, new_tokens, temperature=0.0, use_cache=False)
    assert len(cached) == new_tokens
    assert cached == uncached
    assert len(set(cached)) > 2  # the check means something only if the tokens vary


def test_generation_restores_training_mode_and_handles_long_prompts() -> None:
    model = lively_model().train()
    long_prompt = list(range(VOCAB))[:40]  # longer than n_ctx = 32: cropped to the last 32
    out = generate(model, long_prompt, 3, temperature=0.0)
    assert model.training
    assert out == generate(model, long_prompt[-32:], 3, temperature=0.0, use_cache=False)


# --- sampling ----------------------------------------------------------------------------


def test_filter_logits_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    top2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(top2).tolist() == [True, True, False, False]
    assert torch.equal(filter_logits(logits, top_k=10), logits)
    # Nucleus: the smallest set reaching the mass. 0.5 < 0.6 <= 0.75 keeps two; 0.75 keeps two.
    assert torch.isfinite(filter_logits(logits, top_p=0.6)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [True, True, True, False]
    assert torch.isfinite(filter_logits(logits, top_p=1e-9)).tolist() == [True, False, False, False]
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)
    # Unsorted input and a batch dimension.
    batched = torch.stack([logits.flip(0), logits])
    kept = torch.isfinite(filter_logits(batched, top_p=0.6)).tolist()
    assert kept == [[False, False, True, True], [True, True, False, False]]


def test_sample_token_temperature_zero_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9])
    assert sample_token(logits, temperature=0.0) == 1


def test_top_k_one_and_tiny_top_p_equal_greedy() -> None:
    model = lively_model()
    prompt = [3, 1, 4, 1, 5]
    greedy = generate(model, prompt, 15, temperature=0.0)
    assert generate(model, prompt, 15, temperature=1.0, top_k=1, seed=1) == greedy
    assert generate(model, prompt, 15, temperature=1.0, top_p=1e-6, seed=2) == greedy


def test_seeded_sampling_is_reproducible() -> None:
    model = lively_model()
    prompt = [9, 9, 9]
    first = generate(model, prompt, 20, temperature=1.0, top_k=50, top_p=0.95, seed=123)
    again = generate(model, prompt, 20, temperature=1.0, top_k=50, top_p=0.95, seed=123)
    other = generate(model, prompt, 20, temperature=1.0, top_k=50, top_p=0.95, seed=124)
    assert first == again
    assert first != other
    # The cache changes the cost, not the samples.
    assert first == generate(
        model, prompt, 20, temperature=1.0, top_k=50, top_p=0.95, seed=123, use_cache=False
    )


def test_generation_stops_at_end_of_text() -> None:
    model = lively_model()
    prompt = [5, 17, 42, 8]
    greedy = generate(model, prompt, 10, temperature=0.0)
    stop = greedy[3]
    first = greedy.index(stop)
    assert generate(model, prompt, 10, temperature=0.0, eot_id=stop) == greedy[:first]
    assert generate(model, prompt, 0) == []


def test_generation_rejects_bad_arguments() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt"):
        generate(model, [], 5)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 5, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [1], 5, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], 5, temperature=-1.0)

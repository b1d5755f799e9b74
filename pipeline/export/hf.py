"""Export to a Hugging Face GPT-2 folder: `GPT2LMHeadModel.from_pretrained(dir)` loads it.

The model already uses GPT-2's architecture and parameter names, so the export is a copy with
three adjustments:
- GPT-2's `Conv1D` stores `(in, out)` weights where `nn.Linear` stores `(out, in)`: every
  projection matrix is transposed;
- the token embedding's padding rows (added for aligned matmuls) are dropped, so
  `vocab_size` is the tokenizer's true size;
- the output head is tied to the embedding (`tie_word_embeddings`), so only `wte` is saved.

Once exported, the model runs in any tool that speaks transformers, e.g.
`lm_eval --model hf --model_args pretrained=DIR` for the full benchmark suite.
transformers itself is not needed to export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.errors import UserError
from pipeline.evaluation.model_source import LoadedModel
from pipeline.export.hf_tokenizer import write_hf_tokenizer
from pipeline.model import GPT

CONV1D_SUFFIXES = (
    "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"
)
"""Weights that GPT-2 keeps in `Conv1D` layout, i.e. transposed relative to `nn.Linear`."""

LAYER_NORM_EPS = 1e-5
"""`nn.LayerNorm`'s default, which the model uses, and GPT-2's `layer_norm_epsilon`."""


def hf_config(model: GPT, eot_id: int) -> dict[str, object]:
    """`config.json` of a `GPT2LMHeadModel` with this model's shape (dropout off: inference)."""
    c = model.config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model.vocab_size,
        "n_positions": c.n_ctx,
        "n_ctx": c.n_ctx,
        "n_embd": c.d_model,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.d_ff,
        "activation_function": "gelu_new",  # the tanh approximation, as the model's nn.GELU
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": str(model.wte.weight.dtype).removeprefix("torch."),
    }


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under `GPT2LMHeadModel` names, in its layout, padding dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        value = tensor.detach().cpu()
        if name == "wte.weight":
            value = value[: model.vocab_size]
        elif name.endswith(CONV1D_SUFFIXES):
            value = value.t()
        out[f"transformer.{name}"] = value.contiguous().clone()
    return out


def export_hf(loaded: LoadedModel, output: str | Path, overwrite: bool = False) -> Path:
    """Write config.json, model.safetensors and tokenizer files to `output`, atomically.

    The folder is assembled beside `output` and renamed into place, so a failed export never
    leaves a folder that half loads. An existing non-empty `output` is an error unless
    `overwrite`.
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"{output}: exists and is not empty; choose another --output or --force")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        model, tokenizer = loaded.model, loaded.tokenizer
        config = hf_config(model, tokenizer.eot_id)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_hf_tokenizer(tokenizer, tmp, model.config.n_ctx)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output

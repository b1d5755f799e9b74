"""The MLflow model of a trained GPT: a pyfunc that turns prompts into generated text.

Why a pyfunc around the exported model folder rather than `mlflow.pytorch.log_model`: the folder
(`model.safetensors`, `config.yaml`, the tokenizer, `meta.json`) is what every other stage
already reads, it loads without unpickling anything, and it carries the tokenizer, so
`mlflow.pyfunc.load_model("models:/NAME@champion").predict(["ROMEO:"])` returns text. The
pyfunc is logged "from code" (`pyfunc_entry.py`), so loading it executes that small file
instead of unpickling a Python object; the loading side needs this package installed.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import pandas as pd

MODEL_DIR_ARTIFACT = "model_dir"
"""Key of the exported model folder in the pyfunc's `artifacts`."""

DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 64,
    "temperature": 0.8,
    "top_k": 0,
    "top_p": 0.95,
    "seed": -1,
}
"""Generation parameters a caller may pass as `predict(..., params={...})`.

MLflow's param schema has no optional integers, so `top_k = 0` means "no top-k" and
`seed = -1` means "a fresh random seed".
"""


def _prompts(model_input: Any) -> list[str]:
    """Accept what a pyfunc caller may pass: a DataFrame with a `prompt` column, list or str."""
    if isinstance(model_input, str):
        return [model_input]
    columns = getattr(model_input, "columns", None)
    if columns is not None:
        column = "prompt" if "prompt" in columns else columns[0]
        return [str(value) for value in model_input[column].tolist()]
    return [str(value) for value in model_input]


class GPTTextGenerator(mlflow.pyfunc.PythonModel):
    """Loads the exported model folder once; `predict` continues each prompt."""

    def load_context(self, context: Any) -> None:
        from pipeline.data.tokenizer import load_tokenizer
        from pipeline.model_artifact import load_model_dir

        folder = context.artifacts[MODEL_DIR_ARTIFACT]
        self.model, self.config = load_model_dir(folder, "cpu")
        self.tokenizer = load_tokenizer(folder)

    # A DataFrame hint keeps MLflow from inferring a signature from the hint (which would replace
    # the explicit one and drop the params schema): lists of prompts arrive as one column.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[str]:
        from pipeline.generation import generate

        settings = {**DEFAULTS, **(params or {})}
        seed = int(settings["seed"])
        top_k = int(settings["top_k"])
        texts = []
        for prompt in _prompts(model_input):
            ids = self.tokenizer.encode(prompt) or [self.tokenizer.eot_id]
            new = generate(
                self.model,
                ids,
                int(settings["max_new_tokens"]),
                temperature=float(settings["temperature"]),
                top_k=top_k if top_k > 0 else None,
                top_p=float(settings["top_p"]),
                eot_id=self.tokenizer.eot_id,
                seed=seed if seed >= 0 else None,
            )
            texts.append(prompt + self.tokenizer.decode(new))
        return texts


def signature() -> Any:
    """Strings in (`prompt`), strings out, with the generation settings as params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {int: "long", float: "double"}
    params = ParamSchema(
        [ParamSpec(name, kinds[type(value)], value) for name, value in DEFAULTS.items()]
    )
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=params,
    )

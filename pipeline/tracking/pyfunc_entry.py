"""Entry file of the logged pyfunc ("models from code"): MLflow runs it to build the model.

A copy of this file travels inside every logged model; loading the model executes it instead
of unpickling a Python object. Not meant to be imported by the library.
"""

from mlflow.models import set_model

from pipeline.tracking.mlflow_pyfunc import GPTTextGenerator

set_model(GPTTextGenerator())

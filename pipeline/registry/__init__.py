"""MLflow model registry: register trained models and promote the best with aliases."""

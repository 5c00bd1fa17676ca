"""The registered model's code (MLflow models-from-code): ``fusion-dist register`` logs this file, and
``mlflow.pyfunc.load_model`` / ``mlflow models serve`` run it to get the model; nothing is pickled. The
packages it imports travel with the model (``code_paths``), so it loads where fusion-dist is not installed."""

import mlflow

from fusion_dist.registry import SentimentModel

mlflow.models.set_model(SentimentModel())

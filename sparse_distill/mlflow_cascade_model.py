"""The cascade's pyfunc model as code (MLflow's models-from-code): `log_cascade_model` logs this file as the model,
so loading a logged or registered cascade runs this code and unpickles nothing."""

from mlflow.models import set_model

from sparse_distill.mlflow_model import CascadePyfunc

set_model(CascadePyfunc())

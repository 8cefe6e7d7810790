"""The student's pyfunc model as code (MLflow's models-from-code): `log_student_model` logs this file as the model,
so loading a logged or registered student runs this code and unpickles nothing."""

from mlflow.models import set_model

from sparse_distill.mlflow_model import StudentPyfunc

set_model(StudentPyfunc())

"""The pyfunc definition MLflow logs as code ("models from code"): no pickled Python object."""

from mlflow.models import set_model

from incseg.serving import SegmentationModel

set_model(SegmentationModel())

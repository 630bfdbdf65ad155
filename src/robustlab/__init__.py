"""robustlab: train, attack and evaluate adversarially robust image classifiers.

Pixel space everywhere: images are float NCHW in [0, 1] and every model normalises internally, so a
budget ``eps`` always means pixels. See README.md for examples and DESIGN notes.
"""

__version__ = "0.1.0"

from robustlab import schemas  # noqa: E402  (the JSON files of run and results directories)
from robustlab.attacks import ATTACKS, fgsm, make_attack, pgd  # noqa: E402
from robustlab.audit import AuditReport, audit_model, audit_run  # noqa: E402
from robustlab.config import RunConfig, load_config  # noqa: E402
from robustlab.data import DATASETS, TensorLoader, load_dataset  # noqa: E402
from robustlab.defenses import DEFENSES, Objective, build_objective  # noqa: E402
from robustlab.errors import RobustlabError  # noqa: E402
from robustlab.evaluation import EvaluationResult, evaluate_model, evaluate_run  # noqa: E402
from robustlab.models import MODELS, build_model, fused_copy  # noqa: E402
from robustlab.runs import load_run  # noqa: E402
from robustlab.training import TrainResult, train  # noqa: E402

__all__ = [
    "ATTACKS",
    "AuditReport",
    "DATASETS",
    "DEFENSES",
    "EvaluationResult",
    "MODELS",
    "Objective",
    "RobustlabError",
    "RunConfig",
    "TensorLoader",
    "TrainResult",
    "__version__",
    "audit_model",
    "audit_run",
    "build_model",
    "build_objective",
    "evaluate_model",
    "evaluate_run",
    "fgsm",
    "fused_copy",
    "load_config",
    "load_dataset",
    "load_run",
    "make_attack",
    "pgd",
    "schemas",
    "train",
]

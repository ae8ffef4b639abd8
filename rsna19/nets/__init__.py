"""Networks: a registry of model families built by name (docs/architecture.md, "Model families").

Importing this package registers every family, so ``build_model("clf2dc", ...)`` works after
``import rsna19.nets``.
"""

from rsna19.nets import clf2d, clf2dc, clf3d, combine_last, seg_aux, seq  # noqa: F401  (registration side effects)
from rsna19.nets.registry import build_model, get_model_spec, list_models, register_model

__all__ = ["build_model", "get_model_spec", "list_models", "register_model"]

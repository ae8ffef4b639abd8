"""Second level: level-2 features, stacker plug-ins, level-2 CV, blend and the ``stack`` stage.

Importing this package registers every built-in stacker (``convex``, ``lgbm``, ``mlp``; they run in this, the
import order), so :func:`make_stackers` and :func:`get_stacker_spec` know them after ``import rsna19.stacking``.
The stacker modules import LightGBM and torch only when a stacker is fitted or loaded, which keeps
``rsna19 --help`` fast.
"""

from rsna19.stacking import convex, lgbm, mlp  # noqa: F401  (registration side effects; run order)
from rsna19.stacking.registry import (
    StackerSpec,
    build_stacker,
    get_stacker_spec,
    list_stackers,
    make_stackers,
    register_stacker,
)

__all__ = ["StackerSpec", "build_stacker", "get_stacker_spec", "list_stackers", "make_stackers", "register_stacker"]

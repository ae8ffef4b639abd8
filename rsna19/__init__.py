"""rsna19: intracranial hemorrhage detection on head CT, slice by slice.

The 8th-place RSNA 2019 Kaggle pipeline rebuilt as installable software: DICOM → index → volume-aware
conversion → base models per fold → second level → submission, plus inference on new studies.
"""

from rsna19.core.constants import CLASS_WEIGHTS, CLASSES, SUBTYPES

__version__ = "0.1.0"

__all__ = ["CLASSES", "CLASS_WEIGHTS", "SUBTYPES", "__version__"]

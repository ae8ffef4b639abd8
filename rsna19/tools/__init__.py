"""Machine upkeep: pretrained weights on disk (``rsna19 weights``) and the machine checks of ``rsna19 doctor``."""

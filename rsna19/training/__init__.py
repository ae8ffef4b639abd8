"""One trainer for every model family (DESIGN §5)."""

"""OpenCV without its thread pool, imported in place of ``cv2`` by the modules that warp and window images.

OpenCV's thread pool does not survive ``fork()``: once a parallel OpenCV call has run in a process (e.g. the
parent validating or building a sample on 400² slices), a DataLoader worker forked from it hangs for ever in its
first OpenCV call or in ``cv2.setNumThreads`` (the child waits on pool threads that were not copied). The loaders'
parallelism is their worker processes, so OpenCV stays single-threaded everywhere; the pool is then never created
and forked workers are safe. (`benchmarks/train_throughput.py` at 384² with 2 workers hung before this.)
"""

from __future__ import annotations

import cv2

cv2.setNumThreads(1)

__all__ = ["cv2"]

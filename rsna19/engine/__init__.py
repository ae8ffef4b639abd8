"""The forward path: how any trained model of any family is loaded, fed and read out.

Layers import downwards only: ``io → conversion → data → nets → engine → training / inference → stacking →
pipeline``. Everything that runs a network — validation during training, ``rsna19 predict``, ``rsna19 embed``,
Grad-CAM, bundles and ``predict-study`` — goes through this package:

* :mod:`~rsna19.engine.config`: the typed run config (one YAML per base model);
* :mod:`~rsna19.engine.runtime`: device, AMP rule, channels-last, TTA views;
* :mod:`~rsna19.engine.tasks`: one task per kind of item (slice, segmentation-aided slice, slab, sequence): data,
  loss, read-out; families name their task when they register;
* :mod:`~rsna19.engine.forward`: the read-out loops (probabilities, embeddings);
* :mod:`~rsna19.engine.predictor`: a trained run's folds on a device (from a checkpoint or a bundle);
* :mod:`~rsna19.engine.embed`: the embeddings files a sequence model trains on.
"""

"""Watching what comes in: each study's input facts and outputs against the reference the bundle recorded from its
training data (:mod:`rsna19.monitor.facts`, :mod:`rsna19.monitor.drift`)."""

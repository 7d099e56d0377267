"""Inference: the predictors behind one interface, the one place that opens a model source
(a checkpoint, or an exported graph), and the one per-image prediction stream."""

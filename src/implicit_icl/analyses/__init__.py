"""Analyses built on the engine: dynamics (the patch of every prefix of the context, from one pass), compile
(a query-independent patch fitted over calibration queries), baselines (task vectors, function vectors).
Each imports the engine, never the studies."""

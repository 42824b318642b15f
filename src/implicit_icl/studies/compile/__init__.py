"""`implicit-icl compile`: splits (demonstrations, calibration, dev and held-out queries), methods (the
compiled patch and every baseline on one split), run (the command), report (tables, curves, the report
folder), study (the multi-task study behind docs/results/compile.md)."""

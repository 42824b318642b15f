"""`implicit-icl dynamics`: study (per-demonstration series with controls), finetune (online SGD for
comparison), run (the command), report (figures and the report folder)."""

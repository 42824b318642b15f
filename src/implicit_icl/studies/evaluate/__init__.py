"""`implicit-icl evaluate`: scores (per prompt, three ways), metrics (per task, with intervals), run (the
command), report (tables and the report folder)."""

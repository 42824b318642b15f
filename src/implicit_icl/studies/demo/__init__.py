"""`implicit-icl demo` (`make run`): run (the headline computation on the default model) and report."""

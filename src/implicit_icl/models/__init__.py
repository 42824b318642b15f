"""Models to run the engine on: load (the default model from its wheel, a .gguf, a local directory or a hub
name), zoo (a tiny random model of every supported family, for tests), options (what every command on a
model shares). Imports the engine's spec only."""

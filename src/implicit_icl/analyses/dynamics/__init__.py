"""The implicit update, demonstration by demonstration: prefixes (every prefix's exact patch from one
forward pass) and series (norms, increments, alignment and answer scores per layer and prefix)."""

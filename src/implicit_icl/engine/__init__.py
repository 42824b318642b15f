"""The engine: exact implicit patches on unmodified Hugging Face models, through forward hooks.

In the order data flows: spec (one declarative entry per family), inputs (checked token ids), forward (masks,
positions, one run), capture (hooks that record a context-ful run), construct (the chained construction of
every layer's patch), moe (the same for stacked experts), apply (Patch: into the weights or through hooks,
restored bit for bit), verify (patched vs context-ful), generate, queries (many queries after one shared
context), lora and merge (exports). Imports theory/ and patch.py only."""

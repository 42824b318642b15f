"""Two checks of compiled patches on the default model that docs/results/compile.md quotes.

    .venv/bin/python scripts/compile_checks.py input-side   # why the input side alone is worse than no patch
    .venv/bin/python scripts/compile_checks.py exports      # PEFT adapter and merged checkpoint, loaded fresh

input-side: the demo's 5-shot context compiled from 16 present → past calibration queries (λ = 10, full rank),
and the KL(p_ICL ‖ p_patched) at the last token of those same queries, for: both sides fitted on every token
but the first (the default), the input side alone fitted on every token but the first, on the last token, and
on every token including the first; and no patch.

exports: the same compiled patch written as a PEFT LoRA adapter and as a merged checkpoint, each loaded fresh
by stock PEFT / transformers; the largest |logit difference| against the patch applied by the library, over
the vocabulary at the last token of 8 other queries.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from implicit_icl.engine.merge import save_merged
from implicit_icl.engine.queries import context_logits, reduced_logits
from implicit_icl.hf import compile_patch, load_model
from implicit_icl.studies.demo.run import DEMO_PROMPT
from implicit_icl.tasks import format_context, format_query, task
from implicit_icl.tasks.encoding import token_ids


def kl_to(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(p_reference ‖ p_logits) over rows [N, V], nats."""
    p, q = reference.double().log_softmax(-1), logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=("input-side", "exports"))
    args = parser.parse_args()
    loaded = load_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    context = torch.tensor(token_ids(tokenizer, format_context(DEMO_PROMPT.shots)))
    words = [example.input for example in task("present_past").examples]
    calibration = [torch.tensor(token_ids(tokenizer, format_query(w))) for w in words[10:26]]
    with torch.no_grad():
        if args.check == "input-side":
            icl = context_logits(model, context, calibration)
            print(f"no patch: {kl_to(icl, reduced_logits(model, calibration, len(context))):.4g} nats")
            for label, settings in (
                ("input and output side, every token but the first", dict()),
                ("input side alone, every token but the first", dict(output="none")),
                ("input side alone, last token", dict(output="none", tokens="last")),
                ("input side alone, every token", dict(output="none", tokens="all+first")),
            ):
                patch = compile_patch(model, context, calibration, ridge=10.0, **settings)
                with patch.applied(model, via="hooks"):
                    print(f"{label}: {kl_to(icl, reduced_logits(model, calibration, len(context))):.4g} nats")
            return
        patch = compile_patch(model, context, calibration, ridge=10.0)
        held_out = [torch.tensor(token_ids(tokenizer, format_query(w))) for w in words[30:38]]
        with patch.applied(model):
            reference = reduced_logits(model, held_out, len(context))
        with tempfile.TemporaryDirectory() as folder:
            save_merged(model, patch, f"{folder}/merged")
            merged = AutoModelForCausalLM.from_pretrained(f"{folder}/merged").eval()
            print(f"merged checkpoint: {(reduced_logits(merged, held_out, len(context)) - reference).abs().max():.2g}")
            patch.to_peft(f"{folder}/adapter", model)
            base = AutoModelForCausalLM.from_pretrained(f"{folder}/merged").eval()
            base.load_state_dict(model.state_dict())  # the unpatched weights in a model PEFT may wrap
            adapted = PeftModel.from_pretrained(base, f"{folder}/adapter").eval()
            print(f"PEFT adapter: {(reduced_logits(adapted, held_out, len(context)) - reference).abs().max():.2g}")


if __name__ == "__main__":
    main()

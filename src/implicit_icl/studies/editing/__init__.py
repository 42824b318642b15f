"""Counterfactual editing with compiled patches: facts (the project's counterfactual facts) and study
(efficacy, generalisation and specificity against ICL)."""

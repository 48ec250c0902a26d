"""Step 1, refinement (the paper's Algorithm 1): the chain runner and plug-in registry
(:mod:`.chain`), the dense CRF (:mod:`.crf`) and AffinityNet's random walk (:mod:`.affinity`)."""

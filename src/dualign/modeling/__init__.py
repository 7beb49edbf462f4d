"""Models and what runs them: loading Hugging Face models and tokenizers and sequence log-probs
(``models``), prompt templates, token batches, the training checkpoint, scorers (``scorers``:
specs like ``reward=hf:path``), log π_ref (``refprobs``), the vLLM sampler, tiny models built
here (``tiny``), FLOP counts (``flops``) and the up-front checks of model and file references
(``checks``)."""

"""Measurement: how good is a prompt, and how does it compare with the alternatives?

- evaluate.py    loss / perplexity, choice log-likelihoods, classification and generation scores
- metrics.py     accuracy, macro-F1, confusion matrix, exact match, chrF
- baselines.py   zero-shot and few-shot hard prompts
- eval_run.py    `softprompt eval`: results.json with config, versions and git commit
- finetune.py    LoRA and full fine-tuning references for compare
- compare.py     `softprompt compare`: five methods on the same data
- inspection.py  `softprompt inspect`: nearest tokens, norms, drift
- sweep.py       `softprompt sweep`: a grid of recipes ranked on validation data

Nothing is re-exported here: the key functions are importable from `softprompt` itself
(``evaluate_loss``, ``classify``, ``run_eval``, ``run_compare``, ``run_sweep``,
``inspect_prompt``), loaded on first use.
"""

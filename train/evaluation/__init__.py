"""Evaluation beyond the training loss: GPT-3-style few-shot tasks (Section 2.4, 3.9), validation loss,
perplexity and bits per byte, an lm-evaluation-harness adapter, and a small probe for training.

tasks.py     the built-in synthetic tasks, in the built-in corpus's own formats
fewshot.py   contexts of K demonstrations; scoring by likelihood (multiple choice) or exact match
validation.py  loss, perplexity and bits per byte on a run's prepared sources
report.py    console tables, wandb tables, per-source epochs
probe.py     the few-shot probe for the trainer's periodic evaluation (eval.fewshot_probe)
harness.py   lm-eval's LM interface on a scalegpt model
"""

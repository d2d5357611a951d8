"""The data pipeline: sources -> tokenizer -> token files + manifest (`scalegpt prepare`) -> Mixture.

The package itself imports nothing, so that `from scalegpt.train.data.builtin import arithmetic_example`
(eval) does not pay for torch, datasets or tokenizers; import each name from the module that defines it.
"""

"""Erasure methods: each turns a model view and a request into an ``AblationPatch``.

Shared below the methods: ``prompts`` (anchor/target prompt banks, misspellings) and ``progress`` (progress reports
and cancellation). One folder per method: ``ablation/`` is the trained concept ablation of Kumari et al.
"""

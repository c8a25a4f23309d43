"""Data: tasks (template, verbalizer, examples, dev slice), the authors' preset, private pools.

Only ``gradmm.stages.release`` imports ``gradmm.data.pools``, the code that reads the private pool.
"""

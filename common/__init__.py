"""What every stage shares and nothing project-specific: errors, atomic writing, typed configs, logging.

Imports nothing from ``data_shards``, ``pretrain`` or ``finetune``; they all import it.
"""

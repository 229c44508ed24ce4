"""Experiment configs: one file per dataset × backbone, each with ``get_config(arg)``.

``arg`` is a comma-separated list of switches; ``smoke`` shrinks any config to seconds.
"""

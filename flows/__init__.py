"""Prefect flows: compositions of the tasks in tasks/, no maths; and the `sparse-distill` console script (cli.py)."""

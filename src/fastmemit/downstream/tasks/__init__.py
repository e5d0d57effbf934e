"""One module per downstream task; each defines a module-level ``TASK`` (a :class:`Task`).

The registry imports every module in this package the first time a task is looked up, so adding
a task is adding one file here (or calling :func:`fastmemit.downstream.register_task`).
"""

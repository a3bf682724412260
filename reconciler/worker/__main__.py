"""`python -m reconciler.worker`: the worker program (see runner)."""

from __future__ import annotations

from reconciler.worker.process import main

main()

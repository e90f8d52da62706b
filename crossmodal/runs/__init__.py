"""The run-folder layer: manifest and its one writer (``folder``), the saved model (``model``),
the "is this step done?" checks (``state``) and a dataset through a run's model (``encode``).

It imports the core (codes, models, data, index, store...) and nothing above it; jobs,
serving and entry points import it.
"""

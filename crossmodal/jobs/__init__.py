"""Jobs: train, index, eval, prepare (all four in one process) and grid. Each composes the
core and the run-folder layer; entry points (``crossmodal.cli``, ``crossmodal.app``) call them."""

"""The simulator: virtual clients sharing one model, and a simulated clock (``python -m pl_parablock.simulate``).

* each virtual client's compute factor and link come from the recipe's
  ``simulation.profile``, resolved by :mod:`pl_parablock.recipe.profile`
  (the recipe validates a profile by resolving it, so the code lives there).
* :mod:`~pl_parablock.simulation.clock`: the event simulation of a run's
  wall-clock (pure).
* :mod:`~pl_parablock.simulation.virtual`: virtual clients (only the state
  the algorithm needs) and the executor that trains a round's sampled
  clients on one shared model.
* :mod:`~pl_parablock.simulation.driver`: the round loop over the algorithm
  core, the report and the saved model.

Nothing is imported here: ``python -m pl_parablock.simulate`` imports what it runs.
"""

"""Online RL building blocks: advantage estimators over group-sampled outcome rewards (``tether.rl.advantages``)
and the online recipe's table of objectives (``tether.rl.objectives``).

The per-token policy objectives that consume these advantages live in ``tether.losses.policy`` and
``tether.losses.regularized``; the recipe that runs them is ``tether.recipes.online_rl``.
"""

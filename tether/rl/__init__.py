"""Online RL building blocks: advantage estimators over group-sampled outcome rewards (``tether.rl.advantages``).

The per-token policy objectives that consume these advantages live in ``tether.losses.policy``.
"""

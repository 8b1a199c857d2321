"""``make_optimizer``'s contiguous AdamW state against torch's own lazy initialization (the plain twin).

Two copies of a tiny model, one optimizer each (``contiguous_state`` True / False), the same gradients for several
steps, one parameter without a gradient at the first step: parameters and state must agree bit for bit, and the
contiguous state must really be views into one buffer.
"""

import torch

from tether.testing import tiny_model
from tether.training import make_optimizer


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}


def test_contiguous_adam_state_matches_plain_adamw_exactly():
    models = [tiny_model(seed=0), tiny_model(seed=0)]
    opts = [make_optimizer(m, lr=1e-2, weight_decay=0.1, contiguous_state=c) for m, c in zip(models, (True, False))]
    late = next(name for name, p in models[0].named_parameters() if p.ndim == 1)  # gets its first gradient at step 2
    for step in range(4):
        grads = _grads(models[0], step)
        for model, opt in zip(models, opts):
            for name, p in model.named_parameters():
                p.grad = None if (step == 0 and name == late) else grads[name].clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
    (pa, pb) = (dict(m.named_parameters()) for m in models)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
        sa, sb = opts[0].state[pa[name]], opts[1].state[pb[name]]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, (name, key)
            assert torch.equal(sa[key], sb[key]), (name, key)
    # all parameters updated at the first step share one storage; the late one got torch's own state
    storages = {opts[0].state[p]["exp_avg"].untyped_storage().data_ptr() for n, p in pa.items() if n != late}
    assert len(storages) == 1
    assert opts[0].state[pa[late]]["exp_avg"].untyped_storage().data_ptr() not in storages


def test_contiguous_state_survives_a_state_dict_round_trip():
    model = tiny_model(seed=1)
    opt = make_optimizer(model, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    fresh = make_optimizer(model, lr=1e-3)
    fresh.load_state_dict(opt.state_dict())
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])
        assert fresh.state[p]["step"].item() == 1
    fresh.step()  # loaded state is kept, not re-initialized
    assert all(fresh.state[p]["step"].item() == 2 for p in model.parameters())

"""Numerical checks against eager: outputs and every parameter gradient."""

import copy

import torch


def run_and_grads(model, inputs, call=None):
    out = (model if call is None else call)(*inputs)
    loss = out if out.dim() == 0 else (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
    loss.backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_matches_eager(model, inputs, options=None, tol=1e-5):
    """Compile a copy of ``model`` with moe_ascend; outputs and all parameter grads equal eager's within ``tol``."""
    reference = copy.deepcopy(model)
    compiled_model = copy.deepcopy(model)
    want_out, want_grads = run_and_grads(reference, inputs)
    compiled = torch.compile(compiled_model, backend="moe_ascend", options=options or {})
    got_out, got_grads = run_and_grads(compiled_model, inputs, call=compiled)
    torch.testing.assert_close(got_out, want_out, rtol=tol, atol=tol)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")

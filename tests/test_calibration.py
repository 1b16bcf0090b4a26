"""The shared calibration plumbing (sparsekit.calibration) used by the pruners and quantizers."""
import copy

import pytest
import torch
from torch import nn

from sparsekit.calibration import accumulate_inputs, forward_groups, hooked, reiterable, sequential
from sparsekit.quant import gptq_quantize, quantize_model_weights


class Attn(nn.Module):
    """q/k/v read the same tensor (one group); o reads their product; `unused` never runs."""

    def __init__(self, d=12):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.unused = nn.Linear(d, d)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)
        return self.o(a @ self.v(x))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_forward_groups_share_input_and_count_calls():
    m = Attn()
    groups, counts = forward_groups(m, dict(m.named_children()), torch.randn(2, 5, 12, generator=_gen()))
    assert groups == [["q", "k", "v"], ["o"]]
    assert counts == {"q": 1, "k": 1, "v": 1, "o": 1, "unused": 0}


def test_hooked_restores_modes_and_removes_hooks_on_error():
    m = Attn().train()
    m.o.eval()

    def make_hook(name):
        def hook(mod, inputs):
            assert not mod.training
            raise RuntimeError("boom")
        return hook

    with pytest.raises(RuntimeError, match="boom"):
        with hooked(m, {"q": m.q}, make_hook):
            m(torch.randn(1, 3, 12))
    assert m.training and m.q.training and not m.o.training
    assert not m.q._forward_pre_hooks
    with pytest.raises(ValueError, match="kind"):
        with hooked(m, {"q": m.q}, make_hook, kind="middle"):
            pass


def test_accumulate_inputs_sums_match_direct_math():
    m = Attn()
    batches = [torch.randn(2, 5, 12, generator=_gen(i)) for i in range(3)]
    acc = accumulate_inputs(m, {"q": m.q, "o": m.o}, batches, stats=("xtx", "sumsq", "sumabs"), progress=False)
    x = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    assert acc["q"]["n"] == 30
    # float32 accumulation (folded into the float64 statistic): float32 rounding
    assert acc["q"]["xtx"].dtype == torch.float64
    torch.testing.assert_close(acc["q"]["xtx"], x.T @ x, rtol=1e-5, atol=1e-5)
    from sparsekit.calibration.core import set_xtx_dtype, set_xtx_fold_rows
    old = set_xtx_fold_rows(10)
    try:                                # a fold after every batch (10 rows): the same sums
        acc_f = accumulate_inputs(m, {"q": m.q}, batches, stats=("xtx",), progress=False)
    finally:
        set_xtx_fold_rows(old)
    torch.testing.assert_close(acc_f["q"]["xtx"], x.T @ x, rtol=1e-5, atol=1e-5)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="rows must be a positive int"):
            set_xtx_fold_rows(bad)
    old = set_xtx_dtype(torch.float64)
    try:                                # float64 products: the exact sums
        acc64 = accumulate_inputs(m, {"q": m.q}, batches, stats=("xtx",), progress=False)
    finally:
        set_xtx_dtype(old)
    torch.testing.assert_close(acc64["q"]["xtx"], x.T @ x)
    torch.testing.assert_close(acc["q"]["sumsq"], x.pow(2).sum(0))
    torch.testing.assert_close(acc["q"]["sumabs"], x.abs().sum(0))
    # max_rows caps each layer and ends the loop early
    m.calls = 0
    acc = accumulate_inputs(m, {"q": m.q}, batches, stats=("sumsq",), max_rows=7, progress=False)
    assert acc["q"]["n"] == 7 and m.calls == 1
    torch.testing.assert_close(acc["q"]["sumsq"], x[:7].pow(2).sum(0))
    with pytest.raises(ValueError, match="no batches"):
        accumulate_inputs(m, {"q": m.q}, [], progress=False)
    with pytest.raises(ValueError, match="statistic"):
        accumulate_inputs(m, {"q": m.q}, batches, stats=("hessian",), progress=False)
    with pytest.raises(ValueError, match="max_rows"):
        accumulate_inputs(m, {"q": m.q}, batches, max_rows=0, progress=False)


def test_accumulate_inputs_stops_forward_early():
    m = Attn()
    seen = []
    m.o.register_forward_pre_hook(lambda mod, inp: seen.append(1))
    acc = accumulate_inputs(m, {"q": m.q, "k": m.k, "v": m.v}, [torch.randn(1, 4, 12)] * 2,
                            stop_after={"q": 1, "k": 1, "v": 1}, progress=False)
    assert not seen  # the forward ended once q, k and v had run
    assert acc["v"]["n"] == 8


def test_sequential_order_groups_and_missing_layers():
    m = Attn()
    batches = (torch.randn(2, 4, 12, generator=_gen(i)) for i in range(2))  # a one-shot generator
    visited = []
    done = sequential(m, None, batches, lambda n, mod, acc: visited.append((n, acc["n"])), stats=("sumsq",),
                      progress=False, missing="zeros")
    assert done == ["q", "k", "v", "o", "unused"]
    assert visited == [("q", 16), ("k", 16), ("v", 16), ("o", 16), ("unused", 0)]
    with pytest.raises(ValueError, match="unused"):
        sequential(m, None, [torch.randn(1, 2, 12)], lambda *a: None, progress=False)
    with pytest.raises(ValueError, match="missing"):
        sequential(m, None, [torch.randn(1, 2, 12)], lambda *a: None, progress=False, missing="skip")
    with pytest.raises(TypeError, match="iterable"):
        reiterable(None)


def test_sequential_gptq_sees_earlier_layers_quantized():
    """o is calibrated on what the already-quantized q/k/v feed it; q/k/v on the raw input."""
    torch.manual_seed(0)
    m = Attn(64)
    del m.unused
    batches = [torch.randn(2, 6, 64, generator=_gen(i)) for i in range(2)]
    got = copy.deepcopy(m)
    quantize_model_weights(got, batches, "gptq", group_size=32, progress=False)

    ref = copy.deepcopy(m)
    x = torch.cat([b.reshape(-1, 64) for b in batches]).double()
    h = 2 * x.T @ x / x.shape[0]
    for name in ("q", "k", "v"):
        w = gptq_quantize(getattr(ref, name).weight.detach(), h, 32, False, 4).dequantize()
        with torch.no_grad():
            getattr(ref, name).weight.copy_(w)
        torch.testing.assert_close(getattr(got, name).weight, getattr(ref, name).weight)
    acc = accumulate_inputs(ref, {"o": ref.o}, batches, stats=("xtx",), progress=False)["o"]
    w = gptq_quantize(ref.o.weight.detach(), acc["xtx"] * 2 / acc["n"], 32, False, 4).dequantize()
    torch.testing.assert_close(got.o.weight, w.to(got.o.weight.dtype))

"""The two vocabulary-wide matmuls of a pass on the CPU: the tied LM head `hidden @ E^T` and self-conditioning's
expected embedding `probs @ E`, with E the [V, H] embedding matrix.

With E stored row-major, the LM head hands MKL a transposed operand and the expected embedding a plain one.
For the shapes of a pass (tens to hundreds of rows against a 4096-entry vocabulary) both run 10-20% faster the
other way round, on a contiguous copy of E^T [H, V] — with the same bits on the machines tried, because MKL
accumulates each output element over H (or V) in the same order either way. That is a property of the BLAS
library, not a contract, so it is checked once per row count, thread count and shape on random inputs, and
where it does not hold the products run on E as before (one-row products, for instance).

A copy can go stale: not every write to E moves its version counter (`param.data.mul_(...)`, fused optimizers,
a freed and reused address). So the copy only lives inside a `session()`, which generation opens around its
loop (the weights do not change while a generation runs) and which drops the copy when it closes; outside one,
and under autograd, on other devices and dtypes, or for matrices over `MAX_ELEMENTS`, the products run on E.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

MAX_ELEMENTS = 1 << 26  # 256 MB of fp32: a full-size vocabulary (262k x 2816) keeps the plain products


class VocabMatmuls:
    def __init__(self):
        self.enabled = True
        self._sessions = 0  # open sessions; the copy is kept while any is open
        self._copy: torch.Tensor | None = None
        self._key: tuple | None = None  # (data_ptr, version, shape) of E when the copy was made, within a session
        self._same: dict[tuple, bool] = {}  # (which, rows, threads, shape) -> do the two ways agree bit for bit

    def __deepcopy__(self, memo):
        copied = VocabMatmuls()
        copied.enabled = self.enabled
        return copied

    def __getstate__(self):  # a pickled model carries no copy and no answers (another machine may differ)
        return {"enabled": self.enabled}

    def __setstate__(self, state):
        self.__init__()
        self.enabled = state["enabled"]

    @contextmanager
    def session(self):
        """Inside: the products may run on a copy of E^T, made on first use; E must not change in between."""
        self._sessions += 1
        try:
            yield
        finally:
            self._sessions -= 1
            if self._sessions == 0:
                self._copy = self._key = None

    def head(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] @ E^T -> [..., V], as `F.linear(hidden, E)` computes it."""
        wt = self._transposed(weight, "head", hidden)
        return F.linear(hidden, weight) if wt is None else torch.matmul(hidden, wt)

    def expected(self, probs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """probs [..., V] @ E -> [..., H], as `torch.matmul(probs, E)` computes it."""
        wt = self._transposed(weight, "expected", probs)
        return torch.matmul(probs, weight) if wt is None else F.linear(probs, wt)

    def _transposed(self, weight: torch.Tensor, which: str, x: torch.Tensor) -> torch.Tensor | None:
        if not self.uses_copy(which, weight, x.numel() // x.shape[-1], x.dtype):
            return None  # e.g. one-row products (AR steps): no copy is made for them
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if key != self._key:
            self._copy, self._key = weight.detach().t().contiguous(), key
        return self._copy

    def uses_copy(self, which: str, weight: torch.Tensor, rows: int, dtype: torch.dtype) -> bool:
        """Whether `head` or `expected` runs on the copy for an input of `rows` rows."""
        if (not (self.enabled and self._sessions) or weight.device.type != "cpu" or weight.dtype != torch.float32
                or dtype != weight.dtype or torch.is_grad_enabled() or weight.numel() > MAX_ELEMENTS):
            return False
        try:
            weight._version
        except RuntimeError:  # an inference-mode tensor keeps no version counter
            return False
        check = (which, rows, torch.get_num_threads(), tuple(weight.shape))
        if check not in self._same:
            self._same[check] = _agree(which, weight.detach(), rows)
        return self._same[check]

    def rows_alike(self, weight: torch.Tensor, rows: int, of: int, limit: int = 8192) -> bool:
        """Whether `head` and `expected` over `rows` scattered rows of an `of`-row input give each of them as over
        all `of` rows (a property of the BLAS library: checked on random inputs, each product on the operand
        layout these calls would use for that row count, against at most the first `limit` vocabulary entries:
        a full-size vocabulary's check would cost two vocabulary-wide products of the whole input)."""
        w = weight.detach()[:limit]
        g = torch.Generator(device=w.device).manual_seed(0)
        pick = torch.randperm(of, generator=g, device=w.device)[:rows].sort().values

        def product(which: str, x: torch.Tensor, n: int) -> torch.Tensor:
            copy = self.uses_copy(which, weight, n, x.dtype)
            if which == "head":
                return torch.matmul(x, w.t().contiguous()) if copy else F.linear(x, w)
            return F.linear(x, w.t().contiguous()) if copy else torch.matmul(x, w)

        hidden = torch.randn(of, w.shape[1], generator=g, device=w.device).to(w.dtype)
        probs = torch.randn(of, w.shape[0], generator=g, device=w.device).softmax(-1).to(w.dtype)
        return all(torch.equal(product(which, x.index_select(0, pick), rows), product(which, x, of)[pick])
                   for which, x in (("head", hidden), ("expected", probs)))


def _agree(which: str, weight: torch.Tensor, rows: int) -> bool:
    g = torch.Generator().manual_seed(0)
    wt = weight.t().contiguous()
    v, h = weight.shape
    if which == "head":
        x = torch.randn(rows, h, generator=g, dtype=weight.dtype)
        return torch.equal(F.linear(x, weight), torch.matmul(x, wt))
    p = torch.randn(rows, v, generator=g).softmax(-1).to(weight.dtype)
    return torch.equal(torch.matmul(p, weight), F.linear(p, wt))

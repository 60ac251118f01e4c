"""Decoder and encoder passes replayed as TorchScript traces on the CPU.

A pass of a small model is hundreds of small ops, and on a CPU the Python between the ops costs about as much
as the ops themselves: ~9 of the 33 ms of the shipped model's denoising pass at batch 1 on a 2-core EPYC.
`torch.jit.trace` records the ATen ops of one pass and replays them from C++: the same kernels, in the same
order, on the same shapes, with TorchScript's graph optimisations off, so every result is bit for bit the
eager pass's (tests compare them).

A trace is a function of tensors only, recorded per signature: which pass (`canvas_pass`, or `encoder_pass`,
which also writes the cache buffers it is given), batch and token count, whether there is a self-conditioning
input, which attention kinds take a mask (and which are causal), dtype. The cached keys/values, positions,
masks and write plans are arguments, so one trace serves every canvas of a generation (the cache grows between
canvases), every token of autoregressive decoding, and every later call of that shape. A signature is traced
on its `trace_after`-th use (8), so short runs never pay for recording a trace (0.15-0.25 s for the shipped
model, against ~7-10 ms saved per pass); encoder passes are traced only for one token or one canvas per row
(a prompt's prefill has a new length every call). A recorded function stays in TorchScript's process-wide
compilation unit, so at most 8 traces are recorded per model and none is evicted; the continuous-batching
scheduler, whose batch size changes all the time, runs untraced passes.

A trace holds the weights it was recorded with. The eager pass runs instead whenever a trace could differ from
it: gradients enabled, a device other than the CPU, hooks on any module (a trace would skip them), a custom
expert kernel or compiled elementwise kernels. Traces are dropped when a module, parameter or buffer is
replaced (a LoRA adapter injected, weights loaded into new tensors, `param.data = ...`); weights updated in
place are seen by the trace (a dropped trace's recorded function stays behind, see above). `model.trace_passes =
False` turns tracing off.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .layers import KERNELS, PLAIN_KERNELS

log = logging.getLogger(__name__)

# traces held at most. A recorded function stays in TorchScript's process-wide compilation unit (~15 MB plus
# ~4 MB per batch row for the shipped model) even after it is dropped here, so traces are never evicted to make
# room: once this many exist, other signatures stay eager, which bounds that memory
_MAX_TRACES = 8
# a signature is traced on this use: recording costs ~15-25 passes' worth of savings (shipped model, batch 1),
# so short runs stay eager and long ones (a 512-token generation: ~70 denoising passes) gain
TRACE_AFTER = 8


# bumped whenever any module registers a parameter, buffer or submodule (plain attribute assignment included):
# the traces then re-check what they were recorded with
_STRUCTURE = [0]


def _changed(*_args) -> None:  # returns None: a registration hook's return value would replace the tensor
    _STRUCTURE[0] += 1


for _register in ("register_module_parameter_registration_hook", "register_module_buffer_registration_hook",
                  "register_module_module_registration_hook"):
    getattr(nn.modules.module, _register, lambda hook: None)(_changed)


class TracedPasses:
    def __init__(self, model: nn.Module):
        self._model = [model]  # in a list: not a submodule, and no attribute cycle for nn.Module to follow
        self.enabled = hasattr(torch.jit, "trace")
        self.trace_after = TRACE_AFTER
        self._traces: dict[tuple, object] = {}  # signature -> trace, or a count of uses so far
        self._structure = -1  # _STRUCTURE when the lists below were taken
        self._hooks: list[tuple[dict, dict]] = []  # every module's forward (pre-)hooks
        self._modules: list[int] = []  # the model's modules, parameters and buffers (ids)
        self._tensors: list[torch.Tensor] = []  # every parameter and buffer
        self._storage: list[int] = []  # where they lived when the traces were recorded

    def __deepcopy__(self, memo):  # a copied model gets its own (empty) set; traces are not copyable
        copied = TracedPasses(memo.get(id(self._model[0]), self._model[0]))
        copied.enabled, copied.trace_after = self.enabled, self.trace_after
        return copied

    def __getstate__(self):
        return {"_model": self._model, "enabled": self.enabled}

    def __setstate__(self, state):
        self.__init__(state["_model"][0])
        self.enabled = state["enabled"]

    def clear(self) -> None:
        self._traces.clear()
        self._structure = -1

    def run_canvas(self, tokens: torch.Tensor, positions: torch.Tensor, self_cond: torch.Tensor | None,
                   kv: list[tuple[torch.Tensor, torch.Tensor]], masks: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """`model.canvas_pass(...)`, replayed from a trace where that gives the same result."""
        model = self._model[0]
        masked = tuple(kind for kind in sorted(masks) if masks[kind] is not None)
        key = ("canvas", tuple(tokens.shape), self_cond is not None, masked, model.dtype)
        args = [tokens, positions] + ([self_cond] if self_cond is not None else []) + [masks[kind] for kind in masked]
        args += [t for pair in kv for t in pair]

        def one_pass(*args):
            rest = list(args[2:])
            cond = rest.pop(0) if self_cond is not None else None
            given = {kind: None for kind in masks} | {kind: rest.pop(0) for kind in masked}
            return model.canvas_pass(args[0], args[1], cond, [tuple(rest[i:i + 2]) for i in range(0, len(rest), 2)],
                                     given)

        return self._run(key, args, one_pass)

    def run_encoder(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                    self_cond: torch.Tensor | None | bool, kv: list[tuple[torch.Tensor, ...]],
                    masks: dict[str, tuple[torch.Tensor | None, bool]], plans: dict[str, torch.Tensor]) -> torch.Tensor:
        """`model.encoder_pass(...)` (it writes the cache buffers in `kv`), replayed from a trace likewise."""
        model = self._model[0]
        kinds = sorted(masks)
        cond = self_cond if isinstance(self_cond, bool) else self_cond is not None  # False: no canvas rows
        layout = tuple((kind, masks[kind][0] is not None, masks[kind][1]) for kind in kinds)
        key = ("encoder", tuple(tokens.shape), cond, layout, model.dtype)
        # a prompt's prefill has its own token count every call: only one-token steps and whole canvases recur
        recurring = tokens.shape[1] in (1, model.config.canvas_length)
        args = [tokens, positions, rows] + ([self_cond] if isinstance(self_cond, torch.Tensor) else [])
        args += [masks[kind][0] for kind in kinds if masks[kind][0] is not None] + [plans[kind] for kind in kinds]
        args += [t for quad in kv for t in quad]

        def one_pass(*args):
            rest = list(args[3:])
            given_cond = rest.pop(0) if isinstance(self_cond, torch.Tensor) else self_cond
            given = {kind: (rest.pop(0) if masks[kind][0] is not None else None, masks[kind][1]) for kind in kinds}
            given_plans = {kind: rest.pop(0) for kind in kinds}
            return model.encoder_pass(args[0], args[1], args[2], given_cond,
                                      [tuple(rest[i:i + 4]) for i in range(0, len(rest), 4)], given, given_plans)

        return self._run(key, args, one_pass) if recurring else one_pass(*args)

    def run_commit(self, committed: torch.Tensor, canvas: torch.Tensor, enc_pos: torch.Tensor, dec_pos: torch.Tensor,
                   kv: list[tuple[torch.Tensor, ...]], masks_e: dict[str, tuple[torch.Tensor | None, bool]],
                   masks_d: dict[str, tuple[torch.Tensor | None, bool]], plans: dict[str, torch.Tensor]) -> torch.Tensor:
        """`model.commit_canvas_pass(...)` (it writes the cache buffers in `kv`), replayed from a trace likewise."""
        model = self._model[0]
        kinds = sorted(masks_e)
        layout = tuple((kind, m[kind][0] is not None, m[kind][1]) for m in (masks_e, masks_d) for kind in kinds)
        key = ("commit", tuple(committed.shape), tuple(canvas.shape), layout, model.dtype)
        args = [committed, canvas, enc_pos, dec_pos]
        args += [m[kind][0] for m in (masks_e, masks_d) for kind in kinds if m[kind][0] is not None]
        args += [plans[kind] for kind in kinds] + [t for six in kv for t in six]

        def one_pass(*args):
            rest = list(args[4:])
            given_e, given_d = ({kind: (rest.pop(0) if m[kind][0] is not None else None, m[kind][1]) for kind in kinds}
                                for m in (masks_e, masks_d))
            given_plans = {kind: rest.pop(0) for kind in kinds}
            return model.commit_canvas_pass(*args[:4], [tuple(rest[i:i + 6]) for i in range(0, len(rest), 6)],
                                            given_e, given_d, given_plans)

        return self._run(key, args, one_pass)

    def _run(self, key: tuple, args: list[torch.Tensor], one_pass) -> torch.Tensor:
        if not (self._traceable(args[0]) and self._current()):
            return one_pass(*args)
        entry = self._traces.get(key, 0)
        if isinstance(entry, int):  # uses so far; -1: tracing failed for this signature
            if entry < 0 or entry + 1 < self.trace_after or self._held() >= _MAX_TRACES:
                self._traces[key] = entry + 1 if entry >= 0 else -1
                return one_pass(*args)
            return self._trace(key, one_pass, args)  # the recording pass is this call's pass: it writes the cache
        with torch.jit.optimized_execution(False):
            return entry(*args)

    def _traceable(self, tokens: torch.Tensor) -> bool:
        model = self._model[0]
        return (self.enabled and tokens.device.type == "cpu" and not torch.is_grad_enabled()
                and KERNELS == PLAIN_KERNELS and all(layer.experts.kernel is None for layer in model.layers))

    def _current(self) -> bool:
        """False while hooks are registered; drops the traces when a weight is no longer where it was."""
        if _STRUCTURE[0] != self._structure:  # some module somewhere changed: is it one of this model's?
            modules = list(self._model[0].modules())
            tensors = [t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
            modules_now = [id(m) for m in modules] + [id(t) for t in tensors]
            if modules_now != self._modules:
                self._traces.clear()
            self._modules, self._tensors, self._structure = modules_now, tensors, _STRUCTURE[0]
            self._hooks = [(m._forward_hooks, m._forward_pre_hooks) for m in modules]
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return False
        for hooks, pre_hooks in self._hooks:
            if hooks or pre_hooks:
                return False
        storage = [t.data_ptr() for t in self._tensors]  # `param.data = ...` (e.g. `model.to(...)`) moves them
        if storage != self._storage:
            self._traces.clear()
            self._storage = storage
        return True

    def _held(self) -> int:
        return sum(not isinstance(entry, int) for entry in self._traces.values())

    def _trace(self, key: tuple, one_pass, args: list[torch.Tensor]) -> torch.Tensor:
        """Record `one_pass` on `args` and return what the recorded run computed (a pass that writes the cache
        must run once)."""
        ran = []

        def recorded(*args):
            ran.append(one_pass(*args))
            return ran[-1]

        try:
            with warnings.catch_warnings(), torch.jit.optimized_execution(False):
                warnings.simplefilter("ignore")  # the deprecation notice, and "tensor results are constants"
                self._traces[key] = torch.jit.trace(recorded, tuple(args), check_trace=False, _store_inputs=False)
        except Exception as e:  # noqa: BLE001 - any failure leaves this signature on the eager pass
            log.info("pass not traced (%s): eager passes for %s", e, key)
            self._traces[key] = -1
            if not ran:
                return one_pass(*args)
        return ran[0]

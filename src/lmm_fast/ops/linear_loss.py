"""Custom ops of the fused linear + LMM loss: the head's GEMM and the mixture
loss over row chunks, so that the ``[B, ΣN_l]`` logits never exist at once.

Per chunk of rows, one buffer ``[chunk, ΣN_l]`` receives the chunk's logits
(one GEMM), ``lmm_loss_forward`` reads them (in a backward, the forward's
statistics are reused instead), ``lmm_loss_backward`` writes their gradient
to a second chunk-sized tensor, and two GEMMs take that gradient to
``grad_x`` (written) and ``grad_W`` (accumulated); the bias gradient is a
GEMV. Peak extra memory: the two chunk-sized buffers and ``O(B · L)``
statistics. Three operators:

- ``lmm_fast::linear_lmm_loss``: per-row loss ``[B]`` and the statistics
  ``lse`` ``[B, STAT_ROWS · L]`` / ``log_m`` ``[B, L]``; its backward
  (``lmm_fast::linear_lmm_loss_backward``) recomputes every chunk's logits,
  for any per-row ``grad_loss``.
- ``lmm_fast::linear_lmm_loss_reduced``: the ``"sum"``/``"mean"`` loss with
  the gradients computed during the forward, as fused cross-entropy kernels
  do, so the logits are produced once; its backward scales the stored
  gradients by the incoming scalar.

All three are ``torch.library.custom_op``: the chunk loop is opaque to
``torch.compile`` (which sees one op with a fake kernel), and each chunk's
GEMMs run on whatever device the tensors are on (CPU or CUDA), with the loss
kernels of that device. No kernel of their own: the loss kernels are those
of :mod:`lmm_fast.ops.loss`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from lmm_fast.ops.library import accumulate_dtype, check_one_device
from lmm_fast.ops.loss import _SMOOTH_ROW, STAT_ROWS

__all__ = [
    "linear_lmm_loss_rows",
    "linear_lmm_loss_rows_backward",
    "linear_lmm_loss_reduced",
    "theta_grad",
    "mean_denominator",
    "REDUCED",
    "BUFFERS_PER_ROW",
]

# The reductions whose gradient the forward can compute: a scalar loss, so
# the backward only scales it.
REDUCED = ("sum", "mean")
# Chunk-sized tensors alive at once: the logits and their gradient.
BUFFERS_PER_ROW = 2
# Rows of grad_W accumulated per GEMM when the weight is float16/bfloat16:
# the product is formed in the weight's dtype and added to a float32
# accumulator block by block, so the temporary stays small.
_LOW_PRECISION_BLOCK_ROWS = 8192


def mean_denominator(target: Tensor, ignore_index: int, class_weight: Tensor | None, dtype: torch.dtype) -> Tensor:
    """What ``"mean"`` divides by, as ``F.cross_entropy``: the number of rows
    not ignored, or the sum of their class weights ``Σ w_{y_b}``."""
    valid = target != ignore_index
    if class_weight is None:
        return valid.sum().to(dtype)
    row_weight = class_weight[torch.where(valid, target, torch.zeros_like(target))]
    return torch.where(valid, row_weight, torch.zeros_like(row_weight)).sum().to(dtype)


def theta_grad(
    theta: Tensor,
    log_m: Tensor,
    lse: Tensor,
    target: Tensor,
    grad_loss: Tensor,
    ignore_index: int,
    class_weight: Tensor | None,
    label_smoothing: float,
    num_classes: int,
) -> Tensor:
    """``Σ_b grad_loss[b] ∂loss_b/∂θ`` (per row for a ``[B, L]`` θ) from the
    forward's statistics: ``∂loss/∂θ_l = −(1−ε)·w_y·m^l_y / z_y −
    (ε/N)·Σ_c w_c m^l_c / z_c``, the formula of :mod:`lmm_fast.ops.loss`."""
    levels = log_m.shape[1]
    log_theta = theta.detach().to(log_m.dtype).log()
    log_z = torch.logsumexp(log_theta + log_m, dim=1, keepdim=True)
    valid = (target != ignore_index).unsqueeze(1)
    per_row = -torch.exp(log_m - log_z)
    if class_weight is not None:
        safe = torch.where(valid.squeeze(1), target, torch.zeros_like(target))
        per_row = per_row * class_weight.to(log_m.dtype)[safe].unsqueeze(1)
    if label_smoothing > 0:
        smooth = lse.view(-1, STAT_ROWS, levels)[:, _SMOOTH_ROW]
        per_row = (1 - label_smoothing) * per_row - (label_smoothing / num_classes) * smooth
    per_row = per_row * grad_loss.to(log_m.dtype).unsqueeze(1)
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    return (per_row if theta.dim() == 2 else per_row.sum(0)).to(theta.dtype)


# ---------------------------------------------------------------------------
# The chunk loop (eager; runs inside the custom ops)
# ---------------------------------------------------------------------------


def _chunks(batch: int, max_rows: int) -> list[tuple[int, int]]:
    """Row ranges of at most ``max_rows``, as even as possible (no small tail)."""
    if batch == 0:
        return []
    count = -(-batch // max_rows)
    rows = -(-batch // count)
    return [(start, min(start + rows, batch)) for start in range(0, batch, rows)]


def _check_targets(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """The loss kernel's target check, over the whole batch at once so that
    the message names the row of the batch, not of a chunk. (The CUDA kernel
    asserts on the device instead; checking here would cost a sync.)"""
    if target.dim() != 1 or target.dtype != torch.int64:
        return  # the kernel's own shape and dtype checks report these
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise RuntimeError(
            f"lmm_fast: target[{row}] = {int(target[row])} is out of range: class indices must be in "
            f"[0, {num_classes}) or equal ignore_index ({ignore_index})"
        )


def _chunk_logits(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _accumulate_grad_weight(acc: Tensor, grad_logits: Tensor, x: Tensor, first: bool) -> None:
    """``acc += grad_logitsᵀ x`` (``acc = …`` for the ``first`` chunk, which
    spares zeroing a weight-sized tensor and reading it back)."""
    if acc.dtype == grad_logits.dtype:
        if first:
            torch.mm(grad_logits.t(), x, out=acc)
        else:
            acc.addmm_(grad_logits.t(), x)
        return
    for start in range(0, acc.shape[0], _LOW_PRECISION_BLOCK_ROWS):
        end = min(start + _LOW_PRECISION_BLOCK_ROWS, acc.shape[0])
        block = torch.mm(grad_logits[:, start:end].t(), x)
        if first:
            acc[start:end].copy_(block)
        else:
            acc[start:end].add_(block)


def _accumulate_grad_bias(acc: Tensor, grad_logits: Tensor, ones: Tensor, first: bool) -> None:
    """``acc += grad_logits.sum(0)``; a GEMV where the dtypes allow (a
    column sum of a row-major chunk is several times slower)."""
    if acc.dtype != grad_logits.dtype:
        column_sum = grad_logits.sum(0, dtype=acc.dtype)
        acc.copy_(column_sum) if first else acc.add_(column_sum)
    elif first:
        torch.mv(grad_logits.t(), ones[: grad_logits.shape[0]], out=acc)
    else:
        acc.addmv_(grad_logits.t(), ones[: grad_logits.shape[0]])


def _run_chunks(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    psi_t: Tensor,
    theta: Tensor,
    psi_scale: Tensor | None,
    class_weight: Tensor | None,
    label_smoothing: float,
    level_sizes: list[int],
    ignore_index: int,
    max_rows: int,
    *,
    grad_loss: Tensor | None,
    stats: tuple[Tensor, Tensor] | None,
    need: Sequence[bool],
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The chunk loop shared by the three ops.

    ``grad_loss`` ``[B]``: weights of each row's loss in the gradient (None:
    no gradient). ``stats``: the ``(lse, log_m)`` a forward saved, when
    recomputing for a backward (the loss kernel's forward is then skipped).
    ``need``: which of ``(grad_x, grad_weight, grad_bias)`` to form.

    Returns ``(loss [B] or None, lse, log_m, grad_x, grad_weight, grad_bias)``.
    """
    batch, width = x.shape[0], weight.shape[0]
    levels = len(level_sizes)
    acc = accumulate_dtype(x.dtype)
    need_x, need_w, need_b = need if grad_loss is not None else (False, False, False)
    if stats is None:
        loss = x.new_empty((batch,))
        lse = x.new_empty((batch, STAT_ROWS * levels), dtype=acc)
        log_m = x.new_empty((batch, levels), dtype=acc)
    else:
        loss = None
        lse, log_m = stats
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    grad_w = (
        torch.empty(weight.shape, dtype=torch.promote_types(weight.dtype, acc), device=weight.device)
        if need_w else None
    )
    grad_b = torch.empty(width, dtype=acc, device=x.device) if need_b else None
    if x.device.type == "cpu":
        _check_targets(target, level_sizes[-1], ignore_index)
    ranges = _chunks(batch, max_rows)
    if not ranges:
        for grad in (grad_w, grad_b):
            if grad is not None:
                grad.zero_()
        return loss, lse, log_m, grad_x, grad_w, grad_b
    buffer = x.new_empty((ranges[0][1] - ranges[0][0], width))
    ones = x.new_ones(buffer.shape[0]) if need_b else None
    per_row_theta = theta.dim() == 2
    smoothing = float(label_smoothing)
    for start, end in ranges:
        rows = end - start
        logits = _chunk_logits(x[start:end], weight, bias, buffer[:rows])
        chunk_target = target[start:end]
        chunk_theta = theta[start:end] if per_row_theta else theta
        if stats is None:
            loss[start:end], lse[start:end], log_m[start:end] = torch.ops.lmm_fast.lmm_loss_forward.default(
                logits, chunk_target, psi_t, chunk_theta, level_sizes, ignore_index, psi_scale, class_weight,
                smoothing,
            )
        if grad_loss is None:
            continue
        # The second chunk-sized buffer: the kernel's gradient of the chunk's
        # logits, dropped before the next chunk asks for one (the CPU kernel
        # then hands the same storage out again).
        grad_logits = torch.ops.lmm_fast.lmm_loss_backward.default(
            grad_loss[start:end], logits, chunk_target, psi_t, chunk_theta, lse[start:end], log_m[start:end],
            level_sizes, ignore_index, psi_scale, class_weight, smoothing,
        )
        if need_x:
            torch.mm(grad_logits, weight, out=grad_x[start:end])
        if need_w:
            _accumulate_grad_weight(grad_w, grad_logits, x[start:end], first=start == 0)
        if need_b:
            _accumulate_grad_bias(grad_b, grad_logits, ones, first=start == 0)
        del grad_logits
    return loss, lse, log_m, grad_x, grad_w, grad_b


def _empty_like_none(grad: Tensor | None, like: Tensor) -> Tensor:
    """Custom ops return tensors only: an unneeded gradient is an empty one."""
    return like.new_empty((0,)) if grad is None else grad


def _fake_grads(x, weight, bias, need):
    need_x, need_w, need_b = need[:3]
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty((0,)),
        torch.empty_like(weight) if need_w else weight.new_empty((0,)),
        (torch.empty(weight.shape[0], dtype=bias.dtype, device=bias.device) if need_b else weight.new_empty((0,))),
    )


def _one_device(op, x, weight, bias, target, psi_t, theta, psi_scale, class_weight, **more) -> None:
    check_one_device(op, **more, x=x, weight=weight, bias=bias, target=target, psi_t=psi_t, theta=theta,
                     psi_scale=psi_scale, class_weight=class_weight)


def _fake_checks(x, weight, level_sizes):
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "lmm_fast: x and weight must be 2-D")
    torch._check(weight.shape[0] == sum(level_sizes), lambda: "lmm_fast: weight rows != sum(level_sizes)")


# ---------------------------------------------------------------------------
# lmm_fast::linear_lmm_loss — per-row loss; backward recomputes the logits
# ---------------------------------------------------------------------------


@torch.library.custom_op("lmm_fast::linear_lmm_loss", mutates_args=())
def linear_lmm_loss_rows(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    psi_t: Tensor,
    theta: Tensor,
    psi_scale: Optional[Tensor],
    class_weight: Optional[Tensor],
    label_smoothing: float,
    level_sizes: Sequence[int],
    ignore_index: int,
    chunk_rows: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row LMM loss of the logits ``x @ weightᵀ + bias``, chunk by chunk.

    Shapes: ``x`` ``[B, d]``, ``weight`` ``[ΣN_l, d]``, ``bias`` ``[ΣN_l]`` or
    None, ``target`` ``[B]`` int64, ``psi_t`` ``[N, Σ_upper N_l]``, ``theta``
    ``[L]`` or ``[B, L]``, ``psi_scale`` ``[Σ_upper N_l]`` or None,
    ``class_weight`` ``[N]`` or None, ``label_smoothing`` ε (both as
    ``lmm_loss_forward``'s ``weight`` and ``label_smoothing``);
    ``chunk_rows``: the most rows whose logits exist at once.

    Returns ``(loss [B], lse [B, STAT_ROWS·L], log_m [B, L])`` as
    ``lmm_loss_forward``. Differentiable in ``x``, ``weight``, ``bias`` and
    ``theta``.
    """
    _one_device("linear_lmm_loss", x, weight, bias, target, psi_t, theta, psi_scale, class_weight)
    loss, lse, log_m, _, _, _ = _run_chunks(
        x, weight, bias, target, psi_t, theta, psi_scale, class_weight, label_smoothing, list(level_sizes),
        ignore_index, chunk_rows, grad_loss=None, stats=None, need=(False, False, False),
    )
    return loss, lse, log_m


@linear_lmm_loss_rows.register_fake
def _linear_lmm_loss_rows_fake(
    x, weight, bias, target, psi_t, theta, psi_scale, class_weight, label_smoothing, level_sizes, ignore_index,
    chunk_rows,
):
    # The FakeTensor kernel is what torch.compile traces instead of the chunk loop.
    _one_device("linear_lmm_loss", x, weight, bias, target, psi_t, theta, psi_scale, class_weight)
    _fake_checks(x, weight, level_sizes)
    acc = accumulate_dtype(x.dtype)
    batch, levels = x.shape[0], len(level_sizes)
    return (
        x.new_empty((batch,)),
        x.new_empty((batch, STAT_ROWS * levels), dtype=acc),
        x.new_empty((batch, levels), dtype=acc),
    )


@torch.library.custom_op("lmm_fast::linear_lmm_loss_backward", mutates_args=())
def linear_lmm_loss_rows_backward(
    grad_loss: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    psi_t: Tensor,
    theta: Tensor,
    psi_scale: Optional[Tensor],
    class_weight: Optional[Tensor],
    label_smoothing: float,
    lse: Tensor,
    log_m: Tensor,
    level_sizes: Sequence[int],
    ignore_index: int,
    chunk_rows: int,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``Σ_b grad_loss[b] · loss[b]``: ``(grad_x [B, d],
    grad_weight [ΣN_l, d], grad_bias [ΣN_l])``, each empty where
    ``output_mask`` (x, weight, bias) is False. Recomputes each chunk's logits."""
    _one_device("linear_lmm_loss_backward", x, weight, bias, target, psi_t, theta, psi_scale, class_weight,
                grad_loss=grad_loss, lse=lse, log_m=log_m)
    _, _, _, grad_x, grad_w, grad_b = _run_chunks(
        x, weight, bias, target, psi_t, theta, psi_scale, class_weight, label_smoothing, list(level_sizes),
        ignore_index, chunk_rows, grad_loss=grad_loss.contiguous(), stats=(lse, log_m), need=tuple(output_mask),
    )
    return (
        _empty_like_none(grad_x, x),
        _empty_like_none(None if grad_w is None else grad_w.to(weight.dtype), weight),
        _empty_like_none(None if grad_b is None else grad_b.to(bias.dtype), weight),
    )


@linear_lmm_loss_rows_backward.register_fake
def _linear_lmm_loss_rows_backward_fake(
    grad_loss, x, weight, bias, target, psi_t, theta, psi_scale, class_weight, label_smoothing, lse, log_m,
    level_sizes, ignore_index, chunk_rows, output_mask,
):
    _one_device("linear_lmm_loss_backward", x, weight, bias, target, psi_t, theta, psi_scale, class_weight,
                grad_loss=grad_loss, lse=lse, log_m=log_m)
    return _fake_grads(x, weight, bias, output_mask)


def _rows_setup_context(ctx, inputs, output):
    (x, weight, bias, target, psi_t, theta, psi_scale, class_weight, label_smoothing, level_sizes, ignore_index,
     chunk_rows) = inputs
    _, lse, log_m = output
    ctx.save_for_backward(x, weight, bias, target, psi_t, theta, psi_scale, class_weight, lse, log_m)
    ctx.label_smoothing = float(label_smoothing)
    ctx.level_sizes = list(level_sizes)
    ctx.ignore_index = ignore_index
    ctx.chunk_rows = chunk_rows
    ctx.mark_non_differentiable(lse, log_m)
    ctx.set_materialize_grads(False)


def _rows_backward(ctx, grad_loss, grad_lse, grad_log_m):
    x, weight, bias, target, psi_t, theta, psi_scale, class_weight, lse, log_m = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    need_theta = ctx.needs_input_grad[5]
    grads = [None] * 12
    if grad_loss is None:
        return tuple(grads)
    grad_loss = grad_loss.to(x.dtype).contiguous()
    eps = ctx.label_smoothing
    if need_x or need_w or need_b:
        grad_x, grad_w, grad_b = linear_lmm_loss_rows_backward(
            grad_loss, x, weight, bias, target, psi_t, theta, psi_scale, class_weight, eps, lse, log_m,
            ctx.level_sizes, ctx.ignore_index, ctx.chunk_rows, [need_x, need_w, need_b and bias is not None],
        )
        grads[0] = grad_x if need_x else None
        grads[1] = grad_w if need_w else None
        grads[2] = grad_b if need_b and bias is not None else None
    if need_theta:
        grads[5] = theta_grad(theta, log_m, lse, target, grad_loss, ctx.ignore_index, class_weight, eps,
                              ctx.level_sizes[-1])
    return tuple(grads)


linear_lmm_loss_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)


# ---------------------------------------------------------------------------
# lmm_fast::linear_lmm_loss_reduced — scalar loss, gradients during the forward
# ---------------------------------------------------------------------------


@torch.library.custom_op("lmm_fast::linear_lmm_loss_reduced", mutates_args=())
def linear_lmm_loss_reduced(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    psi_t: Tensor,
    theta: Tensor,
    psi_scale: Optional[Tensor],
    class_weight: Optional[Tensor],
    label_smoothing: float,
    level_sizes: Sequence[int],
    ignore_index: int,
    chunk_rows: int,
    reduction: str,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The ``"sum"`` or ``"mean"`` LMM loss of ``x @ weightᵀ + bias`` and,
    in the same pass over the chunks, its gradients.

    Shapes as :func:`linear_lmm_loss_rows`; ``output_mask``: which of
    ``(x, weight, bias, theta)`` get a gradient.

    Returns ``(loss [], grad_x [B, d], grad_weight [ΣN_l, d], grad_bias [ΣN_l],
    grad_theta [L] or [B, L])``, the gradients of the loss itself (each empty
    where ``output_mask`` is False). Differentiable in the loss only: its
    backward scales the gradients by the incoming scalar. ``"mean"`` divides
    by the rows not ignored (``Σ w_{y_b}`` with class weights); over no valid
    row it is NaN with zero gradients, as ``nn.CrossEntropyLoss``.
    """
    if reduction not in REDUCED:
        raise ValueError(f"lmm_fast: reduction must be one of {REDUCED}, got {reduction!r}")
    _one_device("linear_lmm_loss_reduced", x, weight, bias, target, psi_t, theta, psi_scale, class_weight)
    acc = accumulate_dtype(x.dtype)
    if reduction == "mean":
        scale = 1.0 / mean_denominator(target, ignore_index, class_weight, acc)
    else:
        scale = torch.ones((), dtype=acc, device=x.device)
    grad_loss = scale.to(x.dtype).expand(x.shape[0]).contiguous()
    need_x, need_w, need_b, need_theta = output_mask
    loss, lse, log_m, grad_x, grad_w, grad_b = _run_chunks(
        x, weight, bias, target, psi_t, theta, psi_scale, class_weight, label_smoothing, list(level_sizes),
        ignore_index, chunk_rows, grad_loss=grad_loss, stats=None, need=(need_x, need_w, need_b and bias is not None),
    )
    total = (loss.sum(dtype=acc) * scale).to(x.dtype)
    grad_theta = (
        theta_grad(theta, log_m, lse, target, grad_loss, ignore_index, class_weight, label_smoothing,
                   level_sizes[-1])
        if need_theta else None
    )
    return (
        total,
        _empty_like_none(grad_x, x),
        _empty_like_none(None if grad_w is None else grad_w.to(weight.dtype), weight),
        _empty_like_none(None if grad_b is None else grad_b.to(bias.dtype), weight),
        _empty_like_none(grad_theta, theta),
    )


@linear_lmm_loss_reduced.register_fake
def _linear_lmm_loss_reduced_fake(
    x, weight, bias, target, psi_t, theta, psi_scale, class_weight, label_smoothing, level_sizes, ignore_index,
    chunk_rows, reduction, output_mask,
):
    _one_device("linear_lmm_loss_reduced", x, weight, bias, target, psi_t, theta, psi_scale, class_weight)
    _fake_checks(x, weight, level_sizes)
    grad_x, grad_w, grad_b = _fake_grads(x, weight, bias, output_mask)
    grad_theta = torch.empty_like(theta) if output_mask[3] else theta.new_empty((0,))
    return x.new_empty(()), grad_x, grad_w, grad_b, grad_theta


def _reduced_setup_context(ctx, inputs, output):
    _, grad_x, grad_w, grad_b, grad_theta = output
    ctx.save_for_backward(grad_x, grad_w, grad_b, grad_theta)
    ctx.mark_non_differentiable(grad_x, grad_w, grad_b, grad_theta)
    # Otherwise autograd hands the backward zeros for the four gradient
    # outputs, a weight-sized allocation.
    ctx.set_materialize_grads(False)


def _is_exactly_one(grad_output: Tensor) -> bool:
    """Whether the incoming gradient is the literal 1 of ``loss.backward()``
    (eager only: a traced backward cannot branch on a value)."""
    if torch.compiler.is_compiling() or torch._subclasses.fake_tensor.is_fake(grad_output):
        return False
    return grad_output.numel() == 1 and bool(grad_output == 1)


def _scaled(grad: Tensor, grad_output: Tensor, needed: bool, one: bool) -> Tensor | None:
    if not needed:
        return None
    # Handing back the stored gradient itself when the scale is one spares a
    # weight-sized copy; the engine clones it before accumulating wherever the
    # graph (retain_graph) still holds it.
    return grad if one else grad * grad_output.to(grad.dtype)


def _reduced_backward(ctx, grad_loss, *unused):
    grad_x, grad_w, grad_b, grad_theta = ctx.saved_tensors
    grads = [None] * 14
    if grad_loss is None:
        return tuple(grads)
    one = _is_exactly_one(grad_loss)
    needs = ctx.needs_input_grad
    grads[0] = _scaled(grad_x, grad_loss, needs[0], one)
    grads[1] = _scaled(grad_w, grad_loss, needs[1], one)
    grads[2] = _scaled(grad_b, grad_loss, needs[2], one)
    grads[5] = _scaled(grad_theta, grad_loss, needs[5], one)
    return tuple(grads)


linear_lmm_loss_reduced.register_autograd(_reduced_backward, setup_context=_reduced_setup_context)

"""torch.library registration of the fused ops, one op set per backend.

Each backend supplies plain forward/backward functions with the *kernel interface* below; ``define_op_set``
wraps them into ``torch.library.custom_op``s named ``emcad_kernels::<op>_fwd_<backend>`` and
``emcad_kernels::<op>_bwd_<backend>``, with fake (meta) implementations for ``torch.compile``, autograd
(the backward is itself an op, so it is opaque to the compiler too) and FLOP formulas (``flops.py``).

Kernel interface (all backends implement exactly this; BatchNorm arrives as explicit tensors):

``msdc_fwd(x, weights[nb], bn_weight[nb,C], bn_bias[nb,C], mean[nb,C], var[nb,C], training, eps, activation,
concat, shuffle_groups, stride) -> (y, save_mean[nb,C], save_var[nb,C])``
    ``training`` means "normalise with batch statistics" (``mean``/``var`` are then ignored); the returned
    statistics are the ones used (batch statistics with the *biased* variance, or copies of the inputs).
    ``shuffle_groups == 0`` means no shuffle.
``updw_fwd(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale)
-> (y, save_mean, save_var)``
``lgag_fwd(g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g(4), bn_x(4), bn_psi(4), training, eps, groups, activation,
add_gate_input) -> (out, mean_g, var_g, mean_x, var_x, mean_psi, var_psi)``

Optional ops (EGE-UNet / MALUNet; a backend that leaves them None reports "<op> not implemented in the <name>
backend" through ``Backend.reasons``, so ``auto`` falls back to another backend):

``lndw_fwd(x, ln_weights[G], ln_biases[G], weights[G], biases[G], dilations[G], eps) -> y``
    ``layernorm_dilated_dwconv``: per channel group a channels-first LayerNorm then a dilated depthwise conv
    (EGE-UNet GAB; GHPA ``norm2`` + ``ldw.0`` with one group). No running statistics, so no train/eval flag.
``dwgn_fwd(x, weights[G], biases[G], gn_weight, gn_bias, dilations[G], eps) -> y``
    ``dilated_dwconv_groupnorm``: the dilated depthwise convs then ``GroupNorm(G, C)`` (MALUNet DGA, GAU).
``mscam_fwd(x, fc1[R,C,1,1], fc2[C,R,1,1], sab_weight[1,2,k,k], activation) -> y``
    ``mscam``: EMCAD's CAB then SAB applied as ``y = x · ca · sa`` (issue 8). No statistics, no train/eval flag.
``mutation_stats_fwd(logits[n], target) -> (ce[S], inter[S,K], psq[S,K], tcount[K])``
    ``mutation_stats``: the sums behind the fused MUTATION loss (issue 8) over the S = 2^n - 1 subsets of the n
    low-res heads, bilinearly upsampled to the target's size; backward
    ``mutation_stats_bwd(grad_ce, grad_inter, grad_psq, logits, target) -> grads[n]`` (tcount gets none).
    Statistics are float64 for float64 logits, else float32.

The backward functions receive the upstream gradient, the inputs and the saved statistics, and return the
gradients of every differentiable input (see ``reference.py`` for the exact signatures). Outputs always have
the memory format of the input (``reference.output_memory_format``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import flops
from .reference import output_memory_format, stats_dtype

NAMESPACE = "emcad_kernels"


@dataclass(frozen=True)
class OpSet:
    """The custom ops of one backend, called by ``functional.py``."""

    msdc: Callable
    updw: Callable
    lgag: Callable
    # optional ops: None when the backend does not implement them (see OPTIONAL_OPS in backends.py)
    lndw: Optional[Callable] = None
    dwgn: Optional[Callable] = None
    mscam: Optional[Callable] = None
    mutation_stats: Optional[Callable] = None


@dataclass(frozen=True)
class Kernels:
    """Plain Python callables implementing the kernel interface for one backend."""

    msdc_forward: Callable
    msdc_backward: Callable
    updw_forward: Callable
    updw_backward: Callable
    lgag_forward: Callable
    lgag_backward: Callable
    # optional kernels (a backend may leave them None; both directions are needed to define the op)
    lndw_forward: Optional[Callable] = None
    lndw_backward: Optional[Callable] = None
    dwgn_forward: Optional[Callable] = None
    dwgn_backward: Optional[Callable] = None
    mscam_forward: Optional[Callable] = None
    mscam_backward: Optional[Callable] = None
    mutation_stats_forward: Optional[Callable] = None
    mutation_stats_backward: Optional[Callable] = None


def _empty_like_out(x: Tensor, shape) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def _stats_like(x: Tensor, *shape: int) -> Tensor:
    return x.new_empty(shape, dtype=stats_dtype(x.dtype))


def _conv_out(size: int, k: int, stride: int) -> int:
    return (size + 2 * (k // 2) - k) // stride + 1


def define_op_set(backend: str, kernels: Kernels, device_types: Optional[Sequence[str]] = None) -> OpSet:
    return OpSet(
        msdc=_define_msdc(backend, kernels, device_types),
        updw=_define_updw(backend, kernels, device_types),
        lgag=_define_lgag(backend, kernels, device_types),
        lndw=(_define_lndw(backend, kernels, device_types)
              if kernels.lndw_forward is not None and kernels.lndw_backward is not None else None),
        dwgn=(_define_dwgn(backend, kernels, device_types)
              if kernels.dwgn_forward is not None and kernels.dwgn_backward is not None else None),
        mscam=(_define_mscam(backend, kernels, device_types)
               if kernels.mscam_forward is not None and kernels.mscam_backward is not None else None),
        mutation_stats=(_define_mutation_stats(backend, kernels, device_types)
                        if kernels.mutation_stats_forward is not None and kernels.mutation_stats_backward is not None
                        else None),
    )


# --------------------------------------------------------------------------------------------------
# multi_scale_dwconv
# --------------------------------------------------------------------------------------------------
def _define_msdc(backend: str, k: Kernels, device_types):
    @torch.library.custom_op(f"{NAMESPACE}::msdc_fwd_{backend}", mutates_args=(), device_types=device_types)
    def msdc_fwd(x: Tensor, weights: list[Tensor], bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, var: Tensor,
                 training: bool, eps: float, activation: str, concat: bool, shuffle_groups: int,
                 stride: int) -> tuple[Tensor, Tensor, Tensor]:
        return k.msdc_forward(x, list(weights), bn_weight, bn_bias, mean, var, training, eps, activation, concat,
                              shuffle_groups, stride)

    @msdc_fwd.register_fake
    def _(x, weights, bn_weight, bn_bias, mean, var, training, eps, activation, concat, shuffle_groups, stride):
        n, c, h, w = x.shape
        kmax = max(wt.shape[-1] for wt in weights)
        ho, wo = _conv_out(h, kmax, stride), _conv_out(w, kmax, stride)
        nb = len(weights)
        return (_empty_like_out(x, (n, c * nb if concat else c, ho, wo)), _stats_like(x, nb, c),
                _stats_like(x, nb, c))

    @torch.library.custom_op(f"{NAMESPACE}::msdc_bwd_{backend}", mutates_args=(), device_types=device_types)
    def msdc_bwd(grad: Tensor, x: Tensor, weights: list[Tensor], bn_weight: Tensor, bn_bias: Tensor,
                 save_mean: Tensor, save_var: Tensor, training: bool, eps: float, activation: str, concat: bool,
                 shuffle_groups: int, stride: int) -> list[Tensor]:
        gx, gws, gbw, gbb = k.msdc_backward(grad, x, list(weights), bn_weight, bn_bias, save_mean, save_var,
                                            training, eps, activation, concat, shuffle_groups, stride)
        return [gx, gbw, gbb, *gws]

    @msdc_bwd.register_fake
    def _(grad, x, weights, bn_weight, bn_bias, save_mean, save_var, training, eps, activation, concat,
          shuffle_groups, stride):
        return [_empty_like_out(x, x.shape), torch.empty_like(bn_weight), torch.empty_like(bn_bias),
                *(torch.empty_like(w) for w in weights)]

    def setup_context(ctx, inputs, output):
        x, weights, bn_weight, bn_bias, mean, var, training, eps, activation, concat, shuffle_groups, stride = inputs
        _, save_mean, save_var = output
        ctx.save_for_backward(x, bn_weight, bn_bias, save_mean, save_var, *weights)
        ctx.config = (training, eps, activation, concat, shuffle_groups, stride)
        ctx.mark_non_differentiable(save_mean, save_var)

    def backward(ctx, grad, _grad_mean, _grad_var):
        x, bn_weight, bn_bias, save_mean, save_var, *weights = ctx.saved_tensors
        # kernels want a dense gradient in the output's layout (autograd may hand over expanded views)
        grad = grad.contiguous(memory_format=output_memory_format(x))
        gx, gbw, gbb, *gws = msdc_bwd(grad, x, weights, bn_weight, bn_bias, save_mean, save_var, *ctx.config)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gws if need[1] else None, gbw if need[2] else None,
                gbb if need[3] else None, None, None, None, None, None, None, None, None)

    msdc_fwd.register_autograd(backward, setup_context=setup_context)
    flops.register_msdc(msdc_fwd, msdc_bwd)
    return msdc_fwd


# --------------------------------------------------------------------------------------------------
# upsample_dwconv
# --------------------------------------------------------------------------------------------------
def _define_updw(backend: str, k: Kernels, device_types):
    @torch.library.custom_op(f"{NAMESPACE}::updw_fwd_{backend}", mutates_args=(), device_types=device_types)
    def updw_fwd(x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, mean: Tensor, var: Tensor,
                 training: bool, eps: float, mode: str, activation: str, scale: int) -> tuple[Tensor, Tensor, Tensor]:
        return k.updw_forward(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale)

    @updw_fwd.register_fake
    def _(x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale):
        n, c, h, w = x.shape
        return _empty_like_out(x, (n, c, h * scale, w * scale)), _stats_like(x, c), _stats_like(x, c)

    @torch.library.custom_op(f"{NAMESPACE}::updw_bwd_{backend}", mutates_args=(), device_types=device_types)
    def updw_bwd(grad: Tensor, x: Tensor, weight: Tensor, bn_weight: Tensor, bn_bias: Tensor, save_mean: Tensor,
                 save_var: Tensor, training: bool, eps: float, mode: str, activation: str,
                 scale: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return k.updw_backward(grad, x, weight, bn_weight, bn_bias, save_mean, save_var, training, eps, mode,
                               activation, scale)

    @updw_bwd.register_fake
    def _(grad, x, weight, bn_weight, bn_bias, save_mean, save_var, training, eps, mode, activation, scale):
        return (_empty_like_out(x, x.shape), torch.empty_like(weight), torch.empty_like(bn_weight),
                torch.empty_like(bn_bias))

    def setup_context(ctx, inputs, output):
        x, weight, bn_weight, bn_bias, mean, var, training, eps, mode, activation, scale = inputs
        _, save_mean, save_var = output
        ctx.save_for_backward(x, weight, bn_weight, bn_bias, save_mean, save_var)
        ctx.config = (training, eps, mode, activation, scale)
        ctx.mark_non_differentiable(save_mean, save_var)

    def backward(ctx, grad, _grad_mean, _grad_var):
        x, weight, bn_weight, bn_bias, save_mean, save_var = ctx.saved_tensors
        gx, gw, gbw, gbb = updw_bwd(grad.contiguous(memory_format=output_memory_format(x)), x, weight, bn_weight,
                                    bn_bias, save_mean, save_var, *ctx.config)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gw if need[1] else None, gbw if need[2] else None,
                gbb if need[3] else None) + (None,) * 7

    updw_fwd.register_autograd(backward, setup_context=setup_context)
    flops.register_updw(updw_fwd, updw_bwd)
    return updw_fwd


# --------------------------------------------------------------------------------------------------
# grouped_attention_gate
# --------------------------------------------------------------------------------------------------
def _define_lgag(backend: str, k: Kernels, device_types):
    @torch.library.custom_op(f"{NAMESPACE}::lgag_fwd_{backend}", mutates_args=(), device_types=device_types)
    def lgag_fwd(g: Tensor, x: Tensor, wg: Tensor, bg: Tensor, wx: Tensor, bx: Tensor, wpsi: Tensor, bpsi: Tensor,
                 bn_g_weight: Tensor, bn_g_bias: Tensor, mean_g: Tensor, var_g: Tensor,
                 bn_x_weight: Tensor, bn_x_bias: Tensor, mean_x: Tensor, var_x: Tensor,
                 bn_psi_weight: Tensor, bn_psi_bias: Tensor, mean_psi: Tensor, var_psi: Tensor,
                 training: bool, eps: float, groups: int, activation: str,
                 add_gate_input: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return k.lgag_forward(g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, mean_g, var_g, bn_x_weight,
                              bn_x_bias, mean_x, var_x, bn_psi_weight, bn_psi_bias, mean_psi, var_psi, training, eps,
                              groups, activation, add_gate_input)

    @lgag_fwd.register_fake
    def _(g, x, wg, bg, wx, bx, wpsi, bpsi, *rest):
        f_int = wg.shape[0]
        return (_empty_like_out(x, x.shape), _stats_like(x, f_int), _stats_like(x, f_int), _stats_like(x, f_int),
                _stats_like(x, f_int), _stats_like(x, 1), _stats_like(x, 1))

    @torch.library.custom_op(f"{NAMESPACE}::lgag_bwd_{backend}", mutates_args=(), device_types=device_types)
    def lgag_bwd(grad: Tensor, g: Tensor, x: Tensor, wg: Tensor, bg: Tensor, wx: Tensor, bx: Tensor, wpsi: Tensor,
                 bpsi: Tensor, bn_g_weight: Tensor, bn_g_bias: Tensor, bn_x_weight: Tensor, bn_x_bias: Tensor,
                 bn_psi_weight: Tensor, bn_psi_bias: Tensor, save_stats: list[Tensor], training: bool, eps: float,
                 groups: int, activation: str, add_gate_input: bool) -> list[Tensor]:
        return list(k.lgag_backward(grad, g, x, wg, bg, wx, bx, wpsi, bpsi, bn_g_weight, bn_g_bias, bn_x_weight,
                                    bn_x_bias, bn_psi_weight, bn_psi_bias, list(save_stats), training, eps, groups,
                                    activation, add_gate_input))

    @lgag_bwd.register_fake
    def _(grad, g, x, *params_and_rest):
        params = params_and_rest[:12]
        return [_empty_like_out(g, g.shape), _empty_like_out(x, x.shape), *(torch.empty_like(p) for p in params)]

    # positions of differentiable inputs of lgag_fwd and of the matching entries of lgag_bwd's result
    diff_inputs = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in diff_inputs), *output[1:])
        ctx.config = inputs[20:]
        ctx.mark_non_differentiable(*output[1:])

    def backward(ctx, grad, *_grad_stats):
        saved = ctx.saved_tensors
        params, stats = saved[:14], list(saved[14:])
        grad = grad.contiguous(memory_format=output_memory_format(params[1]))
        grads = lgag_bwd(grad, *params, stats, *ctx.config)
        result = [None] * 25
        for slot, gr in zip(diff_inputs, grads):
            if ctx.needs_input_grad[slot]:
                result[slot] = gr
        return tuple(result)

    lgag_fwd.register_autograd(backward, setup_context=setup_context)
    flops.register_lgag(lgag_fwd, lgag_bwd)
    return lgag_fwd


# --------------------------------------------------------------------------------------------------
# layernorm_dilated_dwconv (EGE-UNet GAB)
# --------------------------------------------------------------------------------------------------
def _define_lndw(backend: str, k: Kernels, device_types):
    @torch.library.custom_op(f"{NAMESPACE}::lndw_fwd_{backend}", mutates_args=(), device_types=device_types)
    def lndw_fwd(x: Tensor, ln_weights: list[Tensor], ln_biases: list[Tensor], weights: list[Tensor],
                 biases: list[Tensor], dilations: list[int], eps: float) -> Tensor:
        return k.lndw_forward(x, list(ln_weights), list(ln_biases), list(weights), list(biases), list(dilations),
                              eps)

    @lndw_fwd.register_fake
    def _(x, ln_weights, ln_biases, weights, biases, dilations, eps):
        return _empty_like_out(x, x.shape)

    @torch.library.custom_op(f"{NAMESPACE}::lndw_bwd_{backend}", mutates_args=(), device_types=device_types)
    def lndw_bwd(grad: Tensor, x: Tensor, ln_weights: list[Tensor], ln_biases: list[Tensor], weights: list[Tensor],
                 biases: list[Tensor], dilations: list[int], eps: float) -> list[Tensor]:
        gx, glw, glb, gw, gb = k.lndw_backward(grad, x, list(ln_weights), list(ln_biases), list(weights),
                                               list(biases), list(dilations), eps)
        return [gx, *glw, *glb, *gw, *gb]

    @lndw_bwd.register_fake
    def _(grad, x, ln_weights, ln_biases, weights, biases, dilations, eps):
        return [_empty_like_out(x, x.shape),
                *(torch.empty_like(t) for t in (*ln_weights, *ln_biases, *weights, *biases))]

    def setup_context(ctx, inputs, output):
        x, ln_weights, ln_biases, weights, biases, dilations, eps = inputs
        ctx.save_for_backward(x, *ln_weights, *ln_biases, *weights, *biases)
        ctx.config = (list(dilations), eps)
        ctx.groups = len(weights)

    def backward(ctx, grad):
        x, *params = ctx.saved_tensors
        g = ctx.groups
        lws, lbs, ws, bs = params[:g], params[g:2 * g], params[2 * g:3 * g], params[3 * g:]
        grad = grad.contiguous(memory_format=output_memory_format(x))
        gx, *rest = lndw_bwd(grad, x, lws, lbs, ws, bs, *ctx.config)
        need = ctx.needs_input_grad
        parts = [rest[i * g:(i + 1) * g] for i in range(4)]
        return (gx if need[0] else None, *(parts[i] if need[i + 1] else None for i in range(4)), None, None)

    lndw_fwd.register_autograd(backward, setup_context=setup_context)
    flops.register_lndw(lndw_fwd, lndw_bwd)
    return lndw_fwd


# --------------------------------------------------------------------------------------------------
# dilated_dwconv_groupnorm (MALUNet DGA / GAU)
# --------------------------------------------------------------------------------------------------
def _define_dwgn(backend: str, k: Kernels, device_types):
    @torch.library.custom_op(f"{NAMESPACE}::dwgn_fwd_{backend}", mutates_args=(), device_types=device_types)
    def dwgn_fwd(x: Tensor, weights: list[Tensor], biases: list[Tensor], gn_weight: Tensor, gn_bias: Tensor,
                 dilations: list[int], eps: float) -> Tensor:
        return k.dwgn_forward(x, list(weights), list(biases), gn_weight, gn_bias, list(dilations), eps)

    @dwgn_fwd.register_fake
    def _(x, weights, biases, gn_weight, gn_bias, dilations, eps):
        return _empty_like_out(x, x.shape)

    @torch.library.custom_op(f"{NAMESPACE}::dwgn_bwd_{backend}", mutates_args=(), device_types=device_types)
    def dwgn_bwd(grad: Tensor, x: Tensor, weights: list[Tensor], biases: list[Tensor], gn_weight: Tensor,
                 gn_bias: Tensor, dilations: list[int], eps: float) -> list[Tensor]:
        gx, gw, gb, ggw, ggb = k.dwgn_backward(grad, x, list(weights), list(biases), gn_weight, gn_bias,
                                               list(dilations), eps)
        return [gx, ggw, ggb, *gw, *gb]

    @dwgn_bwd.register_fake
    def _(grad, x, weights, biases, gn_weight, gn_bias, dilations, eps):
        return [_empty_like_out(x, x.shape), torch.empty_like(gn_weight), torch.empty_like(gn_bias),
                *(torch.empty_like(t) for t in (*weights, *biases))]

    def setup_context(ctx, inputs, output):
        x, weights, biases, gn_weight, gn_bias, dilations, eps = inputs
        ctx.save_for_backward(x, gn_weight, gn_bias, *weights, *biases)
        ctx.config = (list(dilations), eps)
        ctx.groups = len(weights)

    def backward(ctx, grad):
        x, gn_weight, gn_bias, *params = ctx.saved_tensors
        g = ctx.groups
        ws, bs = params[:g], params[g:]
        grad = grad.contiguous(memory_format=output_memory_format(x))
        gx, ggw, ggb, *rest = dwgn_bwd(grad, x, ws, bs, gn_weight, gn_bias, *ctx.config)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, rest[:g] if need[1] else None, rest[g:] if need[2] else None,
                ggw if need[3] else None, ggb if need[4] else None, None, None)

    dwgn_fwd.register_autograd(backward, setup_context=setup_context)
    flops.register_dwgn(dwgn_fwd, dwgn_bwd)
    return dwgn_fwd


# --------------------------------------------------------------------------------------------------
# mscam (EMCAD CAB · SAB)
# --------------------------------------------------------------------------------------------------
def _define_mscam(backend: str, k: Kernels, device_types):
    @torch.library.custom_op(f"{NAMESPACE}::mscam_fwd_{backend}", mutates_args=(), device_types=device_types)
    def mscam_fwd(x: Tensor, fc1: Tensor, fc2: Tensor, sab_weight: Tensor, activation: str) -> Tensor:
        return k.mscam_forward(x, fc1, fc2, sab_weight, activation)

    @mscam_fwd.register_fake
    def _(x, fc1, fc2, sab_weight, activation):
        return _empty_like_out(x, x.shape)

    @torch.library.custom_op(f"{NAMESPACE}::mscam_bwd_{backend}", mutates_args=(), device_types=device_types)
    def mscam_bwd(grad: Tensor, x: Tensor, fc1: Tensor, fc2: Tensor, sab_weight: Tensor,
                  activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tuple(k.mscam_backward(grad, x, fc1, fc2, sab_weight, activation))

    @mscam_bwd.register_fake
    def _(grad, x, fc1, fc2, sab_weight, activation):
        return (_empty_like_out(x, x.shape), torch.empty_like(fc1), torch.empty_like(fc2),
                torch.empty_like(sab_weight))

    def setup_context(ctx, inputs, output):
        x, fc1, fc2, sab_weight, activation = inputs
        ctx.save_for_backward(x, fc1, fc2, sab_weight)  # the backward recomputes the attention maps
        ctx.activation = activation

    def backward(ctx, grad):
        x, fc1, fc2, sab_weight = ctx.saved_tensors
        grads = mscam_bwd(grad.contiguous(memory_format=output_memory_format(x)), x, fc1, fc2, sab_weight,
                          ctx.activation)
        return tuple(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[:4])) + (None,)

    mscam_fwd.register_autograd(backward, setup_context=setup_context)
    flops.register_mscam(mscam_fwd, mscam_bwd)
    return mscam_fwd


# --------------------------------------------------------------------------------------------------
# mutation_stats (fused MUTATION loss, issue 8)
# --------------------------------------------------------------------------------------------------
def _define_mutation_stats(backend: str, k: Kernels, device_types):
    @torch.library.custom_op(f"{NAMESPACE}::mutation_stats_fwd_{backend}", mutates_args=(),
                             device_types=device_types)
    def ms_fwd(logits: list[Tensor], target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tuple(k.mutation_stats_forward(list(logits), target))

    @ms_fwd.register_fake
    def _(logits, target):
        n, kk = len(logits), logits[0].shape[1]
        s = 2 ** n - 1
        z = logits[0]
        return _stats_like(z, s), _stats_like(z, s, kk), _stats_like(z, s, kk), _stats_like(z, kk)

    @torch.library.custom_op(f"{NAMESPACE}::mutation_stats_bwd_{backend}", mutates_args=(),
                             device_types=device_types)
    def ms_bwd(grad_ce: Tensor, grad_inter: Tensor, grad_psq: Tensor, logits: list[Tensor],
               target: Tensor) -> list[Tensor]:
        return list(k.mutation_stats_backward(grad_ce, grad_inter, grad_psq, list(logits), target))

    @ms_bwd.register_fake
    def _(grad_ce, grad_inter, grad_psq, logits, target):
        return [_empty_like_out(z, z.shape) for z in logits]

    def setup_context(ctx, inputs, output):
        logits, target = inputs
        ctx.save_for_backward(target, *logits)  # the backward recomputes the softmaxes
        ctx.mark_non_differentiable(output[3])

    def backward(ctx, grad_ce, grad_inter, grad_psq, _grad_tcount):
        target, *logits = ctx.saved_tensors
        ref = logits[0]
        s, kk = 2 ** len(logits) - 1, ref.shape[1]
        sdt = stats_dtype(ref.dtype)

        def dense(g, *shape):
            return torch.zeros(shape, dtype=sdt, device=ref.device) if g is None else g.contiguous()

        grads = ms_bwd(dense(grad_ce, s), dense(grad_inter, s, kk), dense(grad_psq, s, kk), logits, target)
        return (list(grads) if ctx.needs_input_grad[0] else None), None

    ms_fwd.register_autograd(backward, setup_context=setup_context)
    return ms_fwd

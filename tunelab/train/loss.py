"""The training loss without the full logits: the decoder body, then the output head and cross-entropy in chunks.

`chunked_loss_sum` returns the same summed next-token cross-entropy as running the whole causal LM and taking
`F.cross_entropy` over its `[B, T, V]` logits, but it

- runs the head only on positions whose (shifted) label is not -100 (in SFT most positions carry no loss);
- computes the head and the loss a chunk of positions at a time, upcasting only that chunk's logits to fp32,
  so memory for the logits is O(chunk x V) instead of O(B x T x V) (and 2-3 times that for the autograd copies);
- for a plain `nn.Linear` head, computes the chunk's gradients (softmax minus one-hot, times the head weight)
  right after its loss, in the forward pass, and keeps only the small `[N, hidden]` gradient for the backward:
  the same matmuls as the plain loss, no recomputation, no `[B, T, V]` tensor in forward or backward
  (the "fused linear cross-entropy" of Liger-Kernel / Apple's Cut Cross-Entropy, in plain PyTorch).
  Any other head module (e.g. a LoRA-wrapped head) goes through `torch.utils.checkpoint` per chunk instead,
  which recomputes the chunk's logits in the backward.

Heads with logit post-processing are handled when the config says so: multiplicative scaling (Cohere
`logit_scale`, Granite `logits_scaling`, ...) and Gemma-style `final_logit_softcapping`. Because configs do not
say everything (one model multiplies by `logits_scaling`, another divides), the first call on each model checks
the result against the model's own forward on a few tokens and raises a `ModelError` if they disagree.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunelab.errors import ModelError

Batch = dict[str, torch.Tensor]

# Rows per chunk when `chunk_size` is None: a budget of fp32 logits per chunk, clamped to a range of rows, by device.
# CPU: about 32 MiB (262 rows for a 32k vocabulary), at least 128 rows. Measured on 2 CPU cores (hidden 512, vocab
# 32k, benchmarks/train_speed.py): 128 to 1024 rows run at the same speed on one thread; on two busy threads 524
# rows were ~7% faster than 262 and 128 ~5% slower, while each doubling of the chunk adds its [chunk, V] fp32
# buffer (+32 MiB here) to the peak. CUDA: about 512 MiB, 256 to 1,024 rows (1,024 for vocabularies up to 128k): on
# an H200 (bf16, hidden 2048, vocab 128256, 4 x 1024 positions) 128-row chunks made the step 0.89x the speed of
# transformers' full-logits loss, 1,024 rows 1.04x (peak memory 0.54x), 4,096 rows 1.05x (0.74x).
_AUTO_CHUNK = {"cpu": (2**23, 128, None), "cuda": (2**27, 256, 1024)}  # device: (fp32 logits, fewest, most rows)
# Models whose `logits_scaling` multiplies the logits (the others, Granite-style, divide by it).
_MULTIPLY_BY_LOGITS_SCALING = ("hyperclovax",)
_PROBE_TOKENS = 8


@dataclass(frozen=True)
class LogitTransform:
    """What the causal LM does to `head(hidden)`: `softcap * tanh(scale * z / softcap)`, or `scale * z`."""

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


_checked: weakref.WeakKeyDictionary[nn.Module, LogitTransform] = weakref.WeakKeyDictionary()


def chunked_loss_sum(model: nn.Module, batch: Batch, dtype: torch.dtype | None,
                     chunk_size: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose shifted label is not -100, never holding [B, T, V].

    Same value (fp32: to rounding) and gradients as `F.cross_entropy` over `model(...).logits`, shifted by one.
    `batch` holds `input_ids`, `labels` (-100: no loss) and optionally `attention_mask` or `position_ids` (packed
    rows); `dtype` is the autocast dtype (None: no autocast). `chunk_size`: positions per chunk (None: ~8M logits on
    CPU, up to 1,024 rows on CUDA; see `_AUTO_CHUNK`).
    """
    decoder, head = _body_and_head(model)
    transform = _checked.get(model)
    if transform is None:
        transform = _verified_transform(model, decoder, head, batch)
        _checked[model] = transform
    labels = batch["labels"]
    device = labels.device
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        hidden = _run_body(decoder, batch)
    # Position t predicts label t+1: keep only the positions whose next label carries a loss.
    flat_labels = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    rows = (flat_labels != -100).nonzero().squeeze(1)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    targets = flat_labels.index_select(0, rows)
    if chunk_size is None:
        elements, fewest, most = _AUTO_CHUNK.get(device.type, _AUTO_CHUNK["cpu"])
        chunk_size = max(fewest, min(most or elements, elements // head.weight.shape[0]))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    compute_dtype = dtype or head.weight.dtype
    if type(head) is nn.Linear:
        return _linear_cross_entropy(hidden, head.weight, head.bias, targets, transform, chunk_size, compute_dtype)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return _module_cross_entropy(hidden, head, targets, transform, chunk_size)


# --- the model's parts ---------------------------------------------------------------------------------------------


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder (the model without its head) and the output head of a HF causal LM; ModelError otherwise."""
    get_head, get_decoder = getattr(model, "get_output_embeddings", None), getattr(model, "get_decoder", None)
    head = get_head() if callable(get_head) else None
    decoder = get_decoder() if callable(get_decoder) else None
    if head is None or decoder is None or decoder is model or not isinstance(getattr(head, "weight", None),
                                                                              torch.Tensor):
        raise ModelError(f"{type(model).__name__}: the chunked loss needs a Hugging Face causal LM with an output "
                         f"head (get_output_embeddings) and a decoder body (get_decoder); unwrap the model "
                         f"(e.g. DistributedDataParallel.module) or train with the plain full-logits loss")
    if head.weight.ndim != 2:
        raise ModelError(f"{type(model).__name__}: output head weight has shape {tuple(head.weight.shape)}; the "
                         f"chunked loss expects a [vocab, hidden] matrix")
    return decoder, head


def _run_body(decoder: nn.Module, batch: Batch) -> torch.Tensor:
    # packed rows (data.packing, data.document_mask) carry position ids that restart at each example and no
    # attention mask: transformers' mask then confines attention to each example (see check_packed_attention)
    out = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                  position_ids=batch.get("position_ids"), use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden


def _config_transform(model: nn.Module) -> LogitTransform:
    """Logit scaling and soft-capping as the config describes them (checked against the model afterwards)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if isinstance(s := getattr(text, "logit_scale", None), int | float):  # Cohere: logits * logit_scale
        scale *= s
    if isinstance(s := getattr(text, "logits_scaling", None), int | float) and s != 1:  # Granite: / ; HyperCLOVA: *
        scale = scale * s if getattr(text, "model_type", "") in _MULTIPLY_BY_LOGITS_SCALING else scale / s
    if isinstance(s := getattr(text, "output_multiplier", None), int | float):
        scale *= s
    softcap = getattr(text, "final_logit_softcapping", None)
    return LogitTransform(float(scale), float(softcap) if softcap else None)


@torch.no_grad()
def _verified_transform(model: nn.Module, decoder: nn.Module, head: nn.Module, batch: Batch) -> LogitTransform:
    """The config's logit transform, after checking body + head + transform against the model's own logits."""
    transform = _config_transform(model)
    probe = {"input_ids": batch["input_ids"][:1, :_PROBE_TOKENS]}  # a few tokens, no padding: a cheap check
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout, so both computations see the same network
    try:
        expected = model(**probe, use_cache=False).logits.float()
        got = transform.apply(head(_run_body(decoder, probe)).float())
    finally:
        for m, training in modes.items():
            m.training = training
    tol = 1e-3 * (1.0 + expected.abs().max().item()) if head.weight.dtype == torch.float32 else \
        3e-2 * (1.0 + expected.abs().max().item())
    if got.shape != expected.shape or (got - expected).abs().max().item() > tol:
        raise ModelError(f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r}): its "
                         f"logits are not head(decoder(x)) with the logit scaling / soft-capping its config gives "
                         f"({transform}); tunelab's chunked loss does not support this model yet: train with the "
                         f"plain full-logits loss (tunelab.train.loop.token_loss_sum over model(...).logits)")
    return transform


@torch.no_grad()
def check_packed_attention(model: nn.Module, what: str = "data.packing") -> None:
    """ModelError unless two sequences packed in one row (position ids restarting, no attention mask) give each the
    hidden states it gets alone: packing relies on transformers building a per-sequence mask from the position ids
    (`masking_utils.find_packed_sequence_indices`, transformers >= 4.53, sdpa / eager / flex; flash-attention's
    variable-length path), which an older transformers or a custom attention may not do."""
    decoder, _ = _body_and_head(model)
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]  # an nn.Embedding or vocab extend's TrainableRows
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab, (1, n), generator=g).to(device) for n in (5, 7))
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout
    try:
        alone = torch.cat([_run_body(decoder, {"input_ids": x}).float() for x in (a, b)], dim=1)
        position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
        packed = _run_body(decoder, {"input_ids": torch.cat([a, b], dim=1), "position_ids": position_ids}).float()
    finally:
        for m, training in modes.items():
            m.training = training
    tol = 1e-4 * (1.0 + alone.abs().max().item()) if next(decoder.parameters()).dtype == torch.float32 else \
        3e-2 * (1.0 + alone.abs().max().item())
    if (packed - alone).abs().max().item() > tol:
        impl = getattr(model.config, "_attn_implementation", "?")
        raise ModelError(f"{type(model).__name__} (attention {impl!r}): two sequences packed in one row attend to "
                         f"each other, so {what} would mix examples; this transformers does not build the mask from "
                         f"position ids (upgrade transformers to >= 4.53), or set {what}=false")


# --- head + cross-entropy in chunks ---------------------------------------------------------------------------------


def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, transform: LogitTransform, chunk: int,
                          compute_dtype: torch.dtype) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not needs_grad:
        return _FusedLinearCrossEntropy.compute(hidden, weight, bias, targets, transform, chunk, compute_dtype,
                                                (False, False, False))[0]
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, transform, chunk, compute_dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(transform(h_i W^T + b), y_i) with the gradients computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, chunk, compute_dtype):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        loss, grads = _FusedLinearCrossEntropy.compute(hidden, weight, bias, targets, transform, chunk,
                                                       compute_dtype, needs)
        ctx.grads = grads
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return (*scaled, None, None, None, None)

    @staticmethod
    def compute(hidden, weight, bias, targets, transform, chunk, compute_dtype, needs):
        """(loss, [d hidden, d weight, d bias] or Nones); holds one [chunk, V] fp32 buffer at a time."""
        need_h, need_w, need_b = needs
        n, vocab = hidden.shape[0], weight.shape[0]
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        upcast = compute_dtype != torch.float32
        buf = torch.empty(min(chunk, n), vocab, dtype=compute_dtype, device=hidden.device)
        buf32 = torch.empty(buf.shape, dtype=torch.float32, device=hidden.device) if upcast else buf
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk):
                h = hidden[start:start + chunk].to(compute_dtype)
                y = targets[start:start + chunk]
                rows = h.shape[0]
                z = buf[:rows]
                if b is None:
                    torch.mm(h, w.t(), out=z)
                else:
                    torch.addmm(b, h, w.t(), out=z)
                if upcast:
                    z = buf32[:rows].copy_(z)
                if transform.scale != 1.0:
                    z.mul_(transform.scale)
                capped = None
                if transform.softcap:
                    capped = z.div_(transform.softcap).tanh_()  # in place: z now holds tanh(.), kept for the grad
                    z = capped * transform.softcap
                target_logit = z.gather(1, y[:, None])
                z_max = z.amax(1, keepdim=True)
                probs = z.sub_(z_max).exp_()  # in place: exp(z - max)
                total = probs.sum(1, keepdim=True)
                loss += (z_max + total.log() - target_logit).sum()
                if not (need_h or need_w or need_b):
                    continue
                grad_z = probs.div_(total)  # softmax
                grad_z[torch.arange(rows, device=y.device), y] -= 1.0  # d CE / d logits = softmax - one-hot
                if capped is not None:
                    grad_z.mul_(1.0 - capped.square_())
                if transform.scale != 1.0:
                    grad_z.mul_(transform.scale)
                if upcast:
                    grad_z = buf[:rows].copy_(grad_z)
                if need_h and grad_h.dtype == compute_dtype:
                    torch.mm(grad_z, w, out=grad_h[start:start + rows])
                elif need_h:
                    grad_h[start:start + rows] = grad_z @ w
                if need_w:
                    if upcast:
                        grad_w += grad_z.t() @ h
                    else:
                        grad_w.addmm_(grad_z.t(), h)
                if need_b:
                    grad_b += grad_z.sum(0, dtype=torch.float32)
        return loss, [grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                      None if grad_b is None else grad_b.to(bias.dtype)]


def _module_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, transform: LogitTransform,
                          chunk: int) -> torch.Tensor:
    """Any head module: per chunk, logits -> fp32 -> CE under checkpoint, so the backward recomputes the logits."""

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(transform.apply(head(h).float()), y, reduction="sum")

    loss = hidden.sum() * 0.0  # connected to the graph even when no position carries a loss
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], targets[start:start + chunk]
        loss = loss + (checkpoint(chunk_loss, h, y, use_reentrant=False) if torch.is_grad_enabled()
                       else chunk_loss(h, y))
    return loss

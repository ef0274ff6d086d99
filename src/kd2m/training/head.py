"""The student's output layer fused with its losses: a language model's step without its logits.

A causal LM's training step would build the student's logits ``(B, L, V)``, then the next-token
cross-entropy and each token divergence from them; at V = 49 152 the logits of 8 192 tokens are
1.5 GiB in float32, and their softmaxes and gradient as much again each. Where the student
exposes its last hidden states and a plain output layer (:func:`kd2m.models.hf_logits.fused_output_layer`:
every ``hf:`` model whose logits are that layer of those states), :class:`FusedHead` has the step
run ``net(x, last_hidden=True)`` instead and computes the cross-entropy and every term among
``fkl rkl jsd skew_kl skew_rkl tvd`` with :func:`kd2m.losses.fused_head.fused_head_terms`, chunk
by chunk: the same values and gradients, the ``(B·L, V)`` logits never whole. The output layer's
input, which a distance on the final hidden states reads (the default layer, ``penultimate``), is
handed to the student's taps, as the layer's own hook would have recorded it.

A student whose terms need its full logits (``kd``, ``dkd``, … or a layer tapped at the output
layer itself) keeps the plain step: its logits are built there anyway.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..features import PENULTIMATE
from ..losses.fused_head import DIVERGENCES, TokenDivergence, fused_head_terms

__all__ = ["FusedHead"]


class FusedHead:
    """The fused output layer of a step: ``head`` (the student's ``nn.Linear``), and for each of
    the step's terms its :class:`~kd2m.losses.fused_head.TokenDivergence`, or None where the
    term is computed as usual (a distance on features)."""

    def __init__(self, head: nn.Linear, divergences: list):
        self.head, self.divergences = head, divergences

    @classmethod
    def for_step(cls, net: nn.Module, terms: list, task) -> FusedHead | None:
        """The fused head of ``net`` under ``terms`` for ``task``, or None (the plain step)."""
        if not getattr(task, "fuses_head", False):
            return None
        from ..models.hf_logits import fused_output_layer
        if any(b.config.reads_logits and b.config.name not in DIVERGENCES for b in terms):
            return None  # a term reads the full logits: built anyway
        head = fused_output_layer(net)
        if head is None:
            return None
        head_name = next(name for name, m in net.named_modules() if m is head)
        for b in terms:
            for layer, _ in b.pairs if b.needs & {"feats", "maps"} else ():
                if layer != PENULTIMATE and (layer == head_name or head_name.startswith(f"{layer}.") or not layer):
                    return None  # the head's own output (or a module around it) is tapped: the logits
        return cls(head, [_divergence(b) if b.config.name in DIVERGENCES else None for b in terms])

    def __call__(self, hidden: Tensor, labels: Tensor, teacher, which: list | None,
                 weights: list | None = None) -> tuple[Tensor, dict]:
        """(the cross-entropy, ``{term index: value}``) of the divergence terms asked for
        (``which``: a flag per term, None for all), from ``hidden`` (B, L, d) and ``labels`` (B·L,);
        ``weights``: ``[w_CE, λ per term]`` as the loss will weigh them (their gradient is then
        taken in the forward), or None."""
        asked = [k for k, d in enumerate(self.divergences) if d is not None and (which is None or which[k])]
        ce, values = fused_head_terms(hidden, self.head.weight, labels, teacher if asked else None,
                                      [self.divergences[k] for k in asked], bias=self.head.bias,
                                      weights=None if weights is None else [weights[0]] + [weights[1 + k] for k in asked])
        return ce, dict(zip(asked, values))


def _divergence(bound) -> TokenDivergence:
    """A bound divergence term's kind and options (its registered defaults, then its config's)."""
    options = {**dict(bound.config.spec.defaults), **bound.config.option_dict}
    return TokenDivergence(bound.config.name, float(options.get("temperature", 1.0)),
                           float(options.get("beta", 0.5)), float(options.get("alpha", 0.1)))

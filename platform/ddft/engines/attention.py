"""Row-wise attention for the hf engine: a row's numbers don't depend on what shares its batch.

The scheduler left-pads rows of different lengths into one KV cache. With padding, transformers'
sdpa attention gets a mask and takes other kernels than it takes for the same row alone (no mask:
`is_causal`, grouped-query heads packed otherwise), and the padding shifts where each key sits in
the reduction; both change the last bits of the result (measured on the tiny base: a short prompt's
next-token logits beside a longer one differ from its solo run by up to 9e-8), which is enough to
flip a greedy token on a near tie. So the language model attends row by row here: each row's own queries and keys, the
padding sliced away, through transformers' own sdpa path with no mask, exactly the call the row
makes alone. Rows with the same lengths go through in one call (a batch of equal rows is the same
computation per row). Registered under NAME; hf.py sets it on the base's text model.

What it does not remove (measured, tiny base, decode): the Linear layers' matmuls take another
kernel for one row than for several (a GEMV, not a GEMM), so a row alone and the same row in a
batch still differ by about 1e-7 in their logits; no test's greedy tokens have flipped on it, and
exact batch invariance would need kernels of our own.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "ddft_rows"


def row_attention(module, query, key, value, attention_mask, **kwargs):
    """query (rows, heads, q, dim), key/value (rows, kv_heads, kv, dim), attention_mask the 4D boolean
    mask sdpa would get (None: no padding, plain causal) -> ((rows, q, heads, dim), None)."""
    if attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    if attention_mask.dtype != torch.bool:
        raise TypeError(f"row attention takes a boolean mask, got {attention_mask.dtype}")
    rows, q = query.shape[0], query.shape[2]
    valid = attention_mask[:, 0]  # (rows, q, kv)
    n_q = valid.any(-1).sum(-1).tolist()  # a row's own queries: the last n_q (left padding)
    n_k = valid[:, -1].sum(-1).tolist()  # its own keys: the last n_k
    out = query.new_zeros((rows, q, query.shape[1], query.shape[3]))
    groups: dict[tuple[int, int], list[int]] = {}
    for r in range(rows):
        groups.setdefault((n_q[r], n_k[r]), []).append(r)
    for (nq, nk), idx in groups.items():
        if nq == 0:
            continue
        sel = idx[0] if len(idx) == 1 else torch.tensor(idx, device=query.device)
        qs, ks, vs = (t[sel : sel + 1] if len(idx) == 1 else t[sel] for t in (query, key, value))
        y, _ = sdpa_attention_forward(module, qs[:, :, q - nq :], ks[:, :, -nk:], vs[:, :, -nk:], None, **kwargs)
        out[idx, q - nq :] = y
    return out, None


AttentionInterface.register(NAME, row_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the model builds the boolean mask it would give sdpa


def use_row_attention(model) -> None:
    """Set row attention on the model's language model (the towers keep theirs)."""
    model.config.get_text_config()._attn_implementation = NAME

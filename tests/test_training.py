"""A real (small) training run: a character-level language model trained for 200 steps on
Python's own json package source, once with F.cross_entropy and once with
ce_fast.torch.cross_entropy (and once more with its in-place backward), same seeds.
The per-step losses agree within 1e-4 relative and the loss falls clearly."""

from __future__ import annotations

import inspect
import json.decoder
import json.encoder

import pytest
import torch
import torch.nn.functional as F

import ce_fast
import ce_fast.torch as ct

STEPS = 200
BATCH, T, CTX = 16, 32, 8  # sequences per step, positions per sequence, characters seen per position


def corpus():
    text = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    return ids, len(chars)


class CharMLP(torch.nn.Module):
    """Predicts each next character from the CTX characters before it: embedding, the
    window's embeddings concatenated, a hidden layer. Logits are (B, T, V): class axis last."""

    def __init__(self, vocab, emb=16, hidden=128):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, emb)
        self.hidden = torch.nn.Linear(CTX * emb, hidden)
        self.out = torch.nn.Linear(hidden, vocab)

    def forward(self, ids):  # ids: (B, T + CTX - 1)
        e = self.emb(ids)  # (B, T + CTX - 1, E)
        win = e.unfold(1, CTX, 1)  # (B, T, E, CTX)
        h = torch.tanh(self.hidden(win.transpose(-1, -2).reshape(ids.shape[0], -1, CTX * e.shape[-1])))
        return self.out(h)  # (B, T, V)


def train(loss_kind, ids, vocab):
    torch.manual_seed(1234)
    model = CharMLP(vocab)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(99)
    span = T + CTX
    losses = []
    for _ in range(STEPS):
        starts = torch.randint(0, ids.numel() - span, (BATCH,), generator=gen)
        chunk = torch.stack([ids[s : s + span] for s in starts.tolist()])  # (B, T + CTX)
        x, y = chunk[:, :-1], chunk[:, CTX:]  # y[:, t] follows x[:, t : t + CTX]
        logits = model(x)
        if loss_kind == "torch":
            loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        else:
            loss = ct.cross_entropy(logits, y, inplace_backward=(loss_kind == "ce_fast_inplace"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.fixture(scope="module")
def runs():
    ids, vocab = corpus()
    assert ids.numel() > 10_000 and 40 < vocab < 128
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add noise on a small shared machine
    ce_fast.set_threads(1)
    try:
        for kind in ("torch", "ce_fast", "ce_fast_inplace"):
            out[kind] = train(kind, ids, vocab)
    finally:
        torch.set_num_threads(threads)
        ce_fast.set_threads(0)
    return out, vocab


@pytest.mark.parametrize("kind", ["ce_fast", "ce_fast_inplace"])
def test_training_losses_match_torch(runs, kind):
    out, _ = runs
    ref, got = out["torch"], out[kind]
    rel = ((got - ref).abs() / ref.abs()).max()
    assert float(rel) <= 1e-4, f"step {int(((got - ref).abs() / ref).argmax())}: relative difference {float(rel):.3g}"


def test_training_loss_falls(runs):
    out, vocab = runs
    for kind, losses in out.items():
        first = float(losses[0])
        last = float(losses[-10:].mean())
        assert abs(first - torch.log(torch.tensor(float(vocab)))) < 0.5  # starts near uniform
        assert last < first - 1.5, f"{kind}: loss {first:.3f} -> {last:.3f}"

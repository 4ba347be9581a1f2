"""bRSM's headline experiment (Rawlinson et al. 2019, arXiv 1912.01116): stochastic sequences of digit images.

Protocol: 8 fixed sequences of 9 digits (drawn once from ``--seed``, first digits all different); a stream
concatenates sequences chosen at random, and every digit is shown as a random image of its class. The task
is to name the next digit. Within a sequence the next digit is determined once the model remembers which
sequence it is in; the first digit of the next sequence is not, so the ceiling is 8/9 = 88.9% (90.3% if
the unpredictable step is guessed right with chance 1/8). Paper (MNIST): bRSM 86.43%, LSTM 80.00%.

Here the images are scikit-learn's bundled 8x8 digits (1797 images, no download), split in half: training
streams draw from one half, the test stream from the other.

- bRSM: ``make_core("brsm", 64, ...)`` trained on its own next-image prediction loss only (gradient one
  step deep); a classifier (MLP) reads the detached core output and learns the next digit's label.
- LSTM: same hidden size, trained end to end on the next label with truncated BPTT over 30-step windows.
Both see the same number of windows of ``--batch`` streams. Accuracy: the next label on a fresh test
stream, after a warm-up of two sequences.

Memory: the bytes of the tensors autograd saves for backward during one training update (collected with
``torch.autograd.graph.saved_tensors_hooks``, each storage counted once, the parameters' own storages
left out): what a training step holds alive beyond the model. bRSM's graph is T independent one-step
graphs, so it is also measured for a 2-step window (one prediction pair), the smallest it can learn from;
the LSTM's gradient needs its whole BPTT window, so only its 30-step figure is what it trains with.

    python benchmarks/brsm_sequences.py [--windows 3000] [--batch 64] [--seed 0] [--json-out FILE]

JSON on stdout, a summary on stderr. Needs scikit-learn (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tlb_rl.cores import Core, make_core

N_SEQ, SEQ_LEN, BPTT = 8, 9, 30
CEILING = (N_SEQ - 1 + 1) / SEQ_LEN  # 8/9: every step but the first of a sequence is predictable


def load_digits_split(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per class, the train and test images [N_c, 64] in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("brsm_sequences.py needs scikit-learn for its bundled digit images: pip install -e .[bench]")
    data = load_digits()
    images = torch.tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    half = len(perm) // 2
    split = [perm[:half], perm[half:]]
    return tuple([images[idx][labels[idx] == c] for c in range(10)] for idx in split)  # type: ignore[return-value]


def make_sequences(seed: int) -> torch.Tensor:
    """[8, 9] digit sequences with distinct first digits (so the rest of each is determined)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.randint(10, (N_SEQ, SEQ_LEN), generator=gen)
    seqs[:, 0] = torch.randperm(10, generator=gen)[:N_SEQ]
    return seqs


class Stream:
    """``batch`` endless streams of random sequences; each digit a random image of its class."""

    def __init__(self, seqs: torch.Tensor, images: list[torch.Tensor], batch: int, seed: int):
        self.seqs, self.images, self.gen = seqs, images, torch.Generator().manual_seed(seed)
        self.seq = torch.randint(N_SEQ, (batch,), generator=self.gen)
        self.pos = torch.zeros(batch, dtype=torch.long)

    def labels(self, steps: int) -> torch.Tensor:
        out = []
        for _ in range(steps):
            out.append(self.seqs[self.seq, self.pos])
            self.pos += 1
            done = self.pos == SEQ_LEN
            self.seq[done] = torch.randint(N_SEQ, (int(done.sum()),), generator=self.gen)
            self.pos[done] = 0
        return torch.stack(out, 1)  # [B, steps]

    def images_of(self, labels: torch.Tensor) -> torch.Tensor:
        x = torch.empty(*labels.shape, 64)
        for c in range(10):
            where = labels == c
            pick = torch.randint(len(self.images[c]), (int(where.sum()),), generator=self.gen)
            x[where] = self.images[c][pick]
        return x


@dataclass
class Model:
    """A core and a head reading its output (bRSM's output is detached: the head's loss stays in the head)."""

    core: Core
    head: nn.Module

    def parameters(self) -> list[nn.Parameter]:
        return [*self.core.parameters(), *self.head.parameters()]

    def loss(self, x: torch.Tensor, labels: torch.Tensor, state: dict, starts: torch.Tensor):
        """Loss of one window: next-label CE on every pair inside it (+ bRSM's own prediction loss)."""
        y, state = self.core(x, state, starts)
        logits = self.head(y[:, :-1])  # the prediction at t is scored against the label at t+1
        loss = F.cross_entropy(logits.reshape(-1, 10), labels[:, 1:].reshape(-1))
        aux = self.core.auxiliary_loss()
        return (loss if aux is None else loss + aux), {k: v.detach() for k, v in state.items()}


def build(kind: str, hidden: int, args: argparse.Namespace) -> Model:
    torch.manual_seed(args.seed)
    if kind == "brsm":
        core = make_core("brsm", 64, m=args.m, n=args.n, k=args.k, boost_strength=args.boost)
        head = nn.Sequential(
            nn.Linear(hidden, args.classifier_hidden), nn.LeakyReLU(), nn.Linear(args.classifier_hidden, 10)
        )
        return Model(core, head)
    return Model(make_core("lstm", 64, hidden_size=hidden), nn.Linear(hidden, 10))


def train(model: Model, seqs: torch.Tensor, images: list[torch.Tensor], args: argparse.Namespace) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    stream = Stream(seqs, images, args.batch, args.seed + 1)
    state = model.core.initial_state(args.batch)
    no_starts = torch.zeros(args.batch, BPTT, dtype=torch.bool)
    refresh_boost = getattr(model.core, "refresh_boost", None)  # bRSM ranks winners with these factors
    model.core.train()
    t0 = time.perf_counter()
    for _ in range(args.windows):
        labels = stream.labels(BPTT)
        loss, state = model.loss(stream.images_of(labels), labels, state, no_starts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if refresh_boost is not None:  # once per batch, as the paper's boosting updates
            refresh_boost()
    return time.perf_counter() - t0


@torch.no_grad()
def accuracy(model: Model, seqs: torch.Tensor, images: list[torch.Tensor], args: argparse.Namespace) -> float:
    model.core.eval()
    stream = Stream(seqs, images, args.eval_batch, args.seed + 2)
    labels = stream.labels(args.eval_steps + 2 * SEQ_LEN)
    x = stream.images_of(labels)
    y, _ = model.core(x, model.core.initial_state(args.eval_batch), torch.zeros(labels.shape, dtype=torch.bool))
    pred = model.head(y[:, 2 * SEQ_LEN : -1]).argmax(-1)
    return (pred == labels[:, 2 * SEQ_LEN + 1 :]).float().mean().item()


def saved_bytes(model: Model, seqs: torch.Tensor, images: list[torch.Tensor], window: int, batch: int) -> int:
    """Bytes autograd keeps for backward in one training update over ``window`` steps: each storage once,
    the parameters' own storages left out."""
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}  # kept anyway: not counted

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    stream = Stream(seqs, images, batch, 123)
    labels = stream.labels(window)
    model.core.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.loss(
            stream.images_of(labels),
            labels,
            model.core.initial_state(batch),
            torch.zeros(batch, window, dtype=torch.bool),
        )
    loss.backward()
    return sum(storages.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=3000, help="training windows of 30 steps (default 3000)")
    p.add_argument("--batch", type=int, default=64, help="parallel training streams (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--m", type=int, default=256, help="bRSM groups; the LSTM gets hidden m*n (default 256)")
    p.add_argument("--n", type=int, default=1, help="bRSM cells per group (default 1, flattened)")
    p.add_argument("--k", type=int, default=25, help="bRSM winning groups (default 25)")
    p.add_argument("--boost", type=float, default=1.2, help="bRSM initial boost strength (default 1.2)")
    p.add_argument("--classifier-hidden", type=int, default=256, help="bRSM classifier width (default 256)")
    p.add_argument("--eval-batch", type=int, default=32, help="test streams (default 32)")
    p.add_argument("--eval-steps", type=int, default=900, help="scored steps per test stream (default 900)")
    p.add_argument("--models", default="brsm,lstm", help="comma-separated subset of brsm,lstm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json-out", help="also write the JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train_images, test_images = load_digits_split(args.seed)
    seqs = make_sequences(args.seed)
    hidden = args.m * args.n
    result: dict = {
        "sequences": seqs.tolist(),
        "ceiling": CEILING,
        "ceiling_with_first_digit_guessed": (N_SEQ - 1 + 1 + 1 / N_SEQ) / SEQ_LEN,
        "paper": {"brsm": 0.8643, "lstm": 0.80},
        "config": {k: v for k, v in vars(args).items() if k != "json_out"},
        "hidden_size": hidden,
        "models": {},
    }
    for kind in args.models.split(","):
        model = build(kind, hidden, args)
        seconds = train(model, seqs, train_images, args)
        acc = accuracy(model, seqs, test_images, args)
        memory = {
            f"saved_bytes_window{w}": saved_bytes(build(kind, hidden, args), seqs, train_images, w, args.batch)
            for w in (BPTT, 2)
        }
        result["models"][kind] = {"accuracy": acc, "train_seconds": seconds, **memory}
        print(
            f"{kind}: next-digit accuracy {acc:.4f} (ceiling {CEILING:.4f}), trained {seconds:.0f} s, "
            f"saved for backward: {memory[f'saved_bytes_window{BPTT}'] / 2**20:.2f} MiB per {BPTT}-step update, "
            f"{memory['saved_bytes_window2'] / 2**20:.3f} MiB per 2-step update",
            file=sys.stderr,
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

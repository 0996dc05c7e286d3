"""Passkey probe: a number planted early in held-out code, asked for at the end.

Each probe sequence is exactly ``context`` bytes of held-out stdlib source with
the line ``# the passkey is 48213`` planted near the start (at a line start) and
``# the passkey is 48213`` again as the last line, its digits being the last bytes.
The model reads the sequence teacher-forced; at the query positions (the token
before each digit) it must put the digit first to count as retrieving it. Planted
early, the passkey lies further back than any window, so only All can reach it;
the ``distance`` variant plants it a given number of bytes before the query instead
(a distance the model can bridge, beyond the small windows but inside the large).

The control replaces the planted line by a comment rule of the same length: the digits
can then only be guessed, which gives the accuracy of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aha.experiments.corpus import PLANT
from aha.experiments.model import GateRecorder

__all__ = ["PasskeyBatch", "PLANT", "build_passkey", "run_passkey"]


def _neutral_line(n: int) -> bytes:
    """The control's line in place of the planted one: a comment rule of n bytes, newline included."""
    return b"# " + b"-" * (n - 3) + b"\n"


@dataclass
class PasskeyBatch:
    ids: torch.Tensor  # [S, context] with the passkey planted
    control: torch.Tensor  # [S, context], the same filler with no passkey planted
    keys: list[str]  # the passkey of each sequence
    plant_at: list[int]  # where the planted line starts in each sequence
    digits: int

    @property
    def distances(self) -> list[int]:
        """Bytes from the planted key's last digit to the first query position, per sequence."""
        first = int(self.query_positions[0])
        return [first - (p + len(PLANT) + self.digits - 1) for p in self.plant_at]

    @property
    def query_positions(self) -> torch.Tensor:
        """Input positions whose next byte is a digit of the final passkey: [digits]."""
        n = self.ids.shape[1]
        return torch.arange(n - self.digits - 1, n - 1)


def _line_start(filler: bytes, lo: int, hi: int) -> int:
    """A position in [lo, hi) just after a newline of filler, else lo."""
    nl = filler.find(b"\n", lo - 1, hi - 1)
    return lo if nl < 0 else nl + 1


def build_passkey(
    heldout: torch.Tensor,
    count: int,
    context: int,
    digits: int = 5,
    seed: int = 7,
    distance: tuple[int, int] | None = None,
) -> PasskeyBatch:
    """``count`` probe sequences of ``context`` bytes from the held-out stream (deterministic in seed).

    The planted line goes in the first lines, or, with ``distance=(lo, hi)``, where the
    planted key's last digit lies lo to hi bytes before the first query position.
    """
    gen = torch.Generator().manual_seed(seed)
    query_len = len(PLANT) + digits
    plant_len = query_len + 1  # the planted line ends with a newline
    room = context - plant_len - query_len
    if room < 16:
        raise ValueError(f"context: {context} bytes leave no room for filler around a {digits}-digit passkey")
    if distance is None:
        lo = min(8, room // 4)
        hi = min(room, lo + 128)
    else:
        # distance d = (context - digits - 1) - (p + query_len - 1) for a plant at p
        lo, hi = context - digits - query_len - distance[1], context - digits - query_len - distance[0] + 1
        if not (distance[0] <= distance[1] and 0 <= lo and hi <= room + 1):
            raise ValueError(f"distance: {distance} is not a range of distances a {context}-byte probe can hold")
    ids, control, keys, plant_at = [], [], [], []
    for _ in range(count):
        start = int(torch.randint(0, heldout.numel() - context, (1,), generator=gen))
        region = bytearray(heldout[start : start + room].tolist())  # the filler
        region[-1:] = b"\n"  # the query starts a line
        key = str(int(torch.randint(10 ** (digits - 1), 10**digits, (1,), generator=gen)))
        p = _line_start(bytes(region), lo, hi)
        query = PLANT + key.encode()
        ids.append(list(bytes(region[:p]) + query + b"\n" + bytes(region[p:]) + query))
        control.append(list(bytes(region[:p]) + _neutral_line(plant_len) + bytes(region[p:]) + query))
        keys.append(key)
        plant_at.append(p)
    to = torch.tensor
    return PasskeyBatch(to(ids, dtype=torch.long), to(control, dtype=torch.long), keys, plant_at, digits)


@torch.no_grad()
def _read(model, ids: torch.Tensor, q: torch.Tensor, batch: int = 16) -> tuple[dict, torch.Tensor]:
    """Retrieval of the digits after query positions q of ids [S, N], and the gates [L, S, Hq, N-1] on the way.

    digit_accuracy: the digit is the argmax (chance 0.1 for a guess among digits);
    key_accuracy: every digit is (greedy decoding gives the key); p_digit: mean probability of the digit.
    """
    model.eval()
    with GateRecorder(model) as rec:
        logits = torch.cat([model(ids[s : s + batch, :-1])[:, q] for s in range(0, ids.shape[0], batch)])
        gates = rec.gates()
    target = ids[:, q + 1]  # (S, digits)
    hit = logits.argmax(-1) == target  # (S, digits)
    p = torch.softmax(logits.float(), -1).gather(-1, target[..., None]).squeeze(-1)
    scores = {
        "digit_accuracy": float(hit.float().mean()),
        "key_accuracy": float(hit.all(-1).float().mean()),
        "p_digit": float(p.mean()),
    }
    return scores, gates


def run_passkey(model, probe: PasskeyBatch, window: int) -> dict:
    """Retrieval with and without the planted passkey, and where the router goes All.

    ``query_all_share`` [L][Hq]: All share at the query positions (``..._control``: the same
    positions in the control sequences); ``elsewhere_all_share`` [L][Hq]: at every other
    position >= window; ``per_position`` [N-1]: over layers, heads and sequences.
    """
    q = probe.query_positions
    planted, gates = _read(model, probe.ids, q)
    control, control_gates = _read(model, probe.control, q)
    g = gates.float()  # (L, S, Hq, N - 1)
    elsewhere = torch.ones(g.shape[-1], dtype=torch.bool)
    elsewhere[:window] = False
    elsewhere[q] = False
    return {
        "planted": planted,
        "control": control,
        "chance_digit_accuracy": 0.1,
        "query_all_share": g[..., q].mean((1, 3)).tolist(),
        "query_all_share_control": control_gates.float()[..., q].mean((1, 3)).tolist(),
        "elsewhere_all_share": g[..., elsewhere].mean((1, 3)).tolist(),
        "per_position": g.mean((0, 1, 2)).tolist(),
    }

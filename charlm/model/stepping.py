"""One model step per byte: the one primitive that sampling, explain mode and the reading page
step the model with. (N,) bytes and the state h (L, N, D) in; the log-probabilities of the next
byte (N, 256) and the new state out, and, when asked, every layer's gates.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from charlm.model import native
from charlm.model.gru import layer_weights, lstm_step_with_gates, step_with_gates
from charlm.model.network import CharLM


class Stepper:
    """Computes what CharLM.forward computes for a length-1 input, with less work per byte.

    For nn.GRU the embedding and layer 0's input projection are folded into one (256, 3D) table
    read by byte, weights are transposed once, and nothing is allocated for a time axis; the
    reset-before cell and the LSTM step through the model's own forward. With gates=True each
    layer is stepped with charlm.model.gru's step_with_gates or lstm_step_with_gates (the same
    maths), which also give its gates. On the CPU the nn.GRU step is one call into
    charlm/model/kernels/decoding.cpp where the plan runs the kernels (charlm.plan), else PyTorch's operations.
    precision="bf16" rounds the matmuls' weights and inputs to bfloat16 and keeps their sums, the
    gates and the state in float32 (the other cells: their forward under bf16 autocast); half the
    bytes to read, and AVX-512 BF16's pair products, where the CPU has them. Build it after the
    weights stop changing (it copies them).
    """

    def __init__(self, model: CharLM, precision: str = "fp32"):
        self.model = model
        self.precision = precision
        self.fast = isinstance(model.recurrent, torch.nn.GRU)
        self.weights = [layer_weights(model.recurrent, k) for k in range(model.config.n_layers)]
        self.native = None  # the kernels' ops, for the nn.GRU step on the CPU
        if not self.fast:
            return
        # bf16: the matmuls' weights and inputs rounded to bfloat16, their sums and the gates float32
        mm = torch.bfloat16 if precision == "bf16" else torch.float32
        self.rounded = (lambda t: t.to(mm).float()) if precision == "bf16" else (lambda t: t)
        with torch.no_grad():
            w_ih, _, b_ih, _ = self.weights[0]
            self.table = torch.addmm(b_ih, model.embed.weight, w_ih.t())  # (256, 3D): W_i x + b_i per byte
            self.w_ih_t = [self.rounded(w[0].t().contiguous()) for w in self.weights]
            self.b_ih = [w[2].detach() for w in self.weights]
            # every layer's recurrent matmul needs only the previous state: one batched matmul for all
            self.w_hh_t = self.rounded(torch.stack([w[1].t() for w in self.weights]))  # (L, D, 3D)
            self.b_hh = torch.stack([w[3] for w in self.weights]).unsqueeze(1)  # (L, 1, 3D)
            self.head = (self.rounded(model.head.weight.t().contiguous()), model.head.bias.detach())
        # the kernels' gru_decode: the whole step in one call, on the CPU in float32 parameters
        on_cpu = self.table.device.type == "cpu" and self.table.dtype == torch.float32
        self.native = native.ops() if on_cpu else None
        if self.native is not None:
            # the weights in the order decoding's matmuls read them, in their dtype
            def lay(w: torch.Tensor) -> torch.Tensor:
                return self.native.gemv_layout(w.to(mm))

            w_hh_t = list(self.w_hh_t.contiguous())
            blocked = [t for k, (w_ih_t, w_hh) in enumerate(zip(self.w_ih_t, w_hh_t))
                       for t in (lay(w_ih_t) if k else w_ih_t.new_empty(0), lay(w_hh))]
            self.native_weights = (self.table, self.w_ih_t, self.b_ih, w_hh_t, [b.view(-1) for b in self.b_hh],
                                   *self.head, blocked + [lay(self.head[0])])

    def __call__(self, byte: torch.Tensor, h: torch.Tensor, gates: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, Optional[dict[str, Any]]]:
        """(log_probs (N, 256), new state (L, N, state_size), None or {"logits": (N, 256), "layers": one
        dict per layer of its output "h" and its gates, each (N, D): "r", "z", "n" for a GRU cell,
        "i", "f", "g", "o" (and "c") for the LSTM}) after reading byte (N,) from state h."""
        if gates:
            return self._with_gates(byte, h)
        if not self.fast:
            with torch.autocast(byte.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
                log_probs, h = self.model(byte.unsqueeze(1), h)
            return log_probs[:, -1].float(), h.float(), None
        if self.native is not None:
            log_probs, h = self.native.gru_decode(byte, h.contiguous(), *self.native_weights)
            return log_probs, h, None
        d, r = self.model.config.d_model, self.rounded
        gh_all = torch.baddbmm(self.b_hh, r(h), self.w_hh_t)  # (L, N, 3D)
        x = h.new_empty(0)
        states = []
        for k, gh in enumerate(gh_all):
            gi = self.table[byte] if k == 0 else torch.addmm(self.b_ih[k], r(x), self.w_ih_t[k])
            rz = torch.sigmoid(gi[:, : 2 * d] + gh[:, : 2 * d])
            n = torch.tanh(torch.addcmul(gi[:, 2 * d :], rz[:, :d], gh[:, 2 * d :]))
            x = torch.lerp(n, h[k], rz[:, d:])  # (1 - z) * n + z * h
            states.append(x)
        logits = torch.addmm(self.head[1], r(x), self.head[0])
        return torch.log_softmax(logits, dim=-1), torch.stack(states), None

    def can_write(self, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> bool:
        """Whether write() takes these settings: the kernels loaded, and their own draw (temperature
        above 0, no top-k or top-p)."""
        return self.native is not None and temperature > 0 and top_k is None and top_p is None

    def write(self, log_probs: torch.Tensor, h: torch.Tensor, temperature: float, steps: int,
              generator: Optional[torch.Generator] = None, stop: bytes = b"", tail: bytes = b""
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`steps` turns of sampling's loop in one kernel call (kernels/decoding.cpp's gru_write): draw the
        next byte from log_probs (N, 256) as next_byte would, then step on it. -> (bytes (k, N),
        log_probs, h) after the last; k < steps only where one text's bytes, after `tail`, reach
        `stop`. The same bytes, state and generator state as the loop, without Python per byte."""
        keep = tail[-len(stop):] if stop else b""
        return self.native.gru_write(
            log_probs, h.contiguous(), *self.native_weights, float(temperature), steps,
            torch.tensor(list(stop), dtype=torch.uint8), torch.tensor(list(keep), dtype=torch.uint8), generator)

    def _with_gates(self, byte: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        x = self.model.embed(byte)  # (N, D)
        cell, layers = self.model.config.cell, []
        for k, w in enumerate(self.weights):
            g = lstm_step_with_gates(x, h[k], w) if cell == "lstm" else step_with_gates(x, h[k], w, cell)
            layers.append(g)
            x = g["h"]
        logits = self.model.head(x)
        state = torch.stack([g.get("state", g["h"]) for g in layers])
        return torch.log_softmax(logits, dim=-1), state, {"logits": logits, "layers": layers}

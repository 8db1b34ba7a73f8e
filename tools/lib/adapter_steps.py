"""A decode adapter's chain steps on static buffers (the fast runtime).

`StaticAdapter` does for a decode adapter (L5 / B1 / L5F) what
tools/lib/static_kv.py's `StaticLM` does for a language model: its cached
step and the target's LM head + argmax in one captured graph per input
length T (the one-position step, every drafting step after the first,
compiled), and for B1, which reads only its own outputs while drafting,
the catch-up with the whole chain after it as one graph. The draft trees'
steps: tools/lib/tree_steps.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from tools.lib.static_kv import StepGraphs, capture_steps, cuda_compile


class AdapterBuffers:
  """A decode adapter on static buffers: its module, its KV cache
  [layers, 1, heads, max_len, head_dim] (`k`, `v`), the target's LM head,
  the cache's positions 0..max_len-1 (`keys`), and the capture mode the
  subclass's steps run in (`mode`). Its inputs are states of the width
  the LM head reads (both models' hidden size)."""

  def __init__(self, module, lm_head, num_inputs, max_len, device, dtype):
    self.module = module
    self.lm_head = lm_head.detach()
    self.num_inputs = num_inputs
    self.device, self.dtype = torch.device(device), dtype
    self.k, self.v = module.static_cache(max_len, device, dtype)
    self.max_len = int(max_len)
    self.keys = torch.arange(self.max_len, device=self.device)
    self.mode = "eager"
    self._compiled = None

  def _set_compiled(self, compiled: bool) -> None:
    # The subclass's `_step`, compiled (`capture_steps` sets the mode);
    # its `_forward` picks the input lengths that run it.
    self._compiled = (
      cuda_compile(self._step, self.device, True) if compiled else None
    )

  def zeros(self, steps: int) -> torch.Tensor:
    """[1, steps, D] zero states: a captured step's example input."""
    return torch.zeros(
      (1, steps, self.lm_head.shape[1]), dtype=self.dtype, device=self.device
    )


class StaticAdapter(AdapterBuffers):
  """A decode adapter's cached step + LM head + argmax on static buffers.

  `step(inputs, position)` decodes [1, T, D] inputs (one per stream the
  adapter reads) at positions position..; returns (last output [1, 1, D],
  its argmax token [1]). Rollback: a smaller position at the next step.
  An adapter that reads only its own outputs while drafting (B1,
  `self_fed`) has `draft(inputs, position, count)`: the step, then `count`
  one-position steps, each fed the one before's output, as one call. On
  CUDA the longest chain (the largest of `chains`) and its step are one
  graph per input length in `lengths`; a shorter chain, or one after a
  step of a length not captured, is one graph per count, after the step.
  """

  def __init__(
    self,
    module: torch.nn.Module,
    lm_head: torch.Tensor,
    num_inputs: int,
    max_len: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    lengths: Iterable[int] = (),
    self_fed: bool = False,
    chains: Iterable[int] = (),
    compile_step: bool = True,
  ):
    super().__init__(module, lm_head, num_inputs, max_len, device, dtype)
    self.graphs = capture_steps(self, lengths, compile_step)
    self.self_fed = self_fed
    chains = set(chains) if self_fed else set()
    self._longest = max(chains, default=0)
    captured = self.mode != "eager"
    self.chains = StepGraphs(
      self._chain,
      self._chain_example,
      chains if captured else (),
      self.device,
    )
    self.drafts = StepGraphs(
      self._draft,
      self._draft_example,
      lengths if captured and self._longest else (),
      self.device,
    )

  def _example(self, steps: int) -> tuple:
    x = self.zeros(steps)
    start = torch.full((1,), self.max_len - steps, device=self.device)
    return (start,) + tuple(x.clone() for _ in range(self.num_inputs))

  @torch.inference_mode()
  def _forward(self, start: torch.Tensor, *inputs: torch.Tensor):
    if self._compiled is not None and inputs[0].shape[1] == 1:
      return self._compiled(start, *inputs)
    return self._step(start, *inputs)

  def _step(self, start: torch.Tensor, *inputs: torch.Tensor):
    pos = start + self.keys[: inputs[0].shape[1]]
    y = self.module.static_step(
      *inputs, k_cache=self.k, v_cache=self.v, positions=pos
    )
    # [1, 1, D] with a [1, T, D] tensor's strides would retrace the
    # compiled one-position step for each T that feeds it (its guards
    # read strides); reshaped, every T hands it the same strides.
    y = y[:, -1:].reshape(1, 1, -1)
    logits = F.linear(y[0].to(self.lm_head.dtype), self.lm_head)
    return y, logits.argmax(-1)

  def step(self, inputs: Sequence[torch.Tensor], position: int):
    steps = inputs[0].shape[1]
    if position + steps > self.max_len:
      raise ValueError(
        f"adapter positions up to {position + steps} exceed {self.max_len}"
      )
    return self.graphs(steps, int(position), *inputs)

  def _chain_example(self, count: int) -> tuple:
    return (self.keys[self.max_len - count :].clone(), self.zeros(1))

  @torch.inference_mode()
  def _chain(self, positions: torch.Tensor, y: torch.Tensor):
    tokens = []
    for r in range(positions.shape[0]):
      y, tok = self._forward(positions[r : r + 1], y)
      tokens.append(tok)
    return torch.cat(tokens)

  def _draft_example(self, steps: int) -> tuple:
    example = self._example(steps + self._longest)
    return (example[0],) + tuple(x[:, :steps] for x in example[1:])

  @torch.inference_mode()
  def _draft(self, start: torch.Tensor, *inputs: torch.Tensor):
    y, tok = self._forward(start, *inputs)
    first = start + inputs[0].shape[1]
    rest = self._chain(first + self.keys[: self._longest], y)
    return torch.cat([tok, rest])

  def draft(self, inputs: Sequence[torch.Tensor], position: int, count: int):
    """`step(inputs, position)`, then `count` steps at the positions after
    it, the first fed the step's output, each later one the output before;
    the 1 + count tokens [1 + count]."""
    if not self.self_fed:
      raise ValueError("draft: the adapter reads more than its own outputs")
    steps = inputs[0].shape[1]
    first = position + steps
    if first + count > self.max_len:
      raise ValueError(
        f"adapter positions up to {first + count} exceed {self.max_len}"
      )
    if count == self._longest and steps in self.drafts:
      return self.drafts(steps, int(position), *inputs)
    # A shorter chain, or a catch-up of a length not captured (the prompt,
    # or the prompt and the tokens accepted during it): the step, then the
    # chain's own graph.
    y, tok = self.step(inputs, position)
    rest = self.chains(
      count, self.keys[first : first + count], y.to(self.dtype)
    )
    return torch.cat([tok, rest])

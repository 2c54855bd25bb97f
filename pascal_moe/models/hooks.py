"""One way to watch routers: forward hooks that hand each router's logits to a callback.

Why one helper: the profiler (last forward, optional router inputs, stop after the last
router), evaluation (every forward, for generation), self-sampling (target hits per step)
and the quantizer (one router, with gradients) all need the same thing, registered and
always removed the same way, so a hook can never outlive the code that installed it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from pascal_moe.models.base import router_logits

# on_logits(i, logits [N, E], args): i is the router's position in `routers`, args its forward inputs.
OnLogits = Callable[[int, torch.Tensor, tuple], None]


class StopForward(Exception):
    """Raised by a hook once everything wanted from a forward is recorded; the forward's caller catches it.

    Why: routing statistics need nothing after the last router, and block-input capture nothing
    after the last decoder layer's inputs: stopping there skips the rest of the model.
    """


@contextmanager
def router_hooks(routers: Sequence[nn.Module], on_logits: OnLogits) -> Iterator[None]:
    """Call `on_logits` after every forward of each router; hooks are removed on exit, whatever happens.

    Logits are passed as the router computed them (not detached): a caller that keeps them
    outside autograd detaches them; the quantizer backpropagates through them.  A callback
    may raise (e.g. to stop a forward early); the exception reaches the forward's caller.
    """
    handles = []
    try:
        for i, router in enumerate(routers):

            def hook(_module: nn.Module, args: tuple, output: object, i: int = i) -> None:
                on_logits(i, router_logits(output), args)

            handles.append(router.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()

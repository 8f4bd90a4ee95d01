"""Replicated experts: the storage layout ``auto`` may choose at ``parallelize`` time instead of sharding.

A replicated experts module keeps its whole weights on every rank and its own forward (which the moe backend
fuses under ``torch.compile`` like any experts module): every rank runs its own tokens through all experts, and
``DistributedDataParallel`` broadcasts the weights at construction and all-reduces (averages) their gradients
like any dense weight, so a step is exactly plain DDP's. The parameters are tagged as experts
(``is_expert_param``) but are not in DDP's ignore list, and the checkpoint functions treat them as the ordinary
parameters they are.

:func:`choose_layouts` decides per experts module: ``mode="replicate"`` replicates every module, a sharded mode
(``expert``/``data``/``tensor``) or a data x expert mesh shards every module, and ``auto`` asks the cost model
(``cost.choose_layout``) with the tokens per call: ``tokens_per_call=`` if given, else the ``[T, k]`` index
shape the ``example_inputs`` trace saw, the largest over the ranks; with no count on some rank it keeps the
module sharded. Under ``auto`` a module whose sizes cannot be sharded over the group is replicated.
"""
from __future__ import annotations

import torch

from . import cost
from .comm import Comm
from .find import Found
from .layout import Layout
from .tags import tag_module


class Replicated:
    """What ``parallelize`` keeps on a replicated experts module (``module._moe_replicated``): its path, size,
    the layout choice with its reason and estimates, the rates it was made with, the mode set (``"auto"`` or
    ``"replicate"``) and the process group (for ``set_parallel``'s agreement; None after unpickling)."""

    def __init__(self, path: str, experts: int, world_size: int, choice: cost.LayoutChoice, rates: cost.Rates,
                 rates_given: bool, mode: str, group=None):
        self.path, self.experts, self.world_size = path, experts, world_size
        self.choice, self.rates, self.rates_given = choice, rates, rates_given
        self.mode, self.group = mode, group

    def valid_modes(self) -> tuple[str, ...]:
        return ("auto", "replicate")

    def mode_problem(self, mode: str) -> str | None:
        """Why this module cannot run ``mode`` (one of ``MODES``), or None (without the module's path)."""
        if mode in self.valid_modes():
            return None
        if self.choice.by != "auto":
            how = f"by parallelize({self.choice.by})"
        elif self.choice.estimates:
            how = "by auto at parallelize time (the cost model estimated replicated cheaper)"
        else:
            how = f"by auto at parallelize time ({self.choice.reason})"
        return (f"its experts were kept replicated {how}, so there are no shards to run {mode!r} on; to shard "
                f"them call parallelize(model, mode={mode!r}) (storage is chosen once, by parallelize), or use "
                "'auto'")

    # a deep copy of the model shares the record (and the process group), like ParallelState
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):  # torch.save(model): everything but the process group
        return (Replicated, (self.path, self.experts, self.world_size, self.choice, self.rates, self.rates_given,
                             self.mode))


def agree_tokens(world: Comm, tokens: list[int | None], device: torch.device) -> list[int | None]:
    """Per experts module, the largest tokens per call over the group's ranks; None where any rank has none
    (one small all-gather, so every rank decides alike)."""
    mine = torch.tensor([-1 if t is None else int(t) for t in tokens], dtype=torch.long, device=device)
    table = world.all_gather(mine).view(world.size, len(tokens)).cpu()
    return [None if bool((table[:, j] < 0).any()) else int(table[:, j].max()) for j in range(len(tokens))]


def _layout(f: Found, W: int) -> Layout:
    s, slots = f.match.spec, f.match.slots
    return Layout(s.num_experts, W, s.hidden, s.ffn, s.gate_layout, has_b1=bool(slots["b_up"]),
                  has_b2=bool(slots["b_down"]))


def choose_layouts(found: list[Found], mode: str, world: Comm, L: int, rates: cost.Rates,
                   tokens_per_call: int | None, can_hierarchical: bool, mesh: bool,
                   unshardable: dict[int, str]) -> list[cost.LayoutChoice]:
    """The layout of each found experts module (same order), the same on every rank of ``world``: a collective
    under ``auto`` (``agree_tokens``). ``unshardable``: index in ``found`` -> why its sizes cannot be sharded
    (only under ``auto`` without a mesh: replicated then). ``rates`` are the agreed (or given) rates."""
    tokens: list[int | None] = [None] * len(found)
    if mode == "auto" and not mesh:
        device = next(found[0].module.parameters()).device
        tokens = agree_tokens(world, [tokens_per_call or f.tokens for f in found], device)
    out = []
    for i, (f, t) in enumerate(zip(found, tokens)):
        if mode == "replicate":
            out.append(cost.LayoutChoice("replicated", "mode='replicate'", ""))
        elif i in unshardable:
            out.append(cost.LayoutChoice("replicated", "auto", f"{unshardable[i]}; kept whole on every rank"))
        elif mode != "auto":
            out.append(cost.LayoutChoice("sharded", f"mode={mode!r}", ""))
        elif mesh:
            out.append(cost.LayoutChoice("sharded", "auto", "a data x expert mesh was given (mesh= or dp_group=): "
                                         "the experts are sharded over its experts dimension"))
        else:
            itemsize = next(f.module.parameters()).element_size()
            out.append(cost.choose_layout(_layout(f, world.size), t, f.top_k, rates, L, itemsize,
                                          can_hierarchical))
    return out


def replicate_module(f: Found, choice: cost.LayoutChoice, world: Comm, rates: cost.Rates, rates_given: bool,
                     mode: str) -> None:
    """Keep ``f``'s module whole, with its own forward: tag its parameters as experts (not ignored by DDP) and
    record the choice. Its weights are left as they are: DDP broadcasts them from rank 0 like the dense ones."""
    tag_module(f.module, f.path, sharded=False)
    f.module._moe_replicated = Replicated(f.path or "<model>", f.match.spec.num_experts, world.size, choice, rates,
                                          rates_given, "replicate" if mode == "replicate" else "auto", world.group)

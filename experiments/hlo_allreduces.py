r"""The all-reduces of a compiled XLA program, read from its HLO text.

:mod:`experiments.communication` compiles each optimizer's round and checks
its all-reduces against the exact accounting; this module reads them. With
two devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``)::

  def round_(x):  # a scan of 4 steps, each all-reducing, then one coupling
    step = lambda c, _: (c + jax.lax.psum(c, 'i'), None)
    return jax.lax.pmean(jax.lax.scan(step, x, None, length=4)[0], 'i')
  hlo = jax.pmap(round_, axis_name='i').lower(jnp.ones((2, 3))).compile().as_text()
  hlo_allreduces.count_allreduces(hlo)
  # {'in_loop': 1, 'outside': 1, 'in_loop_elements': 3, 'outside_elements': 3}

An instruction inside a while loop (the ``lax.scan`` of ``L`` steps) runs
``L`` times a round, the others once; its ``replica_groups`` say which devices
reduce together, and so whether it stays inside an island of devices or
crosses between islands (:func:`island_traffic`).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple, Sequence

import numpy as np

_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_ALLREDUCE = re.compile(r'%?([\w.\-]+)\s*=\s*(.+?)\s+all-reduce(?:-start)?\(')
_SHAPE = re.compile(r'\b(?:f|bf|s|u|pred)\d*\[([\d,]*)\]')
_CALLED = re.compile(r'(?:body|condition|to_apply|calls|branch_computations|'
                     r'true_computation|false_computation)=\{?%?([\w.\-]+(?:,\s*%?[\w.\-]+)*)')
_GROUPS_LIST = re.compile(r'replica_groups=\{((?:\s*\{[\d,\s]*\}\s*,?)*)\}')
_GROUPS_IOTA = re.compile(
    r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?')


class AllReduce(NamedTuple):
  """One all-reduce instruction of a compiled HLO module.

  Attributes:
    name: the instruction's name (``all-reduce.3``, ``psum.12``).
    in_loop: whether it lies in a while loop's body (or a computation the
      body calls): in a round, inside the ``lax.scan`` of ``L`` steps, so it
      runs ``L`` times a round; the others run once.
    elements: its payload, in elements (summed over the operands of a
      combined all-reduce); each of its groups reduces that many.
    groups: its replica groups, device ids (positions in the module's device
      assignment); each group all-reduces among itself, in parallel with the
      others. ``()`` for ``replica_groups={}``: all devices in one group.
  """

  name: str
  in_loop: bool
  elements: int
  groups: tuple[tuple[int, ...], ...]


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """HLO module text -> {computation name: its instruction lines}."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line.strip()) if not line.startswith(' ') else None
    if match:
      current = match.group(1)
      computations[current] = []
    elif current is not None and line.strip() and line.strip() != '}':
      computations[current].append(line)
  return computations


def _loop_computations(computations: dict[str, list[str]]) -> set[str]:
  """The names of the while loops' bodies and of every computation they call."""
  called = {name: {c.strip().lstrip('%') for m in _CALLED.findall('\n'.join(lines))
                   for c in m.split(',')} for name, lines in computations.items()}
  loop_bodies = set()
  for lines in computations.values():
    for line in lines:
      if ' while(' in line:
        loop_bodies.update(re.findall(r'body=%?([\w.\-]+)', line))
  in_loop, frontier = set(), list(loop_bodies)
  while frontier:
    name = frontier.pop()
    if name in in_loop:
      continue
    in_loop.add(name)
    frontier.extend(called.get(name, ()))
  return in_loop


def _elements(result_type: str) -> int:
  return sum(math.prod(int(d) for d in dims.split(',') if d) for dims in
             _SHAPE.findall(result_type))


def replica_groups(instruction: str) -> tuple[tuple[int, ...], ...]:
  """The ``replica_groups`` of one HLO instruction's text, as tuples of device ids.

  Reads the explicit form, ``replica_groups={{0,1},{2,3}}``, and XLA's iota
  form ``replica_groups=[G,S]<=[d0,d1,...]T(p0,p1,...)``: ``arange(prod(d))``
  reshaped to ``d``, transposed by ``p`` (no ``T(...)``: not transposed) and
  reshaped to ``G`` groups of ``S``; e.g. ``[4,2]<=[2,4]T(1,0)`` is
  ``{{0,4},{1,5},{2,6},{3,7}}``. Returns ``()`` for ``replica_groups={}`` or
  none (all devices in one group).
  """
  match = _GROUPS_IOTA.search(instruction)
  if match:
    num_groups, size = int(match.group(1)), int(match.group(2))
    dims = [int(d) for d in match.group(3).split(',')]
    perm = ([int(p) for p in match.group(4).split(',')] if match.group(4)
            else list(range(len(dims))))
    if num_groups * size != math.prod(dims) or sorted(perm) != list(range(len(dims))):
      raise ValueError(f'replica_groups={match.group(0)[len("replica_groups="):]!r}: '
                       f'[groups, size] must hold prod(dims) ids and T(...) permute the dims.')
    ids = np.arange(math.prod(dims)).reshape(dims).transpose(perm).reshape(num_groups, size)
    return tuple(tuple(int(i) for i in group) for group in ids)
  match = _GROUPS_LIST.search(instruction)
  if match:
    return tuple(tuple(int(i) for i in group.split(',') if i.strip())
                 for group in re.findall(r'\{([\d,\s]*)\}', match.group(1)))
  return ()


def allreduce_instructions(hlo_text: str) -> list[AllReduce]:
  """The all-reduce instructions of a compiled HLO module, in text order.

  An instruction is in a loop when its computation is a while loop's body or
  is called from one (transitively); its payload counts the elements of its
  result (all operands of a combined all-reduce; ``all-reduce-start`` of an
  asynchronous pair, not its ``-done``).
  """
  computations = _computations(hlo_text)
  in_loop = _loop_computations(computations)
  instructions = []
  for name, lines in computations.items():
    for line in lines:
      match = _ALLREDUCE.search(line)
      if match:
        instructions.append(AllReduce(match.group(1), name in in_loop,
                                      _elements(match.group(2)), replica_groups(line)))
  return instructions


def count_allreduces(hlo_text: str) -> dict[str, int]:
  """All-reduce instructions of a compiled module, inside and outside its loops.

  Returns ``in_loop`` / ``outside`` (instruction counts) and
  ``in_loop_elements`` / ``outside_elements`` (their payloads, in elements).
  Loop bodies include every computation they call.
  """
  return tally(allreduce_instructions(hlo_text))


def tally(instructions: Sequence[AllReduce]) -> dict[str, int]:
  """``count_allreduces``'s counts of instructions already parsed."""
  counts = {'in_loop': 0, 'outside': 0, 'in_loop_elements': 0, 'outside_elements': 0}
  for instruction in instructions:
    where = 'in_loop' if instruction.in_loop else 'outside'
    counts[where] += 1
    counts[f'{where}_elements'] += instruction.elements
  return counts


def island_of_groups(groups: Sequence[Sequence[int]], islands: Sequence[Sequence[int]]) -> str:
  """``'inside'`` when every group lies inside one island, else ``'between'``.

  `islands` lists each island's device ids (as the HLO numbers them); empty
  `groups` (``replica_groups={}``) is one group of all the islands' devices.
  Raises ValueError for a device id of no island.
  """
  where = {device: i for i, island in enumerate(islands) for device in island}
  for group in groups or [list(where)]:
    unknown = [device for device in group if device not in where]
    if unknown:
      raise ValueError(f'device {unknown[0]} of replica group {tuple(group)} is in none of the '
                       f'islands {[list(island) for island in islands]}.')
    if len({where[device] for device in group}) > 1:
      return 'between'
  return 'inside'


def island_traffic(instructions: Sequence[AllReduce], islands: Sequence[Sequence[int]],
                   L: int) -> dict[str, int]:
  """A compiled round's all-reduces split into inside and between islands.

  For ``w`` in ``inside`` / ``between`` (:func:`island_of_groups`):
  ``w_in_loop`` / ``w_outside`` count the instructions, ``w_in_loop_elements``
  / ``w_outside_elements`` sum their payloads (what one group reduces);
  ``w_per_round`` counts the all-reduces a round runs, each group of an
  instruction one (``L`` runs of those in the loop, one of the others), and
  ``w_elements_per_round`` their elements: ``sum(runs * groups * elements)``.
  """
  if L < 1:
    raise ValueError(f'L={L!r} must be >= 1.')
  traffic = {f'{where}_{key}': 0 for where in ('inside', 'between')
             for key in ('in_loop', 'outside', 'in_loop_elements', 'outside_elements',
                         'per_round', 'elements_per_round')}
  for instruction in instructions:
    where = island_of_groups(instruction.groups, islands)
    loop = 'in_loop' if instruction.in_loop else 'outside'
    runs = (L if instruction.in_loop else 1) * max(1, len(instruction.groups))
    traffic[f'{where}_{loop}'] += 1
    traffic[f'{where}_{loop}_elements'] += instruction.elements
    traffic[f'{where}_per_round'] += runs
    traffic[f'{where}_elements_per_round'] += runs * instruction.elements
  return traffic

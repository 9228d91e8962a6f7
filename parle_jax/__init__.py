"""parle_jax: Parle (arXiv:1707.00424) in JAX, as optax transforms and fused rounds.

Layers, each importing only from those before it:

* :mod:`parle_jax.optim` -- Parle as pure optax transforms (no Flax, no data),
  assembled from :mod:`parle_jax.entropy_sgd` (the inner step) and
  :mod:`parle_jax.elastic` (scoping, the coupling, Elastic-SGD), with argument
  checks from :mod:`parle_jax.checks`.
* :mod:`parle_jax.local_updates` -- local SGD and DiLoCo, as round parts like
  Parle's (for comparison).
* :mod:`parle_jax.replicas` -- n replicas over devices (or islands of devices):
  ``pmap`` or ``shard_map`` over devices,
  ``vmap`` or a loop locally; the reference (mean) params.
* :mod:`parle_jax.rounds` -- one fused, donated dispatch per round:
  ``lax.scan`` over ``L`` inner steps, then the coupling.
* :mod:`parle_jax.nnx` -- Flax NNX modules in the rounds; imported on its own
  (``from parle_jax import nnx as parle_nnx``), so that the package itself
  never imports ``flax.nnx``.
"""

from parle_jax.local_updates import DiLoCoState, diloco, local_sgd
from parle_jax.optim import (ElasticCouplingState, ElasticSGDState,
                             EntropySGDInnerState, ParleParts, ParleState, RoundParts,
                             elastic_coupling, elastic_sgd, entropy_sgd_inner,
                             parle, parle_parts, reference_params, scoping)
from parle_jax.replicas import MAPPINGS, Replicas
from parle_jax.rounds import (ReplicaState, RoundFn, init_replicas, make_round,
                              parle_round, parts_round)

__all__ = [
    'DiLoCoState', 'ElasticCouplingState', 'ElasticSGDState', 'EntropySGDInnerState',
    'MAPPINGS', 'ParleParts', 'ParleState', 'ReplicaState', 'Replicas', 'RoundFn', 'RoundParts',
    'diloco', 'elastic_coupling', 'elastic_sgd', 'entropy_sgd_inner', 'init_replicas',
    'local_sgd', 'make_round', 'parle', 'parle_parts', 'parle_round', 'parts_round',
    'reference_params', 'scoping',
]
__version__ = '0.1.0'

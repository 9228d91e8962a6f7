"""parle_jax: Parle (Chaudhari et al., arXiv:1707.00424) in JAX/Flax."""

import setuptools

setuptools.setup(
    name='parle_jax',
    version='0.1.0',
    description='Parle: parallelizing SGD with replicas, Entropy-SGD and elastic '
                'coupling, as optax transforms with jax.pmap',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=setuptools.find_packages(include=['parle_jax', 'parle_jax.*']),
    python_requires='>=3.10',
    install_requires=['jax>=0.10', 'jaxlib>=0.10', 'optax>=0.2.5', 'chex>=0.1.90',
                      'numpy', 'absl-py'],
    extras_require={
        'flax': ['flax>=0.12'],
        'experiments': ['flax>=0.12', 'ml_collections', 'orbax-checkpoint',
                        'tensorflow-datasets', 'tensorflow-cpu', 'importlib_resources',
                        'pillow', 'tensorboard', 'tqdm', 'matplotlib', 'scipy'],
        'notebooks': ['flax>=0.12', 'matplotlib', 'tensorflow-datasets', 'jupyter'],
        'tests': ['pytest', 'pytest-xdist', 'filelock', 'flax>=0.12', 'tensorflow-datasets',
                  'ml_collections', 'matplotlib', 'nbclient', 'nbformat', 'ipykernel'],
    },
    license='Apache-2.0',
)

"""The pipeline's stages, one module each, run in this order by `diffuseg_jax.pipeline`.

Each stage module exposes `is_done(ctx) -> bool` and `run(ctx) -> None`. `STAGES` is the one list of their
names: the default `config.stages` and the pipeline's order both come from it.
"""

STAGES = ('teacher', 'student', 'autoencoder', 'diffusion', 'synthesize', 'segment', 'evaluate')

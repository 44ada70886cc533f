"""The pipeline's stages, one module each, run in this order by `diffuseg_jax.pipeline`.

Each stage module exposes `units(ctx) -> list[str]` (its units of work, run_identity.py: the stage is done
when every one is complete in this run's fingerprint) and `run(ctx) -> None` (computes the incomplete
ones). `STAGES` is the one list of their names: the default `config.stages` and the pipeline's order both
come from it.
"""

STAGES = ('teacher', 'student', 'autoencoder', 'diffusion', 'synthesize', 'segment', 'evaluate')
